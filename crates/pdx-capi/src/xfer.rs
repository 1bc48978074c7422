//! Descriptor lists (NIXL `nixl_xfer_dlist_t`), prepared lists (`prepXferDlist` → `nixlDlistH`) and transfer
//! requests (`makeXferReq` / `createXferReq` → `nixlXferReqH`, `postXferReq`, `getXferStatus`, `releaseXferReq`).

use std::ffi::{c_char, CStr};
use std::time::{Duration, Instant};

use pdx_transfer::{
    MemoryKind, PreparedLocal, PreparedRemote, TransferError, TransportKind, XferDesc,
    XferDescList, XferOp, XferOptions, XferRequest, XferStatus,
};

use crate::agent::pdx_agent;
use crate::mem::{mem_kind, pdx_mem_kind};
use crate::ptr::{self, out_arg};
use crate::status::{guard, pdx_status, CapiError, Result};

use pdx_transfer::metadata::MAX_NAME_BYTES;

/// Directions of a transfer, from the initiator's point of view (NIXL `nixl_xfer_op_t`), passed to pdx as `int32_t`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum pdx_xfer_op {
    /// Copy remote memory into local memory (NIXL `NIXL_READ`).
    PDX_XFER_READ = 0,
    /// Copy local memory into remote memory (NIXL `NIXL_WRITE`).
    PDX_XFER_WRITE = 1,
}

fn xfer_op(op: i32) -> Result<XferOp> {
    match op {
        o if o == pdx_xfer_op::PDX_XFER_READ as i32 => Ok(XferOp::Read),
        o if o == pdx_xfer_op::PDX_XFER_WRITE as i32 => Ok(XferOp::Write),
        o => Err(CapiError::invalid(format!(
            "operation {o} is not a pdx_xfer_op (PDX_XFER_READ = 0, PDX_XFER_WRITE = 1)"
        ))),
    }
}

/// `timeout_us` value that waits without bound (`pdx_wait_xfer_req`, `pdx_wait_notifs`).
pub const PDX_TIMEOUT_INFINITE: u64 = u64::MAX;

/// Longest single wait handed to the engine; longer timeouts wait in steps of this, so no deadline overflows.
const WAIT_STEP: Duration = Duration::from_secs(3600);

/// Waits in steps until `done` gives a value or `timeout_us` (µs; `PDX_TIMEOUT_INFINITE`: no bound) has passed.
pub(crate) fn wait_stepped<T>(
    timeout_us: u64,
    mut step: impl FnMut(Duration) -> Option<T>,
) -> Option<T> {
    let start = Instant::now();
    let total = (timeout_us != PDX_TIMEOUT_INFINITE).then(|| Duration::from_micros(timeout_us));
    loop {
        let left = match total {
            Some(t) => t.saturating_sub(start.elapsed()),
            None => WAIT_STEP,
        };
        if let Some(v) = step(left.min(WAIT_STEP)) {
            return Some(v);
        }
        if total.is_some_and(|t| start.elapsed() >= t) {
            return None;
        }
    }
}

/// A descriptor list: `(addr, len, dev_id)` ranges of one memory kind (NIXL `nixl_xfer_dlist_t`). Opaque; made by
/// `pdx_dlist_create`, filled by `pdx_dlist_add`, freed by `pdx_dlist_destroy`. It is plain data: validated only when
/// prepared or used for a request.
pub struct pdx_dlist {
    list: XferDescList,
    /// The device of a VRAM list, set by its first descriptor.
    device: Option<u32>,
}

/// Creates an empty descriptor list of kind `kind` (a `pdx_mem_kind`).
///
/// Errors: `PDX_ERR_INVALID` for a null `out` or an unknown kind.
///
/// Thread safety: any thread.
///
/// # Safety
/// `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn pdx_dlist_create(kind: i32, out: *mut *mut pdx_dlist) -> pdx_status {
    guard(|| {
        let out = out_arg(out, "out")?;
        let kind = mem_kind(kind, 0)?;
        let list = pdx_dlist {
            list: XferDescList {
                kind,
                descs: Vec::new(),
            },
            device: None,
        };
        // SAFETY: `out` is writable (see above).
        unsafe { ptr::write_out(out, ptr::into_handle(list)) };
        Ok(pdx_status::PDX_OK)
    })
}

