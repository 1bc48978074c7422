//! GPU tests of pdx-cuda: the KV kernels against the CPU reference of pdx-kvlayout, copies, pinned memory and
//! CUDA IPC across processes. On a machine without CUDA each test prints `skipped: no CUDA driver (libcuda)
//! found` and returns; `without_cuda_every_entry_point_is_unavailable` checks that case itself.

use pdx_cuda::{
    device_count, driver, Device, DeviceBuffer, DeviceTable, IpcHandle, KvKernels, KvTensors,
    PinnedHostBuffer, Stream, SKIP_NO_CUDA,
};
use pdx_kvlayout::{pack_ref, unpack_ref, BlockLayout, KvLayout, PackSpec};
use rand::prelude::*;

/// Device 0, or `None` (after printing the skip line) when this machine has no CUDA.
fn gpu() -> Option<Device> {
    match Device::new(0) {
        Ok(d) => Some(d),
        Err(e) if e.is_unavailable() => {
            println!("{SKIP_NO_CUDA} ({e})");
            None
        }
        Err(e) => panic!("CUDA present but device 0 failed: {e}"),
    }
}

#[test]
fn without_cuda_every_entry_point_is_unavailable() {
    match driver() {
        Ok(()) => {
            // A driver is present: the entry points work instead.
            let n = device_count().expect("device count");
            println!("CUDA driver present, {n} device(s)");
        }
        Err(e) => {
            assert!(e.is_unavailable(), "{e}");
            assert!(!e.is_retryable());
            assert!(device_count().unwrap_err().is_unavailable());
            assert!(Device::new(0).unwrap_err().is_unavailable());
            assert!(Device::new(7).unwrap_err().is_unavailable());
            println!("{SKIP_NO_CUDA} ({e})");
        }
    }
}

/// One random case: layout, spec, table, tensor offsets (alignment).
struct Case {
    spec: PackSpec,
    table: Vec<u32>,
    offsets: Vec<usize>,
    staging_off: usize,
}

fn random_case(rng: &mut StdRng) -> Case {
    let nb = rng.gen_range(1..48);
    let bs = *[1u32, 2, 3, 5, 8, 16, 32].choose(rng).unwrap_or(&16);
    let heads = rng.gen_range(1..9);
    let hd = *[1u32, 3, 8, 24, 64, 128].choose(rng).unwrap_or(&64);
    let elem = *[1u32, 2, 4, 8].choose(rng).unwrap_or(&2);
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
    let nt = rng.gen_range(1..6);
    let spec = PackSpec::new(layout, nt, hs, he, sl).expect("spec");
    let mut ids: Vec<u32> = (0..nb).collect();
    ids.shuffle(rng);
    ids.truncate(rng.gen_range(0..=nb as usize));
    // Offsets that move base addresses off 16-byte alignment now and then, so every vector width runs.
    let offsets = (0..nt)
        .map(|_| *[0usize, 0, 0, 2, 4, 8, 1, 6].choose(rng).unwrap_or(&0))
        .collect();
    let staging_off = *[0usize, 0, 16, 8, 4, 2, 1].choose(rng).unwrap_or(&0);
    Case {
        spec,
        table: ids,
        offsets,
        staging_off,
    }
}

