//! The safe RAII wrapper over [`crate::ffi`].

use std::any::Any;
use std::ffi::{c_void, CStr};
use std::os::fd::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use crate::ffi;
use crate::{Result, UcxError};

fn status_err(op: &'static str, status: ffi::ucs_status_t) -> UcxError {
    // SAFETY: ucs_status_string returns a pointer to a static NUL-terminated string for any status value.
    let message = unsafe { CStr::from_ptr(ffi::ucs_status_string(status)) }
        .to_string_lossy()
        .into_owned();
    UcxError::Status {
        op,
        status: status as i32,
        message,
    }
}

fn check(op: &'static str, status: ffi::ucs_status_t) -> Result<()> {
    if status == ffi::UCS_OK {
        Ok(())
    } else {
        Err(status_err(op, status))
    }
}

/// `UCS_PTR_IS_ERR`: a status pointer in the error range.
fn ptr_is_err(p: ffi::ucs_status_ptr_t) -> bool {
    (p as usize) >= (ffi::UCS_ERR_LAST as isize as usize)
}

/// `UCS_PTR_STATUS`.
fn ptr_status(p: ffi::ucs_status_ptr_t) -> ffi::ucs_status_t {
    p as isize as ffi::ucs_status_t
}

/// Memory that UCX may read or write while an operation is in flight: the operation keeps an `Arc` of it
/// until it completes, so the memory outlives every access.
pub trait HostMemory: Send + Sync {
    /// The memory.
    fn memory(&self) -> &pdx_sys::Memory;
}

impl HostMemory for pdx_sys::Memory {
    fn memory(&self) -> &pdx_sys::Memory {
        self
    }
}

struct ContextInner {
    h: ffi::ucp_context_h,
}

// SAFETY: the context is created with `mt_workers_shared = 1`, which makes UCX lock the context's shared state
// (memory registration, rkey packing), so it can be used from any thread.
unsafe impl Send for ContextInner {}
// SAFETY: as above; every context call is internally synchronized by UCX.
unsafe impl Sync for ContextInner {}

impl Drop for ContextInner {
    fn drop(&mut self) {
        // SAFETY: `h` came from ucp_init_version and every worker and memory handle holds an Arc of this context,
        // so none is left when it is cleaned up.
        unsafe { ffi::ucp_cleanup(self.h) };
    }
}

/// Settings pdx changes from UCX's defaults, each applied only when the environment does not set it
/// (`UCX_<NAME>` wins).
///
/// - `TCP_TX_SEG_SIZE` / `TCP_RX_SEG_SIZE` (UCX: 8 KiB / 64 KiB): over TCP, UCX 1.13 emulates RMA with active
///   messages of one TX segment each, so every 8 KiB costs a send, a receive and a handler call on each side.
///   larger segments make large puts several times faster on loopback (figures: `docs/benchmarks.md`, "UCX",
///   "TCP segments"); the receive segment must hold a whole send segment and its header.
const DEFAULTS: &[(&str, &str)] = &[("TCP_RX_SEG_SIZE", "512K"), ("TCP_TX_SEG_SIZE", "256K")];

/// Sets one transport setting (`TCP_TX_SEG_SIZE`) in a UCP configuration. UCX 1.13 takes transport settings
/// without their transport prefix (`TX_SEG_SIZE`, applied to every transport that has it, here only `tcp`)
/// and accepts, then ignores, the prefixed name; later versions refuse the short name: try it first.
fn set_default(config: *mut ffi::ucp_config_t, name: &str, value: &str) {
    let short = name.split_once('_').map_or(name, |(_, rest)| rest);
    let Ok(cvalue) = std::ffi::CString::new(value) else {
        return;
    };
    let mut last = ffi::UCS_OK;
    for key in [short, name] {
        let Ok(ckey) = std::ffi::CString::new(key) else {
            return;
        };
        // SAFETY: config came from ucp_config_read and is live; both strings are NUL-terminated for the call.
        last = unsafe { ffi::ucp_config_modify(config, ckey.as_ptr(), cvalue.as_ptr()) };
        if last == ffi::UCS_OK {
            return;
        }
    }
    // A UCX without this setting keeps its own default.
    tracing::debug!(target: "ucx", setting = name, "{}", status_err("ucp_config_modify", last));
}

/// A UCP context (`ucp_context_h`) with RMA, active messages and wakeup. Configured from the `UCX_*`
/// environment (`UCX_TLS`, `UCX_NET_DEVICES`, ...), read once at creation.
#[derive(Clone)]
pub struct Context {
    inner: Arc<ContextInner>,
}

impl Context {
    /// Checks the library version ([`crate::check_version`]) and creates a context.
    ///
    /// Errors: [`UcxError::TooOld`]; [`UcxError::Status`] when configuration or initialisation fails (e.g. a
    /// `UCX_TLS` naming no usable transport).
    pub fn new() -> Result<Context> {
        crate::check_version()?;
        route_ucx_logs();
        let mut config: *mut ffi::ucp_config_t = ptr::null_mut();
        // SAFETY: null prefix and file name select the defaults (the `UCX_` environment); `config` is a valid
        // out pointer.
        check("ucp_config_read", unsafe {
            ffi::ucp_config_read(ptr::null(), ptr::null(), &mut config)
        })?;
        for (name, value) in DEFAULTS {
            if std::env::var_os(format!("UCX_{name}")).is_none() {
                set_default(config, name, value);
            }
        }
        // SAFETY: ucp_params_t is a plain C struct for which all-zero is a valid "no fields set" value.
        let mut params: ffi::ucp_params_t = unsafe { std::mem::zeroed() };
        params.field_mask =
            (ffi::UCP_PARAM_FIELD_FEATURES | ffi::UCP_PARAM_FIELD_MT_WORKERS_SHARED) as u64;
        params.features =
            (ffi::UCP_FEATURE_RMA | ffi::UCP_FEATURE_AM | ffi::UCP_FEATURE_WAKEUP) as u64;
        params.mt_workers_shared = 1;
        let mut h: ffi::ucp_context_h = ptr::null_mut();
        // SAFETY: params and config are valid for the call; `h` is a valid out pointer.
        let status = unsafe {
            ffi::ucp_init_version(
                ffi::UCP_API_MAJOR,
                ffi::UCP_API_MINOR,
                &params,
                config,
                &mut h,
            )
        };
        // SAFETY: config came from ucp_config_read and is released exactly once, after its last use.
        unsafe { ffi::ucp_config_release(config) };
        check("ucp_init", status)?;
        Ok(Context {
            inner: Arc::new(ContextInner { h }),
        })
    }