/// Appends the range `addr .. addr + len` (bytes, in the owner's address space: this agent's for a local list, the
/// remote agent's for a remote one) of device `dev_id` (ignored for DRAM; one device per VRAM list) to the list.
///
/// Errors: `PDX_ERR_INVALID` for a null list, a zero length, a range that wraps around, or a VRAM device other than
/// the list's.
///
/// Thread safety: not concurrently with other calls on the same list.
///
/// # Safety
/// `dlist` is a live descriptor list.
#[no_mangle]
pub unsafe extern "C" fn pdx_dlist_add(
    dlist: *mut pdx_dlist,
    addr: u64,
    len: u64,
    dev_id: u32,
) -> pdx_status {
    guard(|| {
        // SAFETY: a live list or NULL, used by no other call now (see above).
        let d = unsafe { ptr::handle_mut(dlist, "dlist") }?;
        if len == 0 {
            return Err(CapiError::invalid("descriptor length is 0"));
        }
        if addr.checked_add(len).is_none() {
            return Err(CapiError::invalid(format!(
                "descriptor {addr:#x}+{len} wraps around"
            )));
        }
        let dev_id = match d.list.kind {
            MemoryKind::Host | MemoryKind::PinnedHost => 0,
            MemoryKind::Device(_) => match d.device {
                Some(dev) if dev != dev_id => {
                    return Err(CapiError::invalid(format!(
                        "descriptor of device {dev_id} in a list of device {dev} (one device per VRAM list)"
                    )))
                }
                _ => {
                    d.device = Some(dev_id);
                    d.list.kind = MemoryKind::Device(dev_id);
                    dev_id
                }
            },
        };
        d.list.push(XferDesc { addr, len, dev_id });
        Ok(pdx_status::PDX_OK)
    })
}

/// Writes the number of descriptors in the list to `*len`.
///
/// Errors: `PDX_ERR_INVALID` for null pointers.
///
/// Thread safety: not concurrently with `pdx_dlist_add` on the same list.
///
/// # Safety
/// `dlist` is a live descriptor list; `len` points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn pdx_dlist_len(dlist: *const pdx_dlist, len: *mut usize) -> pdx_status {
    guard(|| {
        let len = out_arg(len, "len")?;
        // SAFETY: a live list or NULL (see above).
        let d = unsafe { ptr::handle(dlist, "dlist") }?;
        // SAFETY: `len` is writable (see above).
        unsafe { ptr::write_out(len, d.list.len()) };
        Ok(pdx_status::PDX_OK)
    })
}

/// Frees a descriptor list (requests made from it do not need it). NULL is a no-op.
///
/// Thread safety: not concurrently with other calls on the same list; destroying twice is the caller's bug.
///
/// # Safety
/// `dlist` is NULL or a live descriptor list, not used after this call.
#[no_mangle]
pub unsafe extern "C" fn pdx_dlist_destroy(dlist: *mut pdx_dlist) -> pdx_status {
    guard(|| {
        // SAFETY: NULL or a live list given back once (see above).
        unsafe { ptr::destroy(dlist) };
        Ok(pdx_status::PDX_OK)
    })
}

enum Side {
    Local(PreparedLocal),
    Remote(PreparedRemote),
}

/// A descriptor list validated once against registrations (NIXL `nixlDlistH`): this agent's own (a local side), or
/// a loaded remote agent's metadata (a remote side). Requests pick descriptors from it by index. Opaque; made by
/// `pdx_prep_xfer_dlist`, freed by `pdx_release_dlist_handle`. It keeps the local memory it names registered:
/// `pdx_deregister_mem` refuses that memory until it is released.
pub struct pdx_prepped {
    side: Side,
    agent_id: u64,
}

