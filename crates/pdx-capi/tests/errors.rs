//! Error paths of the C API, called as C calls them: null handles and outputs, bad enum values, unknown remote
//! agents, descriptors outside registrations, garbage metadata, a post while the last one is in progress, short
//! buffers. Each returns its code (fatal or retryable as documented) and a message, and nothing panics.

mod common;

use std::ffi::{c_char, CStr, CString};
use std::ptr;

use common::*;
use pdx::pdx_status::*;
use pdx::*;

fn cfg(name: &CStr) -> pdx_agent_config {
    pdx_agent_config {
        name: name.as_ptr(),
        listen: ptr::null(),
        advertise_host: ptr::null(),
        transports: ptr::null(),
        secret: ptr::null(),
        secret_len: 0,
        peer_timeout_us: 0,
    }
}

#[test]
fn null_handles_and_outputs() {
    let a = Agent::new("nulls");
    let buf = HostBuf::new(4096);
    let name = c"x";
    let mut agent_out = ptr::null_mut();
    let mut mem = ptr::null_mut();
    let mut xfer = ptr::null_mut();
    let mut list = ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: every pointer is null, a live handle or writable storage, as each case says.
    unsafe {
        expect(
            pdx_agent_create(ptr::null(), &mut agent_out),
            PDX_ERR_INVALID,
            "cfg is null",
        );
        expect(
            pdx_agent_create(&cfg(name), ptr::null_mut()),
            PDX_ERR_INVALID,
            "out (output) is null",
        );
        let mut c = cfg(name);
        c.name = ptr::null();
        expect(
            pdx_agent_create(&c, &mut agent_out),
            PDX_ERR_INVALID,
            "config.name is null",
        );
        assert!(agent_out.is_null(), "no agent on failure");
        expect(
            pdx_register_mem(ptr::null(), buf.addr(), 4096, 0, 0, &mut mem),
            PDX_ERR_INVALID,
            "agent is null",
        );
        expect(
            pdx_register_mem(a.0, buf.addr(), 4096, 0, 0, ptr::null_mut()),
            PDX_ERR_INVALID,
            "out",
        );
        expect(
            pdx_deregister_mem(ptr::null_mut()),
            PDX_ERR_INVALID,
            "mem is null",
        );
        expect(
            pdx_get_local_md(ptr::null(), ptr::null_mut(), &mut len),
            PDX_ERR_INVALID,
            "agent is null",
        );
        expect(
            pdx_get_local_md(a.0, ptr::null_mut(), ptr::null_mut()),
            PDX_ERR_INVALID,
            "len",
        );
        expect(
            pdx_load_remote_md(ptr::null(), [1u8].as_ptr(), 1, ptr::null_mut(), 0),
            PDX_ERR_INVALID,
            "agent",
        );
        expect(
            pdx_load_remote_md(a.0, ptr::null(), 10, ptr::null_mut(), 0),
            PDX_ERR_INVALID,
            "md is null",
        );
        expect(
            pdx_fetch_remote_md(a.0, ptr::null(), ptr::null_mut(), 0),
            PDX_ERR_INVALID,
            "addr is null",
        );
        expect(
            pdx_invalidate_remote_md(a.0, ptr::null()),
            PDX_ERR_INVALID,
            "remote_agent is null",
        );
        expect(
            pdx_dlist_add(ptr::null_mut(), 1, 1, 0),
            PDX_ERR_INVALID,
            "dlist is null",
        );
        expect(
            pdx_dlist_len(ptr::null(), &mut len),
            PDX_ERR_INVALID,
            "dlist is null",
        );
        expect(
            pdx_prep_xfer_dlist(a.0, ptr::null(), ptr::null(), &mut ptr::null_mut()),
            PDX_ERR_INVALID,
            "dlist",
        );
        expect(
            pdx_create_xfer_req(
                a.0,
                0,
                ptr::null(),
                name.as_ptr(),
                ptr::null(),
                ptr::null(),
                0,
                &mut xfer,
            ),
            PDX_ERR_INVALID,
            "local is null",
        );
        expect(
            pdx_post_xfer_req(ptr::null()),
            PDX_ERR_INVALID,
            "xfer is null",
        );
        expect(
            pdx_get_xfer_status(ptr::null()),
            PDX_ERR_INVALID,
            "xfer is null",
        );
        expect(
            pdx_wait_xfer_req(ptr::null(), 0),
            PDX_ERR_INVALID,
            "xfer is null",
        );
        expect(
            pdx_query_xfer_transport(ptr::null(), &mut ptr::null()),
            PDX_ERR_INVALID,
            "xfer is null",
        );
        expect(
            pdx_get_notifs(ptr::null(), &mut list),
            PDX_ERR_INVALID,
            "agent is null",
        );
        expect(pdx_get_notifs(a.0, ptr::null_mut()), PDX_ERR_INVALID, "out");
        expect(
            pdx_wait_notifs(ptr::null(), 0, &mut list),
            PDX_ERR_INVALID,
            "agent is null",
        );
        expect(
            pdx_notif_list_len(ptr::null(), &mut len),
            PDX_ERR_INVALID,
            "list is null",
        );
        expect(
            pdx_notif_list_get(
                ptr::null(),
                0,
                ptr::null_mut(),
                ptr::null_mut(),
                ptr::null_mut(),
            ),
            PDX_ERR_INVALID,
            "list is null",
        );
        expect(
            pdx_gen_notif(ptr::null(), name.as_ptr(), ptr::null(), 0),
            PDX_ERR_INVALID,
            "agent is null",
        );
        expect(
            pdx_gen_notif(a.0, name.as_ptr(), ptr::null(), 3),
            PDX_ERR_INVALID,
            "msg is null",
        );
        expect(
            pdx_agent_listen_addr(a.0, ptr::null_mut(), 64),
            PDX_ERR_INVALID,
            "buf",
        );
        expect(
            pdx_blob_data(ptr::null(), &mut ptr::null(), &mut len),
            PDX_ERR_INVALID,
            "blob is null",
        );
        // Destroying NULL is a no-op, as free(NULL).
        expect(pdx_agent_destroy(ptr::null_mut()), PDX_OK, "");
        expect(pdx_dlist_destroy(ptr::null_mut()), PDX_OK, "");
        expect(pdx_release_xfer_req(ptr::null_mut()), PDX_OK, "");
        expect(pdx_release_dlist_handle(ptr::null_mut()), PDX_OK, "");
        expect(pdx_notif_list_destroy(ptr::null_mut()), PDX_OK, "");
        expect(pdx_blob_destroy(ptr::null_mut()), PDX_OK, "");
    }
    assert!(!pdx_status_is_retryable(PDX_ERR_INVALID as i32));
}

