//! Transfer requests: running a request's plan (`post`), following it (`status`, `wait`, `completion`), and the
//! memcpy of `local`/`shm` plans, split across threads for large batches.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::agent::{Inner, Locality, RemoteAgent};
use crate::error::{Result, TransferError};
use crate::gpu;
use crate::memory::Region;
use crate::notif::Notification;
use crate::request::{Completion, XferCompletion, XferOp, XferStatus};
use crate::tcp::PeerConn;
use crate::transport::{CmaTarget, LocalSeg, Plan, TransportKind};
use crate::wire::FrameKind;

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
    // Cut the segments into `threads` shares of about equal bytes: (segment, offset in it, length).
    let share = total.div_ceil(threads as u64) as usize;
    let mut shares: Vec<Vec<(&S, usize, usize)>> = vec![Vec::new(); threads];
    let (mut t, mut filled) = (0, 0);
    for s in segs {
        let len = seg_len(s);
        let mut at = 0;
        while at < len {
            // The last share takes whatever is left, so the loop always advances.
            let room = if t + 1 == threads {
                usize::MAX
            } else {
                share - filled
            };
            let n = (len - at).min(room);
            shares[t].push((s, at, n));
            at += n;
            filled += n;
            if filled == share && t + 1 < threads {
                t += 1;
                filled = 0;
            }
        }
    }
    let run = |pieces: &[(&'s S, usize, usize)]| -> pdx_sys::Result<()> {
        pieces.iter().try_for_each(|&(s, at, n)| copy(s, at, n))
    };
    let Some((mine, others)) = shares.split_first() else {
        return Ok(());
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = others
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| scope.spawn(move || run(p)))
            .collect();
        let first = run(mine);
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(pdx_sys::SysError::Io {
                        op: "parallel copy",
                        source: std::io::Error::other("copy thread panicked"),
                    })
                })
            })
            .fold(first, |acc, r| acc.and(r))
    })?;
    Ok(())
}

/// A READ or WRITE between local and remote descriptors, with an optional notification (NIXL
/// `nixlXferReqH`). Post it with [`XferRequest::post`]; follow it with [`XferRequest::status`] (polling),
/// [`XferRequest::wait`] (blocking) or [`XferRequest::completion`] (async).
///
/// `local` and `shm` copies and `cma` calls run inside `post` on the caller's thread and are done when it
/// returns; `tcp` requests complete on the connection's thread. Dropping (or [`XferRequest::release`]) an
/// in-flight request lets it finish in the background: the memory it uses stays alive until then.
pub struct XferRequest {
    pub(crate) op: XferOp,
    pub(crate) plan: Plan,
    pub(crate) transport: TransportKind,
    pub(crate) total_bytes: u64,
    pub(crate) remote: Arc<RemoteAgent>,
    pub(crate) conn: Option<Arc<PeerConn>>,
    pub(crate) notif: Option<Vec<u8>>,
    pub(crate) tcp_ctrl: Option<Arc<[u8]>>,
    pub(crate) completion: Arc<Completion>,
    pub(crate) me: Weak<Inner>,
}

impl XferRequest {
    /// The transport chosen for this request.
    pub fn transport(&self) -> TransportKind {
        self.transport
    }

    /// Bytes moved by one post.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The direction.
    pub fn op(&self) -> XferOp {
        self.op
    }

