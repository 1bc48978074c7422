//! Device memory, pinned host memory and CUDA IPC.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{result, sys};
use pdx_sys::Memory;
use serde::{Deserialize, Serialize};

use crate::device::Device;
use crate::error::{check, driver_err, CudaError, Result};

/// Where a [`GpuMemory`] lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemLocation {
    /// On device `n`.
    Device(usize),
    /// Page-locked host memory, registered through device `n`'s context (usable by every device).
    PinnedHost(usize),
}

mod sealed {
    pub trait Sealed {}
}

/// Memory the GPU can address: the unit of [`crate::Stream`] copies and kernel arguments. Sealed: only this
/// crate's buffers implement it, so an address always comes with a live allocation and its true length.
pub trait GpuMemory: sealed::Sealed + Send + Sync {
    /// Device-visible address of byte 0 (under unified addressing, the host address for pinned memory).
    fn gpu_addr(&self) -> u64;
    /// Length in bytes.
    fn gpu_len(&self) -> usize;
    /// Where it lives.
    fn location(&self) -> MemLocation;
    /// The device whose context owns it.
    fn device(&self) -> &Device;
}

/// Checks `[off, off+len)` is inside `mem`; returns the device address of `off`.
pub(crate) fn range(mem: &dyn GpuMemory, off: usize, len: usize, what: &str) -> Result<u64> {
    match off.checked_add(len) {
        Some(end) if end <= mem.gpu_len() => Ok(mem.gpu_addr() + off as u64),
        _ => Err(CudaError::Invalid(format!(
            "{what}: range {off}+{len} outside a buffer of {} bytes",
            mem.gpu_len()
        ))),
    }
}

