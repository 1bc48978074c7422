//! Per-call cost of the C API over the Rust API it wraps: the same prepared 64 × 4 KiB READ between two agents of
//! this process (`local` transport, done inside `post`), posted through `pdx_post_xfer_req` and through
//! `XferRequest::post`, interleaved in rounds; and `pdx_get_xfer_status` against `XferRequest::status`. Prints p50
//! and p99 in µs. Run with `cargo run --release -p pdx-capi --example overhead`.

use std::time::Instant;

use pdx::*;
use pdx_transfer::{Agent, AgentConfig, XferDescList, XferOp, XferOptions};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 64;
const ROUNDS: usize = 20;
const PER_ROUND: usize = 1000;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p) as usize]
}

fn main() {
    // Rust side: two agents, a registered region each, one prepared request.
    let target = Agent::new(AgentConfig::new("ovh-target")).unwrap();
    let init = Agent::new(AgentConfig::new("ovh-init")).unwrap();
    // Heap memory registered by pointer on both sides, as the C side does below.
    let rust_bufs = [
        vec![0u8; (BLOCK * BLOCKS + 4096) as usize],
        vec![0u8; (BLOCK * BLOCKS + 4096) as usize],
    ];
    let reg = |a: &Agent, v: &Vec<u8>| {
        let p = (v.as_ptr() as usize).next_multiple_of(4096) as *mut u8;
        // SAFETY: `BLOCK * BLOCKS` bytes inside `v`, which outlives the agents (dropped at the end of main); only pdx
        // touches them meanwhile.
        let mem = unsafe {
            pdx_sys::Memory::from_raw_parts(
                std::ptr::NonNull::new(p).unwrap(),
                (BLOCK * BLOCKS) as usize,
            )
        };
        a.register(mem, pdx_transfer::MemoryKind::Host).unwrap()
    };
    let tm = reg(&target, &rust_bufs[0]);
    let im = reg(&init, &rust_bufs[1]);
    init.load_remote(&target.local_metadata().unwrap()).unwrap();
    let l = XferDescList::host_from((0..BLOCKS).map(|i| (im.addr() + i * BLOCK, BLOCK)));
    let r = XferDescList::host_from((0..BLOCKS).map(|i| (tm.addr() + i * BLOCK, BLOCK)));
    let rust_req = init
        .create_xfer_from_descs(XferOp::Read, &l, "ovh-target", &r, XferOptions::default())
        .unwrap();

    // C side: the same through the C ABI (its own agents, the same sizes).
    let (mut ca, mut cb) = (std::ptr::null_mut(), std::ptr::null_mut());
    let cfg = |name: &std::ffi::CStr| pdx_agent_config {
        name: name.as_ptr(),
        listen: std::ptr::null(),
        advertise_host: std::ptr::null(),
        transports: std::ptr::null(),
        secret: std::ptr::null(),
        secret_len: 0,
        peer_timeout_us: 0,
    };
    let tbuf = vec![0u8; (BLOCK * BLOCKS) as usize + 4096];
    let ibuf = vec![0u8; (BLOCK * BLOCKS) as usize + 4096];
    let align = |v: &Vec<u8>| (v.as_ptr() as u64).next_multiple_of(4096);
    let (ta, ia) = (align(&tbuf), align(&ibuf));
    let mut x = std::ptr::null_mut();
    let (mut m1, mut m2) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: valid configurations and outputs; the buffers outlive the agents (dropped at the end of main, after
    // the agents are destroyed) and are only touched by pdx meanwhile.
    unsafe {
        assert_eq!(
            pdx_agent_create(&cfg(c"c-target"), &mut ca),
            pdx_status::PDX_OK
        );
        assert_eq!(
            pdx_agent_create(&cfg(c"c-init"), &mut cb),
            pdx_status::PDX_OK
        );
        assert_eq!(
            pdx_register_mem(ca, ta, BLOCK * BLOCKS, 0, 0, &mut m1),
            pdx_status::PDX_OK
        );
        assert_eq!(
            pdx_register_mem(cb, ia, BLOCK * BLOCKS, 0, 0, &mut m2),
            pdx_status::PDX_OK
        );
        let mut blob = std::ptr::null_mut();
        let (mut data, mut len) = (std::ptr::null(), 0);
        assert_eq!(pdx_get_local_md_blob(ca, &mut blob), pdx_status::PDX_OK);
        assert_eq!(pdx_blob_data(blob, &mut data, &mut len), pdx_status::PDX_OK);
        assert_eq!(
            pdx_load_remote_md(cb, data, len, std::ptr::null_mut(), 0),
            pdx_status::PDX_OK
        );
        pdx_blob_destroy(blob);
        let (mut dl, mut dr) = (std::ptr::null_mut(), std::ptr::null_mut());
        pdx_dlist_create(0, &mut dl);
        pdx_dlist_create(0, &mut dr);
        for i in 0..BLOCKS {
            pdx_dlist_add(dl, ia + i * BLOCK, BLOCK, 0);
            pdx_dlist_add(dr, ta + i * BLOCK, BLOCK, 0);
        }
        let s = pdx_create_xfer_req(
            cb,
            0,
            dl,
            c"c-target".as_ptr(),
            dr,
            std::ptr::null(),
            0,
            &mut x,
        );
        assert_eq!(s, pdx_status::PDX_OK);
        pdx_dlist_destroy(dl);
        pdx_dlist_destroy(dr);
    }

    let (mut rust_post, mut c_post, mut rust_status, mut c_status) =
        (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        for _ in 0..PER_ROUND {
            let t = Instant::now();
            rust_req.post().unwrap();
            rust_post.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            // SAFETY: a live request.
            let s = unsafe { pdx_post_xfer_req(x) };
            c_post.push(t.elapsed().as_secs_f64() * 1e6);
            assert_eq!(s, pdx_status::PDX_OK);
            let t = Instant::now();
            rust_req.status().unwrap();
            rust_status.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            // SAFETY: a live request.
            unsafe { pdx_get_xfer_status(x) };
            c_status.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let report = |what: &str, r: &mut Vec<f64>, c: &mut Vec<f64>| {
        let (r50, r99, c50, c99) = (pct(r, 0.5), pct(r, 0.99), pct(c, 0.5), pct(c, 0.99));
        println!(
            "{what:<28} Rust p50 {r50:7.2} µs p99 {r99:7.2} µs | C API p50 {c50:7.2} µs p99 {c99:7.2} µs | p50 overhead {:+.2} µs",
            c50 - r50
        );
    };
    println!(
        "{} samples each, {BLOCKS} x {BLOCK} B READ, local transport",
        ROUNDS * PER_ROUND
    );
    report("post (64 x 4 KiB READ)", &mut rust_post, &mut c_post);
    report("status", &mut rust_status, &mut c_status);
    // SAFETY: handles made above, released once, the request before the registrations it uses.
    unsafe {
        pdx_release_xfer_req(x);
        pdx_deregister_mem(m1);
        pdx_deregister_mem(m2);
        pdx_agent_destroy(cb);
        pdx_agent_destroy(ca);
    }
    drop((rust_req, tm, im, target, init));
    drop((tbuf, ibuf, rust_bufs));
}
