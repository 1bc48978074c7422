//! Helpers of the C API tests: they call the `extern "C"` functions through the rlib exactly as C would, and own
//! what they create so a failing assertion leaks nothing.

#![allow(dead_code)]

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ffi::{c_char, CStr, CString};
use std::ptr;

use pdx::*;

/// The thread's last error message.
pub fn last_error() -> String {
    // SAFETY: pdx_last_error never returns null and its string stays valid until the next pdx call on this thread.
    unsafe { CStr::from_ptr(pdx_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts a status and, for errors, that the message contains `needle`.
#[track_caller]
pub fn expect(got: pdx_status, want: pdx_status, needle: &str) {
    let msg = last_error();
    assert_eq!(got, want, "message: {msg}");
    assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
}

/// Page-aligned, zeroed host memory the test owns (as an engine owns its KV cache).
pub struct HostBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl HostBuf {
    pub fn new(len: usize) -> HostBuf {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size (the tests never ask for 0).
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        HostBuf { ptr, layout }
    }
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }
    pub fn len(&self) -> usize {
        self.layout.size()
    }
    /// Copies the bytes out (pdx and peers write this memory from other threads; only copies are ever read).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len()];
        // SAFETY: `len` bytes owned by this buffer; the test reads only after transfers into it completed.
        unsafe { ptr::copy_nonoverlapping(self.ptr, v.as_mut_ptr(), v.len()) };
        v
    }
    pub fn fill_with(&self, f: impl Fn(usize) -> u8) {
        let v: Vec<u8> = (0..self.len()).map(f).collect();
        // SAFETY: `len` bytes owned by this buffer; no transfer runs while the test fills it.
        unsafe { ptr::copy_nonoverlapping(v.as_ptr(), self.ptr, v.len()) };
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the registrations using it were ended first (fields of the
        // owners drop in order; see `Agent`).
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// An agent handle destroyed on drop.
pub struct Agent(pub *mut pdx_agent);

impl Agent {
    pub fn new(name: &str) -> Agent {
        Agent::with(name, None, None)
    }
    pub fn with(name: &str, transports: Option<&str>, listen: Option<&str>) -> Agent {
        let name = CString::new(name).unwrap();
        let transports = transports.map(|t| CString::new(t).unwrap());
        let listen = listen.map(|t| CString::new(t).unwrap());
        let cfg = pdx_agent_config {
            name: name.as_ptr(),
            listen: listen.as_ref().map_or(ptr::null(), |l| l.as_ptr()),
            advertise_host: ptr::null(),
            transports: transports.as_ref().map_or(ptr::null(), |t| t.as_ptr()),
            secret: ptr::null(),
            secret_len: 0,
            peer_timeout_us: 0,
        };
        let mut out = ptr::null_mut();
        // SAFETY: a valid configuration and output pointer.
        let s = unsafe { pdx_agent_create(&cfg, &mut out) };
        expect(s, pdx_status::PDX_OK, "");
        Agent(out)
    }
    pub fn register(&self, buf: &HostBuf) -> Mem {
        let mut mem = ptr::null_mut();
        // SAFETY: a live agent; `buf` outlives the registration (tests deregister or drop the agent's memory
        // handles before the buffer).
        let s = unsafe {
            pdx_register_mem(
                self.0,
                buf.addr(),
                buf.len() as u64,
                pdx_mem_kind::PDX_MEM_DRAM as i32,
                0,
                &mut mem,
            )
        };
        expect(s, pdx_status::PDX_OK, "");
        Mem(mem)
    }
    pub fn metadata(&self) -> Vec<u8> {
        let mut len = 0usize;
        // SAFETY: live agent; size query with a null buffer.
        let s = unsafe { pdx_get_local_md(self.0, ptr::null_mut(), &mut len) };
        expect(s, pdx_status::PDX_OK, "");
        let mut buf = vec![0u8; len];
        // SAFETY: `len` writable bytes.
        let s = unsafe { pdx_get_local_md(self.0, buf.as_mut_ptr(), &mut len) };
        expect(s, pdx_status::PDX_OK, "");
        buf.truncate(len);
        buf
    }
    /// Loads `other`'s metadata and returns the name pdx reports.
    pub fn load(&self, other: &Agent) -> String {
        let md = other.metadata();
        let mut name = [0 as c_char; PDX_AGENT_NAME_BUF];
        // SAFETY: live agent, `md.len()` readable bytes, a name buffer of PDX_AGENT_NAME_BUF bytes.
        let s = unsafe {
            pdx_load_remote_md(self.0, md.as_ptr(), md.len(), name.as_mut_ptr(), name.len())
        };
        expect(s, pdx_status::PDX_OK, "");
        // SAFETY: pdx wrote a NUL-terminated name.
        unsafe { CStr::from_ptr(name.as_ptr()) }
            .to_str()
            .unwrap()
            .to_string()
    }
    /// Takes notifications, waiting up to `timeout_us` for the first: (sender, payload) pairs.
    pub fn notifs(&self, timeout_us: u64) -> Vec<(String, Vec<u8>)> {
        let mut list = ptr::null_mut();
        // SAFETY: live agent, writable output.
        let s = unsafe { pdx_wait_notifs(self.0, timeout_us, &mut list) };
        expect(s, pdx_status::PDX_OK, "");
        let mut n = 0;
        // SAFETY: a live list.
        expect(
            unsafe { pdx_notif_list_len(list, &mut n) },
            pdx_status::PDX_OK,
            "",
        );
        let mut out = Vec::new();
        for i in 0..n {
            let (mut from, mut msg, mut len) = (ptr::null(), ptr::null(), 0usize);
            // SAFETY: a live list, index in range, writable outputs.
            let s = unsafe { pdx_notif_list_get(list, i, &mut from, &mut msg, &mut len) };
            expect(s, pdx_status::PDX_OK, "");
            // SAFETY: the pointers stay valid until the list is destroyed below.
            let (from, msg) = unsafe {
                (
                    CStr::from_ptr(from).to_string_lossy().into_owned(),
                    std::slice::from_raw_parts(msg, len).to_vec(),
                )
            };
            out.push((from, msg));
        }
        // SAFETY: a live list, destroyed once.
        expect(
            unsafe { pdx_notif_list_destroy(list) },
            pdx_status::PDX_OK,
            "",
        );
        out
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: made by pdx_agent_create, destroyed once.
        unsafe { pdx_agent_destroy(self.0) };
    }
}

/// A descriptor list destroyed on drop.
pub struct Dlist(pub *mut pdx_dlist);

impl Dlist {
    pub fn host(ranges: &[(u64, u64)]) -> Dlist {
        let mut d = ptr::null_mut();
        // SAFETY: writable output.
        let s = unsafe { pdx_dlist_create(pdx_mem_kind::PDX_MEM_DRAM as i32, &mut d) };
        expect(s, pdx_status::PDX_OK, "");
        for &(addr, len) in ranges {
            // SAFETY: a live list used by this thread only.
            expect(
                unsafe { pdx_dlist_add(d, addr, len, 0) },
                pdx_status::PDX_OK,
                "",
            );
        }
        Dlist(d)
    }
}

impl Drop for Dlist {
    fn drop(&mut self) {
        // SAFETY: made by pdx_dlist_create, destroyed once.
        unsafe { pdx_dlist_destroy(self.0) };
    }
}

/// A transfer request released on drop.
pub struct Xfer(pub *mut pdx_xfer);

impl Xfer {
    /// `pdx_create_xfer_req`; the status and, on success, the request.
    pub fn create(
        agent: &Agent,
        op: pdx_xfer_op,
        local: &Dlist,
        remote_agent: &str,
        remote: &Dlist,
        notif: Option<&[u8]>,
    ) -> (pdx_status, Option<Xfer>) {
        let name = CString::new(remote_agent).unwrap();
        let mut x = ptr::null_mut();
        // SAFETY: live handles, a NUL-terminated name, `notif` readable, writable output.
        let s = unsafe {
            pdx_create_xfer_req(
                agent.0,
                op as i32,
                local.0,
                name.as_ptr(),
                remote.0,
                notif.map_or(ptr::null(), |n| n.as_ptr()),
                notif.map_or(0, |n| n.len()),
                &mut x,
            )
        };
        (s, (!x.is_null()).then(|| Xfer(x)))
    }
    pub fn post(&self) -> pdx_status {
        // SAFETY: a live request.
        unsafe { pdx_post_xfer_req(self.0) }
    }
    pub fn wait(&self, timeout_us: u64) -> pdx_status {
        // SAFETY: a live request.
        unsafe { pdx_wait_xfer_req(self.0, timeout_us) }
    }
    pub fn status(&self) -> pdx_status {
        // SAFETY: a live request.
        unsafe { pdx_get_xfer_status(self.0) }
    }
    pub fn transport(&self) -> String {
        let mut name = ptr::null();
        // SAFETY: a live request, writable output.
        expect(
            unsafe { pdx_query_xfer_transport(self.0, &mut name) },
            pdx_status::PDX_OK,
            "",
        );
        // SAFETY: a static NUL-terminated string.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    }
    /// Posts and waits (10 s at most) for completion.
    #[track_caller]
    pub fn run(&self) {
        match self.post() {
            pdx_status::PDX_OK => {}
            pdx_status::PDX_IN_PROGRESS => expect(self.wait(10_000_000), pdx_status::PDX_OK, ""),
            other => panic!("post: {other:?}: {}", last_error()),
        }
    }
}

impl Drop for Xfer {
    fn drop(&mut self) {
        // SAFETY: made by pdx, released once.
        unsafe { pdx_release_xfer_req(self.0) };
    }
}

/// A registration, ended on drop (declare the `HostBuf` before it, so the memory outlives it).
pub struct Mem(pub *mut pdx_mem);

impl Mem {
    /// `pdx_deregister_mem`; on success the handle is gone.
    pub fn deregister(&mut self) -> pdx_status {
        // SAFETY: a live registration used by this thread only.
        let s = unsafe { pdx_deregister_mem(self.0) };
        if s == pdx_status::PDX_OK {
            self.0 = ptr::null_mut();
        }
        s
    }

    /// `pdx_deregister_mem`, retried while it says `PDX_ERR_REGION_IN_USE` (retryable) for up to 5 s: a transfer's
    /// threads (the initiator's connection reader, the target's handler) let go of the region just after the
    /// transfer completes, so a deregistration right after completion can be refused for a moment.
    pub fn deregister_retrying(&mut self) -> pdx_status {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let s = self.deregister();
            if s != pdx_status::PDX_ERR_REGION_IN_USE || std::time::Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        if !self.0.is_null() {
            let s = self.deregister_retrying();
            assert!(
                std::thread::panicking() || s == pdx_status::PDX_OK,
                "deregister: {s:?}"
            );
        }
    }
}
