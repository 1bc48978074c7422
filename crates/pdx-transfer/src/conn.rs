//! The initiator side of the agent protocol: outgoing peer connections ([`PeerConn`]: the `tcp` transport's
//! frames and notifications), the connection handshake (with the agent secret when one is configured, see
//! [`crate::auth`]), the metadata side channel's client, and the blocking-socket framing the listener shares.
//! Blocking sockets on dedicated threads, so the engine works under any async runtime or none. The listener side
//! is in `server.rs`; the `tcp` backend (a request's prepare and post) in `tcp.rs`.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pdx_sys::MemSlice;

use crate::auth::{self, AgentSecret};
use crate::config::Identity;
use crate::error::{Result, TransferError};
use crate::notif::{Notification, NotificationQueue};
use crate::request::Completion;
use crate::transport::LocalSeg;
use crate::wire::{encode_frame, Ctrl, FrameKind, Header, HEADER_LEN};

/// How often a blocked socket call wakes to check the stall bound and shutdown.
pub(crate) const STALL_TICK: Duration = Duration::from_millis(100);
/// An idle initiator connection sends a `Ping` this often, so the target's idle timeout
/// ([`crate::AgentConfig::idle_timeout`], 120 s by default) never closes a live peer's connection.
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(30);
/// Agent name an anonymous side-channel client gives in its `AuthHello`.
const SIDE_CHANNEL_NAME: &str = "pdx-side-channel";

pub(crate) fn configure(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(STALL_TICK))?;
    stream.set_write_timeout(Some(STALL_TICK))?;
    // Socket buffers are left to the kernel's autotuning (net.ipv4.tcp_{r,w}mem): fixing them with
    // SO_SNDBUF/SO_RCVBUF turns autotuning off and measured no faster on loopback.
    Ok(())
}

pub(crate) fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> TransferError {
    move |source| TransferError::Io { op, source }
}

/// Reads exactly `buf.len()` bytes, asking `on_stall` (as in `pdx_sys::OnStall`) whenever a read times out.
pub(crate) fn read_full(
    mut stream: impl Read,
    buf: &mut [u8],
    on_stall: &mut dyn FnMut(bool) -> bool,
) -> io::Result<()> {
    let (mut got, mut progressed) = (0, false);
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                got += n;
                progressed = true;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if !on_stall(std::mem::take(&mut progressed)) {
                    return Err(io::ErrorKind::TimedOut.into());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Why no frame was read.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// No byte of a frame arrived before the idle rule gave up: the connection is in sync, just quiet.
    Idle,
    /// The stream ended or failed (the reason), possibly in the middle of a frame.
    Closed(String),
    /// The bytes are not a valid frame: the connection is out of sync.
    Bad(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Idle => f.write_str("timed out waiting for a frame"),
            FrameError::Closed(r) | FrameError::Bad(r) => f.write_str(r),
        }
    }
}

/// Reads one header and control body (checked as [`crate::wire::decode_frame`] checks them). `idle` is consulted
/// while no byte of the frame has arrived yet; once the frame has started, `busy` bounds the stall.
pub(crate) fn read_frame(
    stream: impl Read + Copy,
    idle: &mut dyn FnMut() -> bool,
    busy: &mut dyn FnMut(bool) -> bool,
) -> std::result::Result<(Header, Ctrl), FrameError> {
    let mut hdr = [0u8; HEADER_LEN];
    // Wait for the first byte with the idle rule, then read the rest of the header with the busy rule.
    read_full(stream, &mut hdr[..1], &mut |_| idle()).map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut => FrameError::Idle,
        _ => FrameError::Closed(e.to_string()),
    })?;
    read_full(stream, &mut hdr[1..], busy).map_err(|e| FrameError::Closed(e.to_string()))?;
    read_frame_rest(stream, &hdr, busy)
}

