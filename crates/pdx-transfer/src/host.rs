//! The host-copy backends (`backend.rs`): `local` (an agent of this process: memcpy to its live regions), `shm`
//! (a same-host peer's memfds mapped here: memcpy with no system call) and `cma` (`process_vm_readv` /
//! `process_vm_writev` on the process the kernel named). All three complete inside `post`, on the caller's
//! thread; large `local`/`shm` copies use streaming stores and are split across threads.

use std::fmt;
use std::sync::Arc;

use crate::backend::{self, Backend, Post, Prepare};
use crate::config::AgentConfig;
use crate::error::{Result, TransferError};
use crate::memory::Region;
use crate::peer::LocalPeer;
use crate::plan::{self, Route};
use crate::remote::Locality;
use crate::request::{XferOp, XferStatus};
use crate::transport::{CopySeg, LocalSeg};

/// How `local`/`shm` copy (from [`AgentConfig`]): threads and the sizes (bytes) from which they split a copy
/// across them and use streaming stores.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CopyConfig {
    threads: usize,
    parallel_min_bytes: u64,
    streaming_min_bytes: u64,
}

impl CopyConfig {
    /// The settings of `config`.
    pub fn new(config: &AgentConfig) -> CopyConfig {
        CopyConfig {
            threads: config.copy_threads.max(1),
            parallel_min_bytes: config.parallel_copy_min_bytes,
            streaming_min_bytes: config.streaming_copy_min_bytes,
        }
    }

    /// `(threads, streaming stores)` for a copy of `total` bytes.
    fn for_bytes(&self, total: u64) -> (usize, bool) {
        let threads = if total >= self.parallel_min_bytes {
            self.threads
        } else {
            1
        };
        (threads, total >= self.streaming_min_bytes)
    }
}

/// Runs the memcpy of a `local`/`shm` plan, split by bytes across `threads` (the caller's thread included), with
/// streaming stores when `streaming`. `parts` gives a segment's local side, remote region and offset in it (`None`:
/// the remote region is no longer there).
pub(crate) fn copy_segments<'s, S: Sync>(
    op: XferOp,
    segs: &'s [S],
    parts: impl Fn(&'s S) -> Option<(&'s LocalSeg, &'s Region, usize)> + Sync,
    total: u64,
    threads: usize,
    streaming: bool,
) -> Result<()> {
    let copy_fn = if streaming {
        pdx_sys::copy_streaming
    } else {
        pdx_sys::copy
    };
    // Plans of host transports only ever hold host memory (checked when they are made); a missing side is an
    // error, never a panic.
    let copy = |s: &'s S, at: usize, len: usize| {
        let Some((local, remote, remote_off)) = parts(s) else {
            return Err(pdx_sys::SysError::InvalidLength(len as u64));
        };
        let (Some(l), Some(r)) = (local.region.host(), remote.host()) else {
            return Err(pdx_sys::SysError::InvalidLength(len as u64));
        };
        match op {
            XferOp::Read => copy_fn(r, remote_off + at, l, local.off + at, len),
            XferOp::Write => copy_fn(l, local.off + at, r, remote_off + at, len),
        }
    };
    let seg_len = |s: &'s S| parts(s).map_or(0, |(l, _, _)| l.len);
    if threads <= 1 {
        for s in segs {
            copy(s, 0, seg_len(s))?;
        }
        return Ok(());
    }
    run_split(
        segs.iter().map(seg_len),
        total as usize,
        threads,
        |pieces| {
            pieces
                .iter()
                .try_for_each(|&(i, at, n)| copy(&segs[i], at, n))
        },
        || pdx_sys::SysError::Io {
            op: "parallel copy",
            source: std::io::Error::other("copy thread panicked"),
        },
    )?;
    Ok(())
}

/// Runs `run` on [`byte_shares`] of segments of `lens` bytes, the first share on this thread and each other on a
/// scoped thread of its own; the first error wins, a panicked thread gives `panicked()`.
fn run_split<E: Send>(
    lens: impl Iterator<Item = usize>,
    total: usize,
    threads: usize,
    run: impl Fn(&[(usize, usize, usize)]) -> std::result::Result<(), E> + Sync,
    panicked: impl Fn() -> E,
) -> std::result::Result<(), E> {
    let shares = byte_shares(lens, total, threads);
    let Some((mine, others)) = shares.split_first() else {
        return Ok(());
    };
    let run = &run;
    std::thread::scope(|scope| {
        let handles: Vec<_> = others
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| scope.spawn(move || run(p)))
            .collect();
        let first = run(mine);
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(panicked())))
            .fold(first, |acc, r| acc.and(r))
    })
}

/// The `local` backend: memcpy between this agent's regions and an agent of this process's live regions.
pub(crate) struct LocalBackend {
    /// This agent's name (the sender of its notifications).
    pub name: String,
    /// How to copy.
    pub copy: CopyConfig,
}

