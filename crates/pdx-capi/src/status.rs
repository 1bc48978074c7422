//! Status codes, the crate's error type, the thread-local last-error message, and the guard every C entry point
//! runs its body in (no panic crosses the boundary).

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use pdx_transfer::TransferError;

/// Result of every pdx call. `PDX_OK` (0) is success and `PDX_IN_PROGRESS` (1) a transfer still running; errors are
/// negative. **Fatal** errors are `-1 ..= -99`: the same call fails again until its input changes. **Retryable**
/// errors are `-100 ..= -199`: the same call may succeed later (a peer that comes back, a transfer that finishes).
/// `pdx_status_is_retryable` tells them apart; `pdx_last_error` gives the failed call's message. The values follow
/// NIXL's `nixl_status_t` where NIXL has the concept (`NIXL_IN_PROG` = 1, `NIXL_SUCCESS` = 0) and are fixed: they are
/// part of the ABI.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum pdx_status {
    /// Success (a posted transfer: done inside the call).
    PDX_OK = 0,
    /// A posted transfer is still running (`pdx_post_xfer_req`, `pdx_get_xfer_status`), or `pdx_wait_xfer_req`
    /// timed out before it completed. Not an error.
    PDX_IN_PROGRESS = 1,
    /// A null pointer, an unknown enum value, a malformed string or descriptor, unequal index counts, an index out of
    /// range, a notification over 64 KiB, a bad configuration (NIXL `NIXL_ERR_INVALID_PARAM`).
    PDX_ERR_INVALID = -1,
    /// A descriptor is not inside a registered region of the agent it names (NIXL `NIXL_ERR_NOT_FOUND`).
    PDX_ERR_NOT_REGISTERED = -2,
    /// No metadata of that remote agent is loaded, or it was invalidated (NIXL `NIXL_ERR_NOT_FOUND`).
    PDX_ERR_UNKNOWN_REMOTE = -3,
    /// Metadata bytes could not be decoded, violate a limit, or are this agent's own.
    PDX_ERR_BAD_METADATA = -4,
    /// The output buffer is too small; the size needed was written where the call says.
    PDX_ERR_BUFFER_TOO_SMALL = -5,
    /// The transfer request was never posted (NIXL `NIXL_ERR_NOT_POSTED`).
    PDX_ERR_NOT_POSTED = -6,
    /// Not supported by this build or machine: VRAM without CUDA, a memory kind the call does not take (NIXL
    /// `NIXL_ERR_NOT_SUPPORTED`).
    PDX_ERR_UNSUPPORTED = -7,
    /// No allowed transport can serve the request (wrong locality or memory kind, or not built in).
    PDX_ERR_TRANSPORT_UNAVAILABLE = -8,
    /// A peer refused this agent, or this agent refused a peer, for want of the shared agent secret.
    PDX_ERR_AUTH = -9,
    /// A peer sent a frame that violates the protocol; its connection was closed.
    PDX_ERR_PROTOCOL = -10,
    /// The remote agent refused or failed the request (its message is in `pdx_last_error`).
    PDX_ERR_REMOTE = -11,
    /// The agent is shut down.
    PDX_ERR_SHUTDOWN = -12,
    /// A host-memory or socket operation failed and will fail again.
    PDX_ERR_IO = -13,
    /// A CUDA operation failed.
    PDX_ERR_CUDA = -14,
    /// A bug in pdx (a panic, caught at the boundary). Please report it with `pdx_last_error`'s message.
    PDX_ERR_INTERNAL = -99,
    /// The request is already posted and not yet complete (NIXL `NIXL_ERR_REPOST_ACTIVE`).
    PDX_ERR_REPOST_ACTIVE = -100,
    /// The connection to the peer was lost (the peer exited or the network failed). Load its metadata again to
    /// reconnect.
    PDX_ERR_PEER_DISCONNECTED = -101,
    /// The peer made no progress within the agent's peer timeout.
    PDX_ERR_TIMEOUT = -102,
    /// A registered region is still used by prepared lists or transfer requests; release them, then deregister.
    PDX_ERR_REGION_IN_USE = -103,
    /// A transient host-memory or socket failure (interrupted, would block, timed out, connection refused).
    PDX_ERR_IO_TRANSIENT = -104,
    /// A transient CUDA failure (out of device memory).
    PDX_ERR_CUDA_TRANSIENT = -105,
}