/// Runs pack then unpack of `case` on the GPU and checks every byte against the CPU reference, outputs
/// poisoned first, guard bytes around them untouched.
fn check_case(dev: &Device, k: &KvKernels, s: &Stream, case: &Case, rng: &mut StdRng) {
    const GUARD: usize = 64;
    let spec = &case.spec;
    let tb = spec.tensor().tensor_bytes() as usize;
    let nt = spec.num_tensors() as usize;
    let host: Vec<Vec<u8>> = (0..nt)
        .map(|_| (0..tb).map(|_| rng.gen()).collect())
        .collect();
    let bufs: Vec<DeviceBuffer> = case
        .offsets
        .iter()
        .map(|off| DeviceBuffer::new(dev, off + tb + GUARD).expect("alloc"))
        .collect();
    for ((b, off), h) in bufs.iter().zip(&case.offsets).zip(&host) {
        s.upload(b, *off, h).expect("upload");
    }
    let tensors = KvTensors::new(
        s,
        *spec.tensor(),
        &bufs
            .iter()
            .cloned()
            .zip(case.offsets.iter().copied())
            .collect::<Vec<_>>(),
    )
    .expect("tensors");
    let table = DeviceTable::new(s, &case.table, spec.tensor().num_blocks()).expect("table");
    let sb = spec.staging_bytes(case.table.len()).expect("size") as usize;
    let staging = DeviceBuffer::new(dev, case.staging_off + sb + GUARD).expect("staging");
    s.memset(&staging, 0, staging.len(), 0xA5).expect("poison");

    let mut want = vec![0u8; sb];
    let refs: Vec<&[u8]> = host.iter().map(|h| h.as_slice()).collect();
    pack_ref(spec, &refs, &case.table, &mut want).expect("reference");
    k.pack(s, spec, &tensors, &table, &staging, case.staging_off)
        .expect("pack");
    let mut got = vec![0u8; staging.len()];
    s.download(&staging, 0, &mut got).expect("download");
    assert!(
        got[..case.staging_off].iter().all(|&x| x == 0xA5),
        "pack wrote before the staging range: {spec:?}"
    );
    assert!(
        got[case.staging_off + sb..].iter().all(|&x| x == 0xA5),
        "pack wrote past the staging range: {spec:?}"
    );
    if got[case.staging_off..case.staging_off + sb] != want[..] {
        let first = (0..sb)
            .find(|&i| got[case.staging_off + i] != want[i])
            .unwrap_or(0);
        panic!(
            "pack differs from the reference at staging byte {first} of {sb}: {spec:?} table {:?}",
            case.table
        );
    }

    // Scatter back into poisoned tensors: compare with the reference scatter into poisoned host copies.
    for b in &bufs {
        s.memset(b, 0, b.len(), 0xC3).expect("poison");
    }
    k.unpack(s, spec, &tensors, &table, &staging, case.staging_off)
        .expect("unpack");
    let mut expect: Vec<Vec<u8>> = (0..nt).map(|_| vec![0xC3u8; tb]).collect();
    let mut out: Vec<&mut [u8]> = expect.iter_mut().map(|e| e.as_mut_slice()).collect();
    unpack_ref(spec, &want, &case.table, &mut out).expect("reference unpack");
    for (t, (b, off)) in bufs.iter().zip(&case.offsets).enumerate() {
        let mut got = vec![0u8; b.len()];
        s.download(b, 0, &mut got).expect("download");
        assert!(
            got[..*off].iter().all(|&x| x == 0xC3),
            "unpack wrote before tensor {t}"
        );
        assert!(
            got[off + tb..].iter().all(|&x| x == 0xC3),
            "unpack wrote past tensor {t}"
        );
        assert!(
            got[*off..off + tb] == expect[t][..],
            "unpack differs from the reference in tensor {t}: {spec:?}"
        );
    }
}

#[test]
fn kernels_match_the_cpu_reference_on_random_layouts() {
    let Some(dev) = gpu() else { return };
    let k = KvKernels::load(&dev).expect("load kernels");
    println!(
        "kernels from {:?} on {}",
        k.source(),
        dev.name().unwrap_or_default()
    );
    let s = Stream::new(&dev).expect("stream");
    let seed = std::env::var("PDX_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..300 {
        let case = random_case(&mut rng);
        if i % 50 == 0 {
            println!("case {i}: {:?}, {} blocks", case.spec, case.table.len());
        }
        check_case(&dev, &k, &s, &case, &mut rng);
    }
}

#[test]
fn kernels_match_the_reference_at_benchmark_size() {
    // The `pdx bench kernels` shape: 4096 scattered 16 KiB blocks (16 tokens × 8 heads × 64 × fp16), plus the
    // same with an NHD → HND transform and a head slice.
    let Some(dev) = gpu() else { return };
    let k = KvKernels::load(&dev).expect("load kernels");
    let s = Stream::new(&dev).expect("stream");
    let mut rng = StdRng::seed_from_u64(7);
    let layout = KvLayout::new(8192, 16, 8, 64, 2, BlockLayout::Nhd).expect("layout");
    let mut ids: Vec<u32> = (0..8192).collect();
    ids.shuffle(&mut rng);
    ids.truncate(4096);
    for spec in [
        PackSpec::full(layout, 1).expect("spec"),
        PackSpec::new(layout, 1, 0, 8, BlockLayout::Hnd).expect("spec"),
        PackSpec::new(layout, 1, 2, 6, BlockLayout::Nhd).expect("spec"),
    ] {
        let case = Case {
            spec,
            table: ids.clone(),
            offsets: vec![0],
            staging_off: 0,
        };
        check_case(&dev, &k, &s, &case, &mut rng);
    }
}

