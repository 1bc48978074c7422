//! The `cuda` transport: transfers that involve GPU memory.
//!
//! - same process: the peer's regions are this process's memory; device ↔ device (same GPU or peer GPUs) and
//!   device ↔ pinned host copies on a CUDA stream;
//! - same host, another process: the peer's device regions are opened from the CUDA IPC handles of its
//!   metadata (version 3, or 4 with offsets), once, and cached. A handle names the peer's whole CUDA allocation
//!   and the region's offset in it (a region registered by pointer inside a larger allocation); `IpcHandle::open`
//!   maps the allocation and checks `offset + len` against the mapped size, so copies address only the region.
//!   Its pinned (memfd) regions are mapped and pinned in this process; copies then run device to device or by DMA
//!   as in one process;
//! - another host (or `tcp` forced): the staged path. The request owns a pinned staging buffer; a WRITE copies
//!   device → staging on the GPU, then sends the staging bytes over `tcp`; a READ receives over `tcp` into
//!   staging, then copies staging → device. The peer's side must be host or pinned memory (peer-side staging
//!   of device memory is not implemented: such requests fail with `TransportUnavailable`).
//!
//! A request's copies are queued on its own stream at post and waited for inside `post` (the transfer is done
//! when `post` returns, as with `local`/`shm`), then the notification is sent like any other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pdx_cuda::{Device, GpuMemory, IpcMemory, PinnedHostBuffer, Stream};
use pdx_sys::Memory;

use crate::backend::{self, Backend, Post, Prepare};
use crate::error::{Result, TransferError};
use crate::memory::{Backing, MemoryKind, Region};
use crate::metadata::{AgentMetadata, CudaMetadata};
use crate::plan::Route;
use crate::remote::Locality;
use crate::request::{Completion, XferOp, XferStatus};
use crate::transport::LocalSeg;

/// The far side of one GPU copy.
#[derive(Clone, Debug)]
pub(crate) enum GpuTarget {
    /// A region of an agent in this process (device or pinned memory).
    Region(Arc<Region>),
    /// A same-host peer's device allocation opened through CUDA IPC.
    Ipc(IpcMemory),
    /// A same-host peer's memfd region (host or pinned there), mapped and pinned here.
    Pinned(PinnedHostBuffer),
}

impl GpuTarget {
    fn mem(&self) -> Result<&dyn GpuMemory> {
        match self {
            GpuTarget::Region(r) => r.gpu().ok_or_else(|| unavailable(format!(
                "region {} of the peer is pageable host memory (register pinned memory to copy it to a GPU)",
                r.id
            ))),
            GpuTarget::Ipc(m) => Ok(m),
            GpuTarget::Pinned(p) => Ok(p),
        }
    }
}

/// One copy of a `cuda` plan.
#[derive(Clone, Debug)]
pub(crate) struct GpuCopy {
    pub local: LocalSeg,
    pub remote: GpuTarget,
    pub remote_off: usize,
}

/// A `cuda` plan: the copies and the stream they run on.
#[derive(Debug)]
pub(crate) struct GpuPlan {
    stream: Stream,
    copies: Vec<GpuCopy>,
}

pub(crate) fn unavailable(reason: String) -> TransferError {
    TransferError::TransportUnavailable {
        transport: "cuda",
        reason,
    }
}

/// What this agent has opened of one same-host peer's memory, by the peer's region id.
#[derive(Default)]
pub(crate) struct GpuPeer {
    ipc: Mutex<HashMap<u64, IpcMemory>>,
    pinned: Mutex<HashMap<u64, PinnedHostBuffer>>,
}

impl GpuPeer {
    /// The peer's device region `id` opened through its IPC handle (cached).
    fn ipc(&self, device: &Device, cuda: Option<&CudaMetadata>, id: u64) -> Result<IpcMemory> {
        let mut map = self.ipc.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = map.get(&id) {
            return Ok(m.clone());
        }
        let handle = cuda
            .and_then(|c| c.ipc.iter().find(|(r, _)| *r == id))
            .map(|(_, h)| h)
            .ok_or_else(|| {
                unavailable(format!(
                    "the peer published no CUDA IPC handle for region {id}"
                ))
            })?;
        let m = handle.open(device)?;
        map.insert(id, m.clone());
        Ok(m)
    }

    /// The peer's memfd region `id` mapped into this process (from the descriptor its Unix socket passed) and
    /// pinned (cached).
    fn pinned(
        &self,
        device: &Device,
        local: &crate::peer::LocalPeer,
        md: &AgentMetadata,
        idx: usize,
        populate: bool,
    ) -> Result<PinnedHostBuffer> {
        let r = &md.regions[idx];
        let mut map = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = map.get(&r.id) {
            return Ok(p.clone());
        }
        let maps = local.maps().ok_or_else(|| local.gone_error())?;
        let fd = maps
            .slot(r.id)
            .map(|slot| &maps.regions[slot].fd)
            .ok_or_else(|| {
                unavailable(format!(
                    "region {} of the peer is not a shareable memfd",
                    r.id
                ))
            })?;
        let mem = Memory::map_memfd(std::os::fd::AsFd::as_fd(fd), r.len as usize, populate)?;
        let p = PinnedHostBuffer::pin(device, mem)?;
        map.insert(r.id, p.clone());
        Ok(p)
    }
}