    /// Registers host memory with UCX (`ucp_mem_map`) so peers can reach it with the packed [`MemHandle::rkey`];
    /// unmapped when the handle drops. The handle does not keep the memory alive (the owner's reference counts
    /// stay exact): drop it when the memory is deregistered. A registration that outlives its memory touches no
    /// memory of this process (RDMA transports keep the pages pinned until the unmap), but a peer still holding
    /// the key could write into them, as with any stale registration.
    ///
    /// Errors: [`UcxError::Status`] from `ucp_mem_map` / `ucp_rkey_pack`; [`UcxError::Invalid`] for empty memory.
    pub fn mem_map(&self, mem: &pdx_sys::Memory) -> Result<MemHandle> {
        let (addr, len) = (mem.addr(), mem.len());
        if len == 0 {
            return Err(UcxError::Invalid("cannot map empty memory".into()));
        }
        // SAFETY: all-zero is a valid empty ucp_mem_map_params_t.
        let mut params: ffi::ucp_mem_map_params_t = unsafe { std::mem::zeroed() };
        params.field_mask =
            (ffi::UCP_MEM_MAP_PARAM_FIELD_ADDRESS | ffi::UCP_MEM_MAP_PARAM_FIELD_LENGTH) as u64;
        params.address = addr as *mut c_void;
        params.length = len;
        let mut memh: ffi::ucp_mem_h = ptr::null_mut();
        // SAFETY: [addr, addr+len) is live memory (borrowed for the call); registration reads no bytes of it.
        check("ucp_mem_map", unsafe {
            ffi::ucp_mem_map(self.inner.h, &params, &mut memh)
        })?;
        self.finish_map(memh)
    }

    /// Allocates `len` bytes of host memory through UCX (`ucp_mem_map` with `UCP_MEM_MAP_ALLOCATE`) and
    /// registers it, zero-filled. UCX takes the memory from its allocators in `UCX_ALLOC_PRIO` order (SysV or
    /// POSIX shared memory first), so peers on the same host can reach it with direct RMA over UCX's
    /// shared-memory transports: UCX 1.13's `sysv` and `posix` serve RMA only on memory they allocated, and
    /// emulate it (through their message FIFO and the target's progress) on any other memory. The returned
    /// [`pdx_sys::Memory`] owns the handle, so the memory stays valid until the `Memory` and the handle are
    /// both gone, whichever is dropped last.
    ///
    /// Errors: [`UcxError::Invalid`] for 0 bytes; [`UcxError::Status`] from `ucp_mem_map`, `ucp_mem_query` or
    /// `ucp_rkey_pack`.
    pub fn allocate(&self, len: usize) -> Result<(pdx_sys::Memory, Arc<MemHandle>)> {
        if len == 0 {
            return Err(UcxError::Invalid("cannot allocate 0 bytes".into()));
        }
        // SAFETY: all-zero is a valid empty ucp_mem_map_params_t.
        let mut params: ffi::ucp_mem_map_params_t = unsafe { std::mem::zeroed() };
        params.field_mask = (ffi::UCP_MEM_MAP_PARAM_FIELD_ADDRESS
            | ffi::UCP_MEM_MAP_PARAM_FIELD_LENGTH
            | ffi::UCP_MEM_MAP_PARAM_FIELD_FLAGS) as u64;
        params.address = ptr::null_mut();
        params.length = len;
        params.flags = ffi::UCP_MEM_MAP_ALLOCATE;
        let mut memh: ffi::ucp_mem_h = ptr::null_mut();
        // SAFETY: a null address with ALLOCATE asks UCX for new memory; params and the out pointer are valid.
        check("ucp_mem_map", unsafe {
            ffi::ucp_mem_map(self.inner.h, &params, &mut memh)
        })?;
        // From here the handle unmaps (and frees) the allocation on every path.
        let handle = Arc::new(self.finish_map(memh)?);
        // SAFETY: all-zero is a valid empty ucp_mem_attr_t.
        let mut attr: ffi::ucp_mem_attr_t = unsafe { std::mem::zeroed() };
        attr.field_mask = (ffi::UCP_MEM_ATTR_FIELD_ADDRESS | ffi::UCP_MEM_ATTR_FIELD_LENGTH) as u64;
        // SAFETY: memh is a live handle of this context; attr is a valid out pointer.
        check("ucp_mem_query", unsafe {
            ffi::ucp_mem_query(handle.memh, &mut attr)
        })?;
        let ptr = std::ptr::NonNull::new(attr.address as *mut u8)
            .ok_or_else(|| UcxError::Invalid("ucp_mem_query returned no address".into()))?;
        if attr.length < len {
            return Err(UcxError::Invalid(format!(
                "UCX allocated {} of {len} bytes",
                attr.length
            )));
        }
        // SAFETY: UCX mapped [ptr, ptr+attr.length) ⊇ [ptr, ptr+len) read-write for this process, valid until
        // ucp_mem_unmap, which runs only when the last Arc of the handle drops; the Memory owns one of them. No
        // Rust references into it exist.
        let mem =
            unsafe { pdx_sys::Memory::from_raw_parts_owned(ptr, len, Box::new(handle.clone())) };
        // Allocators other than shared memory and mmap (the heap) do not zero.
        mem.fill(0, len, 0)
            .map_err(|e| UcxError::Invalid(e.to_string()))?;
        Ok((mem, handle))
    }

    fn finish_map(&self, memh: ffi::ucp_mem_h) -> Result<MemHandle> {
        let mut handle = MemHandle {
            ctx: self.inner.clone(),
            memh,
            rkey: Vec::new(),
        };
        let mut buf: *mut c_void = ptr::null_mut();
        let mut size = 0usize;
        // SAFETY: memh is a live handle of this context; buf/size are valid out pointers.
        check("ucp_rkey_pack", unsafe {
            ffi::ucp_rkey_pack(self.inner.h, memh, &mut buf, &mut size)
        })?;
        // SAFETY: on success UCX returns `size` readable bytes at `buf`, which we copy and release once.
        let rkey = unsafe { std::slice::from_raw_parts(buf as *const u8, size) }.to_vec();
        // SAFETY: buf came from ucp_rkey_pack and is released exactly once.
        unsafe { ffi::ucp_rkey_buffer_release(buf) };
        handle.rkey = rkey;
        Ok(handle)
    }
}