/// Validates a descriptor list once (NIXL `prepXferDlist`) so requests can then be made from it by index
/// (`pdx_make_xfer_req`). `remote_agent` NULL or `""` (NIXL's `NIXL_INIT_AGENT`) prepares a local side, checked
/// against this agent's registrations; a remote agent's name prepares a remote side, checked against that agent's
/// loaded metadata.
///
/// Errors: `PDX_ERR_INVALID` for null pointers or a kind mismatch; `PDX_ERR_NOT_REGISTERED` naming the first
/// descriptor outside every registered region; `PDX_ERR_UNKNOWN_REMOTE`.
///
/// Thread safety: any thread, concurrently with other calls on the agent (not with `pdx_dlist_add` on the list).
///
/// # Safety
/// `agent` is a live agent handle; `remote_agent` is NULL or a NUL-terminated string; `dlist` is a live descriptor
/// list; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn pdx_prep_xfer_dlist(
    agent: *const pdx_agent,
    remote_agent: *const c_char,
    dlist: *const pdx_dlist,
    out: *mut *mut pdx_prepped,
) -> pdx_status {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: a live agent handle or NULL (see above).
        let a = unsafe { ptr::handle(agent, "agent") }?;
        // SAFETY: NULL or NUL-terminated (see above).
        let remote = unsafe { ptr::opt_str_arg(remote_agent, MAX_NAME_BYTES, "remote_agent") }?;
        // SAFETY: a live list or NULL (see above).
        let d = unsafe { ptr::handle(dlist, "dlist") }?;
        let side = match remote {
            None | Some("") => Side::Local(a.agent.prep_local(&d.list)?),
            Some(name) => Side::Remote(a.agent.prep_remote(name, &d.list)?),
        };
        let prepped = pdx_prepped {
            side,
            agent_id: a.id,
        };
        // SAFETY: `out` is writable (see above).
        unsafe { ptr::write_out(out, ptr::into_handle(prepped)) };
        Ok(pdx_status::PDX_OK)
    })
}

/// Releases a prepared list (NIXL `releasedDlistH`). Requests made from it keep what they need. NULL is a no-op.
///
/// Thread safety: not concurrently with other calls on the same prepared list; releasing twice is the caller's bug.
///
/// # Safety
/// `prepped` is NULL or a live prepared list, not used after this call.
#[no_mangle]
pub unsafe extern "C" fn pdx_release_dlist_handle(prepped: *mut pdx_prepped) -> pdx_status {
    guard(|| {
        // SAFETY: NULL or a live prepared list given back once (see above).
        unsafe { ptr::destroy(prepped) };
        Ok(pdx_status::PDX_OK)
    })
}

/// A READ or WRITE between local and remote descriptors with an optional notification (NIXL `nixlXferReqH`),
/// resolved once into a plan (transport and segments) and postable any number of times. Opaque; made by
/// `pdx_make_xfer_req` or `pdx_create_xfer_req`, freed by `pdx_release_xfer_req`.
pub struct pdx_xfer {
    req: XferRequest,
}

/// The optional notification of a request: NULL means none; otherwise `len` bytes (0 is an empty notification).
///
/// # Safety
/// `notif` is NULL or points to `len` readable bytes.
unsafe fn notif_arg(notif: *const u8, len: usize) -> Result<Option<Vec<u8>>> {
    if notif.is_null() {
        if len != 0 {
            return Err(CapiError::invalid("notif is null but notif_len is not 0"));
        }
        return Ok(None);
    }
    // SAFETY: `len` readable bytes (see above).
    Ok(Some(
        unsafe { ptr::slice_arg(notif, len, "notif") }?.to_vec(),
    ))
}

fn give_xfer(out: std::ptr::NonNull<*mut pdx_xfer>, req: XferRequest) {
    let h = ptr::into_handle(pdx_xfer { req });
    // SAFETY: every caller checked `out` with `out_arg` and holds the C caller's promise that it is writable.
    unsafe { ptr::write_out(out, h) };
}