/// The rest of a frame whose header is in `hdr`: decodes it, reads and checks the control body.
pub(crate) fn read_frame_rest(
    stream: impl Read,
    hdr: &[u8; HEADER_LEN],
    busy: &mut dyn FnMut(bool) -> bool,
) -> std::result::Result<(Header, Ctrl), FrameError> {
    let header = Header::decode(hdr).map_err(|e| FrameError::Bad(e.0))?;
    let mut body = vec![0u8; header.ctrl_len as usize];
    read_full(stream, &mut body, busy).map_err(|e| FrameError::Closed(e.to_string()))?;
    let ctrl = Ctrl::decode(&body).map_err(|e| FrameError::Bad(e.0))?;
    if !ctrl.fits(header.kind) {
        return Err(FrameError::Bad(format!(
            "{:?} frame with a mismatched body",
            header.kind
        )));
    }
    Ok((header, ctrl))
}

/// Tracks progress against the peer timeout.
pub(crate) struct StallClock {
    last: Instant,
    limit: Duration,
}

impl StallClock {
    pub(crate) fn new(limit: Duration) -> Self {
        StallClock {
            last: Instant::now(),
            limit,
        }
    }
    pub(crate) fn tick(&mut self, progressed: bool) -> bool {
        if progressed {
            self.last = Instant::now();
        }
        self.last.elapsed() < self.limit
    }
}

pub(crate) fn slices(segs: &[LocalSeg]) -> Result<Vec<MemSlice<'_>>> {
    segs.iter()
        .map(|s| Ok(s.region.host_mem()?.slice(s.off, s.len)?))
        .collect()
}

/// A frame queued for a connection's writer thread.
struct Outgoing {
    header: [u8; HEADER_LEN],
    ctrl: Arc<[u8]>,
    /// Data sent after the control body (WRITE), straight from registered memory.
    data: Option<Arc<[LocalSeg]>>,
}

struct PendingOp {
    completion: Arc<Completion>,
    /// Where a READ's data lands.
    read_into: Option<Arc<[LocalSeg]>>,
}

#[derive(Default)]
struct PendingTable {
    ops: HashMap<u64, PendingOp>,
    /// Set once the connection is lost; no new op is accepted after.
    closed: Option<TransferError>,
}

/// An initiator's connection to one peer agent: a writer thread fed by a channel, a reader thread that completes
/// requests. Once lost it stays lost: the peer must be loaded again (new metadata) to reconnect.
pub(crate) struct PeerConn {
    peer: String,
    stream: TcpStream,
    tx: Mutex<Option<Sender<Outgoing>>>,
    /// Held while a frame is written, so frames never interleave; holds the reusable header buffer.
    wire: Mutex<Vec<u8>>,
    /// Frames handed to the writer thread and not yet written.
    queued: std::sync::atomic::AtomicUsize,
    pending: Mutex<PendingTable>,
    next_id: AtomicU64,
    closed: AtomicBool,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last progress or submission.
    activity_ms: AtomicU64,
    timeout: Duration,
}

impl PeerConn {
    /// Connects to `addr`, introduces this agent (`me`) and starts the connection threads; notifications the peer
    /// sends on it go to `notifications`. Connecting, and later each stall, is bounded by the peer timeout.
    pub fn connect(
        peer: &str,
        addr: &str,
        me: Identity<'_>,
        notifications: Arc<NotificationQueue>,
    ) -> Result<Arc<PeerConn>> {
        let timeout = me.config.peer_timeout;
        let disconnected = |reason: String| TransferError::PeerDisconnected {
            peer: peer.to_string(),
            reason,
        };
        let sockaddr: SocketAddr = addr
            .to_socket_addrs()
            .map_err(|e| disconnected(format!("resolving {addr}: {e}")))?
            .next()
            .ok_or_else(|| disconnected(format!("{addr} resolves to nothing")))?;
        let stream = TcpStream::connect_timeout(&sockaddr, timeout)
            .map_err(|e| disconnected(format!("connecting to {addr}: {e}")))?;
        configure(&stream).map_err(io_err("configuring socket"))?;
        match &me.config.secret {
            Some(secret) => {
                authenticate(&stream, secret, me.name(), me.instance_id, peer, timeout)?;
            }
            None => {
                let hello = encode_frame(
                    FrameKind::Hello,
                    0,
                    &Ctrl::Hello {
                        name: me.name().to_string(),
                        instance_id: me.instance_id,
                    },
                );
                (&stream)
                    .write_all(&hello)
                    .map_err(|e| disconnected(format!("hello: {e}")))?;
            }
        }
        let (tx, rx) = mpsc::channel();
        let conn = Arc::new(PeerConn {
            peer: peer.to_string(),
            stream: stream.try_clone().map_err(io_err("cloning socket"))?,
            tx: Mutex::new(Some(tx)),
            wire: Mutex::new(Vec::with_capacity(256)),
            queued: std::sync::atomic::AtomicUsize::new(0),
            pending: Mutex::new(PendingTable::default()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            epoch: Instant::now(),
            activity_ms: AtomicU64::new(0),
            timeout,
        });
        let (w, r) = (conn.clone(), conn.clone());
        std::thread::Builder::new()
            .name(format!("pdx-tx-{peer}"))
            .spawn(move || w.writer_loop(rx))
            .map_err(io_err("spawning writer"))?;
        std::thread::Builder::new()
            .name(format!("pdx-rx-{peer}"))
            .spawn(move || r.reader_loop(stream, notifications))
            .map_err(io_err("spawning reader"))?;
        Ok(conn)
    }

    /// True once the connection is lost.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn touch(&self) {
        self.activity_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.activity_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    fn lock_pending(&self) -> MutexGuard<'_, PendingTable> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn closed_error(&self) -> TransferError {
        self.lock_pending()
            .closed
            .as_ref()
            .map(|e| e.duplicate())
            .unwrap_or_else(|| TransferError::PeerDisconnected {
                peer: self.peer.clone(),
                reason: "connection closed".into(),
            })
    }