/// A prepared `local` request: one memcpy per pair, the peer's regions held live.
#[derive(Debug)]
pub(crate) struct LocalReq(Vec<CopySeg>);

/// Copies `segs` (local side, a region of this process, offset in it) with `copy`'s settings.
fn copy_in_process(copy: &CopyConfig, x: &Post<'_>, segs: &[CopySeg]) -> Result<()> {
    let (threads, streaming) = copy.for_bytes(x.total_bytes);
    copy_segments(
        x.op,
        segs,
        |c| Some((&c.local, &*c.remote, c.remote_off)),
        x.total_bytes,
        threads,
        streaming,
    )
}

impl Backend for LocalBackend {
    type Peer<'a> = ();
    type Req = LocalReq;

    fn prepare(&self, x: &Prepare<'_>, (): ()) -> Result<LocalReq> {
        match x.route {
            Route::Copy => Ok(LocalReq(x.resolved()?.to_vec())),
            _ => Err(x.wrong_route("local")),
        }
    }

    fn post(&self, req: &LocalReq, x: &Post<'_>) -> Result<XferStatus> {
        backend::post_inline(&self.name, x, || copy_in_process(&self.copy, x, &req.0))
    }
}

/// The `shm` backend: memcpy into a same-host peer's memfds mapped here (or, between agents of one process,
/// into the peer's live memfd regions).
pub(crate) struct ShmBackend {
    /// This agent's name (the sender of its notifications).
    pub name: String,
    /// How to copy.
    pub copy: CopyConfig,
}

/// One memcpy between a local range and a same-host peer's memfd mapped here.
#[derive(Clone, Debug)]
pub(crate) struct ShmSeg {
    local: LocalSeg,
    /// Slot of the remote region in the peer's [`crate::peer::PeerMap`].
    slot: usize,
    /// Offset in the remote region.
    off: usize,
}

/// A prepared `shm` request.
#[derive(Debug)]
pub(crate) enum ShmReq {
    /// Between agents of one process: the peer's live regions, held by the request.
    InProcess(Vec<CopySeg>),
    /// To a same-host peer. The request holds no mapping; each post takes the peer's current ones, so a peer that
    /// goes away is unmapped at once.
    Mapped {
        /// The peer.
        peer: Arc<LocalPeer>,
        /// The copies.
        segs: Vec<ShmSeg>,
    },
}

impl Backend for ShmBackend {
    type Peer<'a> = ();
    type Req = ShmReq;

    fn prepare(&self, x: &Prepare<'_>, (): ()) -> Result<ShmReq> {
        match (x.route, &x.remote.locality) {
            (Route::Copy, _) => Ok(ShmReq::InProcess(x.resolved()?.to_vec())),
            (Route::Shm { slots }, Locality::SameHost(peer)) => Ok(ShmReq::Mapped {
                peer: peer.clone(),
                segs: plan::shm_segments(x.pairs, slots)
                    .into_iter()
                    .map(|(local, slot, off)| ShmSeg { local, slot, off })
                    .collect(),
            }),
            _ => Err(x.wrong_route("shm")),
        }
    }

    fn post(&self, req: &ShmReq, x: &Post<'_>) -> Result<XferStatus> {
        backend::post_inline(&self.name, x, || match req {
            ShmReq::InProcess(segs) => copy_in_process(&self.copy, x, segs),
            ShmReq::Mapped { peer, segs } => {
                // One reference to the peer's mappings for the whole copy: they stay mapped until it ends even if
                // the peer goes away meanwhile, and are unmapped as soon as it does otherwise.
                let map = peer
                    .maps()
                    .filter(|_| peer.is_alive())
                    .ok_or_else(|| peer.gone_error())?;
                let (threads, streaming) = self.copy.for_bytes(x.total_bytes);
                copy_segments(
                    x.op,
                    segs,
                    |s| {
                        map.regions
                            .get(s.slot)
                            .map(|m| (&s.local, &*m.region, s.off))
                    },
                    x.total_bytes,
                    threads,
                    streaming,
                )
            }
        })
    }
}

/// The `cma` backend: one batched `process_vm_readv` / `process_vm_writev` per post, or per thread when the batch
/// is split (`AgentConfig::parallel_cma_min_bytes`).
pub(crate) struct CmaBackend {
    /// This agent's name (the sender of its notifications).
    pub name: String,
    /// Threads a large batch is split across (the posting thread included).
    pub threads: usize,
    /// Smallest batch (bytes) that is split.
    pub parallel_min_bytes: u64,
}