#[test]
fn bad_configuration() {
    let mut out = ptr::null_mut();
    let long = CString::new("n".repeat(257)).unwrap();
    let bad_utf8 = [0xffu8, 0xfe, 0];
    let name = c"cfg";
    // SAFETY: configurations whose pointers are null or NUL-terminated strings / readable bytes.
    unsafe {
        expect(
            pdx_agent_create(&cfg(&long), &mut out),
            PDX_ERR_INVALID,
            "longer than 256",
        );
        expect(
            pdx_agent_create(&cfg(c""), &mut out),
            PDX_ERR_INVALID,
            "1..=256",
        );
        let mut c = cfg(name);
        c.name = bad_utf8.as_ptr().cast();
        expect(pdx_agent_create(&c, &mut out), PDX_ERR_INVALID, "not UTF-8");
        let mut c = cfg(name);
        c.transports = c"tcp,carrier-pigeon".as_ptr();
        expect(
            pdx_agent_create(&c, &mut out),
            PDX_ERR_INVALID,
            "unknown transport `carrier-pigeon`",
        );
        let mut c = cfg(name);
        c.transports = c"".as_ptr();
        expect(
            pdx_agent_create(&c, &mut out),
            PDX_ERR_INVALID,
            "unknown transport",
        );
        let mut c = cfg(name);
        c.secret = b"short".as_ptr();
        c.secret_len = 5;
        expect(
            pdx_agent_create(&c, &mut out),
            PDX_ERR_INVALID,
            "config.secret",
        );
        let mut c = cfg(name);
        c.listen = c"not an address".as_ptr();
        expect(
            pdx_agent_create(&c, &mut out),
            PDX_ERR_INVALID,
            "config.listen",
        );
        assert!(out.is_null());
        // No listener: valid, but it has no address.
        let mut c = cfg(name);
        c.listen = c"none".as_ptr();
        expect(pdx_agent_create(&c, &mut out), PDX_OK, "");
        let mut addr = [0 as c_char; 64];
        expect(
            pdx_agent_listen_addr(out, addr.as_mut_ptr(), 64),
            PDX_ERR_INVALID,
            "no listener",
        );
        expect(pdx_agent_destroy(out), PDX_OK, "");
    }
}