    /// Sends a frame. Small frames (no data) go out on the caller's thread when nothing is queued and no
    /// frame is being written: that saves two thread wake-ups per READ request, which dominate a batch's
    /// latency on loopback. Frames with data, or any frame while others are queued, go to the writer thread,
    /// so order is kept and the caller never blocks behind a large WRITE.
    fn send(&self, out: Outgoing) -> Result<()> {
        if out.data.is_none() && self.queued.load(Ordering::Acquire) == 0 {
            if let Ok(mut prefix) = self.wire.try_lock() {
                if self.queued.load(Ordering::Acquire) == 0 {
                    return match self.write_frame(&out, &mut prefix) {
                        Ok(()) => Ok(()),
                        Err(e) => {
                            drop(prefix);
                            let err = self.send_error(e);
                            self.fail_all(err.duplicate());
                            Err(err)
                        }
                    };
                }
            }
        }
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        self.queued.fetch_add(1, Ordering::AcqRel);
        match tx.as_ref().map(|tx| tx.send(out)) {
            Some(Ok(())) => Ok(()),
            _ => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                Err(self.closed_error())
            }
        }
    }

    /// Writes one frame: header, control body and data straight from registered memory.
    fn write_frame(&self, out: &Outgoing, prefix: &mut Vec<u8>) -> Result<()> {
        let fd = self.stream.as_raw_fd();
        prefix.clear();
        prefix.extend_from_slice(&out.header);
        prefix.extend_from_slice(&out.ctrl);
        let result = match &out.data {
            None => pdx_sys::write_all_vectored(fd, prefix, &[], &mut |p| self.busy_stall(p))
                .map_err(TransferError::from),
            Some(segs) => slices(segs).and_then(|s| {
                Ok(pdx_sys::write_all_vectored(fd, prefix, &s, &mut |p| {
                    self.busy_stall(p)
                })?)
            }),
        };
        self.touch();
        result
    }

    fn send_error(&self, e: TransferError) -> TransferError {
        if self.idle_for() >= self.timeout {
            self.timeout_error()
        } else {
            TransferError::PeerDisconnected {
                peer: self.peer.clone(),
                reason: format!("send failed: {e}"),
            }
        }
    }

    /// Queues a READ or WRITE request; `completion` is finished by the reader thread (or on connection loss).
    pub fn submit(
        &self,
        kind: FrameKind,
        ctrl: Arc<[u8]>,
        local: Arc<[LocalSeg]>,
        completion: Arc<Completion>,
    ) -> Result<()> {
        let req_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (read_into, data) = match kind {
            FrameKind::ReadRequest => (Some(local), None),
            _ => (None, Some(local)),
        };
        {
            let mut table = self.lock_pending();
            if let Some(e) = &table.closed {
                return Err(e.duplicate());
            }
            if table.ops.is_empty() {
                self.touch(); // the stall clock starts with the first outstanding op
            }
            table.ops.insert(
                req_id,
                PendingOp {
                    completion,
                    read_into,
                },
            );
        }
        let header = Header {
            kind,
            req_id,
            ctrl_len: ctrl.len() as u32,
        }
        .encode();
        self.send(Outgoing { header, ctrl, data }).inspect_err(|_| {
            self.lock_pending().ops.remove(&req_id);
        })
    }

    /// Queues a notification frame.
    pub fn notify(&self, payload: Vec<u8>) -> Result<()> {
        self.send_ctrl(FrameKind::Notify, Ctrl::Notify(payload))
    }

    /// Sends a keepalive frame.
    fn ping(&self) -> Result<()> {
        self.send_ctrl(FrameKind::Ping, Ctrl::Empty)
    }

    /// Queues a frame of `kind` that carries only a control body (no request id, no data).
    fn send_ctrl(&self, kind: FrameKind, ctrl: Ctrl) -> Result<()> {
        let body: Arc<[u8]> = ctrl.encode().into();
        let header = Header {
            kind,
            req_id: 0,
            ctrl_len: body.len() as u32,
        }
        .encode();
        self.send(Outgoing {
            header,
            ctrl: body,
            data: None,
        })
    }

    /// Marks the connection lost and fails every outstanding op with `err`.
    pub fn fail_all(&self, err: TransferError) {
        let ops = {
            let mut table = self.lock_pending();
            if table.closed.is_none() {
                tracing::debug!(peer = %self.peer, error = %err, "peer connection lost");
                table.closed = Some(err.duplicate());
            }
            std::mem::take(&mut table.ops)
        };
        self.closed.store(true, Ordering::Release);
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let _ = self.stream.shutdown(Shutdown::Both);
        for (_, op) in ops {
            op.completion.finish(Err(err.duplicate()));
        }
    }

    /// Stall rule while ops are outstanding: give up after `timeout` without progress on either direction.
    fn busy_stall(&self, progressed: bool) -> bool {
        if progressed {
            self.touch();
        }
        !self.is_closed() && self.idle_for() < self.timeout
    }

    fn timeout_error(&self) -> TransferError {
        TransferError::Timeout {
            peer: self.peer.clone(),
            after: self.timeout,
        }
    }

    fn writer_loop(self: Arc<Self>, rx: Receiver<Outgoing>) {
        while let Ok(out) = rx.recv() {
            let result = {
                let mut prefix = self.wire.lock().unwrap_or_else(|e| e.into_inner());
                self.write_frame(&out, &mut prefix)
            };
            self.queued.fetch_sub(1, Ordering::AcqRel);
            if let Err(e) = result {
                self.fail_all(self.send_error(e));
                return;
            }
        }
    }

    fn reader_loop(self: Arc<Self>, stream: TcpStream, notifications: Arc<NotificationQueue>) {
        let err = loop {
            let frame = read_frame(
                &stream,
                &mut || {
                    // Waiting for a response: bounded only while something is outstanding.
                    let waiting = !self.lock_pending().ops.is_empty();
                    if !waiting && self.idle_for() >= KEEPALIVE {
                        // Quiet but alive: keep the target's idle timeout from closing us.
                        let _ = self.ping();
                    }
                    !self.is_closed() && (!waiting || self.idle_for() < self.timeout)
                },
                &mut |p| self.busy_stall(p),
            );
            let (header, ctrl) = match frame {
                Ok(f) => f,
                Err(reason) => break self.loss(reason.to_string()),
            };
            self.touch();
            match (header.kind, ctrl) {
                (FrameKind::AuthError, Ctrl::Error(reason)) => {
                    break TransferError::Unauthenticated {
                        peer: self.peer.clone(),
                        reason,
                    }
                }
                (FrameKind::Notify, Ctrl::Notify(payload)) => notifications.push(Notification {
                    from: self.peer.clone(),
                    payload,
                }),
                (
                    kind @ (FrameKind::ReadResponse | FrameKind::WriteAck | FrameKind::Error),
                    ctrl,
                ) => {
                    let Some(mut op) = self.lock_pending().ops.remove(&header.req_id) else {
                        break self
                            .protocol(format!("response for unknown request {}", header.req_id));
                    };
                    let result = match (kind, ctrl) {
                        (FrameKind::Error, Ctrl::Error(message)) => Err(TransferError::Remote {
                            peer: self.peer.clone(),
                            message,
                        }),
                        (FrameKind::WriteAck, _) if op.read_into.is_none() => Ok(()),
                        (FrameKind::ReadResponse, _) => match &op.read_into {
                            Some(segs) => {
                                let read = slices(segs).and_then(|s| {
                                    Ok(pdx_sys::read_exact_into(
                                        stream.as_raw_fd(),
                                        &s,
                                        &mut |p| self.busy_stall(p),
                                    )?)
                                });
                                if let Err(e) = read {
                                    let err = self.loss(format!("reading data: {e}"));
                                    op.completion.finish(Err(err.duplicate()));
                                    break err;
                                }
                                Ok(())
                            }
                            None => {
                                // Data of unknown length follows a frame we did not ask for: the stream is out of
                                // step from here, so the connection ends (every op on it fails), not just this op.
                                let err = self.protocol("read data for a write".into());
                                op.completion.finish(Err(err.duplicate()));
                                break err;
                            }
                        },
                        _ => Err(TransferError::Invalid("mismatched response".into())),
                    };
                    // Let go of the regions before the request reads as done: a caller that releases the request
                    // and deregisters at once must not find them still in use.
                    op.read_into = None;
                    op.completion.finish(result);
                }
                (kind, _) => break self.protocol(format!("unexpected {kind:?} frame")),
            }
        };
        self.fail_all(err);
    }

    fn loss(&self, reason: String) -> TransferError {
        if !self.is_closed() && self.idle_for() >= self.timeout {
            self.timeout_error()
        } else {
            TransferError::PeerDisconnected {
                peer: self.peer.clone(),
                reason,
            }
        }
    }

    fn protocol(&self, reason: String) -> TransferError {
        TransferError::Protocol {
            peer: self.peer.clone(),
            reason,
        }
    }
}

