//! Python exceptions. One base class, `pdx_transfer.TransferError`, and under it one class per NIXL status
//! (`nixlNotFoundError`, `nixlInvalidParamError`, …, the names NIXL's Python bindings raise), so code written for
//! NIXL catches what it always caught and pdx code can catch the base class. Each instance carries `retryable`
//! ([`Error::is_retryable`]).

// The exception classes carry NIXL's names (`nixlNotFoundError`, …) so NIXL code catches them unchanged.
#![allow(non_camel_case_types)]

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyModule;

use pdx_transfer::TransferError as Error;

pyo3::create_exception!(
    pdx_transfer,
    TransferError,
    PyException,
    "Base of every error pdx_transfer raises (a failed pdx-transfer call)."
);

macro_rules! nixl_errors {
    ($($name:ident => $doc:literal),* $(,)?) => {
        $(
            pyo3::create_exception!(pdx_transfer, $name, TransferError, $doc);
        )*
        /// Adds the base class (as `TransferError`) and every NIXL-named class to the module.
        pub fn add_to(m: &Bound<'_, PyModule>) -> PyResult<()> {
            let py = m.py();
            m.add("TransferError", py.get_type::<TransferError>())?;
            $( m.add(stringify!($name), py.get_type::<$name>())?; )*
            Ok(())
        }
    };
}

// NIXL's status codes (nixl_types.h), as its Python bindings raise them.
nixl_errors! {
    nixlNotPostedError => "The transfer request was never posted (NIXL_ERR_NOT_POSTED).",
    nixlInvalidParamError => "Invalid input: descriptors, indices, lengths, sizes (NIXL_ERR_INVALID_PARAM).",
    nixlBackendError => "The transport failed: a system call, the peer refused or broke the protocol (NIXL_ERR_BACKEND).",
    nixlNotFoundError => "Unknown remote agent, or memory that is not registered (NIXL_ERR_NOT_FOUND).",
    nixlMismatchError => "Malformed or mismatched metadata (NIXL_ERR_MISMATCH).",
    nixlNotAllowedError => "Refused: authentication, memory still in use, agent closed (NIXL_ERR_NOT_ALLOWED).",
    nixlRepostActiveError => "Posted again while the previous post is still in progress (NIXL_ERR_REPOST_ACTIVE).",
    nixlUnknownError => "An error with no better class (NIXL_ERR_UNKNOWN).",
    nixlNotSupportedError => "No transport or build support for this memory or request (NIXL_ERR_NOT_SUPPORTED).",
    nixlRemoteDisconnectError => "The peer is gone or made no progress within its timeout (NIXL_ERR_REMOTE_DISCONNECT).",
    nixlCancelledError => "The transfer was cancelled (NIXL_ERR_CANCELED).",
    nixlNoTelemetryError => "No telemetry for this request (NIXL_ERR_NO_TELEMETRY).",
}

/// The Python exception for a pdx-transfer error: the NIXL class of the status NIXL would return for it, with
/// pdx's message and a `retryable` attribute.
pub fn to_py(e: Error) -> PyErr {
    let retryable = e.is_retryable();
    let msg = e.to_string();
    let err = match &e {
        Error::NotRegistered { .. } | Error::UnknownRemote(_) => nixlNotFoundError::new_err(msg),
        Error::Invalid(_) => nixlInvalidParamError::new_err(msg),
        Error::BadMetadata(_) => nixlMismatchError::new_err(msg),
        Error::Unauthenticated { .. } | Error::RegionInUse(..) | Error::Shutdown => {
            nixlNotAllowedError::new_err(msg)
        }
        Error::PeerDisconnected { .. } | Error::Timeout { .. } => {
            nixlRemoteDisconnectError::new_err(msg)
        }
        Error::InProgress => nixlRepostActiveError::new_err(msg),
        Error::TransportUnavailable { .. } | Error::Unavailable(_) => {
            nixlNotSupportedError::new_err(msg)
        }
        Error::Cuda(pdx_cuda::CudaError::Unavailable { .. }) => nixlNotSupportedError::new_err(msg),
        // A range CUDA says is not what the caller claimed (not device memory of that GPU, past its allocation).
        Error::Cuda(pdx_cuda::CudaError::Invalid(_)) => nixlInvalidParamError::new_err(msg),
        Error::Protocol { .. }
        | Error::Remote { .. }
        | Error::Cuda(_)
        | Error::Sys(_)
        | Error::Io { .. } => nixlBackendError::new_err(msg),
        // TransferError is non-exhaustive in spirit: a variant added later is still an error.
        #[allow(unreachable_patterns)]
        _ => nixlUnknownError::new_err(msg),
    };
    Python::attach(|py| {
        // Setting an attribute on a fresh exception instance cannot fail short of memory exhaustion; the error
        // itself matters more than the attribute.
        let _ = err.value(py).setattr("retryable", retryable);
    });
    err
}

/// An invalid-argument error (`nixlInvalidParamError`).
pub fn invalid(msg: impl Into<String>) -> PyErr {
    nixlInvalidParamError::new_err(msg.into())
}

/// A not-supported error (`nixlNotSupportedError`).
pub fn unsupported(msg: impl Into<String>) -> PyErr {
    nixlNotSupportedError::new_err(msg.into())
}

/// Extension trait: `?` on pdx-transfer results inside `#[pymethods]`.
pub trait IntoPy<T> {
    /// Maps the error to its Python exception.
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, Error> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
