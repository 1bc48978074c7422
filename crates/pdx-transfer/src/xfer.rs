//! Transfer requests: an agent's backends, preparing a planned request on the backend of its transport, and the
//! public request (`post`, `status`, `wait`, `completion`), which dispatches to that backend.

use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, Post, Prepare};
use crate::config::AgentConfig;
use crate::conn::PeerConn;
use crate::error::{Result, TransferError};
use crate::gpu::{CudaBackend, CudaPeer, CudaReq};
use crate::host::{CmaBackend, CmaReq, CopyConfig, LocalBackend, LocalReq, ShmBackend, ShmReq};
use crate::remote::RemoteAgent;
use crate::request::{Completion, XferCompletion, XferOp, XferStatus};
use crate::tcp::{TcpBackend, TcpReq};
use crate::transport::TransportKind;

/// The backends of one agent (NIXL's agent holds one engine per backend), shared by the agent and its requests.
pub(crate) struct Backends {
    pub local: LocalBackend,
    pub shm: ShmBackend,
    pub cma: CmaBackend,
    pub tcp: TcpBackend,
    pub cuda: CudaBackend,
    /// `None` when the agent does not serve UCX (not listed, or it failed to start).
    #[cfg(feature = "ucx")]
    pub ucx: Option<Arc<crate::ucx::UcxAgent>>,
}

/// What the agent keeps of a peer for the backends that have per-peer state.
pub(crate) struct PeerSlots<'a> {
    /// The `cuda` backend's.
    pub cuda: CudaPeer<'a>,
    /// The `ucx` backend's.
    #[cfg(feature = "ucx")]
    pub ucx: crate::ucx::UcxPeerSlot<'a>,
}

/// A request prepared by the backend of its transport.
#[derive(Debug)]
pub(crate) enum Prepared {
    Local(LocalReq),
    Shm(ShmReq),
    Cma(CmaReq),
    Tcp(TcpReq),
    /// `cuda`, and GPU memory staged over `tcp`.
    Cuda(CudaReq),
    #[cfg(feature = "ucx")]
    Ucx(crate::ucx::UcxReq),
}

/// Runs `$body` with the backend and the prepared request of `$prepared` bound to `$b` and `$r`.
macro_rules! dispatch {
    ($backends:expr, $prepared:expr, |$b:ident, $r:ident| $body:expr) => {
        match $prepared {
            Prepared::Local($r) => {
                let $b = &$backends.local;
                $body
            }
            Prepared::Shm($r) => {
                let $b = &$backends.shm;
                $body
            }
            Prepared::Cma($r) => {
                let $b = &$backends.cma;
                $body
            }
            Prepared::Tcp($r) => {
                let $b = &$backends.tcp;
                $body
            }
            Prepared::Cuda($r) => {
                let $b = &$backends.cuda;
                $body
            }
            #[cfg(feature = "ucx")]
            Prepared::Ucx($r) => match &$backends.ucx {
                Some(ucx) => {
                    let $b = &**ucx;
                    $body
                }
                None => Err(TransferError::Shutdown),
            },
        }
    };
}

impl Backends {
    /// The backends of an agent configured by `config`.
    pub fn new(
        config: &AgentConfig,
        #[cfg(feature = "ucx")] ucx: Option<Arc<crate::ucx::UcxAgent>>,
    ) -> Backends {
        let name = config.name.clone();
        let copy = CopyConfig::new(config);
        Backends {
            local: LocalBackend {
                name: name.clone(),
                copy,
            },
            shm: ShmBackend {
                name: name.clone(),
                copy,
            },
            cma: CmaBackend {
                name: name.clone(),
                threads: config.copy_threads.max(1),
                parallel_min_bytes: config.parallel_cma_min_bytes,
            },
            tcp: TcpBackend,
            cuda: CudaBackend {
                name,
                populate: config.populate,
            },
            #[cfg(feature = "ucx")]
            ucx,
        }
    }

