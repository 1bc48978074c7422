//! Memory registration: kinds, RAII handles and the per-agent registry of regions.

use std::sync::{Arc, RwLock};

use pdx_cuda::{DeviceBuffer, GpuMemory, PinnedHostBuffer, Stream};
use pdx_sys::Memory;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TransferError};

fn gpu_device(d: &DeviceBuffer) -> &pdx_cuda::Device {
    GpuMemory::device(d)
}

/// Where a region lives. Descriptors carry the kind and device id; transports are chosen by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemoryKind {
    /// Pageable host memory (NIXL `DRAM`).
    Host,
    /// Page-locked host memory registered with CUDA (needs a CUDA driver at run time).
    PinnedHost,
    /// GPU memory of device `n` (NIXL `VRAM`; needs CUDA).
    Device(u32),
}

impl MemoryKind {
    /// The device id that descriptors of this kind carry: the GPU index for device memory, 0 otherwise.
    pub fn dev_id(self) -> u32 {
        match self {
            MemoryKind::Device(d) => d,
            _ => 0,
        }
    }
}

/// What backs a region.
pub(crate) enum Backing {
    /// Host memory (memfd arena or caller memory).
    Host(Memory),
    /// Page-locked host memory (a memfd arena registered with CUDA): host transports and CUDA copies alike.
    Pinned(PinnedHostBuffer),
    /// GPU memory: only the `cuda` transport moves it.
    Device(DeviceBuffer),
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::Host(m) => write!(f, "Host({m:?})"),
            Backing::Pinned(p) => write!(f, "{p:?}"),
            Backing::Device(d) => write!(f, "{d:?}"),
        }
    }
}

/// One registered region of an agent. Shared by the registry, the user's handle, prepared descriptor lists and
/// in-flight transfers, so the memory lives until the last of them is gone (never a use-after-free).
#[derive(Debug)]
pub(crate) struct Region {
    /// Agent-unique id, also carried in metadata.
    pub id: u64,
    /// Memory kind.
    pub kind: MemoryKind,
    /// The memory itself.
    pub backing: Backing,
}

impl Region {
    pub fn addr(&self) -> u64 {
        match &self.backing {
            Backing::Host(m) => m.addr(),
            Backing::Pinned(p) => p.memory().addr(),
            Backing::Device(d) => d.addr(),
        }
    }
    pub fn len(&self) -> u64 {
        match &self.backing {
            Backing::Host(m) => m.len() as u64,
            Backing::Pinned(p) => p.len() as u64,
            Backing::Device(d) => d.len() as u64,
        }
    }
    /// The host view of the region (host and pinned memory), `None` for GPU memory.
    pub fn host(&self) -> Option<&Memory> {
        match &self.backing {
            Backing::Host(m) => Some(m),
            Backing::Pinned(p) => Some(p.memory()),
            Backing::Device(_) => None,
        }
    }
    /// The host view, or the error host transports give for GPU memory.
    pub fn host_mem(&self) -> Result<&Memory> {
        self.host()
            .ok_or_else(|| TransferError::TransportUnavailable {
                transport: "host",
                reason: format!(
                    "region {} is GPU memory; only the cuda transport moves it",
                    self.id
                ),
            })
    }
    /// The CUDA view of the region (device and pinned memory), `None` for pageable host memory.
    pub fn gpu(&self) -> Option<&dyn GpuMemory> {
        match &self.backing {
            Backing::Host(_) => None,
            Backing::Pinned(p) => Some(p),
            Backing::Device(d) => Some(d),
        }
    }
    /// Offset of `[addr, addr+len)` inside this region, if it is fully inside.
    pub fn offset_of(&self, addr: u64, len: u64) -> Option<usize> {
        let off = addr.checked_sub(self.addr())?;
        (off.checked_add(len)? <= self.len()).then_some(off as usize)
    }
}

/// A registered region, returned by [`crate::Agent::allocate`] and [`crate::Agent::register`].
///
/// Dropping the handle deregisters the region: new descriptors can no longer name it and remote requests for it
/// are refused, but the memory itself is released only once prepared lists and in-flight transfers that use it
/// are gone. [`RegisteredMemory::deregister`] instead refuses while anything still uses the region.
#[derive(Debug)]
pub struct RegisteredMemory {
    pub(crate) region: Arc<Region>,
    pub(crate) registry: Arc<Registry>,
}