/// The device that runs a plan: the local side's GPU if it is device memory, else the remote's, else 0.
fn plan_device(copies: &[(LocalSeg, MemoryKind)]) -> Result<Device> {
    let ordinal = copies
        .iter()
        .find_map(|(l, rk)| match (l.region.kind, *rk) {
            (MemoryKind::Device(d), _) | (_, MemoryKind::Device(d)) => Some(d),
            _ => None,
        })
        .unwrap_or(0);
    Ok(Device::new(ordinal as usize)?)
}

/// Where the peer is, as the `cuda` transport sees it.
pub(crate) enum PeerMemory<'a> {
    /// In this process: remote ranges resolved to the peer's live regions.
    SameProcess(Vec<(Arc<Region>, usize)>),
    /// Same host, other process: through IPC handles and memfd mappings.
    SameHost {
        md: &'a AgentMetadata,
        cuda: Option<&'a CudaMetadata>,
        /// The peer as the kernel vouched for it: its memfds came over its Unix socket.
        local: &'a crate::peer::LocalPeer,
        peer: &'a GpuPeer,
        /// `(metadata region index, offset)` per pair.
        segs: Vec<(usize, usize)>,
        populate: bool,
    },
}

/// Builds a `cuda` plan for `pairs` (local segment, remote memory kind) against `peer`.
pub(crate) fn plan(locals: &[(LocalSeg, MemoryKind)], peer: PeerMemory<'_>) -> Result<GpuPlan> {
    for (i, (l, _)) in locals.iter().enumerate() {
        if l.region.gpu().is_none() {
            return Err(unavailable(format!(
                "local descriptor {i} is pageable host memory; the cuda transport needs device or pinned memory"
            )));
        }
    }
    let device = plan_device(locals)?;
    let copies = match peer {
        PeerMemory::SameProcess(remote) => locals
            .iter()
            .zip(remote)
            .map(|((l, _), (region, off))| GpuCopy {
                local: l.clone(),
                remote: GpuTarget::Region(region),
                remote_off: off,
            })
            .collect(),
        PeerMemory::SameHost {
            md,
            cuda,
            local,
            peer,
            segs,
            populate,
        } => locals
            .iter()
            .zip(segs)
            .map(|((l, kind), (idx, off))| {
                let remote = match kind {
                    MemoryKind::Device(_) => {
                        GpuTarget::Ipc(peer.ipc(&device, cuda, md.regions[idx].id)?)
                    }
                    _ => GpuTarget::Pinned(peer.pinned(&device, local, md, idx, populate)?),
                };
                Ok(GpuCopy {
                    local: l.clone(),
                    remote,
                    remote_off: off,
                })
            })
            .collect::<Result<Vec<_>>>()?,
    };
    for c in &copies {
        c.remote.mem()?;
    }
    Ok(GpuPlan {
        stream: Stream::new(&device)?,
        copies,
    })
}

/// Runs a `cuda` plan: queues every copy on the plan's stream, then waits for them.
pub(crate) fn run(op: XferOp, plan: &GpuPlan) -> Result<()> {
    let s = &plan.stream;
    for c in &plan.copies {
        let local = c
            .local
            .region
            .gpu()
            .ok_or_else(|| unavailable("local region is not GPU-addressable".into()))?;
        let remote = c.remote.mem()?;
        match op {
            XferOp::Read => s.copy(local, c.local.off, remote, c.remote_off, c.local.len)?,
            XferOp::Write => s.copy(remote, c.remote_off, local, c.local.off, c.local.len)?,
        }
    }
    Ok(s.synchronize()?)
}

/// A staged (`tcp` through pinned host memory) plan: GPU copies between the local segments and a staging
/// region, and the `tcp` frame that moves the staging bytes.
#[derive(Debug)]
pub(crate) struct StagedPlan {
    /// Segments of the staging region, one per pair, in order (the `tcp` side).
    pub tcp_local: Arc<[LocalSeg]>,
    /// The encoded `tcp` request (remote segments and notification).
    pub ctrl: Arc<[u8]>,
    /// Local GPU segments ↔ staging.
    pub gpu: GpuPlan,
}

