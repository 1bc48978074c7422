//! Transport names, and the segments requests are made of.
//!
//! A transfer request is resolved once, at creation: `plan.rs` chooses the transport, whose backend prepares the
//! validated, pre-resolved segments it moves. Re-posting the request runs them again without re-validation.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::memory::Region;

/// A transport, by the name used in configuration and on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TransportKind {
    /// Same process: memcpy between the two agents' regions.
    Local,
    /// Same host, pdx-allocated (memfd) remote memory: the peer's regions are mapped once; a transfer is a
    /// memcpy with no system call.
    Shm,
    /// Same host, caller-owned remote memory: `process_vm_readv` / `process_vm_writev` with batched iovecs.
    Cma,
    /// Any host: one TCP connection per peer, framed, vectored I/O straight from and into registered memory.
    Tcp,
    /// UCX RMA (put/get) over whatever UCX reaches: shared memory, TCP, RDMA, CUDA IPC (cargo feature `ucx`;
    /// without it, choosing it gives `TransportUnavailable`).
    Ucx,
    /// GPU memory: device and pinned copies in one process, CUDA IPC between processes of one host (the only
    /// transport that moves device memory; see `crate::gpu`).
    Cuda,
}

impl TransportKind {
    /// The host-memory transports every build has, in order of preference. `ucx` (cargo feature) and `cuda`
    /// (GPU memory) come on top of these where the build and the machine have them.
    pub const HOST: [TransportKind; 4] = [
        TransportKind::Local,
        TransportKind::Shm,
        TransportKind::Cma,
        TransportKind::Tcp,
    ];

    /// The configuration / command-line name.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Local => "local",
            TransportKind::Shm => "shm",
            TransportKind::Cma => "cma",
            TransportKind::Tcp => "tcp",
            TransportKind::Ucx => "ucx",
            TransportKind::Cuda => "cuda",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TransportKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            TransportKind::Local,
            TransportKind::Shm,
            TransportKind::Cma,
            TransportKind::Tcp,
            TransportKind::Ucx,
            TransportKind::Cuda,
        ]
        .into_iter()
        .find(|t| t.name() == s)
        .ok_or_else(|| format!("unknown transport `{s}` (local, shm, cma, tcp, ucx, cuda)"))
    }
}

/// A validated range of a local region.
#[derive(Clone, Debug)]
pub(crate) struct LocalSeg {
    pub region: Arc<Region>,
    pub off: usize,
    pub len: usize,
}

/// One memcpy between a local range and a remote range that is mapped (or lives) in this process.
#[derive(Clone, Debug)]
pub(crate) struct CopySeg {
    pub local: LocalSeg,
    pub remote: Arc<Region>,
    pub remote_off: usize,
}