/// Makes a transfer request from prepared lists (NIXL `makeXferReq`): descriptor `local_idx[i]` of `local` moves
/// to or from descriptor `remote_idx[i]` of `remote` for every `i < count`, READ (`op` = `PDX_XFER_READ`: remote into
/// local) or WRITE. `notif` (`notif_len` bytes, at most 64 KiB; NULL: none) is delivered to the remote agent after
/// every completed post. The transport is chosen now (the agent's preference order, by locality and memory kind),
/// and connections are made now.
///
/// Errors: `PDX_ERR_INVALID` for null pointers, an unknown `op`, `count` 0, an index out of range, unequal
/// descriptor lengths, sides swapped or from another agent, or a notification over 64 KiB;
/// `PDX_ERR_TRANSPORT_UNAVAILABLE` when no allowed transport can serve it; `PDX_ERR_PEER_DISCONNECTED` and other
/// connection errors when the peer cannot be reached.
///
/// Thread safety: any thread, concurrently with other calls on the agent and the prepared lists.
///
/// # Safety
/// `agent`, `local` and `remote` are live handles; `local_idx` and `remote_idx` point to `count` readable `size_t`;
/// `notif` is NULL or points to `notif_len` readable bytes; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn pdx_make_xfer_req(
    agent: *const pdx_agent,
    op: i32,
    local: *const pdx_prepped,
    local_idx: *const usize,
    remote: *const pdx_prepped,
    remote_idx: *const usize,
    count: usize,
    notif: *const u8,
    notif_len: usize,
    out: *mut *mut pdx_xfer,
) -> pdx_status {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: a live agent handle or NULL (see above).
        let a = unsafe { ptr::handle(agent, "agent") }?;
        let op = xfer_op(op)?;
        // SAFETY: live prepared lists or NULL (see above).
        let (l, r) = unsafe { (ptr::handle(local, "local")?, ptr::handle(remote, "remote")?) };
        if l.agent_id != a.id || r.agent_id != a.id {
            return Err(CapiError::invalid("a prepared list of another agent"));
        }
        let (Side::Local(l), Side::Remote(r)) = (&l.side, &r.side) else {
            return Err(CapiError::invalid(
                "local must be prepared with remote_agent NULL and remote with a remote agent's name",
            ));
        };
        if count == 0 {
            return Err(CapiError::invalid("count is 0"));
        }
        // SAFETY: `count` readable size_t at each (see above).
        let (li, ri) = unsafe {
            (
                ptr::slice_arg(local_idx, count, "local_idx")?,
                ptr::slice_arg(remote_idx, count, "remote_idx")?,
            )
        };
        // SAFETY: as promised for `notif` (see above).
        let notif = unsafe { notif_arg(notif, notif_len) }?;
        let req = a.agent.create_xfer(
            op,
            l,
            li,
            r,
            ri,
            XferOptions {
                notif,
                ..Default::default()
            },
        )?;
        give_xfer(out, req);
        Ok(pdx_status::PDX_OK)
    })
}

