//! The TCP side of an agent: outgoing peer connections (TCP transport and notifications) and the listener that
//! serves them and the metadata side channel. Blocking sockets on dedicated threads, so the engine works under
//! any async runtime or none.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use pdx_sys::MemSlice;

use crate::agent::Inner;
use crate::error::{Result, TransferError};
use crate::memory::Region;
use crate::request::Completion;
use crate::transport::LocalSeg;
use crate::wire::{encode_frame, Ctrl, FrameKind, Header, HEADER_LEN};

/// How often a blocked socket call wakes to check the stall bound and shutdown.
const STALL_TICK: Duration = Duration::from_millis(100);
/// A WRITE to invalid target memory is drained (then refused) up to this size; beyond it the connection closes.
const MAX_DRAIN_BYTES: u64 = 256 << 20;

fn configure(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(STALL_TICK))?;
    stream.set_write_timeout(Some(STALL_TICK))?;
    // Socket buffers are left to the kernel's autotuning (net.ipv4.tcp_{r,w}mem): fixing them with
    // SO_SNDBUF/SO_RCVBUF turns autotuning off and measured no faster on loopback.
    Ok(())
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> TransferError {
    move |source| TransferError::Io { op, source }
}

/// Reads exactly `buf.len()` bytes, asking `on_stall` (as in `pdx_sys::OnStall`) whenever a read times out.
fn read_full(
    mut stream: &TcpStream,
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

/// Reads one header and control body. `idle` is consulted while no byte of the frame has arrived yet; once the
/// frame has started, `busy` bounds the stall.
fn read_frame(
    stream: &TcpStream,
    idle: &mut dyn FnMut() -> bool,
    busy: &mut dyn FnMut(bool) -> bool,
) -> std::result::Result<(Header, Ctrl), String> {
    let mut hdr = [0u8; HEADER_LEN];
    // Wait for the first byte with the idle rule, then read the rest of the header with the busy rule.
    read_full(stream, &mut hdr[..1], &mut |_| idle()).map_err(|e| e.to_string())?;
    read_full(stream, &mut hdr[1..], busy).map_err(|e| e.to_string())?;
    let header = Header::decode(&hdr).map_err(|e| e.0)?;
    let mut body = vec![0u8; header.ctrl_len as usize];
    read_full(stream, &mut body, busy).map_err(|e| e.to_string())?;
    let ctrl = Ctrl::decode(&body).map_err(|e| e.0)?;
    Ok((header, ctrl))
}

/// Tracks progress against the peer timeout.
struct StallClock {
    last: Instant,
    limit: Duration,
}

impl StallClock {
    fn new(limit: Duration) -> Self {
        StallClock {
            last: Instant::now(),
            limit,
        }
    }
    fn tick(&mut self, progressed: bool) -> bool {
        if progressed {
            self.last = Instant::now();
        }
        self.last.elapsed() < self.limit
    }
}

fn slices(segs: &[LocalSeg]) -> Result<Vec<MemSlice<'_>>> {
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
    /// Connects to `addr`, introduces this agent and starts the connection threads.
    pub fn connect(peer: &str, addr: &str, me: &Inner, timeout: Duration) -> Result<Arc<PeerConn>> {
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
        let hello = encode_frame(
            FrameKind::Hello,
            0,
            &Ctrl::Hello {
                name: me.name.clone(),
                instance_id: me.instance_id,
            },
        );
        (&stream)
            .write_all(&hello)
            .map_err(|e| disconnected(format!("hello: {e}")))?;
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
        let notifications = me.notifications.clone();
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
        let body: Arc<[u8]> = Ctrl::Notify(payload).encode().into();
        let header = Header {
            kind: FrameKind::Notify,
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
                    !self.is_closed() && (!waiting || self.idle_for() < self.timeout)
                },
                &mut |p| self.busy_stall(p),
            );
            let (header, ctrl) = match frame {
                Ok(f) => f,
                Err(reason) => break self.loss(reason),
            };
            self.touch();
            match (header.kind, ctrl) {
                (FrameKind::Notify, Ctrl::Notify(payload)) => notifications.push(Notification {
                    from: self.peer.clone(),
                    payload,
                }),
                (
                    kind @ (FrameKind::ReadResponse | FrameKind::WriteAck | FrameKind::Error),
                    ctrl,
                ) => {
                    let Some(op) = self.lock_pending().ops.remove(&header.req_id) else {
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
                            None => Err(TransferError::Invalid("read data for a write".into())),
                        },
                        _ => Err(TransferError::Invalid("mismatched response".into())),
                    };
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

/// A notification: a payload an agent sent to this one, usually on completion of a transfer (NIXL notifications,
/// e.g. vLLM NixlConnector's "blocks read, free them" message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// Sending agent's name.
    pub from: String,
    /// The payload (at most 64 KiB).
    pub payload: Vec<u8>,
}

/// Notifications received by an agent, oldest first. Bounded: past [`NotificationQueue::CAPACITY`] the oldest
/// are dropped (with a warning) so a consumer that never takes them cannot exhaust memory.
#[derive(Debug, Default)]
pub(crate) struct NotificationQueue {
    queue: Mutex<std::collections::VecDeque<Notification>>,
    cv: std::sync::Condvar,
}

impl NotificationQueue {
    pub const CAPACITY: usize = 1 << 20;

    pub fn push(&self, n: Notification) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= Self::CAPACITY {
            tracing::warn!("notification queue full; dropping the oldest");
            q.pop_front();
        }
        q.push_back(n);
        drop(q);
        self.cv.notify_all();
    }

    pub fn take(&self) -> Vec<Notification> {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect()
    }

    pub fn wait(&self, timeout: Duration) -> Vec<Notification> {
        let deadline = Instant::now() + timeout;
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        while q.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            q = self
                .cv
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        q.drain(..).collect()
    }
}