/// Host memory registered with UCX (`ucp_mem_map`); unmapped on drop.
pub struct MemHandle {
    ctx: Arc<ContextInner>,
    memh: ffi::ucp_mem_h,
    rkey: Vec<u8>,
}

// SAFETY: the handle is only used through the (thread-safe, mt_workers_shared) context.
unsafe impl Send for MemHandle {}
// SAFETY: the handle is immutable after creation.
unsafe impl Sync for MemHandle {}

impl MemHandle {
    /// The packed remote key (`ucp_rkey_pack`): peers unpack it with [`Endpoint::unpack_rkey`].
    pub fn rkey(&self) -> &[u8] {
        &self.rkey
    }
}

impl Drop for MemHandle {
    fn drop(&mut self) {
        // SAFETY: memh came from ucp_mem_map on this context (alive through `ctx`) and is unmapped once.
        let status = unsafe { ffi::ucp_mem_unmap(self.ctx.h, self.memh) };
        if status != ffi::UCS_OK {
            eprintln!("pdx-ucx-sys: {}", status_err("ucp_mem_unmap", status));
        }
    }
}

impl std::fmt::Debug for MemHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemHandle")
            .field("rkey_bytes", &self.rkey.len())
            .finish()
    }
}

/// A notification receiver: `(header, data)` of one active message.
pub type AmHandler = Box<dyn Fn(&[u8], &[u8]) + Send + Sync>;

/// Completion of a non-blocking operation: `Ok` or the failure. Runs inside [`Worker::progress`] (or inside
/// the posting call when it completed at once); it must not call back into the worker.
pub type DoneFn = Box<dyn FnOnce(Result<()>) + Send>;

struct WorkerInner {
    h: ffi::ucp_worker_h,
    lock: Mutex<()>,
    holder: Mutex<Option<ThreadId>>,
    // Boxed twice on purpose: callbacks get a thin pointer to the inner `AmHandler`, which must not move when the
    // Vec grows.
    #[allow(clippy::vec_box)]
    am_handlers: Mutex<Vec<Box<AmHandler>>>,
    _ctx: Arc<ContextInner>,
}

// SAFETY: the worker is created SERIALIZED and every call on it goes through `WorkerInner::enter`, which holds
// `lock`, so no two threads use it at once.
unsafe impl Send for WorkerInner {}
// SAFETY: as above.
unsafe impl Sync for WorkerInner {}

struct Guard<'a> {
    _g: MutexGuard<'a, ()>,
    holder: &'a Mutex<Option<ThreadId>>,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        *self.holder.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl WorkerInner {
    fn enter(&self) -> Result<Guard<'_>> {
        let me = std::thread::current().id();
        if *self.holder.lock().unwrap_or_else(|e| e.into_inner()) == Some(me) {
            return Err(UcxError::Reentrant);
        }
        let g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        *self.holder.lock().unwrap_or_else(|e| e.into_inner()) = Some(me);
        Ok(Guard {
            _g: g,
            holder: &self.holder,
        })
    }

    fn try_enter(&self) -> Result<Option<Guard<'_>>> {
        let me = std::thread::current().id();
        if *self.holder.lock().unwrap_or_else(|e| e.into_inner()) == Some(me) {
            return Err(UcxError::Reentrant);
        }
        let g = match self.lock.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
        };
        *self.holder.lock().unwrap_or_else(|e| e.into_inner()) = Some(me);
        Ok(Some(Guard {
            _g: g,
            holder: &self.holder,
        }))
    }

    /// Progresses until `req` (a request of this worker) completes or `limit` passes; then frees it.
    fn wait_and_free(&self, _g: &Guard<'_>, req: ffi::ucs_status_ptr_t, limit: Duration) {
        let start = Instant::now();
        loop {
            // SAFETY: req is a live request of this worker; the guard serializes worker access.
            let st = unsafe { ffi::ucp_request_check_status(req) };
            if st != ffi::UCS_INPROGRESS || start.elapsed() > limit {
                break;
            }
            // SAFETY: the guard serializes worker access.
            unsafe { ffi::ucp_worker_progress(self.h) };
        }
        // SAFETY: req is a live request; freeing it is allowed whether or not it completed.
        unsafe { ffi::ucp_request_free(req) };
    }
}

impl Drop for WorkerInner {
    fn drop(&mut self) {
        // SAFETY: endpoints and keys hold Arcs of this worker, so none is left; the worker is destroyed once,
        // before its context (held by `_ctx`).
        unsafe { ffi::ucp_worker_destroy(self.h) };
    }
}

/// A UCP worker (`ucp_worker_h`): the progress engine, its address, and the endpoints made from it.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<WorkerInner>,
}

impl Worker {
    /// Creates a worker with wakeup events for RMA, active messages and sends.
    ///
    /// Errors: [`UcxError::Status`] from `ucp_worker_create`.
    pub fn new(ctx: &Context) -> Result<Worker> {
        // SAFETY: all-zero is a valid empty ucp_worker_params_t.
        let mut params: ffi::ucp_worker_params_t = unsafe { std::mem::zeroed() };
        params.field_mask =
            (ffi::UCP_WORKER_PARAM_FIELD_THREAD_MODE | ffi::UCP_WORKER_PARAM_FIELD_EVENTS) as u64;
        params.thread_mode = ffi::UCS_THREAD_MODE_SERIALIZED;
        params.events = ffi::UCP_WAKEUP_RMA | ffi::UCP_WAKEUP_TX | ffi::UCP_WAKEUP_RX;
        let mut h: ffi::ucp_worker_h = ptr::null_mut();
        // SAFETY: the context is alive; params and the out pointer are valid.
        check("ucp_worker_create", unsafe {
            ffi::ucp_worker_create(ctx.inner.h, &params, &mut h)
        })?;
        Ok(Worker {
            inner: Arc::new(WorkerInner {
                h,
                lock: Mutex::new(()),
                holder: Mutex::new(None),
                am_handlers: Mutex::new(Vec::new()),
                _ctx: ctx.inner.clone(),
            }),
        })
    }

    /// The worker's address (`ucp_worker_get_address`): give it to peers, who connect with
    /// [`Worker::connect`]. A few hundred bytes, opaque.
    pub fn address(&self) -> Result<Vec<u8>> {
        let g = self.inner.enter()?;
        let mut addr: *mut ffi::ucp_address_t = ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: the guard serializes worker access; out pointers are valid.
        check("ucp_worker_get_address", unsafe {
            ffi::ucp_worker_get_address(self.inner.h, &mut addr, &mut len)
        })?;
        // SAFETY: UCX returned `len` readable bytes at `addr`.
        let out = unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec();
        // SAFETY: addr came from ucp_worker_get_address on this worker and is released once.
        unsafe { ffi::ucp_worker_release_address(self.inner.h, addr) };
        drop(g);
        Ok(out)
    }

