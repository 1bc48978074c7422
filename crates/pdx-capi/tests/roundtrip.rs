//! The C API end to end between two agents of this process (and over `tcp`): registration of caller memory by
//! address, metadata out and in, READ and WRITE with notifications, prepared lists with indices, notifications
//! sent on their own, the side channel. Every byte is checked.

mod common;

use std::ffi::CString;
use std::ptr;

use common::*;
use pdx::*;

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 16;

fn pattern(seed: u8) -> impl Fn(usize) -> u8 {
    move |i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8
}

fn read_and_write(transports: Option<&str>, want_transport: &str) {
    let target_buf = HostBuf::new((BLOCK * BLOCKS) as usize);
    let init_buf = HostBuf::new((BLOCK * BLOCKS) as usize);
    let target = Agent::new("target");
    let init = Agent::with("initiator", transports, None);
    let _tm = target.register(&target_buf);
    let _im = init.register(&init_buf);
    target_buf.fill_with(pattern(7));
    assert_eq!(init.load(&target), "target");

    // READ blocks 0..8 of the target into blocks 8..16 of ours, notification "read-done".
    let local = Dlist::host(
        &(0..8)
            .map(|i| (init_buf.addr() + (8 + i) * BLOCK, BLOCK))
            .collect::<Vec<_>>(),
    );
    let remote = Dlist::host(
        &(0..8)
            .map(|i| (target_buf.addr() + i * BLOCK, BLOCK))
            .collect::<Vec<_>>(),
    );
    let (s, x) = Xfer::create(
        &init,
        pdx_xfer_op::PDX_XFER_READ,
        &local,
        "target",
        &remote,
        Some(b"read-done"),
    );
    expect(s, pdx_status::PDX_OK, "");
    let x = x.unwrap();
    assert_eq!(x.transport(), want_transport);
    expect(x.status(), pdx_status::PDX_ERR_NOT_POSTED, "never posted");
    x.run();
    expect(x.status(), pdx_status::PDX_OK, "");
    let got = init_buf.snapshot();
    let want = target_buf.snapshot();
    let half = (8 * BLOCK) as usize;
    assert_eq!(&got[half..], &want[..half], "READ moved every byte");
    assert!(
        got[..half].iter().all(|b| *b == 0),
        "READ touched nothing else"
    );
    assert_eq!(
        target.notifs(10_000_000),
        vec![("initiator".to_string(), b"read-done".to_vec())]
    );

    // Re-post: the same plan again.
    x.run();
    assert_eq!(target.notifs(10_000_000).len(), 1);

    // WRITE our blocks 0..4 (a new pattern) into target blocks 12..16 through prepared lists and indices.
    init_buf.fill_with(pattern(99));
    let local = Dlist::host(
        &(0..BLOCKS)
            .map(|i| (init_buf.addr() + i * BLOCK, BLOCK))
            .collect::<Vec<_>>(),
    );
    let remote = Dlist::host(
        &(0..BLOCKS)
            .map(|i| (target_buf.addr() + i * BLOCK, BLOCK))
            .collect::<Vec<_>>(),
    );
    let rname = CString::new("target").unwrap();
    let (mut lp, mut rp) = (ptr::null_mut(), ptr::null_mut());
    // SAFETY: live handles, writable outputs; NULL remote name prepares the local side.
    unsafe {
        expect(
            pdx_prep_xfer_dlist(init.0, ptr::null(), local.0, &mut lp),
            pdx_status::PDX_OK,
            "",
        );
        expect(
            pdx_prep_xfer_dlist(init.0, rname.as_ptr(), remote.0, &mut rp),
            pdx_status::PDX_OK,
            "",
        );
    }
    let li: [usize; 4] = [0, 1, 2, 3];
    let ri: [usize; 4] = [12, 13, 14, 15];
    let mut xw = ptr::null_mut();
    // SAFETY: live handles; 4 indices each; a readable notification; writable output.
    let s = unsafe {
        pdx_make_xfer_req(
            init.0,
            pdx_xfer_op::PDX_XFER_WRITE as i32,
            lp,
            li.as_ptr(),
            rp,
            ri.as_ptr(),
            4,
            b"write-done".as_ptr(),
            10,
            &mut xw,
        )
    };
    expect(s, pdx_status::PDX_OK, "");
    let xw = Xfer(xw);
    // SAFETY: prepared lists released once; the request keeps what it needs.
    unsafe {
        expect(pdx_release_dlist_handle(lp), pdx_status::PDX_OK, "");
        expect(pdx_release_dlist_handle(rp), pdx_status::PDX_OK, "");
    }
    xw.run();
    assert_eq!(
        target.notifs(10_000_000),
        vec![("initiator".to_string(), b"write-done".to_vec())]
    );
    let t = target_buf.snapshot();
    let src = init_buf.snapshot();
    assert_eq!(
        &t[(12 * BLOCK) as usize..],
        &src[..(4 * BLOCK) as usize],
        "WRITE moved every byte"
    );
    assert_eq!(
        &t[..(12 * BLOCK) as usize],
        &want[..(12 * BLOCK) as usize],
        "WRITE touched nothing else"
    );

    // A notification of its own, both ways once the target knows the initiator.
    // SAFETY: live agent, NUL-terminated name, 5 readable bytes.
    expect(
        unsafe { pdx_gen_notif(init.0, rname.as_ptr(), b"hello".as_ptr(), 5) },
        pdx_status::PDX_OK,
        "",
    );
    assert_eq!(
        target.notifs(10_000_000),
        vec![("initiator".to_string(), b"hello".to_vec())]
    );
    assert_eq!(target.load(&init), "initiator");
    let iname = CString::new("initiator").unwrap();
    // SAFETY: as above, an empty message (NULL with length 0).
    expect(
        unsafe { pdx_gen_notif(target.0, iname.as_ptr(), ptr::null(), 0) },
        pdx_status::PDX_OK,
        "",
    );
    assert_eq!(
        init.notifs(10_000_000),
        vec![("target".to_string(), Vec::new())]
    );
    // Nothing left over.
    assert!(target.notifs(0).is_empty());
}