#[test]
fn bad_tables_are_errors_before_any_launch() {
    let Some(dev) = gpu() else { return };
    let s = Stream::new(&dev).expect("stream");
    assert!(DeviceTable::new(&s, &[0, 9], 4).is_err());
    let k = KvKernels::load(&dev).expect("kernels");
    let layout = KvLayout::new(4, 2, 2, 8, 2, BlockLayout::Nhd).expect("layout");
    let spec = PackSpec::full(layout, 1).expect("spec");
    let buf = DeviceBuffer::new(&dev, layout.tensor_bytes() as usize).expect("alloc");
    let tensors = KvTensors::new(&s, layout, &[(buf, 0)]).expect("tensors");
    let dup = DeviceTable::new(&s, &[1, 1], 4).expect("duplicates can be packed");
    let staging = DeviceBuffer::new(&dev, 2 * layout.block_bytes() as usize).expect("staging");
    k.pack(&s, &spec, &tensors, &dup, &staging, 0)
        .expect("pack with duplicates");
    assert!(
        k.unpack(&s, &spec, &tensors, &dup, &staging, 0).is_err(),
        "a scatter to one block twice must be refused"
    );
    let table = DeviceTable::new(&s, &[0, 1, 2], 4).expect("table");
    assert!(
        k.pack(&s, &spec, &tensors, &table, &staging, 0).is_err(),
        "staging too small must be refused"
    );
    s.synchronize().expect("no fault");
}

#[test]
fn copies_between_device_pinned_and_peer_memory() {
    let Some(dev) = gpu() else { return };
    let s = Stream::new(&dev).expect("stream");
    let n = 3 << 20;
    let data: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
    let pinned = PinnedHostBuffer::new(&dev, n).expect("pinned");
    pinned.memory().write_at(0, &data).expect("write");
    let d = DeviceBuffer::new(&dev, n).expect("alloc");
    s.copy(&d, 0, &pinned, 0, n).expect("h2d");
    let back = PinnedHostBuffer::new(&dev, n).expect("pinned");
    s.copy(&back, 0, &d, 0, n).expect("d2h");
    s.synchronize().expect("sync");
    let mut out = vec![0u8; n];
    back.memory().read_at(0, &mut out).expect("read");
    assert!(out == data);
    assert!(
        s.copy(&d, 1, &pinned, 0, n).is_err(),
        "out-of-bounds copy must be refused"
    );
    if device_count().unwrap_or(1) >= 2 {
        let dev1 = Device::new(1).expect("device 1");
        let _ = dev.enable_peer_access(&dev1);
        let d1 = DeviceBuffer::new(&dev1, n).expect("alloc on 1");
        s.copy(&d1, 0, &d, 0, n).expect("peer copy");
        let mut out = vec![0u8; n];
        Stream::new(&dev1)
            .expect("stream")
            .download(&d1, 0, &mut out)
            .and_then(|_| s.synchronize())
            .expect("read");
        assert!(out == data);
    } else {
        println!("peer copy: skipped, one GPU");
    }
}

/// The child side of `ipc_across_processes` (runs only when started by it).
#[test]
fn ipc_child() {
    let Ok(handle) = std::env::var("PDX_IPC_HANDLE") else {
        return;
    };
    let h: IpcHandle = serde_json::from_str(&handle).expect("handle json");
    let dev = Device::new(0).expect("device");
    let mem = h.open(&dev).expect("open IPC handle");
    let s = Stream::new(&dev).expect("stream");
    let mut got = vec![0u8; mem.len()];
    s.download(&mem, 0, &mut got).expect("read peer memory");
    assert!(
        got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8),
        "child saw other bytes"
    );
    s.memset(&mem, 0, 4096, 0x42).expect("write peer memory");
    s.synchronize().expect("sync");
}

#[test]
fn ipc_across_processes() {
    let Some(dev) = gpu() else { return };
    let n = 1 << 20;
    let buf = DeviceBuffer::new(&dev, n).expect("alloc");
    let s = Stream::new(&dev).expect("stream");
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    s.upload(&buf, 0, &data).expect("upload");
    let h = buf.ipc_handle().expect("export");
    assert_eq!(h.bytes().len(), IpcHandle::BYTES);
    // The handle survives serialisation (it travels in agent metadata).
    let json = serde_json::to_string(&h).expect("json");
    assert_eq!(serde_json::from_str::<IpcHandle>(&json).expect("parse"), h);
    let status = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", "ipc_child", "--nocapture"])
        .env("PDX_IPC_HANDLE", &json)
        .status()
        .expect("spawn child");
    assert!(status.success(), "child failed");
    let mut got = vec![0u8; 8192];
    s.download(&buf, 0, &mut got).expect("download");
    assert!(
        got[..4096].iter().all(|&b| b == 0x42),
        "the child's write is visible"
    );
    assert_eq!(got[4096..], data[4096..8192]);
}