/// Runs the initiator's side of the secret handshake ([`crate::auth`]) on a fresh connection to `peer`.
///
/// Errors: [`TransferError::Unauthenticated`] when the peer refuses this agent (no secret there, or another one)
/// or cannot prove it holds the secret; [`TransferError::PeerDisconnected`] / [`TransferError::Timeout`] when the
/// connection fails or stalls for `timeout`.
pub(crate) fn authenticate(
    stream: impl Read + Write + Copy,
    secret: &AgentSecret,
    name: &str,
    instance_id: u64,
    peer: &str,
    timeout: Duration,
) -> Result<()> {
    let refused = |reason: String| TransferError::Unauthenticated {
        peer: peer.to_string(),
        reason,
    };
    let nonce_i = auth::nonce()?;
    send_all(
        stream,
        &encode_frame(
            FrameKind::AuthHello,
            0,
            &Ctrl::AuthHello {
                name: name.to_string(),
                instance_id,
                nonce: nonce_i,
            },
        ),
        peer,
    )?;
    let nonce_t = match read_reply(stream, peer, timeout)? {
        (_, Ctrl::Challenge { nonce, proof }) => {
            if !secret.verify_target(&nonce_i, &nonce, &proof) {
                return Err(refused(
                    "the peer could not prove it holds the agent secret".into(),
                ));
            }
            nonce
        }
        (h, _) => return Err(refused(format!("expected a challenge, got {:?}", h.kind))),
    };
    let proof = secret.initiator_proof(&nonce_i, &nonce_t, name);
    send_all(
        stream,
        &encode_frame(FrameKind::Auth, 0, &Ctrl::Auth { proof }),
        peer,
    )?;
    match read_reply(stream, peer, timeout)? {
        (h, _) if h.kind == FrameKind::AuthOk => Ok(()),
        (h, _) => Err(refused(format!("expected AuthOk, got {:?}", h.kind))),
    }
}