    /// Makes progress on every outstanding operation (`ucp_worker_progress`) until there is nothing left to do
    /// right now; runs completion callbacks and active-message handlers. Returns the number of events.
    ///
    /// Errors: [`UcxError::Reentrant`] from inside a callback.
    pub fn progress(&self) -> Result<u32> {
        let _g = self.inner.enter()?;
        let mut total = 0;
        loop {
            // SAFETY: the guard serializes worker access.
            let n = unsafe { ffi::ucp_worker_progress(self.inner.h) };
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    /// Like [`Worker::progress`], but returns `Ok(None)` at once when another thread is using the worker (it
    /// is making progress, or posting), instead of waiting for it.
    ///
    /// Errors: [`UcxError::Reentrant`] from inside a callback.
    pub fn try_progress(&self) -> Result<Option<u32>> {
        let Some(_g) = self.inner.try_enter()? else {
            return Ok(None);
        };
        let mut total = 0;
        loop {
            // SAFETY: the guard serializes worker access.
            let n = unsafe { ffi::ucp_worker_progress(self.inner.h) };
            if n == 0 {
                return Ok(Some(total));
            }
            total += n;
        }
    }

    /// The worker's event file descriptor (`ucp_worker_get_efd`): readable when there is work after
    /// [`Worker::arm`]. Owned by the worker; do not close it.
    pub fn event_fd(&self) -> Result<RawFd> {
        let _g = self.inner.enter()?;
        let mut fd: libc::c_int = -1;
        // SAFETY: the guard serializes worker access; fd is a valid out pointer.
        check("ucp_worker_get_efd", unsafe {
            ffi::ucp_worker_get_efd(self.inner.h, &mut fd)
        })?;
        Ok(fd)
    }

    /// Arms the event fd (`ucp_worker_arm`). `Ok(true)`: armed, safe to block on [`Worker::wait_event`];
    /// `Ok(false)`: events are pending (`UCS_ERR_BUSY`), call [`Worker::progress`] again first.
    pub fn arm(&self) -> Result<bool> {
        let _g = self.inner.enter()?;
        // SAFETY: the guard serializes worker access.
        match unsafe { ffi::ucp_worker_arm(self.inner.h) } {
            ffi::UCS_OK => Ok(true),
            ffi::UCS_ERR_BUSY => Ok(false),
            s => Err(status_err("ucp_worker_arm", s)),
        }
    }

    /// Wakes a thread blocked in [`Worker::wait_event`] (`ucp_worker_signal`). Safe from any thread.
    pub fn signal(&self) -> Result<()> {
        // SAFETY: ucp_worker_signal is documented thread-safe and may be called without serialization.
        check("ucp_worker_signal", unsafe {
            ffi::ucp_worker_signal(self.inner.h)
        })
    }

    /// Blocks until the event fd is readable or `timeout` passes (poll(2)); true when readable. Call after
    /// [`Worker::arm`] returned true. Does not hold the worker lock.
    pub fn wait_event(&self, fd: RawFd, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: pfd is one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
    }

    /// Installs the receiver of active messages with `id` (`ucp_worker_set_am_recv_handler`). Messages must be
    /// sent eagerly ([`Endpoint::am_send`] does); the handler gets copies-free views of header and data.
    pub fn set_am_handler(&self, id: u16, handler: AmHandler) -> Result<()> {
        let _g = self.inner.enter()?;
        let boxed: Box<AmHandler> = Box::new(handler);
        let arg = &*boxed as *const AmHandler as *mut c_void;
        // SAFETY: all-zero is a valid empty ucp_am_handler_param_t.
        let mut p: ffi::ucp_am_handler_param_t = unsafe { std::mem::zeroed() };
        p.field_mask = (ffi::UCP_AM_HANDLER_PARAM_FIELD_ID
            | ffi::UCP_AM_HANDLER_PARAM_FIELD_CB
            | ffi::UCP_AM_HANDLER_PARAM_FIELD_ARG
            | ffi::UCP_AM_HANDLER_PARAM_FIELD_FLAGS) as u64;
        p.id = id as libc::c_uint;
        p.flags = ffi::UCP_AM_FLAG_WHOLE_MSG;
        p.cb = Some(am_trampoline);
        p.arg = arg;
        // SAFETY: the guard serializes worker access; `arg` points into a Box kept in the worker (never moved or
        // freed before the worker), so it outlives every callback.
        check("ucp_worker_set_am_recv_handler", unsafe {
            ffi::ucp_worker_set_am_recv_handler(self.inner.h, &p)
        })?;
        self.inner
            .am_handlers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(boxed);
        Ok(())
    }

    /// Connects to a peer worker by its [`Worker::address`] (`ucp_ep_create`). Asks for peer error handling (a
    /// dead peer fails the endpoint's operations instead of hanging them) and falls back to none where the
    /// transports cannot provide it ([`Endpoint::detects_peer_failure`]).
    ///
    /// Errors: [`UcxError::Status`] (e.g. unreachable, or a malformed address); [`UcxError::Invalid`] for an
    /// empty address.
    pub fn connect(&self, address: &[u8]) -> Result<Endpoint> {
        match self.connect_mode(address, ffi::UCP_ERR_HANDLING_MODE_PEER) {
            // Transports without peer failure support (UCX 1.13's shared memory) refuse PEER mode: fall back to
            // no error handling; the caller must then detect peer death itself.
            Err(UcxError::Status { .. }) => {
                self.connect_mode(address, ffi::UCP_ERR_HANDLING_MODE_NONE)
            }
            r => r,
        }
    }

    fn connect_mode(&self, address: &[u8], mode: ffi::ucp_err_handling_mode_t) -> Result<Endpoint> {
        if address.is_empty() {
            return Err(UcxError::Invalid("empty worker address".into()));
        }
        let g = self.inner.enter()?;
        let state = Arc::new(EpState {
            failed: AtomicI32::new(0),
        });
        let arg = Arc::into_raw(state.clone()) as *mut c_void;
        // SAFETY: all-zero is a valid empty ucp_ep_params_t.
        let mut p: ffi::ucp_ep_params_t = unsafe { std::mem::zeroed() };
        p.field_mask = (ffi::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
            | ffi::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
            | ffi::UCP_EP_PARAM_FIELD_ERR_HANDLER) as u64;
        p.address = address.as_ptr() as *const ffi::ucp_address_t;
        p.err_mode = mode;
        p.err_handler.cb = Some(ep_error_trampoline);
        p.err_handler.arg = arg;
        let mut ep: ffi::ucp_ep_h = ptr::null_mut();
        // SAFETY: the guard serializes worker access; the address bytes are valid for the call (UCX copies what it
        // needs); `arg` is a leaked Arc reclaimed in Endpoint::drop after the endpoint is closed.
        let status = unsafe { ffi::ucp_ep_create(self.inner.h, &p, &mut ep) };
        if status != ffi::UCS_OK {
            // SAFETY: the endpoint was not created, so the error handler will never see `arg`: reclaim it.
            drop(unsafe { Arc::from_raw(arg as *const EpState) });
            return Err(status_err("ucp_ep_create", status));
        }
        drop(g);
        Ok(Endpoint {
            inner: Arc::new(EpInner {
                worker: self.inner.clone(),
                ep,
                state,
                arg: AtomicU64::new(arg as u64),
                peer_failure_handling: mode == ffi::UCP_ERR_HANDLING_MODE_PEER,
            }),
        })
    }
}

struct EpState {
    /// 0, or the ucs_status_t that failed the endpoint.
    failed: AtomicI32,
}

struct EpInner {
    worker: Arc<WorkerInner>,
    ep: ffi::ucp_ep_h,
    state: Arc<EpState>,
    arg: AtomicU64,
    peer_failure_handling: bool,
}

// SAFETY: every use of `ep` goes through the worker's serializing guard.
unsafe impl Send for EpInner {}
// SAFETY: as above.
unsafe impl Sync for EpInner {}

impl Drop for EpInner {
    fn drop(&mut self) {
        let Ok(g) = self.worker.enter() else {
            // Dropped from inside a callback: leak the endpoint rather than deadlock.
            return;
        };
        // SAFETY: all-zero is a valid empty ucp_request_param_t.
        let mut p: ffi::ucp_request_param_t = unsafe { std::mem::zeroed() };
        p.op_attr_mask = ffi::UCP_OP_ATTR_FIELD_FLAGS;
        p.flags = ffi::UCP_EP_CLOSE_FLAG_FORCE;
        // SAFETY: the guard serializes worker access; the endpoint is live and closed once.
        let req = unsafe { ffi::ucp_ep_close_nbx(self.ep, &p) };
        let closed = if req.is_null() || ptr_is_err(req) {
            true
        } else {
            self.worker.wait_and_free(&g, req, Duration::from_secs(5));
            true
        };
        if closed {
            let arg = self.arg.swap(0, Ordering::AcqRel) as *const EpState;
            if !arg.is_null() {
                // SAFETY: after a forced close the error handler is no longer called; `arg` is the Arc leaked in
                // Worker::connect, reclaimed once.
                drop(unsafe { Arc::from_raw(arg) });
            }
        }
    }
}

/// A connection to a peer worker (`ucp_ep_h`), closed (forcibly) on drop.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<EpInner>,
}

/// Direction of an RMA batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rma {
    /// `ucp_put_nbx`: local → remote.
    Put,
    /// `ucp_get_nbx`: remote → local.
    Get,
}

