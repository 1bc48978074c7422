//! Notifications (NIXL `getNotifs` / `genNotif`): taken all at once into an opaque list, and sent to a loaded peer.

use std::ffi::{c_char, CString};

use pdx_transfer::metadata::MAX_NAME_BYTES;
use pdx_transfer::Notification;

use crate::agent::pdx_agent;
use crate::ptr::{self, out_arg};
use crate::status::{guard, pdx_status, CapiError, Result};
use crate::xfer::wait_stepped;

/// Notifications taken from an agent, oldest first: the sending agent's name and the payload bytes of each. Opaque;
/// made by `pdx_get_notifs` / `pdx_wait_notifs`, read with `pdx_notif_list_len` and `pdx_notif_list_get`, freed by
/// `pdx_notif_list_destroy`.
pub struct pdx_notif_list {
    items: Vec<(CString, Vec<u8>)>,
}

fn into_list(notifs: Vec<Notification>) -> pdx_notif_list {
    pdx_notif_list {
        items: notifs
            .into_iter()
            .map(|n| {
                // A name with a NUL byte cannot be a C string; such a name never loads (pdx_load_remote_md refuses
                // it), so the stand-in cannot be confused with a real peer's.
                let from = CString::new(n.from).unwrap_or_else(|_| c"<name with NUL>".to_owned());
                (from, n.payload)
            })
            .collect(),
    }
}

/// Gives a new list to C.
///
/// # Safety
/// `out` points to writable storage for a pointer.
unsafe fn give_list(out: std::ptr::NonNull<*mut pdx_notif_list>, notifs: Vec<Notification>) {
    // SAFETY: writable (see above).
    unsafe { ptr::write_out(out, ptr::into_handle(into_list(notifs))) }
}

/// Takes every notification received so far (NIXL `getNotifs`), oldest first, into a new list (empty when there are
/// none) written to `*out`. Each is returned once.
///
/// Errors: `PDX_ERR_INVALID` for null pointers.
///
/// Thread safety: any thread, concurrently with other calls on the agent (each notification goes to one taker).
///
/// # Safety
/// `agent` is a live agent handle; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn pdx_get_notifs(
    agent: *const pdx_agent,
    out: *mut *mut pdx_notif_list,
) -> pdx_status {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: a live agent handle or NULL (see above).
        let a = unsafe { ptr::handle(agent, "agent") }?;
        // SAFETY: `out` is writable (see above).
        unsafe { give_list(out, a.agent.take_notifications()) };
        Ok(pdx_status::PDX_OK)
    })
}

/// Waits up to `timeout_us` µs (`PDX_TIMEOUT_INFINITE`: no bound) for at least one notification, then takes all of
/// them as `pdx_get_notifs` does. The list is empty when the time ran out first.
///
/// Errors: `PDX_ERR_INVALID` for null pointers.
///
/// Thread safety: any thread, concurrently with other calls on the agent.
///
/// # Safety
/// `agent` is a live agent handle; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn pdx_wait_notifs(
    agent: *const pdx_agent,
    timeout_us: u64,
    out: *mut *mut pdx_notif_list,
) -> pdx_status {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: a live agent handle or NULL (see above).
        let a = unsafe { ptr::handle(agent, "agent") }?;
        let got = wait_stepped(timeout_us, |step| {
            let n = a.agent.wait_notifications(step);
            (!n.is_empty()).then_some(n)
        })
        .unwrap_or_default();
        // SAFETY: `out` is writable (see above).
        unsafe { give_list(out, got) };
        Ok(pdx_status::PDX_OK)
    })
}

/// Writes the number of notifications in the list to `*len`.
///
/// Errors: `PDX_ERR_INVALID` for null pointers.
///
/// Thread safety: any thread (the list is immutable).
///
/// # Safety
/// `list` is a live notification list; `len` points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn pdx_notif_list_len(
    list: *const pdx_notif_list,
    len: *mut usize,
) -> pdx_status {
    guard(|| {
        let len = out_arg(len, "len")?;
        // SAFETY: a live list or NULL (see above).
        let l = unsafe { ptr::handle(list, "list") }?;
        // SAFETY: writable (see above).
        unsafe { ptr::write_out(len, l.items.len()) };
        Ok(pdx_status::PDX_OK)
    })
}