#[test]
fn read_and_write_in_process() {
    read_and_write(None, "local");
}

#[test]
fn read_and_write_over_tcp() {
    read_and_write(Some("tcp"), "tcp");
}

#[test]
fn metadata_blob_side_channel_and_invalidation() {
    let buf = HostBuf::new(8192);
    let target = Agent::new("md-target");
    let init = Agent::with("md-init", Some("tcp"), None);
    let _m = target.register(&buf);

    // The blob and the buffer give the same bytes.
    let mut blob = ptr::null_mut();
    let (mut data, mut len) = (ptr::null(), 0usize);
    // SAFETY: live handles, writable outputs; the blob's bytes are copied before it is destroyed.
    let from_blob = unsafe {
        expect(
            pdx_get_local_md_blob(target.0, &mut blob),
            pdx_status::PDX_OK,
            "",
        );
        expect(
            pdx_blob_data(blob, &mut data, &mut len),
            pdx_status::PDX_OK,
            "",
        );
        let v = std::slice::from_raw_parts(data, len).to_vec();
        expect(pdx_blob_destroy(blob), pdx_status::PDX_OK, "");
        v
    };
    assert_eq!(from_blob, target.metadata());

    // The side channel: fetch from the listener address the target reports.
    let mut addr = [0 as std::ffi::c_char; 64];
    let mut name = [0 as std::ffi::c_char; PDX_AGENT_NAME_BUF];
    // SAFETY: live agents, buffers of the sizes given.
    unsafe {
        expect(
            pdx_agent_listen_addr(target.0, addr.as_mut_ptr(), addr.len()),
            pdx_status::PDX_OK,
            "",
        );
        let a = std::ffi::CStr::from_ptr(addr.as_ptr()).to_str().unwrap();
        assert!(a.starts_with("127.0.0.1:"), "{a}");
        expect(
            pdx_fetch_remote_md(init.0, addr.as_ptr(), name.as_mut_ptr(), name.len()),
            pdx_status::PDX_OK,
            "",
        );
        assert_eq!(
            std::ffi::CStr::from_ptr(name.as_ptr()).to_str().unwrap(),
            "md-target"
        );
    }
    let local = HostBuf::new(4096);
    let _lm = init.register(&local);
    buf.fill_with(|i| i as u8);
    let l = Dlist::host(&[(local.addr(), 4096)]);
    let r = Dlist::host(&[(buf.addr() + 4096, 4096)]);
    let (s, x) = Xfer::create(&init, pdx_xfer_op::PDX_XFER_READ, &l, "md-target", &r, None);
    expect(s, pdx_status::PDX_OK, "");
    let x = x.unwrap();
    x.run();
    assert_eq!(local.snapshot(), buf.snapshot()[4096..]);
    assert!(target.notifs(0).is_empty(), "no notification was asked for");

    // Invalidated: the request fails on post with a fatal code, and a new request cannot be made.
    let tname = CString::new("md-target").unwrap();
    // SAFETY: live agent, NUL-terminated name.
    expect(
        unsafe { pdx_invalidate_remote_md(init.0, tname.as_ptr()) },
        pdx_status::PDX_OK,
        "",
    );
    let s = x.post();
    assert!(
        s != pdx_status::PDX_OK && s != pdx_status::PDX_IN_PROGRESS
            || x.wait(10_000_000) != pdx_status::PDX_OK,
        "a request for an invalidated peer must fail: {s:?}"
    );
    let (s, _) = Xfer::create(&init, pdx_xfer_op::PDX_XFER_READ, &l, "md-target", &r, None);
    expect(s, pdx_status::PDX_ERR_UNKNOWN_REMOTE, "md-target");
}

#[test]
fn deregister_waits_for_requests_then_frees() {
    let tbuf = HostBuf::new(4096);
    let ibuf = HostBuf::new(4096);
    let target = Agent::new("dr-target");
    let init = Agent::new("dr-init");
    let _tm = target.register(&tbuf);
    let mut im = init.register(&ibuf);
    init.load(&target);
    let l = Dlist::host(&[(ibuf.addr(), 4096)]);
    let r = Dlist::host(&[(tbuf.addr(), 4096)]);
    let (s, x) = Xfer::create(&init, pdx_xfer_op::PDX_XFER_READ, &l, "dr-target", &r, None);
    expect(s, pdx_status::PDX_OK, "");
    // The request uses the region: refused, retryable, and the handle stays valid.
    let s = im.deregister();
    expect(s, pdx_status::PDX_ERR_REGION_IN_USE, "still used");
    assert!(pdx_status_is_retryable(s as i32));
    drop(x);
    expect(im.deregister_retrying(), pdx_status::PDX_OK, "");
    // The range is no longer registered.
    let (s, _) = Xfer::create(&init, pdx_xfer_op::PDX_XFER_READ, &l, "dr-target", &r, None);
    expect(s, pdx_status::PDX_ERR_NOT_REGISTERED, "descriptor 0");
}