/// One RMA operation of a batch: `len` bytes at `local_off` of `local`, to or from `remote_addr` of the peer
/// (inside the region that `rkey` covers).
pub struct RmaOp<'a> {
    /// Local memory.
    pub local: &'a Arc<dyn HostMemory>,
    /// Offset in `local`, bytes.
    pub local_off: usize,
    /// Length, bytes.
    pub len: usize,
    /// Address in the peer's address space.
    pub remote_addr: u64,
    /// The peer region's key, unpacked on this endpoint.
    pub rkey: &'a RemoteKey,
}

struct Pending {
    done: DoneFn,
    _keep: Box<dyn Any + Send>,
}

impl Endpoint {
    /// The failure status reported by UCX for this endpoint (peer death), if any.
    pub fn failure(&self) -> Option<UcxError> {
        match self.inner.state.failed.load(Ordering::Acquire) {
            0 => None,
            s => Some(status_err("endpoint", s as ffi::ucs_status_t)),
        }
    }

    /// True when UCX reports peer failures on this endpoint (`UCP_ERR_HANDLING_MODE_PEER`); false when the
    /// transports in use cannot (UCX 1.13 shared memory), so the caller must watch the peer another way.
    pub fn detects_peer_failure(&self) -> bool {
        self.inner.peer_failure_handling
    }

    /// Unpacks a peer's packed key ([`MemHandle::rkey`]) for use on this endpoint (`ucp_ep_rkey_unpack`).
    ///
    /// Errors: [`UcxError::Invalid`] for an empty buffer; [`UcxError::Status`] for a malformed one.
    pub fn unpack_rkey(&self, packed: &[u8]) -> Result<RemoteKey> {
        if packed.is_empty() {
            return Err(UcxError::Invalid("empty remote key".into()));
        }
        let _g = self.inner.worker.enter()?;
        let mut rkey: ffi::ucp_rkey_h = ptr::null_mut();
        // SAFETY: the guard serializes worker access; the endpoint is live; the buffer is valid for the call.
        check("ucp_ep_rkey_unpack", unsafe {
            ffi::ucp_ep_rkey_unpack(self.inner.ep, packed.as_ptr() as *const c_void, &mut rkey)
        })?;
        Ok(RemoteKey {
            ep: self.inner.clone(),
            rkey,
        })
    }