/// Makes a transfer request from two descriptor lists, paired in order (NIXL `createXferReq`): equivalent to
/// preparing `local` (this agent) and `remote` (agent `remote_agent`) and making a request over all their indices.
///
/// Errors: `PDX_ERR_INVALID` for null pointers, an unknown `op`, empty or unequal lists, unequal descriptor lengths
/// or a notification over 64 KiB; `PDX_ERR_NOT_REGISTERED` for a descriptor outside the owner's registrations;
/// `PDX_ERR_UNKNOWN_REMOTE`; `PDX_ERR_TRANSPORT_UNAVAILABLE`; connection errors.
///
/// Thread safety: any thread, concurrently with other calls on the agent (not with `pdx_dlist_add` on the lists).
///
/// # Safety
/// `agent`, `local` and `remote` are live handles; `remote_agent` is a NUL-terminated string; `notif` is NULL or
/// points to `notif_len` readable bytes; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn pdx_create_xfer_req(
    agent: *const pdx_agent,
    op: i32,
    local: *const pdx_dlist,
    remote_agent: *const c_char,
    remote: *const pdx_dlist,
    notif: *const u8,
    notif_len: usize,
    out: *mut *mut pdx_xfer,
) -> pdx_status {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: live handles or NULL (see above).
        let (a, l, r) = unsafe {
            (
                ptr::handle(agent, "agent")?,
                ptr::handle(local, "local")?,
                ptr::handle(remote, "remote")?,
            )
        };
        let op = xfer_op(op)?;
        // SAFETY: NUL-terminated or NULL (see above).
        let name = unsafe { ptr::str_arg(remote_agent, MAX_NAME_BYTES, "remote_agent") }?;
        if l.list.len() != r.list.len() {
            return Err(CapiError::invalid(format!(
                "{} local and {} remote descriptors (need equal counts)",
                l.list.len(),
                r.list.len()
            )));
        }
        // SAFETY: as promised for `notif` (see above).
        let notif = unsafe { notif_arg(notif, notif_len) }?;
        let req = a.agent.create_xfer_from_descs(
            op,
            &l.list,
            name,
            &r.list,
            XferOptions {
                notif,
                ..Default::default()
            },
        )?;
        give_xfer(out, req);
        Ok(pdx_status::PDX_OK)
    })
}

/// The request's outcome as a status: `PDX_OK` done, `PDX_IN_PROGRESS` running, `PDX_ERR_NOT_POSTED` never
/// posted, or the failure of the last post.
fn status_of(req: &XferRequest) -> Result<pdx_status> {
    code(req.status()?)
}

/// A request state as a status: done, in progress, or never posted.
fn code(s: XferStatus) -> Result<pdx_status> {
    match s {
        XferStatus::Done => Ok(pdx_status::PDX_OK),
        XferStatus::InProgress => Ok(pdx_status::PDX_IN_PROGRESS),
        XferStatus::Idle => Err(CapiError::NotPosted),
    }
}

/// Starts (or restarts) a transfer (NIXL `postXferReq`). Returns `PDX_OK` when it completed inside the call (`local`,
/// `shm`, `cma`: every byte moved and the notification sent) and `PDX_IN_PROGRESS` when it completes later (`tcp`,
/// `ucx`, `cuda`): follow it with `pdx_get_xfer_status` or `pdx_wait_xfer_req`. Posting again after completion runs
/// the same plan without new validation.
///
/// Errors: `PDX_ERR_INVALID` for NULL; `PDX_ERR_REPOST_ACTIVE` while the previous post is in progress (the running
/// transfer is unaffected); the transfer's own failure when it fails inside the call (`PDX_ERR_PEER_DISCONNECTED`,
/// `PDX_ERR_UNKNOWN_REMOTE` after an invalidation, `PDX_ERR_REMOTE`, …).
///
/// Thread safety: any thread; concurrent posts of one request are refused with `PDX_ERR_REPOST_ACTIVE`.
///
/// # Safety
/// `xfer` is a live transfer request.
#[no_mangle]
pub unsafe extern "C" fn pdx_post_xfer_req(xfer: *const pdx_xfer) -> pdx_status {
    guard(|| {
        // SAFETY: a live request or NULL (see above).
        let x = unsafe { ptr::handle(xfer, "xfer") }?;
        code(x.req.post()?)
    })
}

/// The state of the last post (NIXL `getXferStatus`), without blocking: `PDX_OK` done, `PDX_IN_PROGRESS` running,
/// `PDX_ERR_NOT_POSTED` never posted, or the error the last post failed with (retryable or fatal as its code says).
///
/// Thread safety: any thread, concurrently with other calls on the request.
///
/// # Safety
/// `xfer` is a live transfer request.
#[no_mangle]
pub unsafe extern "C" fn pdx_get_xfer_status(xfer: *const pdx_xfer) -> pdx_status {
    guard(|| {
        // SAFETY: a live request or NULL (see above).
        let x = unsafe { ptr::handle(xfer, "xfer") }?;
        status_of(&x.req)
    })
}