/// The child side of `caller_memory_by_pointer_across_processes`: opens the sub-range's handle, checks its bytes,
/// overwrites them.
#[test]
fn ipc_sub_range_child() {
    let Ok(handle) = std::env::var("PDX_IPC_SUB_HANDLE") else {
        return;
    };
    let h: IpcHandle = serde_json::from_str(&handle).expect("handle json");
    let dev = Device::new(0).expect("device");
    let mem = h.open(&dev).expect("open IPC handle");
    assert_eq!(mem.len() as u64, h.len());
    let s = Stream::new(&dev).expect("stream");
    let mut got = vec![0u8; mem.len()];
    s.download(&mem, 0, &mut got).expect("read peer memory");
    assert!(
        got.iter().enumerate().all(|(i, &b)| b == (i % 253) as u8),
        "child saw other bytes (the offset was not honoured)"
    );
    s.memset(&mem, 0, mem.len(), 0x5a)
        .expect("write peer memory");
    s.synchronize().expect("sync");
}

#[test]
fn caller_memory_by_pointer_across_processes() {
    let Some(dev) = gpu() else { return };
    // The "engine's" allocation; the registered range is a sub-range of it, as a KV tensor inside a block of
    // PyTorch's caching allocator.
    let whole = 4 << 20;
    let (off, n) = (1 << 20, 1 << 20);
    let engine = DeviceBuffer::new(&dev, whole).expect("alloc");
    let s = Stream::new(&dev).expect("stream");
    s.memset(&engine, 0, whole, 0x11).expect("memset");
    s.synchronize().expect("sync");
    // SAFETY: `engine` owns the allocation and outlives `sub` (dropped at the end of this test, after `sub`).
    let sub =
        unsafe { DeviceBuffer::from_raw(engine.addr() + off as u64, n, 0) }.expect("from_raw");
    assert!(!sub.is_owned() && engine.is_owned());
    // Validation: past the end of the allocation, wrong device, host memory.
    let refused = |ptr: u64, len: usize, device: u32| {
        // SAFETY: each call below names a range that validation refuses, so nothing is ever wrapped or accessed.
        unsafe { DeviceBuffer::from_raw(ptr, len, device) }.is_err()
    };
    assert!(refused(engine.addr() + (whole - 16) as u64, 32, 0));
    assert!(refused(engine.addr(), 16, 1));
    let host = vec![0u8; 4096];
    assert!(refused(host.as_ptr() as u64, 4096, 0));

    let data: Vec<u8> = (0..n).map(|i| (i % 253) as u8).collect();
    s.upload(&sub, 0, &data).expect("upload");
    let h = sub.ipc_handle().expect("export");
    assert_eq!((h.offset(), h.len()), (off as u64, n as u64));
    let json = serde_json::to_string(&h).expect("json");
    let status = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", "ipc_sub_range_child", "--nocapture"])
        .env("PDX_IPC_SUB_HANDLE", &json)
        .status()
        .expect("spawn child");
    assert!(status.success(), "child failed");
    drop(sub); // Not freed: the engine's allocation is still usable below.
    let mut got = vec![0u8; whole];
    s.download(&engine, 0, &mut got).expect("download");
    assert!(
        got[..off].iter().all(|&b| b == 0x11),
        "bytes before the range untouched"
    );
    assert!(
        got[off..off + n].iter().all(|&b| b == 0x5a),
        "the child wrote the range in place"
    );
    assert!(
        got[off + n..].iter().all(|&b| b == 0x11),
        "bytes after the range untouched"
    );
}

#[test]
fn ipc_handles_are_validated() {
    assert!(IpcHandle::from_parts(&[0; 63], 10, 0, 0).is_err());
    assert!(IpcHandle::from_parts(&[0; 64], 0, 0, 0).is_err());
    let h = IpcHandle::from_parts(&[1; 64], 10, 0, 0).expect("valid");
    let mut v = serde_json::to_value(&h).expect("json");
    v["bytes"] = serde_json::json!([1, 2, 3]);
    assert!(
        serde_json::from_value::<IpcHandle>(v).is_err(),
        "a short handle must not deserialise"
    );
}