    /// Posts a batch of puts or gets and then a flush (`ucp_ep_flush_nbx`); `done` runs once every operation
    /// of the batch is complete at the peer (or failed). The operations' local memory is held until then by
    /// the endpoint itself. Returns after posting; completion comes from [`Worker::progress`], or at once
    /// (inside this call) when UCX finished everything immediately.
    ///
    /// Errors (then `done` is not called): [`UcxError::Invalid`] for a range outside its local memory or a key
    /// of another endpoint; [`UcxError::Status`] when posting fails (e.g. the endpoint has failed).
    pub fn rma_batch(&self, kind: Rma, ops: &[RmaOp<'_>], done: DoneFn) -> Result<()> {
        for (i, op) in ops.iter().enumerate() {
            let mem_len = op.local.memory().len();
            if op.local_off.checked_add(op.len).is_none_or(|e| e > mem_len) || op.len == 0 {
                return Err(UcxError::Invalid(format!(
                    "op {i}: {} bytes at {} outside {mem_len}-byte local memory",
                    op.len, op.local_off
                )));
            }
            if !Arc::ptr_eq(&op.rkey.ep, &self.inner) {
                return Err(UcxError::Invalid(format!(
                    "op {i}: remote key unpacked on another endpoint"
                )));
            }
        }
        if let Some(e) = self.failure() {
            return Err(e);
        }
        // One reference per distinct local region (a batch's blocks are usually in one region): an atomic
        // increment and decrement per block would cost more than the post itself at 64 KiB over shared memory.
        let mut keep_ops: Vec<Arc<dyn HostMemory>> = Vec::new();
        for o in ops {
            if !keep_ops
                .iter()
                .any(|k| std::ptr::addr_eq(Arc::as_ptr(k), Arc::as_ptr(o.local)))
            {
                keep_ops.push(o.local.clone());
            }
        }
        let g = self.inner.worker.enter()?;
        // SAFETY: all-zero is a valid empty ucp_request_param_t (no callback: the request is freed at once).
        let p0: ffi::ucp_request_param_t = unsafe { std::mem::zeroed() };
        for op in ops {
            let buf = (op.local.memory().addr() as usize + op.local_off) as *mut c_void;
            // SAFETY: the guard serializes worker access; [buf, buf+len) lies in memory kept alive until the flush
            // below completes (`keep_ops` travels with the flush's Pending); the key belongs to this endpoint.
            let req = unsafe {
                match kind {
                    Rma::Put => ffi::ucp_put_nbx(
                        self.inner.ep,
                        buf,
                        op.len,
                        op.remote_addr,
                        op.rkey.rkey,
                        &p0,
                    ),
                    Rma::Get => ffi::ucp_get_nbx(
                        self.inner.ep,
                        buf,
                        op.len,
                        op.remote_addr,
                        op.rkey.rkey,
                        &p0,
                    ),
                }
            };
            if ptr_is_err(req) {
                return Err(status_err(
                    match kind {
                        Rma::Put => "ucp_put_nbx",
                        Rma::Get => "ucp_get_nbx",
                    },
                    ptr_status(req),
                ));
            }
            if !req.is_null() {
                // SAFETY: a request returned without a callback is freed by us; UCX releases it on completion.
                unsafe { ffi::ucp_request_free(req) };
            }
        }
        let pending = Box::new(Pending {
            done,
            _keep: Box::new(keep_ops),
        });
        self.post_with_callback(&g, "ucp_ep_flush_nbx", pending, |p| {
            // SAFETY: the guard serializes worker access; the endpoint is live; p is a valid param.
            unsafe { ffi::ucp_ep_flush_nbx(self.inner.ep, p) }
        })
    }

    /// Sends an active message `id` with `header` and `data`, eagerly (`ucp_am_send_nbx` with
    /// `UCP_AM_SEND_FLAG_EAGER`); `done` runs when the buffers may be reused (sent, not necessarily received).
    /// Messages on one endpoint are ordered after earlier completed operations of this endpoint.
    ///
    /// Errors: [`UcxError::Status`] when the send fails to post.
    pub fn am_send(&self, id: u16, header: Vec<u8>, data: Vec<u8>, done: DoneFn) -> Result<()> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let g = self.inner.worker.enter()?;
        let (hp, hl, dp, dl) = (header.as_ptr(), header.len(), data.as_ptr(), data.len());
        let pending = Box::new(Pending {
            done,
            _keep: Box::new((header, data)),
        });
        self.post_with_callback(&g, "ucp_am_send_nbx", pending, |p| {
            let mut p = *p;
            p.op_attr_mask |= ffi::UCP_OP_ATTR_FIELD_FLAGS;
            p.flags = ffi::UCP_AM_SEND_FLAG_EAGER;
            // SAFETY: the guard serializes worker access; header and data buffers live in `pending` (heap, not
            // moved) until the completion callback or the immediate completion below.
            unsafe {
                ffi::ucp_am_send_nbx(
                    self.inner.ep,
                    id as libc::c_uint,
                    hp as *const c_void,
                    hl,
                    dp as *const c_void,
                    dl,
                    &p,
                )
            }
        })
    }

    fn post_with_callback(
        &self,
        _g: &Guard<'_>,
        op: &'static str,
        pending: Box<Pending>,
        post: impl FnOnce(&ffi::ucp_request_param_t) -> ffi::ucs_status_ptr_t,
    ) -> Result<()> {
        let raw = Box::into_raw(pending);
        // SAFETY: all-zero is a valid empty ucp_request_param_t.
        let mut p: ffi::ucp_request_param_t = unsafe { std::mem::zeroed() };
        p.op_attr_mask = ffi::UCP_OP_ATTR_FIELD_CALLBACK | ffi::UCP_OP_ATTR_FIELD_USER_DATA;
        p.cb.send = Some(send_trampoline);
        p.user_data = raw as *mut c_void;
        let req = post(&p);
        if req.is_null() || ptr_is_err(req) {
            // Completed (or failed) at once: UCX will not call the callback.
            // SAFETY: `raw` came from Box::into_raw above and UCX did not take it.
            let pending = unsafe { Box::from_raw(raw) };
            let result = if req.is_null() {
                Ok(())
            } else {
                Err(status_err(op, ptr_status(req)))
            };
            let failed = result.is_err();
            let Pending { done, _keep } = *pending;
            if failed {
                drop(_keep);
                return result;
            }
            done(result);
            return Ok(());
        }
        Ok(())
    }
}

/// A peer region's key unpacked on an endpoint (`ucp_rkey_h`); destroyed on drop.
pub struct RemoteKey {
    ep: Arc<EpInner>,
    rkey: ffi::ucp_rkey_h,
}

// SAFETY: the key is only used under the worker's serializing guard.
unsafe impl Send for RemoteKey {}
// SAFETY: as above.
unsafe impl Sync for RemoteKey {}

impl Drop for RemoteKey {
    fn drop(&mut self) {
        let _g = self.ep.worker.enter();
        // SAFETY: the key came from ucp_ep_rkey_unpack on an endpoint still open (held by `ep`); destroyed once.
        unsafe { ffi::ucp_rkey_destroy(self.rkey) };
    }
}