/// Blocks until the last post completes, or `timeout_us` µs pass (`PDX_TIMEOUT_INFINITE`: no bound; 0: a status
/// check). Returns `PDX_OK` when done, `PDX_IN_PROGRESS` when the time ran out first, `PDX_ERR_NOT_POSTED`, or the
/// transfer's failure.
///
/// Thread safety: any thread; several threads may wait on one request.
///
/// # Safety
/// `xfer` is a live transfer request.
#[no_mangle]
pub unsafe extern "C" fn pdx_wait_xfer_req(xfer: *const pdx_xfer, timeout_us: u64) -> pdx_status {
    guard(|| {
        // SAFETY: a live request or NULL (see above).
        let x = unsafe { ptr::handle(xfer, "xfer") }?;
        let now = status_of(&x.req)?;
        if now != pdx_status::PDX_IN_PROGRESS {
            return Ok(now);
        }
        let outcome = wait_stepped(timeout_us, |step| match x.req.wait(Some(step)) {
            Err(TransferError::InProgress) => None,
            other => Some(other),
        });
        match outcome {
            None => Ok(pdx_status::PDX_IN_PROGRESS),
            Some(Ok(())) => Ok(pdx_status::PDX_OK),
            Some(Err(e)) => Err(e.into()),
        }
    })
}

/// Writes the name of the transport the request was planned on (`"local"`, `"shm"`, `"cma"`, `"tcp"`, `"ucx"`,
/// `"cuda"`; a static string) to `*name` (NIXL `queryXferBackend`).
///
/// Errors: `PDX_ERR_INVALID` for null pointers.
///
/// Thread safety: any thread.
///
/// # Safety
/// `xfer` is a live transfer request; `name` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn pdx_query_xfer_transport(
    xfer: *const pdx_xfer,
    name: *mut *const c_char,
) -> pdx_status {
    guard(|| {
        let name = out_arg(name, "name")?;
        // SAFETY: a live request or NULL (see above).
        let x = unsafe { ptr::handle(xfer, "xfer") }?;
        let s: &'static CStr = match x.req.transport() {
            TransportKind::Local => c"local",
            TransportKind::Shm => c"shm",
            TransportKind::Cma => c"cma",
            TransportKind::Tcp => c"tcp",
            TransportKind::Ucx => c"ucx",
            TransportKind::Cuda => c"cuda",
        };
        // SAFETY: `name` is writable (see above).
        unsafe { ptr::write_out(name, s.as_ptr()) };
        Ok(pdx_status::PDX_OK)
    })
}

/// Releases a transfer request (NIXL `releaseXferReq`). A transfer still in flight is not cancelled: it finishes in
/// the background (its notification is still sent), and the memory it uses stays registered until then. NULL is a
/// no-op.
///
/// Thread safety: not concurrently with other calls on the same request; releasing twice is the caller's bug.
///
/// # Safety
/// `xfer` is NULL or a live transfer request, not used after this call.
#[no_mangle]
pub unsafe extern "C" fn pdx_release_xfer_req(xfer: *mut pdx_xfer) -> pdx_status {
    guard(|| {
        if xfer.is_null() {
            return Ok(pdx_status::PDX_OK);
        }
        // SAFETY: a live request given back once (see above).
        let x = unsafe { ptr::take(xfer, "xfer") }?;
        x.req.release();
        Ok(pdx_status::PDX_OK)
    })
}

#[allow(dead_code)]
const _: () = {
    // The handles are used from any thread, as the functions above promise.
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<pdx_agent>();
    send_sync::<pdx_xfer>();
    send_sync::<pdx_prepped>();
    send_sync::<pdx_dlist>();
    let _ = pdx_mem_kind::PDX_MEM_DRAM;
};
