//! The error type of pdx-cuda.

use cudarc::driver::{result::DriverError, sys::CUresult};

/// Errors of the CUDA layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    /// No usable CUDA here: no `libcuda` (no driver), no device, no NVRTC when the kernels need it. Fatal for
    /// GPU paths; callers fall back to host paths or report it.
    #[error("CUDA unavailable: {reason}")]
    Unavailable {
        /// Why, for the user.
        reason: String,
    },
    /// Device memory is exhausted (`CUDA_ERROR_OUT_OF_MEMORY`). Retryable once memory is freed.
    #[error("CUDA out of memory during {op}")]
    OutOfMemory {
        /// The driver call.
        op: &'static str,
    },
    /// A driver call failed. Fatal (CUDA errors from kernels are sticky for the context).
    #[error("CUDA driver call {op} failed: {code}")]
    Driver {
        /// The driver call, e.g. `cuMemcpyAsync`.
        op: &'static str,
        /// The CUDA error name, e.g. `CUDA_ERROR_INVALID_VALUE`.
        code: String,
    },
    /// NVRTC could not compile the kernels (the log says why).
    #[error("NVRTC compilation of {name} failed: {log}")]
    Compile {
        /// Kernel file.
        name: String,
        /// Compiler log or error.
        log: String,
    },
    /// A caller error: out-of-bounds range, buffers of another device, malformed handle.
    #[error("invalid CUDA request: {0}")]
    Invalid(String),
    /// A layout, table or buffer-size error from `pdx-kvlayout`.
    #[error(transparent)]
    Layout(#[from] pdx_kvlayout::LayoutError),
}

impl CudaError {
    /// True for errors worth retrying later (out of memory); everything else is fatal for the operation.
    pub fn is_retryable(&self) -> bool {
        matches!(self, CudaError::OutOfMemory { .. })
    }
    /// True when CUDA is not usable on this machine at all.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, CudaError::Unavailable { .. })
    }
    pub(crate) fn unavailable(reason: impl Into<String>) -> Self {
        CudaError::Unavailable {
            reason: reason.into(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, CudaError>;

/// Maps a driver error of call `op`.
pub(crate) fn driver_err(op: &'static str) -> impl FnOnce(DriverError) -> CudaError {
    move |e| {
        if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            return CudaError::OutOfMemory { op };
        }
        let code = e
            .error_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("{:?}", e.0));
        if matches!(
            e.0,
            CUresult::CUDA_ERROR_NO_DEVICE
                | CUresult::CUDA_ERROR_NOT_INITIALIZED
                | CUresult::CUDA_ERROR_DEINITIALIZED
        ) {
            return CudaError::unavailable(format!("{op}: {code}"));
        }
        CudaError::Driver { op, code }
    }
}

/// `CUresult` → `Result`, for raw `sys` calls.
pub(crate) fn check(op: &'static str, r: CUresult) -> Result<()> {
    r.result().map_err(driver_err(op))
}