use pdx_status::*;

impl pdx_status {
    /// Every status, for lookups from the C integer.
    pub(crate) const ALL: [pdx_status; 23] = [
        PDX_OK,
        PDX_IN_PROGRESS,
        PDX_ERR_INVALID,
        PDX_ERR_NOT_REGISTERED,
        PDX_ERR_UNKNOWN_REMOTE,
        PDX_ERR_BAD_METADATA,
        PDX_ERR_BUFFER_TOO_SMALL,
        PDX_ERR_NOT_POSTED,
        PDX_ERR_UNSUPPORTED,
        PDX_ERR_TRANSPORT_UNAVAILABLE,
        PDX_ERR_AUTH,
        PDX_ERR_PROTOCOL,
        PDX_ERR_REMOTE,
        PDX_ERR_SHUTDOWN,
        PDX_ERR_IO,
        PDX_ERR_CUDA,
        PDX_ERR_INTERNAL,
        PDX_ERR_REPOST_ACTIVE,
        PDX_ERR_PEER_DISCONNECTED,
        PDX_ERR_TIMEOUT,
        PDX_ERR_REGION_IN_USE,
        PDX_ERR_IO_TRANSIENT,
        PDX_ERR_CUDA_TRANSIENT,
    ];

    /// The status with this integer value, if any.
    pub(crate) fn from_code(code: i32) -> Option<pdx_status> {
        Self::ALL.into_iter().find(|s| *s as i32 == code)
    }

    /// The constant's name as a NUL-terminated C string.
    pub(crate) fn name(self) -> &'static std::ffi::CStr {
        match self {
            PDX_OK => c"PDX_OK",
            PDX_IN_PROGRESS => c"PDX_IN_PROGRESS",
            PDX_ERR_INVALID => c"PDX_ERR_INVALID",
            PDX_ERR_NOT_REGISTERED => c"PDX_ERR_NOT_REGISTERED",
            PDX_ERR_UNKNOWN_REMOTE => c"PDX_ERR_UNKNOWN_REMOTE",
            PDX_ERR_BAD_METADATA => c"PDX_ERR_BAD_METADATA",
            PDX_ERR_BUFFER_TOO_SMALL => c"PDX_ERR_BUFFER_TOO_SMALL",
            PDX_ERR_NOT_POSTED => c"PDX_ERR_NOT_POSTED",
            PDX_ERR_UNSUPPORTED => c"PDX_ERR_UNSUPPORTED",
            PDX_ERR_TRANSPORT_UNAVAILABLE => c"PDX_ERR_TRANSPORT_UNAVAILABLE",
            PDX_ERR_AUTH => c"PDX_ERR_AUTH",
            PDX_ERR_PROTOCOL => c"PDX_ERR_PROTOCOL",
            PDX_ERR_REMOTE => c"PDX_ERR_REMOTE",
            PDX_ERR_SHUTDOWN => c"PDX_ERR_SHUTDOWN",
            PDX_ERR_IO => c"PDX_ERR_IO",
            PDX_ERR_CUDA => c"PDX_ERR_CUDA",
            PDX_ERR_INTERNAL => c"PDX_ERR_INTERNAL",
            PDX_ERR_REPOST_ACTIVE => c"PDX_ERR_REPOST_ACTIVE",
            PDX_ERR_PEER_DISCONNECTED => c"PDX_ERR_PEER_DISCONNECTED",
            PDX_ERR_TIMEOUT => c"PDX_ERR_TIMEOUT",
            PDX_ERR_REGION_IN_USE => c"PDX_ERR_REGION_IN_USE",
            PDX_ERR_IO_TRANSIENT => c"PDX_ERR_IO_TRANSIENT",
            PDX_ERR_CUDA_TRANSIENT => c"PDX_ERR_CUDA_TRANSIENT",
        }
    }

    /// True for the retryable range `-100 ..= -199`.
    pub(crate) fn is_retryable(self) -> bool {
        (-199..=-100).contains(&(self as i32))
    }
}