/// Cuts segments of `lens` bytes into `threads` shares of about equal bytes: `(segment, offset in it, length)`.
fn byte_shares(
    lens: impl Iterator<Item = usize>,
    total: usize,
    threads: usize,
) -> Vec<Vec<(usize, usize, usize)>> {
    let threads = threads.max(1);
    let share = total.div_ceil(threads).max(1);
    let mut shares: Vec<Vec<(usize, usize, usize)>> = vec![Vec::new(); threads];
    let (mut t, mut filled) = (0, 0);
    for (i, len) in lens.enumerate() {
        let mut at = 0;
        while at < len {
            // The last share takes whatever is left, so the loop always advances.
            let room = if t + 1 == threads {
                usize::MAX
            } else {
                share - filled
            };
            let n = (len - at).min(room);
            shares[t].push((i, at, n));
            at += n;
            filled += n;
            if filled == share && t + 1 < threads {
                t += 1;
                filled = 0;
            }
        }
    }
    shares
}

/// The process a `cma` request copies to or from.
pub(crate) enum CmaTarget {
    /// This process (a peer agent of it), with the peer's regions the ranges lie in, kept alive by the request.
    ThisProcess(
        pdx_sys::ipc::PeerProcess,
        #[allow(dead_code)] Vec<Arc<Region>>,
    ),
    /// The same-host process the kernel named on the peer's Unix socket.
    Peer(Arc<LocalPeer>),
}

impl fmt::Debug for CmaTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmaTarget::ThisProcess(p, _) => write!(f, "ThisProcess({})", p.pid()),
            CmaTarget::Peer(p) => write!(f, "Peer({})", p.process().pid()),
        }
    }
}

/// A prepared `cma` request: the process, the local segments and the remote iovecs `(address, length)`.
#[derive(Debug)]
pub(crate) struct CmaReq {
    target: CmaTarget,
    local: Vec<LocalSeg>,
    remote: Vec<(u64, usize)>,
}

impl Backend for CmaBackend {
    type Peer<'a> = ();
    type Req = CmaReq;

    fn prepare(&self, x: &Prepare<'_>, (): ()) -> Result<CmaReq> {
        let target = match (x.route, &x.remote.locality) {
            (
                Route::Cma {
                    this_process: false,
                },
                Locality::SameHost(peer),
            ) => CmaTarget::Peer(peer.clone()),
            (Route::Cma { this_process: true }, Locality::SameProcess(_)) => {
                CmaTarget::ThisProcess(
                    pdx_sys::ipc::PeerProcess::this_process(),
                    x.resolved()?.iter().map(|c| c.remote.clone()).collect(),
                )
            }
            _ => return Err(x.wrong_route("cma")),
        };
        Ok(CmaReq {
            target,
            local: x.pairs.iter().map(|p| p.0.clone()).collect(),
            remote: plan::cma_iovecs(x.pairs),
        })
    }

    fn post(&self, req: &CmaReq, x: &Post<'_>) -> Result<XferStatus> {
        backend::post_inline(&self.name, x, || {
            let process = match &req.target {
                CmaTarget::ThisProcess(p, _) => p,
                CmaTarget::Peer(peer) if peer.is_alive() => peer.process(),
                CmaTarget::Peer(peer) => return Err(peer.gone_error()),
            };
            let op = x.op;
            let gone = |e: pdx_sys::SysError| {
                if e.is_process_gone() {
                    TransferError::PeerDisconnected {
                        peer: x.remote.name().to_string(),
                        reason: "process is gone".into(),
                    }
                } else {
                    TransferError::Sys(e)
                }
            };
            let total = x.total_bytes as usize;
            if self.threads <= 1 || (total as u64) < self.parallel_min_bytes {
                let slices = req
                    .local
                    .iter()
                    .map(|s| Ok(s.region.host_mem()?.slice(s.off, s.len)?))
                    .collect::<Result<Vec<_>>>()?;
                let moved = match op {
                    XferOp::Read => process.read(&slices, &req.remote),
                    XferOp::Write => process.write(&slices, &req.remote),
                };
                return moved.map_err(gone);
            }
            // Each thread copies its share with its own system call; the pairs are one to one (the planner checked
            // their lengths), so a share cuts the same bytes out of both sides.
            let run = |pieces: &[(usize, usize, usize)]| -> Result<()> {
                let mut slices = Vec::with_capacity(pieces.len());
                let mut remote = Vec::with_capacity(pieces.len());
                for &(i, at, n) in pieces {
                    let s = &req.local[i];
                    slices.push(s.region.host_mem()?.slice(s.off + at, n)?);
                    remote.push((req.remote[i].0 + at as u64, n));
                }
                match op {
                    XferOp::Read => process.read(&slices, &remote),
                    XferOp::Write => process.write(&slices, &remote),
                }
                .map_err(gone)
            };
            run_split(
                req.local.iter().map(|s| s.len),
                total,
                self.threads,
                run,
                || TransferError::Invalid("cma copy thread panicked".into()),
            )
        })
    }
}
