//! Descriptor lists: the memory ranges a transfer request moves.

use serde::{Deserialize, Serialize};

use crate::memory::MemoryKind;

/// One contiguous range: an address in the owner's address space, a length in bytes, and a device id (the GPU
/// index for device memory, 0 for host memory), as NIXL's `nixlBasicDesc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct XferDesc {
    /// Start address in the owner's address space.
    pub addr: u64,
    /// Length in bytes (> 0).
    pub len: u64,
    /// Device id.
    pub dev_id: u32,
}

/// A list of descriptors of one memory kind (NIXL `nixl_xfer_dlist_t`). Validate it against registrations with
/// [`crate::Agent::prep_local`] or [`crate::Agent::prep_remote`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XferDescList {
    /// Memory kind of every descriptor.
    pub kind: MemoryKind,
    /// The ranges.
    pub descs: Vec<XferDesc>,
}

impl XferDescList {
    /// An empty host-memory list.
    pub fn host() -> Self {
        XferDescList {
            kind: MemoryKind::Host,
            descs: Vec::new(),
        }
    }

    /// A host-memory list from `(addr, len)` pairs.
    pub fn host_from(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        XferDescList {
            kind: MemoryKind::Host,
            descs: ranges
                .into_iter()
                .map(|(addr, len)| XferDesc {
                    addr,
                    len,
                    dev_id: 0,
                })
                .collect(),
        }
    }

    /// Appends a descriptor.
    pub fn push(&mut self, desc: XferDesc) {
        self.descs.push(desc);
    }

    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    /// Sum of lengths in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.descs.iter().map(|d| d.len).sum()
    }
}