    /// Prepares a planned request on the backend of `transport` (`x.route` says how; staging is the `cuda`
    /// backend's, under `tcp`). Errors: the backend's.
    pub fn prepare(
        &self,
        transport: TransportKind,
        x: &Prepare<'_>,
        peer: PeerSlots<'_>,
    ) -> Result<Prepared> {
        Ok(match (transport, x.route) {
            (TransportKind::Local, _) => Prepared::Local(self.local.prepare(x, ())?),
            (TransportKind::Shm, _) => Prepared::Shm(self.shm.prepare(x, ())?),
            (TransportKind::Cma, _) => Prepared::Cma(self.cma.prepare(x, ())?),
            (TransportKind::Tcp, crate::plan::Route::Staged) | (TransportKind::Cuda, _) => {
                Prepared::Cuda(self.cuda.prepare(x, peer.cuda)?)
            }
            (TransportKind::Tcp, _) => Prepared::Tcp(self.tcp.prepare(x, ())?),
            #[cfg(feature = "ucx")]
            (TransportKind::Ucx, _) => {
                let ucx = self
                    .ucx
                    .as_ref()
                    .ok_or_else(|| TransferError::TransportUnavailable {
                        transport: "ucx",
                        reason: "this agent has no UCX worker (UCX failed to start)".into(),
                    })?;
                Prepared::Ucx(ucx.prepare(x, peer.ucx)?)
            }
            #[cfg(not(feature = "ucx"))]
            (TransportKind::Ucx, _) => return Err(TransferError::Unavailable("ucx")),
        })
    }
}

/// Everything a request is made of, once its backend prepared it.
pub(crate) struct Parts {
    /// The direction.
    pub op: XferOp,
    /// The transport chosen.
    pub transport: TransportKind,
    /// Bytes of one post.
    pub total_bytes: u64,
    /// What its backend prepared.
    pub prepared: Prepared,
    /// The agent's backends.
    pub backends: Arc<Backends>,
    /// The peer.
    pub remote: Arc<RemoteAgent>,
    /// The connection to the peer's listener, if the request uses one.
    pub conn: Option<Arc<PeerConn>>,
    /// The notification to deliver on completion.
    pub notif: Option<Vec<u8>>,
}

/// A READ or WRITE between local and remote descriptors, with an optional notification (NIXL
/// `nixlXferReqH`). Post it with [`XferRequest::post`]; follow it with [`XferRequest::status`] (polling),
/// [`XferRequest::wait`] (blocking) or [`XferRequest::completion`] (async).
///
/// `local` and `shm` copies and `cma` calls run inside `post` on the caller's thread and are done when it
/// returns; `tcp` requests complete on the connection's thread. Dropping (or [`XferRequest::release`]) an
/// in-flight request lets it finish in the background: the memory it uses stays alive until then.
pub struct XferRequest {
    op: XferOp,
    transport: TransportKind,
    total_bytes: u64,
    prepared: Prepared,
    backends: Arc<Backends>,
    remote: Arc<RemoteAgent>,
    conn: Option<Arc<PeerConn>>,
    notif: Option<Vec<u8>>,
    completion: Arc<Completion>,
}

impl XferRequest {
    /// Assembles a prepared request, not posted yet.
    pub(crate) fn new(p: Parts) -> XferRequest {
        XferRequest {
            op: p.op,
            transport: p.transport,
            total_bytes: p.total_bytes,
            prepared: p.prepared,
            backends: p.backends,
            remote: p.remote,
            conn: p.conn,
            notif: p.notif,
            completion: Completion::new(),
        }
    }

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
        let x = Post {
            op: self.op,
            remote: &self.remote,
            conn: self.conn.as_ref(),
            notif: self.notif.as_deref(),
            completion: &self.completion,
            total_bytes: self.total_bytes,
        };
        let posted = dispatch!(self.backends, &self.prepared, |b, r| b.post(r, &x));
        match posted {
            Ok(XferStatus::InProgress) => Ok(XferStatus::InProgress),
            Ok(_) => {
                self.completion.finish(Ok(()));
                Ok(XferStatus::Done)
            }
            Err(e) => {
                self.completion.finish(Err(e.duplicate()));
                Err(e)
            }
        }
    }

    /// The state of the last post. Errors: the failure of the last post, if it failed.
    pub fn status(&self) -> Result<XferStatus> {
        dispatch!(self.backends, &self.prepared, |b, r| b
            .check(r, &self.completion))
    }

    /// Blocks until the current post completes, or `timeout` passes ([`TransferError::InProgress`]). `ucx`
    /// requests are progressed on the calling thread meanwhile.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<()> {
        dispatch!(self.backends, &self.prepared, |b, r| b.wait(
            r,
            &self.completion,
            timeout
        ))
    }

    /// A future resolving when the current post completes; works under any async runtime.
    pub fn completion(&self) -> XferCompletion {
        XferCompletion::new(self.completion.clone())
    }

    /// Releases the request (NIXL `releaseXferReq`). An in-flight transfer finishes in the background.
    pub fn release(self) {}
}
