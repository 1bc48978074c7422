//! The one interface every transport implements, in the shape of NIXL's backend engine (`nixlBackendEngine`:
//! `prepXfer`, `postXfer`, `checkXfer`, `genNotif`, `getNotifs`):
//!
//! | NIXL | here |
//! |---|---|
//! | `prepXfer` → `nixlBackendReqH` | [`Backend::prepare`] → [`Backend::Req`], from the planner's route (`plan.rs`) |
//! | `postXfer` | [`Backend::post`]: `Done` when the transfer completed inside, `InProgress` when a thread of the transport completes it |
//! | `checkXfer` | [`Backend::check`] (and [`Backend::wait`], blocking), driving progress where the transport needs the caller to |
//! | `genNotif` | [`Backend::notify`] |
//! | `getNotifs` | none: every backend pushes what it receives into the agent's one queue (`notif.rs`) |
//!
//! Implementations: `local`, `shm`, `cma` in `host.rs`, `tcp` in `tcp.rs`, `cuda` (and staging over `tcp`) in
//! `gpu.rs`, `ucx` in `ucx.rs`. The request (`xfer.rs`) owns the completion: it begins it before `post` and
//! finishes it after a `Done` or an error; backends that answer `InProgress` finish it from their own thread.

use std::sync::Arc;
use std::time::Duration;

use crate::conn::PeerConn;
use crate::error::{Result, TransferError};
use crate::plan::{RemoteSeg, Route};
use crate::remote::{Locality, RemoteAgent};
use crate::request::{Completion, XferOp, XferStatus};
use crate::transport::{CopySeg, LocalSeg};

/// What a backend prepares a request from.
pub(crate) struct Prepare<'a> {
    /// The validated pairs: local segment, remote range.
    pub pairs: &'a [(LocalSeg, RemoteSeg)],
    /// The peer.
    pub remote: &'a Arc<RemoteAgent>,
    /// How the planner routed it.
    pub route: &'a Route,
    /// The notification to deliver on completion.
    pub notif: Option<&'a [u8]>,
    /// The pairs' remote ranges resolved in an agent of this process (when the peer is one and they resolve).
    pub resolved: Option<&'a [CopySeg]>,
}

impl Prepare<'_> {
    /// The error for a route this backend does not serve (a planner/backend mismatch, never the caller's input).
    pub fn wrong_route(&self, backend: &str) -> TransferError {
        TransferError::Invalid(format!(
            "the {backend} backend cannot run a {:?} plan",
            self.route
        ))
    }

    /// The resolved in-process ranges, or the error when there are none.
    pub fn resolved(&self) -> Result<&[CopySeg]> {
        self.resolved
            .ok_or_else(|| TransferError::Invalid("peer is not an agent of this process".into()))
    }
}

/// What a backend posts a prepared request with.
pub(crate) struct Post<'a> {
    /// The direction.
    pub op: XferOp,
    /// The peer.
    pub remote: &'a RemoteAgent,
    /// The connection to the peer's listener, if the request has one (required by `tcp`).
    pub conn: Option<&'a Arc<PeerConn>>,
    /// The notification to deliver after the data.
    pub notif: Option<&'a [u8]>,
    /// The request's completion (already begun).
    pub completion: &'a Arc<Completion>,
    /// Bytes of one post.
    pub total_bytes: u64,
}

/// A transport's engine (NIXL `nixlBackendEngine`); see the module docs.
pub(crate) trait Backend {
    /// What the backend keeps of a peer besides [`RemoteAgent`] (its endpoint, its opened memory), lent to
    /// `prepare`.
    type Peer<'a>;
    /// A prepared request (NIXL `nixlBackendReqH`).
    type Req: Send + Sync;

    /// Resolves a routed request into what `post` runs (NIXL `prepXfer`). Errors: why this transport cannot
    /// serve it after all.
    fn prepare(&self, x: &Prepare<'_>, peer: Self::Peer<'_>) -> Result<Self::Req>;

    /// Runs or starts the transfer (NIXL `postXfer`): [`XferStatus::Done`] when it completed inside the call
    /// (notification sent), [`XferStatus::InProgress`] when the backend finishes `x.completion` later.
    fn post(&self, req: &Self::Req, x: &Post<'_>) -> Result<XferStatus>;

    /// The request's state (NIXL `checkXfer`), progressing the transport once where it needs the caller to.
    fn check(&self, _req: &Self::Req, done: &Completion) -> Result<XferStatus> {
        done.status()
    }

    /// Blocks until the current post completes, or `timeout` passes ([`TransferError::InProgress`]).
    fn wait(&self, _req: &Self::Req, done: &Completion, timeout: Option<Duration>) -> Result<()> {
        done.wait(timeout)
    }

    /// Sends a notification to `to` outside any transfer (NIXL `genNotif`); by default [`deliver`] (transports
    /// without a channel of their own). Errors: the peer is unreachable.
    fn notify(
        &self,
        from: &str,
        to: &RemoteAgent,
        conn: Option<&Arc<PeerConn>>,
        payload: Vec<u8>,
    ) -> Result<()> {
        deliver(from, to, conn, payload)
    }
}

/// A notification from `from` to `to`, for the transports without a channel of their own (`local`, `shm`,
/// `cma`, `cuda`): a queue push to an agent of this process, a `Notify` frame over the peer connection
/// otherwise (after the data, so the peer never sees it first).
///
/// Errors: [`TransferError::Shutdown`] when the in-process peer is gone; [`TransferError::TransportUnavailable`]
/// when the peer runs no listener; connection errors.
pub(crate) fn deliver(
    from: &str,
    to: &RemoteAgent,
    conn: Option<&Arc<PeerConn>>,
    payload: Vec<u8>,
) -> Result<()> {
    if let Locality::SameProcess(peer) = &to.locality {
        let peer = peer.upgrade().ok_or(TransferError::Shutdown)?;
        peer.deliver(from, payload);
        return Ok(());
    }
    match conn {
        Some(c) => c.notify(payload),
        None => Err(TransferError::TransportUnavailable {
            transport: "tcp",
            reason: "a notification needs the peer's listener".into(),
        }),
    }
}

/// The post of the transports that complete inside it (`local`, `shm`, `cma`, `cuda`): the peer must still be
/// loaded and its connection (if any) alive; then `run` moves the bytes; then the notification follows.
pub(crate) fn post_inline(
    from: &str,
    x: &Post<'_>,
    run: impl FnOnce() -> Result<()>,
) -> Result<XferStatus> {
    x.remote.check_alive()?;
    if x.conn.is_some_and(|c| c.is_closed()) {
        return Err(TransferError::PeerDisconnected {
            peer: x.remote.name().to_string(),
            reason: "connection to the peer was lost".into(),
        });
    }
    run()?;
    if let Some(payload) = x.notif {
        deliver(from, x.remote, x.conn, payload.to_vec())?;
    }
    Ok(XferStatus::Done)
}