impl RemoteKey {
    /// Whether UCX can map the peer's memory at `remote_addr` into this process (`ucp_rkey_ptr`). True for memory
    /// a same-host peer allocated through UCX (its `sysv`/`posix` transports then do put/get as one copy). False
    /// otherwise, in particular for memory UCX did not allocate (caller memory, pdx's memfd arenas): UCX 1.13 has
    /// no shared-memory RMA lane for such memory (`cma` offers only zero-copy operations, which 1.13 does not take
    /// for RMA lanes), so put/get on it are emulated with active messages through the shared-memory FIFO, a copy
    /// on each side and the target's progress in the loop (`UCX_PROTO_ENABLE=y UCX_PROTO_INFO=y` prints "software
    /// emulation"). Transports with hardware RMA (InfiniBand) reach memory they cannot map, so false does not
    /// always mean emulated. Errors (called from inside a UCX callback) count as false.
    pub fn maps(&self, remote_addr: u64) -> bool {
        let Ok(_g) = self.ep.worker.enter() else {
            return false;
        };
        let mut local: *mut c_void = ptr::null_mut();
        // SAFETY: the guard serializes use of the key, which came from ucp_ep_rkey_unpack on an endpoint still
        // open (held by `ep`); `local` is a valid out pointer and nothing is accessed through it.
        let status = unsafe { ffi::ucp_rkey_ptr(self.rkey, remote_addr, &mut local) };
        status == ffi::UCS_OK
    }
}

impl std::fmt::Debug for RemoteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RemoteKey")
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("failed", &self.inner.state.failed.load(Ordering::Relaxed))
            .finish()
    }
}

unsafe extern "C" fn send_trampoline(
    request: *mut c_void,
    status: ffi::ucs_status_t,
    user_data: *mut c_void,
) {
    // SAFETY: user_data is the Box<Pending> leaked by post_with_callback; UCX calls this once per request.
    let pending = unsafe { Box::from_raw(user_data as *mut Pending) };
    // SAFETY: the request completed; we own it and free it once.
    unsafe { ffi::ucp_request_free(request) };
    let result = if status == ffi::UCS_OK {
        Ok(())
    } else {
        Err(status_err("request", status))
    };
    let Pending { done, _keep } = *pending;
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| done(result)));
    drop(_keep);
}

unsafe extern "C" fn ep_error_trampoline(
    arg: *mut c_void,
    _ep: ffi::ucp_ep_h,
    status: ffi::ucs_status_t,
) {
    // SAFETY: arg is the EpState Arc leaked in Worker::connect, alive until the endpoint is closed.
    let state = unsafe { &*(arg as *const EpState) };
    let s = if status == ffi::UCS_OK {
        ffi::UCS_ERR_CONNECTION_RESET
    } else {
        status
    };
    state.failed.store(s as i32, Ordering::Release);
}

unsafe extern "C" fn am_trampoline(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const ffi::ucp_am_recv_param_t,
) -> ffi::ucs_status_t {
    // SAFETY: param is valid for the callback.
    let flags = unsafe { (*param).recv_attr };
    if flags & ffi::UCP_AM_RECV_ATTR_FLAG_RNDV as u64 != 0 {
        // Only eager messages are sent; drop anything else.
        return ffi::UCS_OK;
    }
    // SAFETY: arg points at the AmHandler boxed in the worker (alive as long as the worker).
    let handler = unsafe { &*(arg as *const AmHandler) };
    let h: &[u8] = if header_length == 0 || header.is_null() {
        &[]
    } else {
        // SAFETY: UCX gives header_length readable bytes at header for the duration of the callback.
        unsafe { std::slice::from_raw_parts(header as *const u8, header_length) }
    };
    let d: &[u8] = if length == 0 || data.is_null() {
        &[]
    } else {
        // SAFETY: eager data: `length` readable bytes at data for the duration of the callback.
        unsafe { std::slice::from_raw_parts(data as *const u8, length) }
    };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(h, d)));
    ffi::UCS_OK
}

