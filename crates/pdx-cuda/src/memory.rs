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
    /// Base of the driver allocation that holds `ptr` (equal to `ptr` for pdx's own allocations): what CUDA IPC
    /// exports, at allocation granularity.
    base: sys::CUdeviceptr,
    /// Whether `cuIpcGetMemHandle` can export the allocation (`cuMemAlloc` memory can; `cuMemCreate`/VMM memory,
    /// such as PyTorch's expandable segments, cannot).
    ipc_capable: bool,
    /// True when pdx allocated it and frees it on drop; false for memory registered by pointer
    /// ([`DeviceBuffer::from_raw`]), which its owner frees.
    owned: bool,
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        // Wait for copies and kernels that may still use the memory: for pdx's allocations before freeing them,
        // for caller memory so that, once the last clone is gone, nothing pdx queued can still touch it (the
        // caller may free it right after). Errors here (a sticky context error) cannot be reported from drop; the
        // memory is then released with the context.
        if self.device.synchronize().is_ok() && self.owned {
            // SAFETY: `ptr` came from cuMemAlloc in this context (`owned`) and is freed exactly once, here; the
            // device is idle, so nothing in flight uses it.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Device memory: either allocated by pdx (`cuMemAlloc`, 256-byte aligned, [`DeviceBuffer::new`]) and freed when
/// the last clone is dropped, or memory of the caller registered by pointer ([`DeviceBuffer::from_raw`]: an
/// engine's KV cache tensors), never freed by pdx. Cloning shares the buffer (kernels and in-flight transfers keep
/// the tensors they use alive this way).
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
                base: ptr,
                ipc_capable: true,
                owned: true,
            }),
        })
    }

    /// Wraps `len` bytes of device memory at device address `ptr` on GPU `device` that the caller allocated
    /// (an engine's KV cache: a `cudaMalloc` block or a tensor inside one, such as a slice of PyTorch's caching
    /// allocator). pdx never frees it. The range is validated with `cuPointerGetAttributes`: the memory type is
    /// device memory, its device ordinal is `device`, and `[ptr, ptr+len)` lies inside one driver allocation
    /// (`CU_POINTER_ATTRIBUTE_RANGE_START_ADDR` / `RANGE_SIZE`). Peers on this host reach it through the CUDA IPC
    /// handle of that whole allocation plus the offset of `ptr` in it ([`DeviceBuffer::ipc_handle`]); note that
    /// CUDA IPC exports at allocation granularity, so a same-host peer process that opens the handle could address
    /// the rest of the allocation too (pdx's own peers only touch `[ptr, ptr+len)`, bounds-checked).
    ///
    /// Errors: [`CudaError::Unavailable`] without a CUDA driver or without GPU `device`; [`CudaError::Invalid`]
    /// for a zero length, an overflowing range, an address that is not device memory of GPU `device`, or a range
    /// that runs past the end of its allocation.
    ///
    /// # Safety
    /// The one contract of memory registered by pointer: `[ptr, ptr+len)` must stay allocated (not freed, not
    /// unmapped, not reused for another purpose the caller would mind pdx writing into) until this buffer and
    /// every clone of it are dropped. Clones include those held by `pdx-transfer` registrations, prepared
    /// descriptor lists and transfers in flight; dropping the last clone waits for the device, so no copy pdx
    /// queued still runs once it returns. pdx writes into the range whenever a peer's transfer asks it to, so the
    /// caller synchronises its own use of the bytes through transfer completion and notifications.
    pub unsafe fn from_raw(ptr: u64, len: usize, device: u32) -> Result<DeviceBuffer> {
        if len == 0 || ptr == 0 || ptr.checked_add(len as u64).is_none() {
            return Err(CudaError::Invalid(format!(
                "device range {ptr:#x}+{len}: null, empty or overflowing"
            )));
        }
        let dev = Device::new(device as usize)?;
        dev.bind()?;
        let info = pointer_info(ptr)?;
        if info.memory_type != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u64 {
            return Err(CudaError::Invalid(format!(
                "{ptr:#x} is not device memory (CUDA memory type {}; 0 means unknown to CUDA)",
                info.memory_type
            )));
        }
        if info.ordinal != u64::from(device) {
            return Err(CudaError::Invalid(format!(
                "{ptr:#x} is memory of GPU {}, not of GPU {device}",
                info.ordinal
            )));
        }
        let in_range = ptr >= info.base
            && (ptr - info.base)
                .checked_add(len as u64)
                .is_some_and(|end| end <= info.size);
        if info.size == 0 || !in_range {
            return Err(CudaError::Invalid(format!(
                "device range {ptr:#x}+{len} is not inside its allocation {:#x}+{}",
                info.base, info.size
            )));
        }
        Ok(DeviceBuffer {
            inner: Arc::new(DeviceAlloc {
                device: dev,
                ptr,
                len,
                base: info.base,
                ipc_capable: info.ipc_capable,
                owned: false,
            }),
        })
    }

    /// True when pdx allocated the memory ([`DeviceBuffer::new`]); false for memory registered by pointer.
    pub fn is_owned(&self) -> bool {
        self.inner.owned
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

    /// Exports the buffer for another process on this host ([`IpcHandle`]): the `cuIpcGetMemHandle` handle of
    /// the allocation that holds it, with the offset of byte 0 in that allocation and the buffer's length.
    /// Errors: the allocation cannot be exported by CUDA IPC (`cuMemCreate`/VMM memory), driver errors.
    pub fn ipc_handle(&self) -> Result<IpcHandle> {
        if !self.inner.ipc_capable {
            return Err(CudaError::Invalid(format!(
                "{:#x} is in an allocation that CUDA IPC cannot export (cuMemCreate/VMM memory, e.g. PyTorch \
                 expandable segments); allocate the KV cache with cudaMalloc/cuMemAlloc",
                self.inner.ptr
            )));
        }
        self.inner.device.bind()?;
        let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: `h` is a valid out-parameter; `base` is the base of a live allocation (ours from cuMemAlloc, or
        // the caller's, which the `from_raw` contract keeps alive while this buffer exists).
        check("cuIpcGetMemHandle", unsafe {
            sys::cuIpcGetMemHandle(&mut h, self.inner.base)
        })?;
        Ok(IpcHandle {
            bytes: h.reserved.iter().map(|&c| c as u8).collect(),
            len: self.inner.len as u64,
            device: self.inner.device.ordinal() as u32,
            offset: self.inner.ptr - self.inner.base,
        })
    }
}

/// What the driver says about a device address (`cuPointerGetAttributes`).
struct PointerInfo {
    memory_type: u64,
    ordinal: u64,
    base: u64,
    size: u64,
    ipc_capable: bool,
}

/// Queries the driver about `ptr` in one call. `cuPointerGetAttributes`, unlike `cuPointerGetAttribute`, succeeds
/// for addresses CUDA does not know and leaves the attributes at zero (memory type 0), which `from_raw` refuses.
fn pointer_info(ptr: u64) -> Result<PointerInfo> {
    use sys::CUpointer_attribute as A;
    let mut attrs = [
        A::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
        A::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        A::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
        A::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
        A::CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
    ];
    // Each slot is 8 zeroed bytes, at least the size of every attribute asked for (unsigned int, int,
    // CUdeviceptr, size_t, bool), so a narrower value leaves the slot's high bytes zero (little endian).
    let mut vals = [0u64; 5];
    let mut data: [*mut c_void; 5] = [std::ptr::null_mut(); 5];
    for (d, v) in data.iter_mut().zip(vals.iter_mut()) {
        *d = (v as *mut u64).cast();
    }
    // SAFETY: `attrs` and `data` have 5 entries each; every `data` entry points to an 8-byte, 8-aligned slot of
    // `vals`, large enough for its attribute; all three arrays outlive the call.
    check("cuPointerGetAttributes", unsafe {
        sys::cuPointerGetAttributes(
            attrs.len() as u32,
            attrs.as_mut_ptr(),
            data.as_mut_ptr(),
            ptr,
        )
    })?;
    Ok(PointerInfo {
        memory_type: vals[0] & 0xffff_ffff,
        // An int: a negative ordinal (none) becomes a large number, which no device matches.
        ordinal: vals[1] & 0xffff_ffff,
        base: vals[2],
        size: vals[3],
        ipc_capable: vals[4] & 0xff != 0,
    })
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

/// A CUDA IPC handle of a device buffer: the `CUipcMemHandle` (64 opaque bytes) of the allocation that holds
/// it, the buffer's offset in that allocation and its length, and its device. What an agent publishes in its
/// metadata so a same-host peer process can map the memory: the peer opens the whole allocation (CUDA IPC
/// exports allocations, not sub-ranges) and addresses `base + offset`. The offset is non-zero for memory
/// registered by pointer inside a larger allocation ([`DeviceBuffer::from_raw`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "IpcHandleWire")]
pub struct IpcHandle {
    bytes: Vec<u8>,
    len: u64,
    device: u32,
    offset: u64,
}

/// Serde shape of [`IpcHandle`], validated on the way in. `offset` defaults to 0 in self-describing formats
/// (JSON handles written before it existed); binary formats (pdx-transfer's metadata) version it themselves.
#[derive(Deserialize)]
struct IpcHandleWire {
    bytes: Vec<u8>,
    len: u64,
    device: u32,
    #[serde(default)]
    offset: u64,
}

impl TryFrom<IpcHandleWire> for IpcHandle {
    type Error = String;
    fn try_from(w: IpcHandleWire) -> std::result::Result<Self, String> {
        IpcHandle::from_parts(&w.bytes, w.len, w.device, w.offset).map_err(|e| e.to_string())
    }
}

impl IpcHandle {
    /// Bytes in a `CUipcMemHandle`.
    pub const BYTES: usize = 64;

    /// A handle from its parts (as received from a peer): the 64 handle bytes, the exported length in bytes, the
    /// device index, and the offset in bytes of the exported range in its allocation. Errors: not exactly 64
    /// bytes, zero length, `offset + len` overflows (whether the range fits the allocation is checked when it is
    /// opened, against the driver's size of the mapping).
    pub fn from_parts(bytes: &[u8], len: u64, device: u32, offset: u64) -> Result<IpcHandle> {
        if bytes.len() != Self::BYTES || len == 0 {
            return Err(CudaError::Invalid(format!(
                "IPC handle of {} bytes for {len} bytes of memory (want {} bytes, non-empty)",
                bytes.len(),
                Self::BYTES
            )));
        }
        if offset.checked_add(len).is_none() {
            return Err(CudaError::Invalid(format!(
                "IPC handle range {offset}+{len} overflows"
            )));
        }
        Ok(IpcHandle {
            bytes: bytes.to_vec(),
            len,
            device,
            offset,
        })
    }
    /// The 64 handle bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// Length of the exported range in bytes.
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
    /// Offset in bytes of the exported range from the base of its allocation (0 for pdx's own allocations).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Maps the peer's allocation into this process through `device` (`cuIpcOpenMemHandle` with lazy peer
    /// access, so the memory of another GPU of this host can be opened too) and returns its exported range,
    /// `[base + offset, base + offset + len)`. The range is checked against the driver's size of the mapped
    /// allocation. Opening the same allocation again (another region inside it) returns the same mapping with its
    /// reference count raised (CUDA ≥ 11), and each [`IpcMemory`] closes its own reference. Errors: the handle is
    /// from this process (CUDA refuses), the peer freed the memory, or the range runs past the allocation.
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
        // Owned from here on, so an error below closes the mapping again.
        let mapped = IpcMemory {
            inner: Arc::new(IpcMapping {
                device: device.clone(),
                ptr,
                offset: self.offset,
                len: self.len as usize,
            }),
        };
        let (mut base, mut size) = (0, 0usize);
        // SAFETY: valid out-parameters; `ptr` is a live mapping.
        check("cuMemGetAddressRange", unsafe {
            sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr)
        })?;
        check_ipc_range(base == ptr, size as u64, self.offset, self.len)?;
        Ok(mapped)
    }
}