/// Reads notification `index` of the list: `*agent_name` (NUL-terminated), `*msg` and `*msg_len` (the payload bytes)
/// point into the list and stay valid until `pdx_notif_list_destroy`. Any output may be NULL when not wanted.
///
/// Errors: `PDX_ERR_INVALID` for a null list or an index out of range.
///
/// Thread safety: any thread (the list is immutable).
///
/// # Safety
/// `list` is a live notification list; each output is NULL or points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn pdx_notif_list_get(
    list: *const pdx_notif_list,
    index: usize,
    agent_name: *mut *const c_char,
    msg: *mut *const u8,
    msg_len: *mut usize,
) -> pdx_status {
    guard(|| {
        // SAFETY: a live list or NULL (see above).
        let l = unsafe { ptr::handle(list, "list") }?;
        let (from, payload) = l.items.get(index).ok_or_else(|| {
            CapiError::invalid(format!(
                "index {index} out of range (the list holds {})",
                l.items.len()
            ))
        })?;
        // SAFETY: each output is NULL (skipped) or writable (see above).
        unsafe {
            if let Some(p) = std::ptr::NonNull::new(agent_name) {
                ptr::write_out(p, from.as_ptr());
            }
            if let Some(p) = std::ptr::NonNull::new(msg) {
                ptr::write_out(p, payload.as_ptr());
            }
            if let Some(p) = std::ptr::NonNull::new(msg_len) {
                ptr::write_out(p, payload.len());
            }
        }
        Ok(pdx_status::PDX_OK)
    })
}

/// Frees a notification list. NULL is a no-op.
///
/// Thread safety: not concurrently with other calls on the same list; destroying twice is the caller's bug.
///
/// # Safety
/// `list` is NULL or a live notification list, not used after this call.
#[no_mangle]
pub unsafe extern "C" fn pdx_notif_list_destroy(list: *mut pdx_notif_list) -> pdx_status {
    guard(|| {
        // SAFETY: NULL or a live list given back once (see above).
        unsafe { ptr::destroy(list) };
        Ok(pdx_status::PDX_OK)
    })
}

/// Sends a notification of `len` bytes (at most 64 KiB; `msg` may be NULL for 0) to a loaded remote agent, not
/// bound to a transfer (NIXL `genNotif`). It arrives after the notifications of transfers this agent completed to
/// that peer before.
///
/// Errors: `PDX_ERR_INVALID` for null pointers or a message over 64 KiB; `PDX_ERR_UNKNOWN_REMOTE`; connection
/// errors (`PDX_ERR_PEER_DISCONNECTED`, …).
///
/// Thread safety: any thread, concurrently with other calls on the agent.
///
/// # Safety
/// `agent` is a live agent handle; `remote_agent` is a NUL-terminated string; `msg` is NULL or points to `len`
/// readable bytes.
#[no_mangle]
pub unsafe extern "C" fn pdx_gen_notif(
    agent: *const pdx_agent,
    remote_agent: *const c_char,
    msg: *const u8,
    len: usize,
) -> pdx_status {
    guard(|| {
        // SAFETY: a live agent handle or NULL (see above).
        let a = unsafe { ptr::handle(agent, "agent") }?;
        // SAFETY: NUL-terminated or NULL (see above).
        let name = unsafe { ptr::str_arg(remote_agent, MAX_NAME_BYTES, "remote_agent") }?;
        // SAFETY: `len` readable bytes or NULL with 0 (see above).
        let payload = unsafe { ptr::slice_arg(msg, len, "msg") }?.to_vec();
        send(a, name, payload)?;
        Ok(pdx_status::PDX_OK)
    })
}

fn send(a: &pdx_agent, name: &str, payload: Vec<u8>) -> Result<()> {
    Ok(a.agent.notify(name, payload)?)
}
