//! Driver loading and devices.

use std::sync::{Arc, OnceLock};

use cudarc::driver::{result, safe::CudaContext, sys};

use crate::error::{check, driver_err, CudaError, Result};

/// Loads `libcuda` and initialises the driver, once per process. Errors: [`CudaError::Unavailable`] when no
/// `libcuda` can be loaded (checked before any cudarc call, which would panic) or `cuInit` fails (no device,
/// driver too old).
pub fn driver() -> Result<()> {
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        // SAFETY: `is_culib_present` only tries `dlopen` on the candidate library names; it calls no CUDA function.
        if !unsafe { sys::is_culib_present() } {
            return Err("no CUDA driver (libcuda) found".into());
        }
        result::init().map_err(|e| format!("cuInit failed: {e:?}"))
    })
    .clone()
    .map_err(CudaError::unavailable)
}

/// Number of CUDA devices. Errors: [`CudaError::Unavailable`] without a driver.
pub fn device_count() -> Result<usize> {
    driver()?;
    let n = result::device::get_count().map_err(driver_err("cuDeviceGetCount"))?;
    Ok(n.max(0) as usize)
}

/// A GPU, through its primary context (the context the CUDA runtime, PyTorch and vLLM use, so device addresses
/// are shared with an engine in the same process). Cheap to clone.
#[derive(Clone)]
pub struct Device {
    ctx: Arc<CudaContext>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({})", self.ordinal())
    }
}

impl PartialEq for Device {
    fn eq(&self, other: &Self) -> bool {
        self.ordinal() == other.ordinal()
    }
}
impl Eq for Device {}

impl Device {
    /// Opens GPU `ordinal` (retains its primary context). Errors: [`CudaError::Unavailable`] without a driver
    /// or when `ordinal` is not below [`device_count`].
    pub fn new(ordinal: usize) -> Result<Device> {
        let n = device_count()?;
        if ordinal >= n {
            return Err(CudaError::unavailable(format!(
                "no CUDA device {ordinal} ({n} present)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err("cuDevicePrimaryCtxRetain"))?;
        Ok(Device { ctx })
    }

    /// Device index.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// Device name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> Result<String> {
        self.ctx.name().map_err(driver_err("cuDeviceGetName"))
    }

    /// Compute capability `(major, minor)`, e.g. `(9, 0)`.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        self.ctx
            .compute_capability()
            .map_err(driver_err("cuDeviceGetAttribute"))
    }

    /// Makes this device's context current on the calling thread (every driver call of this crate does it
    /// first, so callers never have to).
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(driver_err("cuCtxSetCurrent"))
    }

    pub(crate) fn cu_ctx(&self) -> sys::CUcontext {
        self.ctx.cu_ctx()
    }

    pub(crate) fn cu_device(&self) -> sys::CUdevice {
        self.ctx.cu_device()
    }

    /// Waits for all work on this device's context.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        result::ctx::synchronize().map_err(driver_err("cuCtxSynchronize"))
    }

    /// `(free, total)` device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        result::mem_get_info().map_err(driver_err("cuMemGetInfo"))
    }

    /// Whether this device can access `peer`'s memory directly (NVLink or PCIe P2P).
    pub fn can_access_peer(&self, peer: &Device) -> Result<bool> {
        let mut can = 0;
        // SAFETY: `can` is a valid out-pointer; both devices come from the driver.
        check("cuDeviceCanAccessPeer", unsafe {
            sys::cuDeviceCanAccessPeer(&mut can, self.cu_device(), peer.cu_device())
        })?;
        Ok(can != 0)
    }

    /// Lets this device's kernels and copies access `peer`'s memory directly. Idempotent.
    pub fn enable_peer_access(&self, peer: &Device) -> Result<()> {
        if self == peer {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both contexts are retained primary contexts; the flags argument must be 0.
        let r = unsafe { sys::cuCtxEnablePeerAccess(peer.cu_ctx(), 0) };
        if r == sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
            return Ok(());
        }
        check("cuCtxEnablePeerAccess", r)
    }
}