/// Checks an opened handle's range `[offset, offset+len)` against the mapped allocation (`size` bytes, mapped at
/// its base when `at_base`). Separate from [`IpcHandle::open`] so the bounds are tested without a GPU.
fn check_ipc_range(at_base: bool, size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if at_base && end <= size => Ok(()),
        _ => Err(CudaError::Invalid(format!(
            "IPC handle advertises bytes {offset}..{offset}+{len}, the mapped allocation has {size}"
        ))),
    }
}

struct IpcMapping {
    device: Device,
    /// Base of the mapped allocation (what `cuIpcCloseMemHandle` takes).
    ptr: sys::CUdeviceptr,
    /// Offset of the exported range in the allocation; `offset + len` ≤ the allocation's size (checked in open).
    offset: u64,
    len: usize,
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        if self.device.synchronize().is_ok() {
            // SAFETY: `ptr` came from cuIpcOpenMemHandle and this reference is closed once; the device is idle.
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.ptr) };
        }
    }
}

/// The exported range of another process's device allocation, mapped into this one ([`IpcHandle::open`]);
/// closed when the last clone is dropped.
#[derive(Clone)]
pub struct IpcMemory {
    inner: Arc<IpcMapping>,
}

impl std::fmt::Debug for IpcMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IpcMemory({:#x}+{})", self.addr(), self.inner.len)
    }
}

