//! The `tcp` backend (`backend.rs`): a request is one pre-encoded `ReadRequest` / `WriteRequest` frame to the
//! peer's listener over the connection of `conn.rs`, whose reader thread completes it; the notification rides in
//! the frame and the target delivers it once the data has been sent (READ) or received (WRITE). The frames are
//! documented in [`crate::wire`]; the target side is `server.rs`.

use std::sync::Arc;

use crate::backend::{Backend, Post, Prepare};
use crate::conn::PeerConn;
use crate::error::{Result, TransferError};
use crate::plan::{self, Route};
use crate::remote::RemoteAgent;
use crate::request::{XferOp, XferStatus};
use crate::transport::LocalSeg;
use crate::wire::{Ctrl, FrameKind};

/// The `tcp` backend. Stateless: the connection is the peer's (`RemoteAgent::conn`).
pub(crate) struct TcpBackend;

/// A prepared `tcp` request: the local segments (where a READ lands, what a WRITE sends) and the encoded
/// control body (remote segments and notification).
#[derive(Debug)]
pub(crate) struct TcpReq {
    local: Arc<[LocalSeg]>,
    ctrl: Arc<[u8]>,
}

/// The control body of a `tcp` request for `pairs`: the remote segments and the notification.
pub(crate) fn encode_request<L>(pairs: &[(L, plan::RemoteSeg)], notif: Option<&[u8]>) -> Arc<[u8]> {
    Ctrl::Segments {
        segs: plan::tcp_segments(pairs),
        notif: notif.map(<[u8]>::to_vec),
    }
    .encode()
    .into()
}

/// Submits one `tcp` request frame of `op` on `conn`; `completion` is finished by the connection's reader.
pub(crate) fn submit(
    conn: &PeerConn,
    op: XferOp,
    ctrl: &Arc<[u8]>,
    local: &Arc<[LocalSeg]>,
    completion: Arc<crate::request::Completion>,
) -> Result<()> {
    let kind = match op {
        XferOp::Read => FrameKind::ReadRequest,
        XferOp::Write => FrameKind::WriteRequest,
    };
    conn.submit(kind, ctrl.clone(), local.clone(), completion)
}

impl Backend for TcpBackend {
    type Peer<'a> = ();
    type Req = TcpReq;

    fn prepare(&self, x: &Prepare<'_>, (): ()) -> Result<TcpReq> {
        match x.route {
            Route::Tcp => Ok(TcpReq {
                local: x.pairs.iter().map(|p| p.0.clone()).collect(),
                ctrl: encode_request(x.pairs, x.notif),
            }),
            _ => Err(x.wrong_route("tcp")),
        }
    }

    fn post(&self, req: &TcpReq, x: &Post<'_>) -> Result<XferStatus> {
        let conn = x
            .conn
            .ok_or_else(|| TransferError::Invalid("tcp request without a connection".into()))?;
        x.remote.check_alive()?;
        submit(conn, x.op, &req.ctrl, &req.local, x.completion.clone())?;
        Ok(XferStatus::InProgress)
    }

    /// A `Notify` frame over the peer connection.
    fn notify(
        &self,
        _from: &str,
        to: &RemoteAgent,
        conn: Option<&Arc<PeerConn>>,
        payload: Vec<u8>,
    ) -> Result<()> {
        match conn {
            Some(c) => c.notify(payload),
            None => Err(TransferError::TransportUnavailable {
                transport: "tcp",
                reason: format!("agent `{}` runs no listener", to.name()),
            }),
        }
    }
}