/// The error of a C API call: a status code and the message `pdx_last_error` returns.
#[derive(Debug, thiserror::Error)]
pub enum CapiError {
    /// An error of the transfer engine, mapped to its code by [`CapiError::status`].
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// A null pointer, bad enum value, malformed string or other invalid argument.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An output buffer of `have` bytes where `need` are needed.
    #[error("buffer too small: {need} bytes needed, {have} given")]
    BufferTooSmall {
        /// Bytes needed (with the terminating NUL for strings).
        need: usize,
        /// Bytes the caller offered.
        have: usize,
    },
    /// A transfer request that was never posted.
    #[error("transfer request was never posted")]
    NotPosted,
    /// Something this build or machine does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// Result of the crate's internal functions.
pub type Result<T> = std::result::Result<T, CapiError>;

impl CapiError {
    /// Shorthand for [`CapiError::Invalid`].
    pub(crate) fn invalid(msg: impl Into<String>) -> CapiError {
        CapiError::Invalid(msg.into())
    }

    /// The status code of this error. Fatal or retryable follows [`TransferError::is_retryable`].
    pub fn status(&self) -> pdx_status {
        match self {
            CapiError::Invalid(_) => PDX_ERR_INVALID,
            CapiError::BufferTooSmall { .. } => PDX_ERR_BUFFER_TOO_SMALL,
            CapiError::NotPosted => PDX_ERR_NOT_POSTED,
            CapiError::Unsupported(_) => PDX_ERR_UNSUPPORTED,
            CapiError::Transfer(e) => transfer_status(e),
        }
    }
}

/// The code of a transfer-engine error (exhaustive on purpose: a new variant must be given its code here).
fn transfer_status(e: &TransferError) -> pdx_status {
    match e {
        TransferError::NotRegistered { .. } => PDX_ERR_NOT_REGISTERED,
        TransferError::Invalid(_) => PDX_ERR_INVALID,
        TransferError::UnknownRemote(_) => PDX_ERR_UNKNOWN_REMOTE,
        TransferError::BadMetadata(_) => PDX_ERR_BAD_METADATA,
        TransferError::Protocol { .. } => PDX_ERR_PROTOCOL,
        TransferError::Remote { .. } => PDX_ERR_REMOTE,
        TransferError::Unauthenticated { .. } => PDX_ERR_AUTH,
        TransferError::PeerDisconnected { .. } => PDX_ERR_PEER_DISCONNECTED,
        TransferError::Timeout { .. } => PDX_ERR_TIMEOUT,
        TransferError::InProgress => PDX_ERR_REPOST_ACTIVE,
        TransferError::RegionInUse(..) => PDX_ERR_REGION_IN_USE,
        TransferError::TransportUnavailable { .. } => PDX_ERR_TRANSPORT_UNAVAILABLE,
        TransferError::Unavailable(_) => PDX_ERR_UNSUPPORTED,
        TransferError::Shutdown => PDX_ERR_SHUTDOWN,
        TransferError::Cuda(c) if c.is_unavailable() => PDX_ERR_UNSUPPORTED,
        TransferError::Cuda(_) if e.is_retryable() => PDX_ERR_CUDA_TRANSIENT,
        TransferError::Cuda(_) => PDX_ERR_CUDA,
        TransferError::Sys(_) | TransferError::Io { .. } if e.is_retryable() => {
            PDX_ERR_IO_TRANSIENT
        }
        TransferError::Sys(_) | TransferError::Io { .. } => PDX_ERR_IO,
    }
}

thread_local! {
    /// The message of the last failed call on this thread (`None` after a call that succeeded).
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn set_last_error(msg: String) {
    // Interior NULs would cut the C string short; a message never needs them.
    let msg = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = Some(msg));
}

fn clear_last_error() {
    LAST_ERROR.with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            if l.is_some() {
                *l = None;
            }
        }
    });
}