/// Fetches an agent's encoded metadata from its listener at `addr` (`host:port`): the side channel, in the
/// spirit of NIXL's (vLLM's NixlConnector uses port 5600 for it).
///
/// Errors: [`TransferError::PeerDisconnected`] when it cannot connect or the connection drops;
/// [`TransferError::Timeout`] after `timeout` without an answer; [`TransferError::Protocol`] for a bad reply.
pub fn fetch_metadata(addr: &str, timeout: Duration) -> Result<Vec<u8>> {
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
    (&stream)
        .write_all(&encode_frame(FrameKind::GetMetadata, 0, &Ctrl::GetMetadata))
        .map_err(|e| disconnected(e.to_string()))?;
    let mut clock = StallClock::new(timeout);
    let mut clock2 = StallClock::new(timeout);
    let frame = read_frame(&stream, &mut || clock.tick(false), &mut |p| clock2.tick(p));
    match frame {
        Ok((_, Ctrl::Metadata(bytes))) => Ok(bytes),
        Ok((h, _)) => Err(TransferError::Protocol {
            peer: addr.to_string(),
            reason: format!("expected metadata, got {:?}", h.kind),
        }),
        Err(reason) if reason.contains("timed out") => Err(TransferError::Timeout {
            peer: addr.to_string(),
            after: timeout,
        }),
        Err(reason) => Err(disconnected(reason)),
    }
}

/// Binds the agent's listener. Returns it with its bound address.
pub(crate) fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).map_err(io_err("binding agent listener"))?;
    let local = listener.local_addr().map_err(io_err("listener address"))?;
    Ok((listener, local))
}

/// Accepts connections until the agent shuts down (woken by a connection to itself).
pub(crate) fn accept_loop(listener: TcpListener, agent: Weak<Inner>) {
    for stream in listener.incoming() {
        let Some(inner) = agent.upgrade() else { break };
        if inner.is_shut_down() {
            break;
        }
        let Ok(stream) = stream else { continue };
        if configure(&stream).is_err() {
            continue;
        }
        let id = inner.track_server_conn(&stream);
        let spawned = std::thread::Builder::new()
            .name(format!("pdx-srv-{}", inner.name))
            .spawn(move || {
                serve_conn(&inner, &stream);
                inner.untrack_server_conn(id);
            });
        if spawned.is_err() {
            tracing::warn!("could not spawn a connection thread");
        }
    }
}

/// Resolves target segments against this agent's registrations.
fn resolve(inner: &Inner, segs: &[(u64, u64)]) -> std::result::Result<Vec<LocalSeg>, String> {
    segs.iter()
        .enumerate()
        .map(|(i, &(addr, len))| {
            let (region, off): (Arc<Region>, usize) = inner
                .registry
                .lookup(addr, len)
                .ok_or_else(|| format!("segment {i} ({addr:#x}+{len}) is not registered"))?;
            if region.host().is_none() {
                return Err(format!(
                    "segment {i} ({addr:#x}+{len}) is GPU memory, not reachable over tcp"
                ));
            }
            Ok(LocalSeg {
                region,
                off,
                len: len as usize,
            })
        })
        .collect()
}