/// Builds a staged plan for `locals` (GPU segments) whose remote sides are host memory of the peer; `ctrl` is
/// the encoded `tcp` request for the remote segments.
pub(crate) fn staged_plan(
    locals: &[(LocalSeg, MemoryKind)],
    ctrl: Arc<[u8]>,
) -> Result<StagedPlan> {
    if let Some(i) = locals
        .iter()
        .position(|(_, k)| matches!(k, MemoryKind::Device(_)))
    {
        return Err(unavailable(format!(
            "remote descriptor {i} is GPU memory of a peer reached over tcp: peer-side staging is not implemented"
        )));
    }
    let device = plan_device(locals)?;
    let total: usize = locals.iter().map(|(l, _)| l.len).sum();
    let staging = Arc::new(Region {
        id: u64::MAX, // never in a registry: owned by this request
        kind: MemoryKind::PinnedHost,
        backing: Backing::Pinned(PinnedHostBuffer::new(&device, total.max(1))?),
    });
    let mut off = 0;
    let mut tcp_local = Vec::with_capacity(locals.len());
    let mut copies = Vec::with_capacity(locals.len());
    for (l, _) in locals {
        if l.region.gpu().is_none() {
            return Err(unavailable(
                "a staged transfer needs GPU or pinned local memory".into(),
            ));
        }
        tcp_local.push(LocalSeg {
            region: staging.clone(),
            off,
            len: l.len,
        });
        copies.push(GpuCopy {
            local: l.clone(),
            remote: GpuTarget::Region(staging.clone()),
            remote_off: off,
        });
        off += l.len;
    }
    Ok(StagedPlan {
        tcp_local: tcp_local.into(),
        ctrl,
        gpu: GpuPlan {
            stream: Stream::new(&device)?,
            copies,
        },
    })
}

/// The `cuda` backend (`backend.rs`): GPU copies on a stream (same process, or same host through CUDA IPC), and
/// the staged path through pinned memory over `tcp`. Both complete inside `post`.
pub(crate) struct CudaBackend {
    /// This agent's name (the sender of its notifications).
    pub name: String,
    /// Fault in pages of the peer memory mapped here up front.
    pub populate: bool,
}

/// What the `cuda` backend keeps of a peer: its CUDA IPC handles (metadata version 3) and the memory opened here.
pub(crate) struct CudaPeer<'a> {
    /// The peer's IPC handles.
    pub cuda: Option<&'a CudaMetadata>,
    /// What this agent has opened of the peer's memory.
    pub opened: &'a GpuPeer,
}

/// A prepared `cuda` request.
#[derive(Debug)]
pub(crate) enum CudaReq {
    /// Copies on a stream.
    Direct(GpuPlan),
    /// Staged through pinned memory over `tcp` (the request's transport is `tcp`).
    Staged(StagedPlan),
}

impl Backend for CudaBackend {
    type Peer<'a> = CudaPeer<'a>;
    type Req = CudaReq;

    fn prepare(&self, x: &Prepare<'_>, peer: CudaPeer<'_>) -> Result<CudaReq> {
        let md = &x.remote.md;
        let locals: Vec<(LocalSeg, MemoryKind)> = x
            .pairs
            .iter()
            .map(|(l, r)| (l.clone(), md.regions[r.region].kind))
            .collect();
        match x.route {
            Route::Staged => Ok(CudaReq::Staged(staged_plan(
                &locals,
                crate::tcp::encode_request(x.pairs, x.notif),
            )?)),
            Route::Cuda => {
                let memory = match &x.remote.locality {
                    Locality::SameProcess(_) => PeerMemory::SameProcess(
                        x.resolved()?
                            .iter()
                            .map(|c| (c.remote.clone(), c.remote_off))
                            .collect(),
                    ),
                    Locality::SameHost(local) => PeerMemory::SameHost {
                        md,
                        cuda: peer.cuda,
                        local,
                        peer: peer.opened,
                        segs: x
                            .pairs
                            .iter()
                            .map(|(_, r)| (r.region, r.off as usize))
                            .collect(),
                        populate: self.populate,
                    },
                    Locality::Remote(why) => return Err(unavailable(why.clone())),
                };
                Ok(CudaReq::Direct(plan(&locals, memory)?))
            }
            _ => Err(x.wrong_route("cuda")),
        }
    }

    fn post(&self, req: &CudaReq, x: &Post<'_>) -> Result<XferStatus> {
        match req {
            CudaReq::Direct(plan) => backend::post_inline(&self.name, x, || run(x.op, plan)),
            CudaReq::Staged(plan) => run_staged(plan, x).map(|()| XferStatus::Done),
        }
    }
}

/// The staged path, inside `post`: GPU → staging then `tcp` (WRITE), or `tcp` into staging then staging → GPU
/// (READ). The notification rides on the `tcp` request.
fn run_staged(plan: &StagedPlan, x: &Post<'_>) -> Result<()> {
    x.remote.check_alive()?;
    let conn = x
        .conn
        .ok_or_else(|| TransferError::Invalid("staged request without a connection".into()))?;
    let tcp = |op| -> Result<()> {
        let done = Completion::new();
        done.begin()?;
        crate::tcp::submit(conn, op, &plan.ctrl, &plan.tcp_local, done.clone())?;
        done.wait(None)
    };
    // The GPU copies pair each local segment with its staging range, so the request's own direction applies:
    // WRITE copies local GPU memory → staging, READ copies staging → local GPU memory.
    match x.op {
        XferOp::Write => {
            run(XferOp::Write, &plan.gpu)?;
            tcp(XferOp::Write)
        }
        XferOp::Read => {
            tcp(XferOp::Read)?;
            run(XferOp::Read, &plan.gpu)
        }
    }
}
