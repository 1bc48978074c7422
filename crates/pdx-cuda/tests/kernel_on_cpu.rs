//! Runs the real kernel source, `kernels/kv_pack.cu`, on the CPU (compiled as C++ with
//! `kernels/host/kv_host.cpp`, every CTA and thread in turn, alignment checked) against the CPU reference of
//! pdx-kvlayout on random layouts, tables, head ranges, orders and alignments. This checks the kernel's index
//! arithmetic and coverage without a GPU; the PTX loads/stores themselves only run in the GPU tests. Skipped
//! (with a message) where no C++ compiler is installed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use pdx_kvlayout::{pack_ref, unpack_ref, BlockLayout, KvLayout, PackSpec};
use rand::prelude::*;

fn compile_harness() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let src = root.join("kernels/host/kv_host.cpp");
    let exe = std::env::temp_dir().join(format!("pdx-kv-host-{}", std::process::id()));
    for cxx in ["c++", "g++", "clang++"] {
        let out = Command::new(cxx)
            .args(["-std=c++17", "-O1", "-w", "-o"])
            .arg(&exe)
            .arg(&src)
            .output();
        match out {
            Ok(o) if o.status.success() => return Some(exe),
            Ok(o) => panic!(
                "{cxx} failed on kv_host.cpp:\n{}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(_) => continue,
        }
    }
    println!("skipped: no C++ compiler (c++, g++, clang++) to build kernels/host/kv_host.cpp");
    None
}

/// Runs one launch through the harness; returns (tensors, staging) after it.
#[allow(clippy::too_many_arguments)]
fn run(
    exe: &Path,
    spec: &PackSpec,
    pack: bool,
    table: &[u32],
    toffs: &[u64],
    soff: u64,
    tensors: &[Vec<u8>],
    staging: &[u8],
) -> (Vec<Vec<u8>>, Vec<u8>) {
    let align = toffs.iter().fold(soff, |a, o| a | o);
    let args = spec.plan(table.len(), align).expect("plan");
    let tb = spec.tensor().tensor_bytes();
    let mut input = Vec::new();
    for v in [
        args.unit,
        pack as u64,
        spec.num_tensors() as u64,
        tb,
        table.len() as u64,
        staging.len() as u64,
    ] {
        input.extend_from_slice(&v.to_le_bytes());
    }
    let a = [
        args.tensors,
        args.table,
        args.staging,
        args.pairs,
        args.num_tensors,
        args.num_blocks,
        args.block_size,
        args.heads,
        args.head_start,
        args.head_count,
        args.row_bytes,
        args.tensor_hnd,
        args.staging_hnd,
        args.run_rows,
        args.run_units,
        args.units_per_block,
        args.staged_block_bytes,
        args.block_bytes,
        args.unit,
        args.chunks,
    ];
    for v in a.iter().chain(toffs).chain([&soff]) {
        input.extend_from_slice(&v.to_le_bytes());
    }
    for t in tensors {
        input.extend_from_slice(t);
    }
    for b in table {
        input.extend_from_slice(&b.to_le_bytes());
    }
    input.extend_from_slice(staging);
    let mut child = Command::new(exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("harness");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("harness output");
    writer.join().expect("writer").expect("write input");
    assert!(
        out.status.success(),
        "harness failed ({}) for {spec:?} unit {}",
        out.status,
        args.unit
    );
    let mut rest = &out.stdout[..];
    let mut ts = Vec::new();
    for _ in 0..spec.num_tensors() {
        ts.push(rest[..tb as usize].to_vec());
        rest = &rest[tb as usize..];
    }
    assert_eq!(rest.len(), staging.len());
    (ts, rest.to_vec())
}

#[test]
fn kernel_source_matches_the_reference_on_the_cpu() {
    let Some(exe) = compile_harness() else { return };
    let mut rng = StdRng::seed_from_u64(0xC0DE);
    let mut widths = std::collections::BTreeSet::new();
    for _ in 0..150 {
        let nb = rng.gen_range(1..10);
        let bs = *[1u32, 2, 3, 16].choose(&mut rng).unwrap_or(&2);
        let heads = rng.gen_range(1..6);
        let hd = *[1u32, 3, 8, 64].choose(&mut rng).unwrap_or(&8);
        let elem = *[1u32, 2, 4, 8].choose(&mut rng).unwrap_or(&2);
        let tl = if rng.gen() {
            BlockLayout::Hnd
        } else {
            BlockLayout::Nhd
        };
        let sl = if rng.gen() {
            BlockLayout::Hnd
        } else {
            BlockLayout::Nhd
        };
        let layout = KvLayout::new(nb, bs, heads, hd, elem, tl).expect("layout");
        let hs = rng.gen_range(0..heads);
        let he = rng.gen_range(hs + 1..=heads);
        let nt = rng.gen_range(1..4);
        let spec = PackSpec::new(layout, nt, hs, he, sl).expect("spec");
        let mut table: Vec<u32> = (0..nb).collect();
        table.shuffle(&mut rng);
        table.truncate(rng.gen_range(0..=nb as usize));
        let toffs: Vec<u64> = (0..nt)
            .map(|_| *[0u64, 0, 16, 2, 4, 8, 1].choose(&mut rng).unwrap_or(&0))
            .collect();
        let soff = *[0u64, 0, 32, 8, 1].choose(&mut rng).unwrap_or(&0);
        widths.insert(
            spec.plan(table.len(), toffs.iter().fold(soff, |a, o| a | o))
                .expect("plan")
                .unit,
        );

        let tb = layout.tensor_bytes() as usize;
        let tensors: Vec<Vec<u8>> = (0..nt)
            .map(|_| (0..tb).map(|_| rng.gen()).collect())
            .collect();
        let sb = spec.staging_bytes(table.len()).expect("size") as usize;
        let mut want = vec![0u8; sb];
        let refs: Vec<&[u8]> = tensors.iter().map(|t| t.as_slice()).collect();
        pack_ref(&spec, &refs, &table, &mut want).expect("reference");
        let (_, got) = run(
            &exe,
            &spec,
            true,
            &table,
            &toffs,
            soff,
            &tensors,
            &vec![0xA5; sb],
        );
        assert!(
            got == want,
            "pack differs from the reference: {spec:?} table {table:?}"
        );

        let poisoned: Vec<Vec<u8>> = (0..nt).map(|_| vec![0xC3; tb]).collect();
        let mut expect = poisoned.clone();
        let mut e: Vec<&mut [u8]> = expect.iter_mut().map(|t| t.as_mut_slice()).collect();
        unpack_ref(&spec, &want, &table, &mut e).expect("reference unpack");
        let (got, _) = run(&exe, &spec, false, &table, &toffs, soff, &poisoned, &want);
        assert!(
            got == expect,
            "unpack differs from the reference: {spec:?} table {table:?}"
        );
    }
    let _ = std::fs::remove_file(&exe);
    assert_eq!(
        widths.into_iter().collect::<Vec<_>>(),
        vec![1, 2, 4, 8, 16],
        "every kernel width ran"
    );
}