struct DeviceAlloc {
    device: Device,
    ptr: sys::CUdeviceptr,
    len: usize,
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        // Wait for copies and kernels that may still use the allocation, then free it. Errors here (a sticky
        // context error) cannot be reported from drop; the memory is then released with the context.
        if self.device.synchronize().is_ok() {
            // SAFETY: `ptr` came from cuMemAlloc in this context and is freed exactly once, here; the device is
            // idle, so nothing in flight uses it.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Device memory (`cuMemAlloc`, 256-byte aligned), freed when the last clone is dropped. Cloning shares the
/// allocation (kernels keep the tensors they read alive this way).
#[derive(Clone)]
pub struct DeviceBuffer {
    inner: Arc<DeviceAlloc>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuffer({:#x}+{} on {:?})",
            self.inner.ptr, self.inner.len, self.inner.device
        )
    }
}

impl DeviceBuffer {
    /// Allocates `len` bytes (> 0) on `device`. The content is unspecified. Errors: zero length,
    /// [`CudaError::OutOfMemory`].
    pub fn new(device: &Device, len: usize) -> Result<DeviceBuffer> {
        if len == 0 {
            return Err(CudaError::Invalid("zero-length device allocation".into()));
        }
        device.bind()?;
        // SAFETY: the context is current; the result is owned by the DeviceAlloc and freed in its Drop.
        let ptr = unsafe { result::malloc_sync(len) }.map_err(driver_err("cuMemAlloc"))?;
        Ok(DeviceBuffer {
            inner: Arc::new(DeviceAlloc {
                device: device.clone(),
                ptr,
                len,
            }),
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.inner.len
    }
    /// Always false (allocations are never empty).
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Device address of byte 0.
    pub fn addr(&self) -> u64 {
        self.inner.ptr
    }

    /// Exports the allocation for another process on this host ([`IpcHandle`], `cuIpcGetMemHandle`).
    pub fn ipc_handle(&self) -> Result<IpcHandle> {
        self.inner.device.bind()?;
        let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: `h` is a valid out-parameter; `ptr` is the base of a live cuMemAlloc allocation.
        check("cuIpcGetMemHandle", unsafe {
            sys::cuIpcGetMemHandle(&mut h, self.inner.ptr)
        })?;
        Ok(IpcHandle {
            bytes: h.reserved.iter().map(|&c| c as u8).collect(),
            len: self.inner.len as u64,
            device: self.inner.device.ordinal() as u32,
        })
    }
}

impl sealed::Sealed for DeviceBuffer {}
impl GpuMemory for DeviceBuffer {
    fn gpu_addr(&self) -> u64 {
        self.inner.ptr
    }
    fn gpu_len(&self) -> usize {
        self.inner.len
    }
    fn location(&self) -> MemLocation {
        MemLocation::Device(self.inner.device.ordinal())
    }
    fn device(&self) -> &Device {
        &self.inner.device
    }
}

struct Pinned {
    device: Device,
    mem: Memory,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // DMA into this host memory must be over before it is unpinned and unmapped: that would be a write into
        // memory Rust has freed.
        let _ = self.device.synchronize();
        // SAFETY: the range was registered in `PinnedHostBuffer::new` and is unregistered once, before `mem`
        // (dropped after this body) unmaps it.
        let _ = unsafe { sys::cuMemHostUnregister(self.mem.addr() as *mut c_void) };
    }
}

// SAFETY: `Pinned` holds a `Memory` (Send + Sync in pdx-sys: accessed only through raw-pointer copies) and a
// `Device` (Send + Sync); the registration itself is process-wide driver state.
unsafe impl Send for Pinned {}
// SAFETY: see `Send`; no method takes `&mut`.
unsafe impl Sync for Pinned {}

/// Page-locked host memory: a `pdx-sys` memfd arena (same-host peers can map it, as with any pdx region)
/// registered with `cuMemHostRegister(PORTABLE)`, so copies between it and any device run at DMA speed.
/// Unregistered when the last clone is dropped (after the device is idle).
#[derive(Clone)]
pub struct PinnedHostBuffer {
    inner: Arc<Pinned>,
}

impl std::fmt::Debug for PinnedHostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PinnedHostBuffer({:#x}+{})",
            self.inner.mem.addr(),
            self.inner.mem.len()
        )
    }
}

impl PinnedHostBuffer {
    /// Allocates `len` bytes (> 0) of shared host memory, faulted in, and pins it through `device`. Errors:
    /// zero length, host allocation failures, [`CudaError::OutOfMemory`] when it cannot be pinned.
    pub fn new(device: &Device, len: usize) -> Result<PinnedHostBuffer> {
        let mem = Memory::memfd("pdx-pinned", len, true).map_err(|e| {
            CudaError::Invalid(format!("pinned host allocation of {len} bytes: {e}"))
        })?;
        Self::pin(device, mem)
    }

    /// Pins existing host memory and takes ownership of it (e.g. a same-host peer's memfd region mapped into
    /// this process, so the GPU can copy to and from it at DMA speed). Errors: the driver refuses the range.
    pub fn pin(device: &Device, mem: Memory) -> Result<PinnedHostBuffer> {
        device.bind()?;
        // SAFETY: `mem` is a live mapping of `mem.len()` bytes, owned by the Pinned below, which unregisters it
        // before unmapping. PORTABLE makes the pinning visible to every context.
        check("cuMemHostRegister", unsafe {
            sys::cuMemHostRegister_v2(
                mem.addr() as *mut c_void,
                mem.len(),
                sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        })?;
        Ok(PinnedHostBuffer {
            inner: Arc::new(Pinned {
                device: device.clone(),
                mem,
            }),
        })
    }
    /// The host memory (read, write, fill through bounds-checked copies; registrable with pdx-transfer).
    pub fn memory(&self) -> &Memory {
        &self.inner.mem
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.inner.mem.len()
    }
    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl sealed::Sealed for PinnedHostBuffer {}
impl GpuMemory for PinnedHostBuffer {
    fn gpu_addr(&self) -> u64 {
        // Unified addressing (every 64-bit CUDA platform): registered host memory has the same address on the device.
        self.inner.mem.addr()
    }
    fn gpu_len(&self) -> usize {
        self.inner.mem.len()
    }
    fn location(&self) -> MemLocation {
        MemLocation::PinnedHost(self.inner.device.ordinal())
    }
    fn device(&self) -> &Device {
        &self.inner.device
    }
}

/// A CUDA IPC handle of a device allocation (`CUipcMemHandle`, 64 opaque bytes) with the allocation's length
/// and device: what an agent publishes in its metadata so a same-host peer process can map the memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "IpcHandleWire")]
pub struct IpcHandle {
    bytes: Vec<u8>,
    len: u64,
    device: u32,
}

/// Serde shape of [`IpcHandle`], validated on the way in.
#[derive(Deserialize)]
struct IpcHandleWire {
    bytes: Vec<u8>,
    len: u64,
    device: u32,
}

impl TryFrom<IpcHandleWire> for IpcHandle {
    type Error = String;
    fn try_from(w: IpcHandleWire) -> std::result::Result<Self, String> {
        IpcHandle::from_parts(&w.bytes, w.len, w.device).map_err(|e| e.to_string())
    }
}

impl IpcHandle {
    /// Bytes in a `CUipcMemHandle`.
    pub const BYTES: usize = 64;

    /// A handle from its parts (as received from a peer). Errors: not exactly 64 bytes, zero length.
    pub fn from_parts(bytes: &[u8], len: u64, device: u32) -> Result<IpcHandle> {
        if bytes.len() != Self::BYTES || len == 0 {
            return Err(CudaError::Invalid(format!(
                "IPC handle of {} bytes for {len} bytes of memory (want {} bytes, non-empty)",
                bytes.len(),
                Self::BYTES
            )));
        }
        Ok(IpcHandle {
            bytes: bytes.to_vec(),
            len,
            device,
        })
    }
    /// The 64 handle bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// Length of the exported allocation in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Device index of the allocation in the exporting process.
    pub fn device(&self) -> u32 {
        self.device
    }

    /// Maps the peer's allocation into this process through `device` (`cuIpcOpenMemHandle` with lazy peer
    /// access, so the memory of another GPU of this host can be opened too). The mapped length is checked
    /// against the driver's view of the allocation. Errors: the handle is from this process (CUDA refuses),
    /// the peer freed it, or it is shorter than advertised.
    pub fn open(&self, device: &Device) -> Result<IpcMemory> {
        let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
        for (d, s) in h.reserved.iter_mut().zip(&self.bytes) {
            *d = *s as std::ffi::c_char;
        }
        device.bind()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` is a valid out-parameter; the driver validates the opaque handle.
        check("cuIpcOpenMemHandle", unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                h,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        })?;
        let mapped = IpcMemory {
            inner: Arc::new(IpcMapping {
                device: device.clone(),
                ptr,
                len: self.len as usize,
            }),
        };
        let (mut base, mut size) = (0, 0usize);
        // SAFETY: valid out-parameters; `ptr` is a live mapping.
        check("cuMemGetAddressRange", unsafe {
            sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr)
        })?;
        if base != ptr || (size as u64) < self.len {
            return Err(CudaError::Invalid(format!(
                "IPC handle advertises {} bytes, the mapped allocation has {size}",
                self.len
            )));
        }
        Ok(mapped)
    }
}

struct IpcMapping {
    device: Device,
    ptr: sys::CUdeviceptr,
    len: usize,
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        if self.device.synchronize().is_ok() {
            // SAFETY: `ptr` came from cuIpcOpenMemHandle and is closed once; the device is idle.
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.ptr) };
        }
    }
}

/// Another process's device allocation mapped into this one ([`IpcHandle::open`]); closed when the last clone
/// is dropped.
#[derive(Clone)]
pub struct IpcMemory {
    inner: Arc<IpcMapping>,
}

impl std::fmt::Debug for IpcMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IpcMemory({:#x}+{})", self.inner.ptr, self.inner.len)
    }
}

impl IpcMemory {
    /// Device address of byte 0 in this process.
    pub fn addr(&self) -> u64 {
        self.inner.ptr
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.inner.len
    }
    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl sealed::Sealed for IpcMemory {}
impl GpuMemory for IpcMemory {
    fn gpu_addr(&self) -> u64 {
        self.inner.ptr
    }
    fn gpu_len(&self) -> usize {
        self.inner.len
    }
    fn location(&self) -> MemLocation {
        MemLocation::Device(self.inner.device.ordinal())
    }
    fn device(&self) -> &Device {
        &self.inner.device
    }
}
