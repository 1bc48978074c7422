//! Memory registration: kinds, RAII handles and the per-agent registry of regions.

use std::sync::{Arc, RwLock};

use pdx_sys::Memory;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TransferError};

/// Where a region lives. Descriptors carry the kind and device id; transports are chosen by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemoryKind {
    /// Pageable host memory (NIXL `DRAM`).
    Host,
    /// Page-locked host memory registered with CUDA (needs the CUDA support of the `cuda` feature).
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

/// One registered region of an agent. Shared by the registry, the user's handle, prepared descriptor lists and
/// in-flight transfers, so the memory lives until the last of them is gone (never a use-after-free).
#[derive(Debug)]
pub(crate) struct Region {
    /// Agent-unique id, also carried in metadata.
    pub id: u64,
    /// Memory kind.
    pub kind: MemoryKind,
    /// The memory itself.
    pub mem: Memory,
}

impl Region {
    pub fn addr(&self) -> u64 {
        self.mem.addr()
    }
    pub fn len(&self) -> u64 {
        self.mem.len() as u64
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
        self.region.mem.len()
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
    /// True when same-host peers reach it by mapping (pdx-allocated memfd memory).
    pub fn is_shareable(&self) -> bool {
        self.region.mem.memfd_fd().is_some()
    }
    /// Copies bytes out of the region at `offset`. Errors: out of bounds.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        Ok(self.region.mem.read_at(offset, out)?)
    }
    /// Copies `data` into the region at `offset`. Errors: out of bounds.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        Ok(self.region.mem.write_at(offset, data)?)
    }
    /// Fills `[offset, offset+len)` with `byte`. Errors: out of bounds.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<()> {
        Ok(self.region.mem.fill(offset, len, byte)?)
    }
    /// The underlying memory, for zero-copy I/O by engines linking pdx.
    pub fn memory(&self) -> &Memory {
        &self.region.mem
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