#[test]
fn bad_kinds_and_ops() {
    let a = Agent::new("kinds");
    let buf = HostBuf::new(4096);
    let mut mem = ptr::null_mut();
    let mut d = ptr::null_mut();
    let l = Dlist::host(&[(buf.addr(), 4096)]);
    let mut x = ptr::null_mut();
    // SAFETY: live handles and writable outputs.
    unsafe {
        expect(
            pdx_register_mem(a.0, buf.addr(), 4096, 7, 0, &mut mem),
            PDX_ERR_INVALID,
            "memory kind 7",
        );
        expect(
            pdx_register_mem(a.0, buf.addr(), 4096, -1, 0, &mut mem),
            PDX_ERR_INVALID,
            "memory kind -1",
        );
        expect(
            pdx_dlist_create(42, &mut d),
            PDX_ERR_INVALID,
            "memory kind 42",
        );
        assert!(d.is_null());
        expect(
            pdx_create_xfer_req(a.0, 2, l.0, c"p".as_ptr(), l.0, ptr::null(), 0, &mut x),
            PDX_ERR_INVALID,
            "operation 2",
        );
        // VRAM at an address that is no device memory: unsupported without CUDA, invalid with it; fatal either way.
        let s = pdx_register_mem(
            a.0,
            0x7f00_0000_0000,
            4096,
            pdx_mem_kind::PDX_MEM_VRAM as i32,
            0,
            &mut mem,
        );
        assert!(
            s == PDX_ERR_UNSUPPORTED || s == PDX_ERR_INVALID,
            "{s:?}: {}",
            last_error()
        );
        assert!(
            last_error().contains("VRAM") || last_error().contains("device memory"),
            "{}",
            last_error()
        );
        assert!(!pdx_status_is_retryable(s as i32));
        assert!(mem.is_null());
    }
}

#[test]
fn memory_that_is_not_there() {
    let a = Agent::new("unmapped");
    let mut mem = ptr::null_mut();
    static READ_ONLY: [u8; 64] = [1; 64];
    // SAFETY: live agent, writable output; the ranges are checked by pdx before anything touches them.
    unsafe {
        // Page 1 is below mmap_min_addr: never mapped.
        expect(
            pdx_register_mem(a.0, 0x1000, 4096, 0, 0, &mut mem),
            PDX_ERR_INVALID,
            "not mapped",
        );
        expect(
            pdx_register_mem(a.0, 0, 4096, 0, 0, &mut mem),
            PDX_ERR_INVALID,
            "not mapped",
        );
        expect(
            pdx_register_mem(a.0, u64::MAX - 10, 4096, 0, 0, &mut mem),
            PDX_ERR_INVALID,
            "wraps",
        );
        expect(
            pdx_register_mem(a.0, 0x10000, 0, 0, 0, &mut mem),
            PDX_ERR_INVALID,
            "len is 0",
        );
        // A read-only mapping (this binary's constants): a READ into it would fault.
        let s = pdx_register_mem(a.0, READ_ONLY.as_ptr() as u64, 64, 0, 0, &mut mem);
        expect(s, PDX_ERR_INVALID, "not readable and writable");
        assert!(mem.is_null());
    }
}

#[test]
fn unknown_remote_agent() {
    let a = Agent::new("lonely");
    let buf = HostBuf::new(4096);
    let _m = a.register(&buf);
    let l = Dlist::host(&[(buf.addr(), 4096)]);
    let (s, x) = Xfer::create(&a, pdx_xfer_op::PDX_XFER_READ, &l, "nobody", &l, None);
    expect(s, PDX_ERR_UNKNOWN_REMOTE, "unknown remote agent `nobody`");
    assert!(x.is_none());
    assert!(!pdx_status_is_retryable(s as i32));
    let mut p = ptr::null_mut();
    // SAFETY: live handles, NUL-terminated names, writable outputs.
    unsafe {
        expect(
            pdx_prep_xfer_dlist(a.0, c"nobody".as_ptr(), l.0, &mut p),
            PDX_ERR_UNKNOWN_REMOTE,
            "nobody",
        );
        expect(
            pdx_invalidate_remote_md(a.0, c"nobody".as_ptr()),
            PDX_ERR_UNKNOWN_REMOTE,
            "nobody",
        );
        expect(
            pdx_gen_notif(a.0, c"nobody".as_ptr(), b"x".as_ptr(), 1),
            PDX_ERR_UNKNOWN_REMOTE,
            "nobody",
        );
    }
}