impl RegisteredMemory {
    /// Start address in this process (what descriptors name).
    pub fn addr(&self) -> u64 {
        self.region.addr()
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.region.len() as usize
    }
    /// Always false: regions are never empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Memory kind.
    pub fn kind(&self) -> MemoryKind {
        self.region.kind
    }
    /// Agent-unique region id.
    pub fn id(&self) -> u64 {
        self.region.id
    }
    /// True when same-host peers reach it by mapping (pdx-allocated memfd memory, pinned included).
    pub fn is_shareable(&self) -> bool {
        self.region.host().is_some_and(|m| m.memfd_fd().is_some())
    }
    /// Copies bytes out of the region at `offset` (GPU memory through a synchronous CUDA copy). Errors: out of
    /// bounds; CUDA errors.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        match &self.region.backing {
            Backing::Device(d) => Ok(Stream::new(gpu_device(d))?.download(d, offset, out)?),
            _ => Ok(self.region.host_mem()?.read_at(offset, out)?),
        }
    }
    /// Copies `data` into the region at `offset`. Errors: out of bounds; CUDA errors.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        match &self.region.backing {
            Backing::Device(d) => Ok(Stream::new(gpu_device(d))?.upload(d, offset, data)?),
            _ => Ok(self.region.host_mem()?.write_at(offset, data)?),
        }
    }
    /// Fills `[offset, offset+len)` with `byte`. Errors: out of bounds; CUDA errors.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<()> {
        match &self.region.backing {
            Backing::Device(d) => {
                let s = Stream::new(gpu_device(d))?;
                s.memset(d, offset, len, byte)?;
                Ok(s.synchronize()?)
            }
            _ => Ok(self.region.host_mem()?.fill(offset, len, byte)?),
        }
    }
    /// The host memory of the region, for zero-copy I/O by engines linking pdx; `None` for GPU memory (see
    /// [`RegisteredMemory::device_buffer`]).
    pub fn memory(&self) -> Option<&Memory> {
        self.region.host()
    }
    /// The device buffer of a GPU region.
    pub fn device_buffer(&self) -> Option<&DeviceBuffer> {
        match &self.region.backing {
            Backing::Device(d) => Some(d),
            _ => None,
        }
    }
    /// A descriptor for `[offset, offset+len)` of this region. Errors: out of bounds or zero length.
    pub fn desc(&self, offset: usize, len: usize) -> Result<crate::XferDesc> {
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > self.len()) {
            return Err(TransferError::Invalid(format!(
                "range {offset}+{len} outside region of {} bytes",
                self.len()
            )));
        }
        Ok(crate::XferDesc {
            addr: self.addr() + offset as u64,
            len: len as u64,
            dev_id: self.kind().dev_id(),
        })
    }

    /// Deregisters now, or gives the handle back with [`TransferError::RegionInUse`] while prepared descriptor
    /// lists or transfer requests still use the region.
    pub fn deregister(self) -> std::result::Result<(), (Self, TransferError)> {
        // Holders: this handle and the registry; anything more is a prepared list or request.
        let users = Arc::strong_count(&self.region).saturating_sub(2);
        if users > 0 {
            let id = self.region.id;
            return Err((self, TransferError::RegionInUse(id, users)));
        }
        Ok(()) // Drop removes it from the registry.
    }
}

impl Drop for RegisteredMemory {
    fn drop(&mut self) {
        self.registry.remove(self.region.id);
    }
}

/// The regions an agent has registered, sorted by address for descriptor lookup.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    regions: RwLock<Vec<Arc<Region>>>,
}

impl Registry {
    pub fn insert(&self, region: Arc<Region>) {
        let mut regions = self.regions.write().unwrap_or_else(|e| e.into_inner());
        let pos = regions.partition_point(|r| r.addr() < region.addr());
        regions.insert(pos, region);
    }

    pub fn remove(&self, id: u64) {
        let mut regions = self.regions.write().unwrap_or_else(|e| e.into_inner());
        regions.retain(|r| r.id != id);
    }

    /// The region containing all of `[addr, addr+len)` and the offset in it.
    pub fn lookup(&self, addr: u64, len: u64) -> Option<(Arc<Region>, usize)> {
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        let pos = regions.partition_point(|r| r.addr() <= addr);
        let region = regions.get(pos.checked_sub(1)?)?;
        let off = region.offset_of(addr, len)?;
        Some((region.clone(), off))
    }

    /// A snapshot of every region, for metadata.
    pub fn snapshot(&self) -> Vec<Arc<Region>> {
        self.regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