fn send_error(stream: &TcpStream, req_id: u64, message: String) -> io::Result<()> {
    let mut s = stream;
    s.write_all(&encode_frame(
        FrameKind::Error,
        req_id,
        &Ctrl::Error(message),
    ))
}

/// Serves one incoming connection: side-channel metadata, READ/WRITE requests and notifications.
fn serve_conn(inner: &Inner, stream: &TcpStream) {
    let mut peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown".into());
    let fd = stream.as_raw_fd();
    loop {
        let mut clock = StallClock::new(inner.config.peer_timeout);
        let frame = read_frame(stream, &mut || !inner.is_shut_down(), &mut |p| {
            clock.tick(p)
        });
        let (header, ctrl) = match frame {
            Ok(f) => f,
            Err(reason) => {
                tracing::debug!(%peer, %reason, "agent connection closed");
                return;
            }
        };
        let mut clock = StallClock::new(inner.config.peer_timeout);
        let mut stall = |p| clock.tick(p) && !inner.is_shut_down();
        let outcome: std::result::Result<(), String> = match (header.kind, ctrl) {
            (FrameKind::Hello, Ctrl::Hello { name, .. }) => {
                peer = name;
                Ok(())
            }
            (FrameKind::GetMetadata, _) => inner
                .local_metadata()
                .map_err(|e| e.to_string())
                .and_then(|md| {
                    (&*stream)
                        .write_all(&encode_frame(FrameKind::Metadata, 0, &Ctrl::Metadata(md)))
                        .map_err(|e| e.to_string())
                }),
            (FrameKind::Notify, Ctrl::Notify(payload)) => {
                inner.notifications.push(Notification {
                    from: peer.clone(),
                    payload,
                });
                Ok(())
            }
            (FrameKind::ReadRequest, Ctrl::Segments { segs, notif }) => match resolve(inner, &segs)
            {
                Err(msg) => send_error(stream, header.req_id, msg).map_err(|e| e.to_string()),
                Ok(local) => {
                    let prefix = encode_frame(FrameKind::ReadResponse, header.req_id, &Ctrl::Empty);
                    let sent = slices(&local).and_then(|s| {
                        Ok(pdx_sys::write_all_vectored(fd, &prefix, &s, &mut stall)?)
                    });
                    if let (Ok(()), Some(payload)) = (&sent, notif) {
                        inner.notifications.push(Notification {
                            from: peer.clone(),
                            payload,
                        });
                    }
                    sent.map_err(|e| e.to_string())
                }
            },
            (FrameKind::WriteRequest, Ctrl::Segments { segs, notif }) => {
                match resolve(inner, &segs) {
                    Err(msg) => {
                        let total: u64 = segs.iter().map(|s| s.1).sum();
                        if total > MAX_DRAIN_BYTES {
                            let _ = send_error(stream, header.req_id, msg);
                            return;
                        }
                        let mut sink = vec![0u8; total as usize];
                        read_full(stream, &mut sink, &mut stall)
                            .and_then(|()| send_error(stream, header.req_id, msg))
                            .map_err(|e| e.to_string())
                    }
                    Ok(local) => {
                        let received = slices(&local)
                            .and_then(|s| Ok(pdx_sys::read_exact_into(fd, &s, &mut stall)?));
                        match received {
                            Ok(()) => {
                                let ack =
                                    encode_frame(FrameKind::WriteAck, header.req_id, &Ctrl::Empty);
                                let acked = (&*stream).write_all(&ack).map_err(|e| e.to_string());
                                if let Some(payload) = notif {
                                    inner.notifications.push(Notification {
                                        from: peer.clone(),
                                        payload,
                                    });
                                }
                                acked
                            }
                            Err(e) => Err(e.to_string()),
                        }
                    }
                }
            }
            (kind, _) => Err(format!("unexpected {kind:?} frame")),
        };
        if let Err(reason) = outcome {
            tracing::debug!(%peer, %reason, "closing agent connection");
            return;
        }
    }
}