fn send_all(mut stream: impl Write, bytes: &[u8], peer: &str) -> Result<()> {
    stream
        .write_all(bytes)
        .map_err(|e| TransferError::PeerDisconnected {
            peer: peer.to_string(),
            reason: format!("sending: {e}"),
        })
}

/// Reads the reply to a handshake or side-channel frame, within `timeout`. An `AuthError` (or `Error`) answer
/// becomes [`TransferError::Unauthenticated`] (or [`TransferError::Remote`]).
pub(crate) fn read_reply(
    stream: impl Read + Copy,
    peer: &str,
    timeout: Duration,
) -> Result<(Header, Ctrl)> {
    let deadline = Instant::now() + timeout;
    let mut clock = StallClock::new(timeout);
    let frame = read_frame(stream, &mut || Instant::now() < deadline, &mut |p| {
        clock.tick(p)
    });
    match frame {
        Ok((h, Ctrl::Error(reason))) if h.kind == FrameKind::AuthError => {
            Err(TransferError::Unauthenticated {
                peer: peer.to_string(),
                reason,
            })
        }
        Ok((h, Ctrl::Error(message))) if h.kind == FrameKind::Error => Err(TransferError::Remote {
            peer: peer.to_string(),
            message,
        }),
        Ok(f) => Ok(f),
        Err(FrameError::Idle) => Err(TransferError::Timeout {
            peer: peer.to_string(),
            after: timeout,
        }),
        Err(FrameError::Closed(r)) if r.contains("timed out") => Err(TransferError::Timeout {
            peer: peer.to_string(),
            after: timeout,
        }),
        Err(FrameError::Closed(reason)) => Err(TransferError::PeerDisconnected {
            peer: peer.to_string(),
            reason,
        }),
        Err(FrameError::Bad(reason)) => Err(TransferError::Protocol {
            peer: peer.to_string(),
            reason,
        }),
    }
}