#[test]
fn descriptors_out_of_range() {
    let tbuf = HostBuf::new(8192);
    let ibuf = HostBuf::new(8192);
    let t = Agent::new("range-target");
    let i = Agent::new("range-init");
    let _tm = t.register(&tbuf);
    let _im = i.register(&ibuf);
    i.load(&t);
    let ok_l = Dlist::host(&[(ibuf.addr(), 4096)]);
    let ok_r = Dlist::host(&[(tbuf.addr(), 4096)]);
    // A remote descriptor one byte past the target's region, as the second of two.
    let past = Dlist::host(&[(tbuf.addr(), 4096), (tbuf.addr() + 4096, 4097)]);
    let two_l = Dlist::host(&[(ibuf.addr(), 4096), (ibuf.addr() + 4096, 4097)]);
    let (s, _) = Xfer::create(
        &i,
        pdx_xfer_op::PDX_XFER_READ,
        &two_l,
        "range-target",
        &past,
        None,
    );
    expect(s, PDX_ERR_NOT_REGISTERED, "descriptor 1");
    // A local descriptor outside our registrations.
    let outside = Dlist::host(&[(ibuf.addr() + 8192, 4096)]);
    let (s, _) = Xfer::create(
        &i,
        pdx_xfer_op::PDX_XFER_READ,
        &outside,
        "range-target",
        &ok_r,
        None,
    );
    expect(s, PDX_ERR_NOT_REGISTERED, "agent `range-init`");
    // Unequal counts and lengths.
    let (s, _) = Xfer::create(
        &i,
        pdx_xfer_op::PDX_XFER_READ,
        &two_l,
        "range-target",
        &ok_r,
        None,
    );
    expect(s, PDX_ERR_INVALID, "equal counts");
    let short_r = Dlist::host(&[(tbuf.addr(), 100)]);
    let (s, _) = Xfer::create(
        &i,
        pdx_xfer_op::PDX_XFER_READ,
        &ok_l,
        "range-target",
        &short_r,
        None,
    );
    expect(s, PDX_ERR_INVALID, "");
    // A notification over 64 KiB.
    let big = vec![0u8; (64 << 10) + 1];
    let (s, _) = Xfer::create(
        &i,
        pdx_xfer_op::PDX_XFER_READ,
        &ok_l,
        "range-target",
        &ok_r,
        Some(&big),
    );
    expect(s, PDX_ERR_INVALID, "");
    // SAFETY: live handles and writable outputs throughout.
    unsafe {
        // Descriptors that are malformed in themselves.
        expect(
            pdx_dlist_add(ok_l.0, ibuf.addr(), 0, 0),
            PDX_ERR_INVALID,
            "length is 0",
        );
        expect(
            pdx_dlist_add(ok_l.0, u64::MAX, 2, 0),
            PDX_ERR_INVALID,
            "wraps",
        );
        let mut n = 0;
        expect(pdx_dlist_len(ok_l.0, &mut n), PDX_OK, "");
        assert_eq!(n, 1, "refused descriptors are not added");
        // Indices out of range, sides swapped, count 0.
        let (mut lp, mut rp) = (ptr::null_mut(), ptr::null_mut());
        expect(
            pdx_prep_xfer_dlist(i.0, ptr::null(), ok_l.0, &mut lp),
            PDX_OK,
            "",
        );
        expect(
            pdx_prep_xfer_dlist(i.0, c"range-target".as_ptr(), ok_r.0, &mut rp),
            PDX_OK,
            "",
        );
        let mut x = ptr::null_mut();
        let (zero, five) = ([0usize], [5usize]);
        let op = pdx_xfer_op::PDX_XFER_READ as i32;
        let s = pdx_make_xfer_req(
            i.0,
            op,
            lp,
            zero.as_ptr(),
            rp,
            five.as_ptr(),
            1,
            ptr::null(),
            0,
            &mut x,
        );
        expect(s, PDX_ERR_INVALID, "");
        let s = pdx_make_xfer_req(
            i.0,
            op,
            rp,
            zero.as_ptr(),
            lp,
            zero.as_ptr(),
            1,
            ptr::null(),
            0,
            &mut x,
        );
        expect(s, PDX_ERR_INVALID, "local must be prepared");
        let s = pdx_make_xfer_req(
            i.0,
            op,
            lp,
            zero.as_ptr(),
            rp,
            zero.as_ptr(),
            0,
            ptr::null(),
            0,
            &mut x,
        );
        expect(s, PDX_ERR_INVALID, "count is 0");
        let s = pdx_make_xfer_req(
            i.0,
            op,
            lp,
            ptr::null(),
            rp,
            zero.as_ptr(),
            1,
            ptr::null(),
            0,
            &mut x,
        );
        expect(s, PDX_ERR_INVALID, "local_idx is null");
        // A prepared list of another agent.
        let s = pdx_make_xfer_req(
            t.0,
            op,
            lp,
            zero.as_ptr(),
            rp,
            zero.as_ptr(),
            1,
            ptr::null(),
            0,
            &mut x,
        );
        expect(s, PDX_ERR_INVALID, "another agent");
        assert!(x.is_null());
        expect(pdx_release_dlist_handle(lp), PDX_OK, "");
        expect(pdx_release_dlist_handle(rp), PDX_OK, "");
        // Notification list index out of range.
        let mut list = ptr::null_mut();
        expect(pdx_get_notifs(t.0, &mut list), PDX_OK, "");
        let s = pdx_notif_list_get(list, 0, ptr::null_mut(), ptr::null_mut(), ptr::null_mut());
        expect(s, PDX_ERR_INVALID, "out of range");
        expect(pdx_notif_list_destroy(list), PDX_OK, "");
    }
}