    /// Starts (or restarts) the transfer. Returns [`XferStatus::Done`] when it completed inside the call and
    /// [`XferStatus::InProgress`] otherwise.
    ///
    /// Errors: [`TransferError::InProgress`] when the previous post has not completed; the transfer's own error
    /// when it fails inside the call (peer gone, invalidated, memory no longer mapped on the peer).
    pub fn post(&self) -> Result<XferStatus> {
        self.completion.begin()?;
        if let Plan::Staged(plan) = &self.plan {
            let result = self.run_staged(plan);
            let ret = match &result {
                Ok(()) => Ok(XferStatus::Done),
                Err(e) => Err(e.duplicate()),
            };
            self.completion.finish(result);
            return ret;
        }
        if let Plan::Tcp { local, .. } = &self.plan {
            let kind = match self.op {
                XferOp::Read => FrameKind::ReadRequest,
                XferOp::Write => FrameKind::WriteRequest,
            };
            let (Some(conn), Some(ctrl)) = (&self.conn, &self.tcp_ctrl) else {
                let e = TransferError::Invalid("tcp request without a connection".into());
                self.completion.finish(Err(e.duplicate()));
                return Err(e);
            };
            let submitted = self.remote.check_alive().and_then(|()| {
                conn.submit(kind, ctrl.clone(), local.clone(), self.completion.clone())
            });
            return match submitted {
                Ok(()) => Ok(XferStatus::InProgress),
                Err(e) => {
                    self.completion.finish(Err(e.duplicate()));
                    Err(e)
                }
            };
        }
        #[cfg(feature = "ucx")]
        if let Plan::Ucx { peer, ops } = &self.plan {
            let posted = self.remote.check_alive().and_then(|()| {
                let me = self.me.upgrade().ok_or(TransferError::Shutdown)?;
                let ucx = me.ucx.as_ref().ok_or(TransferError::Shutdown)?;
                if self.conn.as_ref().is_some_and(|c| c.is_closed()) {
                    return Err(TransferError::PeerDisconnected {
                        peer: self.remote.md.name.clone(),
                        reason: "connection to the peer was lost".into(),
                    });
                }
                ucx.post(
                    &me.name,
                    &self.remote.md.name,
                    peer,
                    self.op,
                    ops,
                    self.notif.clone(),
                    self.conn.clone(),
                    self.completion.clone(),
                )
            });
            return match posted {
                Ok(()) => Ok(XferStatus::InProgress),
                Err(e) => {
                    self.completion.finish(Err(e.duplicate()));
                    Err(e)
                }
            };
        }
        let result = self.run_inline();
        let ret = match &result {
            Ok(()) => Ok(XferStatus::Done),
            Err(e) => Err(e.duplicate()),
        };
        self.completion.finish(result);
        ret
    }