impl IpcMemory {
    /// Device address of byte 0 of the exported range in this process.
    pub fn addr(&self) -> u64 {
        self.inner.ptr + self.inner.offset
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
        self.addr()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipc_handle_offsets_are_validated_on_the_way_in() {
        assert!(IpcHandle::from_parts(&[1; 64], 10, 0, u64::MAX - 10).is_ok());
        assert!(IpcHandle::from_parts(&[1; 64], 10, 0, u64::MAX - 9).is_err());
        let h = IpcHandle::from_parts(&[1; 64], 4096, 1, 1 << 20).expect("valid");
        assert_eq!((h.len(), h.device(), h.offset()), (4096, 1, 1 << 20));
        let json = serde_json::to_value(&h).expect("json");
        assert_eq!(serde_json::from_value::<IpcHandle>(json).expect("back"), h);
        let mut bad = serde_json::to_value(&h).expect("json");
        bad["offset"] = serde_json::json!(u64::MAX);
        assert!(serde_json::from_value::<IpcHandle>(bad).is_err());
        // A handle written before offsets existed reads as offset 0.
        let mut old = serde_json::to_value(&h).expect("json");
        old.as_object_mut().expect("object").remove("offset");
        assert_eq!(
            serde_json::from_value::<IpcHandle>(old)
                .expect("old")
                .offset(),
            0
        );
    }

    #[test]
    fn ipc_ranges_must_fit_the_mapped_allocation() {
        assert!(check_ipc_range(true, 1 << 20, 0, 1 << 20).is_ok());
        assert!(check_ipc_range(true, 1 << 20, 4096, (1 << 20) - 4096).is_ok());
        assert!(check_ipc_range(true, 1 << 20, 4096, 1 << 20).is_err());
        assert!(check_ipc_range(true, 1 << 20, 1 << 20, 1).is_err());
        assert!(check_ipc_range(true, u64::MAX, u64::MAX, 2).is_err());
        // A mapping that does not start at the allocation's base is refused whatever the sizes.
        assert!(check_ipc_range(false, 1 << 20, 0, 16).is_err());
    }

    #[test]
    fn from_raw_without_cuda_is_unavailable_or_validated() {
        // SAFETY: the call fails validation before anything is wrapped (no CUDA here, or an address CUDA does not
        // know); nothing is ever accessed.
        let r = unsafe { DeviceBuffer::from_raw(0x1000, 4096, 0) };
        match r {
            Err(e) if e.is_unavailable() => println!("{}", crate::SKIP_NO_CUDA),
            Err(CudaError::Invalid(_)) => {}
            other => panic!("a host address was accepted as device memory: {other:?}"),
        }
        // SAFETY: a zero length is refused before any use.
        let empty = unsafe { DeviceBuffer::from_raw(0x1000, 0, 0) };
        assert!(matches!(empty, Err(CudaError::Invalid(_))));
    }
}