#[cfg(all(test, not(pdx_ucx_missing)))]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn mem(len: usize, byte: u8) -> Arc<dyn HostMemory> {
        Arc::new(pdx_sys::Memory::from_vec(vec![byte; len]).unwrap())
    }

    fn wait(worker: &Worker, rx: &mpsc::Receiver<Result<()>>) -> Result<()> {
        loop {
            worker.progress().unwrap();
            if let Ok(r) = rx.try_recv() {
                return r;
            }
        }
    }

    #[test]
    fn version_is_at_least_1_13() {
        assert!(crate::check_version().is_ok(), "{:?}", crate::version());
    }

    #[test]
    fn loopback_put_get_and_active_message() {
        let ctx = Context::new().unwrap();
        let worker = Worker::new(&ctx).unwrap();
        let (ntx, nrx) = mpsc::channel();
        let ntx = Mutex::new(ntx);
        worker
            .set_am_handler(
                7,
                Box::new(move |h, d| {
                    let _ = ntx.lock().unwrap().send((h.to_vec(), d.to_vec()));
                }),
            )
            .unwrap();
        let ep = worker.connect(&worker.address().unwrap()).unwrap();
        let pattern: Vec<u8> = (0..1 << 16).map(|i| (i * 7 % 251) as u8).collect();
        let src = {
            let m = pdx_sys::Memory::from_vec(pattern.clone()).unwrap();
            Arc::new(m) as Arc<dyn HostMemory>
        };
        let dst = mem(1 << 17, 0xee);
        let dst_h = ctx.mem_map(dst.memory()).unwrap();
        let rkey = ep.unpack_rkey(dst_h.rkey()).unwrap();
        // PUT src -> dst[4096..]
        let (tx, rx) = mpsc::channel();
        let op = RmaOp {
            local: &src,
            local_off: 0,
            len: 1 << 16,
            remote_addr: dst.memory().addr() + 4096,
            rkey: &rkey,
        };
        let tx2 = tx.clone();
        ep.rma_batch(
            Rma::Put,
            &[op],
            Box::new(move |r| {
                let _ = tx2.send(r);
            }),
        )
        .unwrap();
        wait(&worker, &rx).unwrap();
        let mut got = vec![0u8; 1 << 16];
        dst.memory().read_at(4096, &mut got).unwrap();
        assert_eq!(got, pattern);
        // GET dst[4096..4096+100] -> back into a fresh buffer
        let back = mem(100, 0);
        let op = RmaOp {
            local: &back,
            local_off: 0,
            len: 100,
            remote_addr: dst.memory().addr() + 4096,
            rkey: &rkey,
        };
        ep.rma_batch(
            Rma::Get,
            &[op],
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .unwrap();
        wait(&worker, &rx).unwrap();
        let mut got = vec![0u8; 100];
        back.memory().read_at(0, &mut got).unwrap();
        assert_eq!(got, pattern[..100]);
        // Out-of-range local memory is refused, not sent.
        let bad = RmaOp {
            local: &back,
            local_off: 50,
            len: 100,
            remote_addr: dst.memory().addr(),
            rkey: &rkey,
        };
        assert!(matches!(
            ep.rma_batch(Rma::Put, &[bad], Box::new(|_| {})),
            Err(UcxError::Invalid(_))
        ));
        // Active message.
        ep.am_send(7, b"hdr".to_vec(), b"payload".to_vec(), Box::new(|_| {}))
            .unwrap();
        let (h, d) = loop {
            worker.progress().unwrap();
            if let Ok(m) = nrx.try_recv() {
                break m;
            }
        };
        assert_eq!((h.as_slice(), d.as_slice()), (&b"hdr"[..], &b"payload"[..]));
        assert!(ep.unpack_rkey(&[]).is_err());
        assert!(worker.connect(&[]).is_err());
        drop(rkey);
        drop(ep);
    }

    #[test]
    fn allocated_memory_is_zeroed_and_reachable() {
        let ctx = Context::new().unwrap();
        assert!(matches!(ctx.allocate(0), Err(UcxError::Invalid(_))));
        let (mem, handle) = ctx.allocate(3 << 20).unwrap();
        assert_eq!(mem.len(), 3 << 20);
        assert!(!handle.rkey().is_empty());
        let mut all = vec![1u8; 3 << 20];
        mem.read_at(0, &mut all).unwrap();
        assert!(all.iter().all(|&b| b == 0));
        let worker = Worker::new(&ctx).unwrap();
        let ep = worker.connect(&worker.address().unwrap()).unwrap();
        let rkey = ep.unpack_rkey(handle.rkey()).unwrap();
        let src = mem_pattern(1 << 20);
        let (tx, rx) = mpsc::channel();
        let op = RmaOp {
            local: &src,
            local_off: 0,
            len: 1 << 20,
            remote_addr: mem.addr() + (1 << 20),
            rkey: &rkey,
        };
        ep.rma_batch(
            Rma::Put,
            &[op],
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .unwrap();
        wait(&worker, &rx).unwrap();
        let mut got = vec![0u8; 1 << 20];
        mem.read_at(1 << 20, &mut got).unwrap();
        let mut want = vec![0u8; 1 << 20];
        src.memory().read_at(0, &mut want).unwrap();
        assert_eq!(got, want);
        // The Memory keeps the allocation alive after the handle is dropped.
        drop((rkey, ep, handle));
        mem.write_at(0, b"still mapped").unwrap();
    }

    #[test]
    fn only_memory_ucx_allocated_is_mapped() {
        let ctx = Context::new().unwrap();
        let worker = Worker::new(&ctx).unwrap();
        let ep = worker.connect(&worker.address().unwrap()).unwrap();
        let (ucx_mem, handle) = ctx.allocate(1 << 20).unwrap();
        let rkey = ep.unpack_rkey(handle.rkey()).unwrap();
        let heap = mem(1 << 20, 0);
        let heap_h = ctx.mem_map(heap.memory()).unwrap();
        let heap_rkey = ep.unpack_rkey(heap_h.rkey()).unwrap();
        println!(
            "ucx-allocated: {}, heap: {}",
            rkey.maps(ucx_mem.addr() + 4096),
            heap_rkey.maps(heap.memory().addr())
        );
        assert!(
            !heap_rkey.maps(heap.memory().addr()),
            "UCX maps memory it did not allocate"
        );
        assert!(
            rkey.maps(ucx_mem.addr() + 4096),
            "UCX does not map its own allocation"
        );
    }

    fn mem_pattern(len: usize) -> Arc<dyn HostMemory> {
        let v: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
        Arc::new(pdx_sys::Memory::from_vec(v).unwrap())
    }

    #[test]
    fn event_fd_arms_and_signals() {
        let ctx = Context::new().unwrap();
        let worker = Worker::new(&ctx).unwrap();
        let fd = worker.event_fd().unwrap();
        while !worker.arm().unwrap() {
            worker.progress().unwrap();
        }
        worker.signal().unwrap();
        assert!(worker.wait_event(fd, Duration::from_secs(5)));
    }
}

unsafe extern "C" {
    /// `src/log_shim.c`: pushes a UCX log handler that formats each message and calls [`pdx_ucx_log_line`].
    fn pdx_ucx_route_logs();
}

/// Sends UCX's log messages to `tracing` (target `ucx`) instead of stdout, once per process. UCX prints
/// messages such as `no peer failure handler` at ERROR level while pdx probes endpoint modes; on stdout they
/// would corrupt machine-readable output (`pdx bench kv --json`).
fn route_ucx_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: ucs_log_push_handler only appends to UCX's handler list; the handler is a static C function that
    // formats into a stack buffer and calls pdx_ucx_log_line, which is safe for any message.
    ONCE.call_once(|| unsafe { pdx_ucx_route_logs() });
}

/// Called by the C log shim for every UCX log message shown at UCX's configured level (`UCX_LOG_LEVEL`).
/// `level` is a `ucs_log_level_t`; `file` and `message` are NUL-terminated (either may be null).
#[unsafe(no_mangle)]
extern "C" fn pdx_ucx_log_line(
    level: libc::c_int,
    file: *const libc::c_char,
    line: libc::c_uint,
    message: *const libc::c_char,
) {
    let text = |p: *const libc::c_char| {
        if p.is_null() {
            std::borrow::Cow::Borrowed("")
        } else {
            // SAFETY: the shim passes NUL-terminated strings that live for the duration of the call.
            unsafe { CStr::from_ptr(p) }.to_string_lossy()
        }
    };
    let (file, message) = (text(file), text(message));
    // ucs_log_level_t (ucs/config/types.h): FATAL 0, ERROR 1, WARN 2, DIAG 3, INFO 4, DEBUG 5, TRACE...
    match level {
        0 | 1 => tracing::warn!(target: "ucx", %file, line, "{message}"),
        2 | 3 => {
            tracing::info!(target: "ucx", %file, line, "{message}")
        }
        _ => tracing::debug!(target: "ucx", %file, line, "{message}"),
    }
}