    /// The staged path, inside `post`: GPU → staging then `tcp` (WRITE), or `tcp` into staging then staging →
    /// GPU (READ). The notification rides on the `tcp` request.
    fn run_staged(&self, plan: &gpu::StagedPlan) -> Result<()> {
        self.remote.check_alive()?;
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| TransferError::Invalid("staged request without a connection".into()))?;
        let tcp = |kind| -> Result<()> {
            let done = Completion::new();
            done.begin()?;
            conn.submit(
                kind,
                plan.ctrl.clone(),
                plan.tcp_local.clone(),
                done.clone(),
            )?;
            done.wait(None)
        };
        // The GPU copies pair each local segment with its staging range, so the request's own direction applies:
        // WRITE copies local GPU memory → staging, READ copies staging → local GPU memory.
        match self.op {
            XferOp::Write => {
                gpu::run(XferOp::Write, &plan.gpu)?;
                tcp(FrameKind::WriteRequest)
            }
            XferOp::Read => {
                tcp(FrameKind::ReadRequest)?;
                gpu::run(XferOp::Read, &plan.gpu)
            }
        }
    }

    fn run_inline(&self) -> Result<()> {
        self.remote.check_alive()?;
        if let Some(c) = &self.conn {
            if c.is_closed() {
                return Err(TransferError::PeerDisconnected {
                    peer: self.remote.md.name.clone(),
                    reason: "connection to the peer was lost".into(),
                });
            }
        }
        let (threads, streaming) = self.me.upgrade().map_or((1, false), |me| {
            let threads = if self.total_bytes >= me.config.parallel_copy_min_bytes {
                me.config.copy_threads.max(1)
            } else {
                1
            };
            (
                threads,
                self.total_bytes >= me.config.streaming_copy_min_bytes,
            )
        });
        match &self.plan {
            Plan::Copy(segs) => {
                copy_segments(
                    self.op,
                    segs,
                    |c| Some((&c.local, &*c.remote, c.remote_off)),
                    self.total_bytes,
                    threads,
                    streaming,
                )?;
            }
            Plan::Shm { peer, segs } => {
                // One reference to the peer's mappings for the whole copy: they stay mapped until it ends even if
                // the peer goes away meanwhile, and are unmapped as soon as it does otherwise.
                let map = peer
                    .maps()
                    .filter(|_| peer.is_alive())
                    .ok_or_else(|| peer.gone_error())?;
                copy_segments(
                    self.op,
                    segs,
                    |s| {
                        map.regions
                            .get(s.slot)
                            .map(|m| (&s.local, &*m.region, s.off))
                    },
                    self.total_bytes,
                    threads,
                    streaming,
                )?;
            }
            Plan::Cma {
                target,
                local,
                remote,
            } => {
                let slices = local
                    .iter()
                    .map(|s| Ok(s.region.host_mem()?.slice(s.off, s.len)?))
                    .collect::<Result<Vec<_>>>()?;
                let process = match target {
                    CmaTarget::ThisProcess(p, _) => p,
                    CmaTarget::Peer(peer) if peer.is_alive() => peer.process(),
                    CmaTarget::Peer(peer) => return Err(peer.gone_error()),
                };
                let moved = match self.op {
                    XferOp::Read => process.read(&slices, remote),
                    XferOp::Write => process.write(&slices, remote),
                };
                moved.map_err(|e| {
                    if e.is_process_gone() {
                        TransferError::PeerDisconnected {
                            peer: self.remote.md.name.clone(),
                            reason: "process is gone".into(),
                        }
                    } else {
                        TransferError::Sys(e)
                    }
                })?;
            }
            Plan::Cuda(plan) => gpu::run(self.op, plan)?,
            Plan::Staged(_) => {
                return Err(TransferError::Invalid("staged requests run in post".into()))
            }
            Plan::Tcp { .. } => {
                return Err(TransferError::Invalid(
                    "tcp requests are posted to their connection".into(),
                ))
            }
            #[cfg(feature = "ucx")]
            Plan::Ucx { .. } => {
                return Err(TransferError::Invalid(
                    "ucx requests are posted to their endpoint".into(),
                ))
            }
        }
        if let Some(payload) = &self.notif {
            self.send_notif(payload.clone())?;
        }
        Ok(())
    }

    fn send_notif(&self, payload: Vec<u8>) -> Result<()> {
        if let Locality::SameProcess(peer) = &self.remote.locality {
            let (Some(peer), Some(me)) = (peer.upgrade(), self.me.upgrade()) else {
                return Err(TransferError::Shutdown);
            };
            peer.notifications.push(Notification {
                from: me.name.clone(),
                payload,
            });
            return Ok(());
        }
        match &self.conn {
            Some(c) => c.notify(payload),
            None => Err(TransferError::TransportUnavailable {
                transport: "tcp",
                reason: "a notification needs the peer's listener".into(),
            }),
        }
    }

    /// The state of the last post. Errors: the failure of the last post, if it failed.
    pub fn status(&self) -> Result<XferStatus> {
        #[cfg(feature = "ucx")]
        if let Some(ucx) = self.ucx_driver() {
            ucx.progress_once();
        }
        self.completion.status()
    }

    /// Blocks until the current post completes, or `timeout` passes ([`TransferError::InProgress`]). `ucx`
    /// requests are progressed on the calling thread meanwhile.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<()> {
        #[cfg(feature = "ucx")]
        if let Some(ucx) = self.ucx_driver() {
            return ucx.wait(&self.completion, timeout);
        }
        self.completion.wait(timeout)
    }

    /// This agent's UCX side when this request is a posted, unfinished `ucx` request.
    #[cfg(feature = "ucx")]
    fn ucx_driver(&self) -> Option<Arc<crate::ucx::UcxAgent>> {
        if !matches!(self.plan, Plan::Ucx { .. })
            || self.completion.status().ok() != Some(XferStatus::InProgress)
        {
            return None;
        }
        self.me.upgrade()?.ucx.clone()
    }

    /// A future resolving when the current post completes; works under any async runtime.
    pub fn completion(&self) -> XferCompletion {
        XferCompletion {
            completion: self.completion.clone(),
        }
    }

    /// Releases the request (NIXL `releaseXferReq`). An in-flight transfer finishes in the background.
    pub fn release(self) {}
}