/// The message of the last pdx call on this thread if it failed, or `""` if it succeeded. Never null. The string
/// belongs to pdx and stays valid until the next pdx call on the same thread; copy it to keep it.
///
/// Thread safety: per thread (each thread sees its own calls' messages).
#[no_mangle]
pub extern "C" fn pdx_last_error() -> *const c_char {
    LAST_ERROR.with(|l| match &*l.borrow() {
        // The CString's buffer stays put until the next call on this thread replaces or clears it.
        Some(m) => m.as_ptr(),
        None => c"".as_ptr(),
    })
}

/// The name of a status code (`"PDX_ERR_INVALID"`, …) as a static string, or `"PDX_UNKNOWN_STATUS"` for a value that
/// is not one. Never null; never freed.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn pdx_status_str(status: i32) -> *const c_char {
    pdx_status::from_code(status)
        .map_or(c"PDX_UNKNOWN_STATUS", pdx_status::name)
        .as_ptr()
}

/// True when `status` is a retryable error (`-100 ..= -199`): the same call may succeed later. False for success,
/// `PDX_IN_PROGRESS`, fatal errors and unknown values.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn pdx_status_is_retryable(status: i32) -> bool {
    pdx_status::from_code(status).is_some_and(pdx_status::is_retryable)
}

/// Runs the body of a C entry point: clears the thread's last error, catches any panic (mapped to
/// `PDX_ERR_INTERNAL`), and records the message of an error.
pub(crate) fn guard(body: impl FnOnce() -> Result<pdx_status>) -> pdx_status {
    clear_last_error();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => {
            let status = e.status();
            set_last_error(e.to_string());
            status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(format!(
                "internal error in pdx (a bug, please report): {what}"
            ));
            PDX_ERR_INTERNAL
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_ranges_hold() {
        let mut seen = std::collections::HashSet::new();
        for s in pdx_status::ALL {
            assert!(seen.insert(s as i32), "{s:?} duplicated");
        }
        for s in pdx_status::ALL {
            let code = s as i32;
            assert_eq!(pdx_status::from_code(code), Some(s));
            let retryable = s.is_retryable();
            assert_eq!(retryable, code <= -100, "{s:?}");
            assert!((-199..=1).contains(&code));
        }
        assert!(pdx_status::from_code(-50).is_none());
    }

    #[test]
    fn retryable_follows_the_engine() {
        let cases = [
            TransferError::InProgress,
            TransferError::Invalid("x".into()),
            TransferError::UnknownRemote("p".into()),
            TransferError::PeerDisconnected {
                peer: "p".into(),
                reason: "r".into(),
            },
            TransferError::Timeout {
                peer: "p".into(),
                after: std::time::Duration::from_secs(1),
            },
            TransferError::RegionInUse(1, 2),
            TransferError::BadMetadata("m".into()),
            TransferError::Io {
                op: "x",
                source: std::io::Error::other("y"),
            },
        ];
        for e in cases {
            assert_eq!(
                transfer_status(&e).is_retryable(),
                e.is_retryable(),
                "{e:?}"
            );
        }
    }

    #[test]
    fn a_panic_becomes_internal_with_its_message() {
        let s = guard(|| panic!("boom"));
        assert_eq!(s, PDX_ERR_INTERNAL);
        let msg = LAST_ERROR.with(|l| l.borrow().clone()).unwrap();
        assert!(msg.to_str().unwrap().contains("boom"));
        assert_eq!(guard(|| Ok(PDX_OK)), PDX_OK);
        assert!(LAST_ERROR.with(|l| l.borrow().is_none()));
    }
}