/// Fetches an agent's encoded metadata from its listener at `addr` (`host:port`): the side channel, in the
/// spirit of NIXL's (vLLM's NixlConnector uses port 5600 for it). For agents without a secret; see
/// [`fetch_metadata_with`].
///
/// The bytes are untrusted: [`crate::Agent::load_remote`] uses them only to reach the peer over `tcp`, and a
/// same-host peer's memory only through what its Unix socket hands over.
///
/// Errors: [`TransferError::PeerDisconnected`] when it cannot connect or the connection drops;
/// [`TransferError::Timeout`] after `timeout` without an answer; [`TransferError::Protocol`] for a bad reply;
/// [`TransferError::Unauthenticated`] when the agent requires a secret.
pub fn fetch_metadata(addr: &str, timeout: Duration) -> Result<Vec<u8>> {
    fetch_metadata_with(addr, timeout, None)
}

/// [`fetch_metadata`] from an agent that may require the shared secret: with `secret`, the connection first runs
/// the handshake of [`crate::auth`] (and fails unless the agent proves the same secret).
///
/// Errors: as [`fetch_metadata`], plus [`TransferError::Unauthenticated`] when the handshake fails.
pub fn fetch_metadata_with(
    addr: &str,
    timeout: Duration,
    secret: Option<&AgentSecret>,
) -> Result<Vec<u8>> {
    let disconnected = |reason: String| TransferError::PeerDisconnected {
        peer: addr.to_string(),
        reason,
    };
    let sockaddr = addr
        .to_socket_addrs()
        .map_err(|e| disconnected(e.to_string()))?
        .next()
        .ok_or_else(|| disconnected("address resolves to nothing".into()))?;
    let stream = TcpStream::connect_timeout(&sockaddr, timeout)
        .map_err(|e| disconnected(format!("connecting: {e}")))?;
    configure(&stream).map_err(io_err("configuring socket"))?;
    if let Some(secret) = secret {
        authenticate(&stream, secret, SIDE_CHANNEL_NAME, 0, addr, timeout)?;
    }
    send_all(
        &stream,
        &encode_frame(FrameKind::GetMetadata, 0, &Ctrl::GetMetadata),
        addr,
    )?;
    match read_reply(&stream, addr, timeout)? {
        (_, Ctrl::Metadata(bytes)) => Ok(bytes),
        (h, _) => Err(TransferError::Protocol {
            peer: addr.to_string(),
            reason: format!("expected metadata, got {:?}", h.kind),
        }),
    }
}