#[test]
fn metadata_garbage() {
    let a = Agent::new("md-garbage");
    let mut name = [0 as c_char; PDX_AGENT_NAME_BUF];
    let mut load = |bytes: &[u8]| {
        // SAFETY: live agent, readable bytes, a name buffer of PDX_AGENT_NAME_BUF bytes.
        unsafe {
            pdx_load_remote_md(
                a.0,
                bytes.as_ptr(),
                bytes.len(),
                name.as_mut_ptr(),
                name.len(),
            )
        }
    };
    expect(load(b""), PDX_ERR_BAD_METADATA, "invalid agent metadata");
    expect(
        load(b"definitely not metadata"),
        PDX_ERR_BAD_METADATA,
        "invalid agent metadata",
    );
    let mut real = Agent::new("md-real").metadata();
    // Truncated, and with every byte after the magic flipped in turn: errors, never a panic.
    expect(load(&real[..real.len() / 2]), PDX_ERR_BAD_METADATA, "");
    for i in 4..real.len() {
        real[i] ^= 0xff;
        let s = load(&real);
        assert!(
            s == PDX_OK || s == PDX_ERR_BAD_METADATA,
            "byte {i}: {s:?} {}",
            last_error()
        );
        real[i] ^= 0xff;
    }
    // One's own metadata.
    expect(
        load(&a.metadata()),
        PDX_ERR_BAD_METADATA,
        "its own metadata",
    );
    // A name buffer too small for every name is refused before anything loads.
    let other = Agent::new("md-other").metadata();
    let mut small = [0 as c_char; 8];
    // SAFETY: as above, with an 8-byte buffer.
    let s = unsafe {
        pdx_load_remote_md(
            a.0,
            other.as_ptr(),
            other.len(),
            small.as_mut_ptr(),
            small.len(),
        )
    };
    expect(s, PDX_ERR_INVALID, "PDX_AGENT_NAME_BUF");
    // SAFETY: live agent, NUL-terminated name.
    let s = unsafe { pdx_invalidate_remote_md(a.0, c"md-other".as_ptr()) };
    expect(s, PDX_ERR_UNKNOWN_REMOTE, "md-other");
}

#[test]
fn short_buffers() {
    let a = Agent::new("short-buffers");
    let mut len = 3usize;
    let mut buf = [0u8; 3];
    let mut name = [0 as c_char; 4];
    // SAFETY: live agent; buffers of the sizes passed.
    unsafe {
        expect(
            pdx_get_local_md(a.0, buf.as_mut_ptr(), &mut len),
            PDX_ERR_BUFFER_TOO_SMALL,
            "bytes needed",
        );
        assert!(len > 3, "the size needed is reported");
        assert_eq!(buf, [0; 3], "nothing written");
        expect(
            pdx_agent_name(a.0, name.as_mut_ptr(), name.len()),
            PDX_ERR_BUFFER_TOO_SMALL,
            "14 bytes needed",
        );
        let mut name = [0 as c_char; PDX_AGENT_NAME_BUF];
        expect(
            pdx_agent_name(a.0, name.as_mut_ptr(), name.len()),
            PDX_OK,
            "",
        );
        assert_eq!(CStr::from_ptr(name.as_ptr()), c"short-buffers");
    }
}

#[test]
fn double_post_while_in_progress() {
    // 64 MiB over tcp takes milliseconds at least: a second post right after the first finds it in progress.
    const LEN: usize = 64 << 20;
    let tbuf = HostBuf::new(LEN);
    let ibuf = HostBuf::new(LEN);
    let t = Agent::new("busy-target");
    let i = Agent::with("busy-init", Some("tcp"), None);
    let _tm = t.register(&tbuf);
    let _im = i.register(&ibuf);
    i.load(&t);
    let l = Dlist::host(&[(ibuf.addr(), LEN as u64)]);
    let r = Dlist::host(&[(tbuf.addr(), LEN as u64)]);
    let (s, x) = Xfer::create(
        &i,
        pdx_xfer_op::PDX_XFER_READ,
        &l,
        "busy-target",
        &r,
        Some(b"n"),
    );
    expect(s, PDX_OK, "");
    let x = x.unwrap();
    let mut refused = 0;
    for _ in 0..5 {
        let first = x.post();
        assert!(
            first == PDX_IN_PROGRESS || first == PDX_OK,
            "{first:?}: {}",
            last_error()
        );
        if first == PDX_IN_PROGRESS {
            match x.post() {
                PDX_ERR_REPOST_ACTIVE => {
                    refused += 1;
                    assert!(last_error().contains("in progress"), "{}", last_error());
                    assert!(pdx_status_is_retryable(PDX_ERR_REPOST_ACTIVE as i32));
                }
                // It finished in between: then the second post is a new one.
                PDX_IN_PROGRESS | PDX_OK => {}
                other => panic!("{other:?}: {}", last_error()),
            }
        }
        // The refused post did not disturb the running one.
        expect(x.wait(20_000_000), PDX_OK, "");
    }
    assert!(refused > 0, "a post while in progress was never refused");
    // The status getters on a finished request.
    expect(x.status(), PDX_OK, "");
    expect(x.wait(0), PDX_OK, "");
}

#[test]
fn status_names_and_last_error() {
    // SAFETY: static strings.
    unsafe {
        assert_eq!(
            CStr::from_ptr(pdx_status_str(PDX_ERR_REPOST_ACTIVE as i32)),
            c"PDX_ERR_REPOST_ACTIVE"
        );
        assert_eq!(CStr::from_ptr(pdx_status_str(12345)), c"PDX_UNKNOWN_STATUS");
        assert!(!CStr::from_ptr(pdx_version()).to_bytes().is_empty());
    }
    assert!(pdx_status_is_retryable(PDX_ERR_PEER_DISCONNECTED as i32));
    assert!(pdx_status_is_retryable(PDX_ERR_TIMEOUT as i32));
    assert!(!pdx_status_is_retryable(PDX_IN_PROGRESS as i32));
    assert!(!pdx_status_is_retryable(-150));
    // A success clears the message of an earlier failure.
    // SAFETY: null handle on purpose, then a null-safe call.
    unsafe {
        pdx_post_xfer_req(ptr::null());
        assert!(!last_error().is_empty());
        pdx_dlist_destroy(ptr::null_mut());
    }
    assert_eq!(last_error(), "");
    // Messages are per thread.
    // SAFETY: as above.
    unsafe { pdx_post_xfer_req(ptr::null()) };
    std::thread::spawn(|| assert_eq!(last_error(), ""))
        .join()
        .unwrap();
    assert!(!last_error().is_empty());
}
