//! The target side of the agent protocol: the listener of the metadata side channel, the TCP transport and
//! notifications, and the agent's Unix socket that hands same-host peers its metadata and memfds.
//!
//! One I/O thread per agent (`pdx-io-<name>`) waits on every idle connection with epoll (`mio`), accepts, and
//! enforces the limits; a bounded pool of handler threads serves connections that have something to read:
//! - at most [`crate::AgentConfig::max_connections`] incoming connections (TCP and Unix) at once; more are
//!   accepted and closed at once;
//! - at most [`crate::AgentConfig::max_handler_threads`] handler threads, started on demand and gone after 10 s
//!   without work; a handler keeps a busy connection while frames keep coming (one tick, 100 ms) and hands it
//!   back to the I/O thread when it goes quiet, or at once when other connections wait for a handler;
//! - a connection must complete its first frame (with a secret: the whole handshake) within
//!   [`crate::AgentConfig::handshake_timeout`], and one that sends nothing for
//!   [`crate::AgentConfig::idle_timeout`] is closed (initiators send a `Ping` every 30 s while idle). A Unix
//!   link that received the memfds stays open as the initiator's liveness signal and has no idle timeout;
//! - nothing is allocated from a peer's claim: a refused WRITE is drained through a fixed 64 KiB buffer (up to
//!   256 MiB; beyond that the connection closes), control bodies are bounded by the frame header's limit.
//!
//! So idle connections cost a socket and a few hundred bytes each, and no thread.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::auth::{self, AgentSecret};
use crate::conn::{self, configure, read_frame, FrameError, StallClock, STALL_TICK};
use crate::error::Result;
use crate::memory::Region;
use crate::notif::Notification;
use crate::transport::LocalSeg;
use crate::wire::{encode_frame, Ctrl, FrameKind, Header, MAX_FDS_PER_FRAME};

const TCP_LISTENER: Token = Token(0);
const UNIX_LISTENER: Token = Token(1);
const WAKE: Token = Token(2);
const FIRST_DYNAMIC: usize = 16;
/// How often the I/O thread checks idle and handshake deadlines (and retries accepting after `EMFILE`).
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// A handler thread with no work for this long exits.
const HANDLER_IDLE_EXIT: Duration = Duration::from_secs(10);
/// A WRITE to invalid target memory is drained (then refused) up to this size; beyond it the connection closes.
const MAX_DRAIN_BYTES: u64 = 256 << 20;
/// The fixed buffer a refused WRITE is drained through.
const DRAIN_CHUNK: usize = 64 << 10;
/// Frames closer together than this make a connection "hot": its handler waits a tick for the next one.
const HOT_GAP: Duration = Duration::from_millis(10);

/// What serving connections needs of the agent, and nothing more: who it is to its peers (name, secret), the
/// bound on a peer's stalls, its live registrations (region lookup, the metadata and memfds of a snapshot), and
/// where received notifications go. The agent implements it; the listener holds it weakly, so a dropped agent
/// stops being served.
pub(crate) trait ServeContext: Send + Sync {
    /// The agent's name (errors sent to peers, logs).
    fn name(&self) -> &str;
    /// The shared secret every connection must prove first, if the agent has one.
    fn secret(&self) -> Option<&AgentSecret>;
    /// How long a peer may stall in the middle of a frame.
    fn peer_timeout(&self) -> Duration;
    /// True once the agent is being dropped: handlers stop serving.
    fn is_shut_down(&self) -> bool;
    /// The live region holding all of `[addr, addr+len)` and the offset in it (bytes), if one does.
    fn lookup(&self, addr: u64, len: u64) -> Option<(Arc<Region>, usize)>;
    /// Every live region, for the metadata and memfds a same-host peer receives.
    fn regions(&self) -> Vec<Arc<Region>>;
    /// The encoded metadata describing exactly `live` (a snapshot of [`ServeContext::regions`]).
    fn metadata_of(&self, live: &[Arc<Region>]) -> Result<Vec<u8>>;
    /// The agent's current metadata (the side channel's answer).
    fn metadata(&self) -> Result<Vec<u8>> {
        self.metadata_of(&self.regions())
    }
    /// Delivers a notification a peer sent.
    fn deliver(&self, n: Notification);
}

/// A same-host peer whose Unix link the I/O thread watches: told when link `generation` closes.
pub(crate) trait LinkWatcher: Send + Sync {
    /// The link of `generation` closed (the peer's process is gone, or the link was replaced).
    fn link_lost(&self, generation: u64);
}

/// The limits of an agent's listener (from [`crate::AgentConfig`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub max_connections: usize,
    pub max_handlers: usize,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
}

/// An incoming connection's socket.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn borrowed(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a connection is in its life.
enum Phase {
    /// Nothing received yet.
    Fresh,
    /// Challenge sent (secret configured), waiting for the initiator's proof.
    Challenged {
        nonce_i: [u8; auth::NONCE_LEN],
        nonce_t: [u8; auth::NONCE_LEN],
        name: String,
    },
    /// Requests are served.
    Ready,
    /// A Unix link that received the memfds: kept open, without idle timeout, as the initiator's liveness signal.
    Link,
}

/// An incoming connection, owned by the I/O thread while idle and by a handler while served.
struct ServerConn {
    stream: Stream,
    /// The peer's agent name once it said it, else its address.
    peer: String,
    phase: Phase,
    accepted: Instant,
    last_frame: Instant,
    /// The last frame came less than [`HOT_GAP`] after the one before.
    hot: bool,
    /// Frames served so far.
    frames: u64,
}

impl ServerConn {
    fn new(stream: Stream, peer: String) -> ServerConn {
        let now = Instant::now();
        ServerConn {
            stream,
            peer,
            phase: Phase::Fresh,
            accepted: now,
            last_frame: now,
            hot: false,
            frames: 0,
        }
    }

    /// The moment the handshake must be done by, while it is not.
    fn handshake_deadline(&self, limits: &Limits) -> Option<Instant> {
        matches!(self.phase, Phase::Fresh | Phase::Challenged { .. })
            .then(|| self.accepted + limits.handshake_timeout)
    }

    /// Why an idle connection must close now, if it must.
    fn expired(&self, now: Instant, limits: &Limits) -> Option<&'static str> {
        if self.handshake_deadline(limits).is_some_and(|d| now >= d) {
            return Some("handshake not completed in time");
        }
        let idle_bound = !matches!(self.phase, Phase::Link);
        (idle_bound && now.duration_since(self.last_frame) >= limits.idle_timeout)
            .then_some("idle timeout")
    }
}

/// A same-host peer's Unix link watched by the I/O thread: its closing means the peer is gone.
struct Monitor {
    /// A duplicate of the link's descriptor, owned here so its registration can never name another socket.
    stream: UnixStream,
    peer: Weak<dyn LinkWatcher>,
    generation: u64,
}

#[derive(Default)]
struct Queue {
    conns: VecDeque<ServerConn>,
    handlers: usize,
    idle_handlers: usize,
    /// Handlers started but not yet asking for work: while one starts, no other is started, so a burst of
    /// readable connections grows the pool one thread at a time (each serves a frame in microseconds).
    starting: usize,
}

/// What the I/O thread and the handlers share.
pub(crate) struct Server {
    name: String,
    limits: Limits,
    waker: Waker,
    shutdown: AtomicBool,
    /// Connections handlers handed back, to wait in epoll again.
    returned: Mutex<Vec<ServerConn>>,
    /// Unix links to start watching.
    new_monitors: Mutex<Vec<Monitor>>,
    queue: Mutex<Queue>,
    work: Condvar,
    /// Incoming connections alive (idle, queued or being served).
    live: AtomicUsize,
    /// Connections closed at accept because `max_connections` were open.
    refused: AtomicU64,
    /// The agent served (set when the I/O thread starts).
    agent: std::sync::OnceLock<Weak<dyn ServeContext>>,
}

/// The listener sockets, handed to the I/O thread.
pub(crate) struct Listeners {
    pub tcp: Option<TcpListener>,
    pub unix: Option<UnixListener>,
}

impl Server {
    /// Creates the shared state and the epoll instance (the I/O thread starts with [`Server::spawn`]).
    pub(crate) fn new(name: &str, limits: Limits) -> Result<(Arc<Server>, Poll)> {
        let poll = Poll::new().map_err(conn::io_err("creating epoll"))?;
        let waker = Waker::new(poll.registry(), WAKE).map_err(conn::io_err("creating waker"))?;
        Ok((
            Arc::new(Server {
                name: name.to_string(),
                limits,
                waker,
                shutdown: AtomicBool::new(false),
                returned: Mutex::new(Vec::new()),
                new_monitors: Mutex::new(Vec::new()),
                queue: Mutex::new(Queue::default()),
                work: Condvar::new(),
                live: AtomicUsize::new(0),
                refused: AtomicU64::new(0),
                agent: std::sync::OnceLock::new(),
            }),
            poll,
        ))
    }

    /// Starts the I/O thread.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        poll: Poll,
        listeners: Listeners,
        agent: Weak<dyn ServeContext>,
    ) -> Result<()> {
        let _ = self.agent.set(agent.clone());
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("pdx-io-{}", self.name))
            .spawn(move || me.run(poll, listeners, agent))
            .map(drop)
            .map_err(conn::io_err("spawning the agent's I/O thread"))
    }

    /// Stops the I/O thread and the handlers (connections close; handlers serving one notice within a tick).
    pub(crate) fn shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        let _ = self.waker.wake();
        self.work.notify_all();
    }

    fn is_shut_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Incoming connections open now (idle, queued or being served).
    pub(crate) fn live_connections(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Connections refused at accept because the limit was reached, since the agent started.
    pub(crate) fn refused_connections(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Watches `peer`'s Unix link (of `generation`): when it closes, the peer is gone.
    pub(crate) fn watch(
        &self,
        link: &UnixStream,
        peer: Weak<dyn LinkWatcher>,
        generation: u64,
    ) -> Result<()> {
        let stream = link
            .try_clone()
            .map_err(conn::io_err("duplicating a link"))?;
        self.new_monitors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Monitor {
                stream,
                peer,
                generation,
            });
        self.waker
            .wake()
            .map_err(conn::io_err("waking the I/O thread"))
    }

    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(self: Arc<Self>, mut poll: Poll, listeners: Listeners, agent: Weak<dyn ServeContext>) {
        let mut events = Events::with_capacity(256);
        let mut idle: HashMap<Token, ServerConn> = HashMap::new();
        let mut monitors: HashMap<Token, Monitor> = HashMap::new();
        let mut next = FIRST_DYNAMIC;
        let mut token = || {
            next = next.checked_add(1).unwrap_or(FIRST_DYNAMIC);
            Token(next)
        };
        let register = |poll: &Poll, fd: RawFd, t: Token| {
            poll.registry()
                .register(&mut SourceFd(&fd), t, Interest::READABLE)
        };
        for (l, t) in [
            (listeners.tcp.as_ref().map(|l| l.as_raw_fd()), TCP_LISTENER),
            (
                listeners.unix.as_ref().map(|l| l.as_raw_fd()),
                UNIX_LISTENER,
            ),
        ] {
            if let Some(fd) = l {
                if let Err(e) = register(&poll, fd, t) {
                    tracing::warn!(agent = %self.name, error = %e, "cannot watch a listener");
                }
            }
        }
        let mut last_sweep = Instant::now();
        while !self.is_shut_down() {
            if let Err(e) = poll.poll(&mut events, Some(SWEEP_EVERY)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!(agent = %self.name, error = %e, "epoll failed; listener stops");
                    break;
                }
            }
            if self.is_shut_down() {
                break;
            }
            let mut accepted = Vec::new();
            for ev in events.iter() {
                match ev.token() {
                    TCP_LISTENER => self.accept_tcp(listeners.tcp.as_ref(), &mut accepted),
                    UNIX_LISTENER => self.accept_unix(listeners.unix.as_ref(), &mut accepted),
                    WAKE => {}
                    t => {
                        if let Some(conn) = idle.remove(&t) {
                            let _ = poll.registry().deregister(&mut SourceFd(&conn.stream.fd()));
                            self.dispatch(conn);
                        } else if let Some(m) = monitors.get(&t) {
                            if ev.is_read_closed() || ev.is_error() {
                                if let Some(p) = m.peer.upgrade() {
                                    p.link_lost(m.generation);
                                }
                                if let Some(m) = monitors.remove(&t) {
                                    let _ = poll
                                        .registry()
                                        .deregister(&mut SourceFd(&m.stream.as_raw_fd()));
                                }
                            }
                        }
                    }
                }
            }
            let now = Instant::now();
            let sweep = now.duration_since(last_sweep) >= SWEEP_EVERY;
            if sweep {
                // Accepts that failed for want of descriptors (EMFILE) are retried here.
                self.accept_tcp(listeners.tcp.as_ref(), &mut accepted);
                self.accept_unix(listeners.unix.as_ref(), &mut accepted);
            }
            let returned =
                std::mem::take(&mut *self.returned.lock().unwrap_or_else(|e| e.into_inner()));
            for conn in accepted.into_iter().chain(returned) {
                let t = token();
                match register(&poll, conn.stream.fd(), t) {
                    Ok(()) => {
                        idle.insert(t, conn);
                    }
                    Err(e) => {
                        tracing::debug!(peer = %conn.peer, error = %e, "cannot watch a connection; closing it");
                        self.live.fetch_sub(1, Ordering::AcqRel);
                    }
                }
            }
            let fresh =
                std::mem::take(&mut *self.new_monitors.lock().unwrap_or_else(|e| e.into_inner()));
            for m in fresh {
                let t = token();
                if register(&poll, m.stream.as_raw_fd(), t).is_ok() {
                    monitors.insert(t, m);
                }
            }
            if sweep {
                last_sweep = now;
                let limits = self.limits;
                idle.retain(|_, c| match c.expired(now, &limits) {
                    None => true,
                    Some(why) => {
                        tracing::debug!(agent = %self.name, peer = %c.peer, why, "closing agent connection");
                        let _ = poll.registry().deregister(&mut SourceFd(&c.stream.fd()));
                        self.live.fetch_sub(1, Ordering::AcqRel);
                        false
                    }
                });
                monitors.retain(|_, m| {
                    let keep = m.peer.strong_count() > 0;
                    if !keep {
                        let _ = poll
                            .registry()
                            .deregister(&mut SourceFd(&m.stream.as_raw_fd()));
                    }
                    keep
                });
            }
        }
        // Shutting down: idle connections close here, queued ones are dropped, handlers stop.
        self.live.fetch_sub(idle.len(), Ordering::AcqRel);
        drop(idle);
        drop(monitors);
        let queued = std::mem::take(&mut self.lock_queue().conns);
        self.live.fetch_sub(queued.len(), Ordering::AcqRel);
        self.work.notify_all();
        drop(agent);
    }

    /// True when a new connection must be refused.
    fn full(&self) -> bool {
        self.live.load(Ordering::Acquire) >= self.limits.max_connections
    }

    fn refuse(&self, peer: &dyn std::fmt::Display) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        // One warning per power of two, so a flood does not flood the log.
        if n.is_power_of_two() {
            tracing::warn!(agent = %self.name, %peer, refused = n, limit = self.limits.max_connections,
                "agent connection limit reached; closing new connections");
        }
    }

    fn accept_tcp(&self, l: Option<&TcpListener>, out: &mut Vec<ServerConn>) {
        let Some(l) = l else { return };
        loop {
            match l.accept() {
                Ok((s, addr)) => {
                    if self.full() {
                        self.refuse(&addr);
                        continue; // dropping `s` closes it
                    }
                    if configure(&s).is_err() {
                        continue;
                    }
                    self.live.fetch_add(1, Ordering::AcqRel);
                    out.push(ServerConn::new(Stream::Tcp(s), addr.to_string()));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!(agent = %self.name, error = %e, "accept failed; retrying later");
                    return;
                }
            }
        }
    }

    fn accept_unix(&self, l: Option<&UnixListener>, out: &mut Vec<ServerConn>) {
        let Some(l) = l else { return };
        let me = pdx_sys::ipc::effective_uid();
        loop {
            match l.accept() {
                Ok((s, _)) => {
                    // Only the same user (or root) may have this agent's memfds: the rule that reading
                    // /proc/<pid>/fd would apply.
                    let cred = match pdx_sys::ipc::peer_cred(&s) {
                        Ok(c) if c.uid == me || c.uid == 0 => c,
                        Ok(c) => {
                            tracing::warn!(agent = %self.name, uid = c.uid, pid = c.pid,
                                "refusing a Unix peer of another user");
                            continue;
                        }
                        Err(_) => continue,
                    };
                    if self.full() {
                        self.refuse(&format!("pid {}", cred.pid));
                        continue;
                    }
                    let ok = s.set_read_timeout(Some(STALL_TICK)).is_ok()
                        && s.set_write_timeout(Some(STALL_TICK)).is_ok();
                    if !ok {
                        continue;
                    }
                    self.live.fetch_add(1, Ordering::AcqRel);
                    out.push(ServerConn::new(
                        Stream::Unix(s),
                        format!("unix peer pid {}", cred.pid),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!(agent = %self.name, error = %e, "accept failed; retrying later");
                    return;
                }
            }
        }
    }

    /// Hands a readable connection to a handler, starting one if none is free and the pool has room.
    fn dispatch(self: &Arc<Self>, conn: ServerConn) {
        let mut q = self.lock_queue();
        q.conns.push_back(conn);
        if q.idle_handlers >= q.conns.len() {
            drop(q);
            self.work.notify_one();
            return;
        }
        if q.handlers < self.limits.max_handlers && q.starting == 0 {
            q.handlers += 1;
            q.starting += 1;
            drop(q);
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("pdx-srv-{}", self.name))
                .spawn(move || me.handler());
            if spawned.is_err() {
                tracing::warn!(agent = %self.name, "could not start a connection handler");
                let mut q = self.lock_queue();
                q.handlers -= 1;
                q.starting -= 1;
            }
        }
        // Otherwise the connection waits for the next free handler.
    }

    /// The next queued connection, or `None` when this handler should exit.
    fn next_conn(&self) -> Option<ServerConn> {
        let mut q = self.lock_queue();
        loop {
            if self.is_shut_down() {
                q.handlers -= 1;
                return None;
            }
            if let Some(c) = q.conns.pop_front() {
                return Some(c);
            }
            q.idle_handlers += 1;
            let (guard, timeout) = self
                .work
                .wait_timeout(q, HANDLER_IDLE_EXIT)
                .unwrap_or_else(|e| e.into_inner());
            q = guard;
            q.idle_handlers -= 1;
            if timeout.timed_out() && q.conns.is_empty() {
                q.handlers -= 1;
                return None;
            }
        }
    }

    fn others_waiting(&self) -> bool {
        !self.lock_queue().conns.is_empty()
    }

    fn handler(self: Arc<Self>) {
        self.lock_queue().starting -= 1;
        while let Some(mut conn) = self.next_conn() {
            let outcome = match self.agent_for_handler() {
                Some(ctx) => serve(&*ctx, &self, &mut conn),
                None => Err("agent shut down".to_string()),
            };
            match outcome {
                Ok(()) if !self.is_shut_down() => {
                    self.returned
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(conn);
                    let _ = self.waker.wake();
                }
                Ok(()) => {
                    self.live.fetch_sub(1, Ordering::AcqRel);
                }
                Err(reason) => {
                    tracing::debug!(agent = %self.name, peer = %conn.peer, %reason, "closing agent connection");
                    self.live.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    fn agent_for_handler(&self) -> Option<Arc<dyn ServeContext>> {
        self.agent
            .get()
            .and_then(Weak::upgrade)
            .filter(|i| !i.is_shut_down())
    }
}

/// Serves `conn` while frames keep coming. `Ok` hands it back to the I/O thread (quiet, or others wait for a
/// handler); `Err` closes it with the reason.
///
/// After a frame the handler serves the next one at once if it is already there. A connection whose frames
/// come close together ("hot", less than [`HOT_GAP`] apart: a decode posting batch after batch) is kept for one
/// more tick while nothing else waits, so its next request is read directly instead of through the I/O thread
/// (one thread wake-up instead of two). Any other connection goes back to epoll at once, so idle connections
/// never hold a handler.
fn serve(
    ctx: &dyn ServeContext,
    server: &Server,
    conn: &mut ServerConn,
) -> std::result::Result<(), String> {
    let mut first = true;
    loop {
        if !first {
            let linger = if conn.hot && !server.others_waiting() {
                STALL_TICK
            } else {
                Duration::ZERO
            };
            if !pdx_sys::readable(conn.stream.borrowed(), linger) {
                return Ok(());
            }
        }
        first = false;
        let deadline = conn.handshake_deadline(&server.limits);
        let before_deadline = || deadline.is_none_or(|d| Instant::now() < d);
        let mut clock = StallClock::new(ctx.peer_timeout());
        // A frame should be there (the connection was readable); once it has started, the peer timeout bounds each
        // stall, and the handshake deadline the whole handshake.
        let frame = read_frame(&conn.stream, &mut || false, &mut |p| {
            clock.tick(p) && !ctx.is_shut_down() && before_deadline()
        });
        let (header, ctrl) = match frame {
            Ok(f) => f,
            Err(FrameError::Idle) if before_deadline() => return Ok(()),
            Err(FrameError::Idle) => return Err("handshake not completed in time".into()),
            Err(e @ FrameError::Bad(_)) => {
                let _ = send(conn, FrameKind::Error, 0, &Ctrl::Error(e.to_string()));
                return Err(e.to_string());
            }
            Err(e) => return Err(e.to_string()),
        };
        let now = Instant::now();
        conn.hot = conn.frames > 0 && now.duration_since(conn.last_frame) < HOT_GAP;
        conn.last_frame = now;
        conn.frames += 1;
        handle(ctx, conn, header, ctrl)?;
        if server.others_waiting() {
            return Ok(());
        }
    }
}

/// Writes one control frame (header and body) with the stall rule of the connection.
fn send(
    conn: &ServerConn,
    kind: FrameKind,
    req_id: u64,
    ctrl: &Ctrl,
) -> std::result::Result<(), String> {
    let mut clock = StallClock::new(Duration::from_secs(2));
    pdx_sys::write_all_vectored(
        conn.stream.fd(),
        &encode_frame(kind, req_id, ctrl),
        &[],
        &mut |p| clock.tick(p),
    )
    .map_err(|e| e.to_string())
}

/// Refuses a connection for want of the secret: tells the peer why, then closes.
fn refuse(conn: &ServerConn, reason: &str) -> std::result::Result<(), String> {
    let _ = send(
        conn,
        FrameKind::AuthError,
        0,
        &Ctrl::Error(reason.to_string()),
    );
    Err(reason.to_string())
}

/// The authentication step of the connection's life, then the request itself.
fn handle(
    ctx: &dyn ServeContext,
    conn: &mut ServerConn,
    header: Header,
    ctrl: Ctrl,
) -> std::result::Result<(), String> {
    let secret = ctx.secret();
    match (&conn.phase, secret) {
        (Phase::Fresh, Some(secret)) => {
            return match ctrl {
                Ctrl::AuthHello { name, nonce, .. } => {
                    let nonce_t = auth::nonce().map_err(|e| e.to_string())?;
                    let proof = secret.target_proof(&nonce, &nonce_t);
                    send(conn, FrameKind::Challenge, 0, &Ctrl::Challenge { nonce: nonce_t, proof })?;
                    conn.peer = name.clone();
                    conn.phase = Phase::Challenged {
                        nonce_i: nonce,
                        nonce_t,
                        name,
                    };
                    Ok(())
                }
                _ => refuse(
                    conn,
                    &format!(
                        "authentication required: agent `{}` has a secret; give the peer the same one \
                         (AgentConfig::secret, PDX_AGENT_SECRET)",
                        ctx.name()
                    ),
                ),
            };
        }
        (
            Phase::Challenged {
                nonce_i,
                nonce_t,
                name,
            },
            Some(secret),
        ) => {
            let ok = matches!(&ctrl, Ctrl::Auth { proof } if secret.verify_initiator(nonce_i, nonce_t, name, proof));
            if !ok {
                return refuse(
                    conn,
                    &format!(
                        "authentication failed: wrong agent secret for `{}`",
                        ctx.name()
                    ),
                );
            }
            send(conn, FrameKind::AuthOk, 0, &Ctrl::Empty)?;
            conn.phase = Phase::Ready;
            return Ok(());
        }
        (Phase::Fresh, None) => {
            if matches!(ctrl, Ctrl::AuthHello { .. }) {
                return refuse(
                    conn,
                    &format!(
                        "agent `{}` has no secret configured, so it cannot prove one",
                        ctx.name()
                    ),
                );
            }
            conn.phase = Phase::Ready;
        }
        _ => {}
    }
    match &conn.stream {
        Stream::Unix(_) => handle_unix(ctx, conn, header),
        Stream::Tcp(s) => handle_tcp(ctx, &mut conn.peer, s, header, ctrl),
    }
}

/// Requests of the Unix socket: who is calling, and the memfds. After the memfds the connection is a `Link`, the
/// initiator's liveness signal.
fn handle_unix(
    ctx: &dyn ServeContext,
    conn: &mut ServerConn,
    header: Header,
) -> std::result::Result<(), String> {
    match header.kind {
        FrameKind::Hello | FrameKind::Ping => Ok(()),
        FrameKind::ShareMemory => {
            share_memory(ctx, conn)?;
            conn.phase = Phase::Link;
            Ok(())
        }
        kind => Err(format!("unexpected {kind:?} frame on the Unix socket")),
    }
}

/// Sends this agent's metadata and, attached to `Memfds` frames, the memfd of every shareable region.
fn share_memory(ctx: &dyn ServeContext, conn: &ServerConn) -> std::result::Result<(), String> {
    let Stream::Unix(sock) = &conn.stream else {
        return Err("memfds go over the Unix socket only".into());
    };
    let live: Vec<Arc<Region>> = ctx.regions();
    let metadata = ctx.metadata_of(&live).map_err(|e| e.to_string())?;
    let fds: Vec<(u64, BorrowedFd<'_>)> = live
        .iter()
        .filter_map(|r| r.host().and_then(|m| m.memfd_handle()).map(|fd| (r.id, fd)))
        .collect();
    send(
        conn,
        FrameKind::SharedMemory,
        0,
        &Ctrl::SharedMemory {
            metadata,
            memfds: fds.len() as u32,
        },
    )?;
    for chunk in fds.chunks(MAX_FDS_PER_FRAME) {
        let frame = encode_frame(
            FrameKind::Memfds,
            0,
            &Ctrl::Memfds {
                region_ids: chunk.iter().map(|c| c.0).collect(),
            },
        );
        let handles: Vec<BorrowedFd<'_>> = chunk.iter().map(|c| c.1).collect();
        pdx_sys::ipc::send_with_fds(sock, &frame, &handles).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Resolves target segments against this agent's live registrations.
fn resolve(
    ctx: &dyn ServeContext,
    segs: &[(u64, u64)],
) -> std::result::Result<Vec<LocalSeg>, String> {
    segs.iter()
        .enumerate()
        .map(|(i, &(addr, len))| {
            let (region, off): (Arc<Region>, usize) = ctx
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

/// Requests of the TCP listener: side-channel metadata, READ/WRITE requests, notifications.
fn handle_tcp(
    ctx: &dyn ServeContext,
    peer: &mut String,
    stream: &TcpStream,
    header: Header,
    ctrl: Ctrl,
) -> std::result::Result<(), String> {
    let fd = stream.as_raw_fd();
    let mut clock = StallClock::new(ctx.peer_timeout());
    let mut stall = |p| clock.tick(p) && !ctx.is_shut_down();
    let write = |bytes: &[u8], stall: &mut dyn FnMut(bool) -> bool| {
        pdx_sys::write_all_vectored(fd, bytes, &[], stall).map_err(|e| e.to_string())
    };
    match (header.kind, ctrl) {
        (FrameKind::Hello, Ctrl::Hello { name, .. }) => {
            *peer = name;
            Ok(())
        }
        (FrameKind::Ping, _) => Ok(()),
        (FrameKind::GetMetadata, _) => ctx.metadata().map_err(|e| e.to_string()).and_then(|md| {
            write(
                &encode_frame(FrameKind::Metadata, 0, &Ctrl::Metadata(md)),
                &mut stall,
            )
        }),
        (FrameKind::Notify, Ctrl::Notify(payload)) => {
            ctx.deliver(Notification {
                from: peer.clone(),
                payload,
            });
            Ok(())
        }
        (FrameKind::ReadRequest, Ctrl::Segments { segs, notif }) => match resolve(ctx, &segs) {
            Err(msg) => write(
                &encode_frame(FrameKind::Error, header.req_id, &Ctrl::Error(msg)),
                &mut stall,
            ),
            Ok(local) => {
                let prefix = encode_frame(FrameKind::ReadResponse, header.req_id, &Ctrl::Empty);
                let sent = conn::slices(&local)
                    .and_then(|s| Ok(pdx_sys::write_all_vectored(fd, &prefix, &s, &mut stall)?));
                // The regions are let go before anyone can see the transfer as done (the initiator's request, the
                // notification here), so an owner that deregisters then does not find them in use.
                drop(local);
                if let (Ok(()), Some(payload)) = (&sent, notif) {
                    ctx.deliver(Notification {
                        from: peer.clone(),
                        payload,
                    });
                }
                sent.map_err(|e| e.to_string())
            }
        },
        (FrameKind::WriteRequest, Ctrl::Segments { segs, notif }) => match resolve(ctx, &segs) {
            Err(msg) => {
                // Keep the connection in sync by draining the data, through a fixed buffer: the peer's claimed
                // length sizes no allocation.
                let total: u64 = segs.iter().map(|s| s.1).sum();
                if total > MAX_DRAIN_BYTES {
                    let _ = write(
                        &encode_frame(FrameKind::Error, header.req_id, &Ctrl::Error(msg.clone())),
                        &mut stall,
                    );
                    return Err(format!("refused WRITE of {total} bytes: {msg}"));
                }
                drain(stream, total, &mut stall)?;
                write(
                    &encode_frame(FrameKind::Error, header.req_id, &Ctrl::Error(msg)),
                    &mut stall,
                )
            }
            Ok(local) => {
                let received = conn::slices(&local)
                    .and_then(|s| Ok(pdx_sys::read_exact_into(fd, &s, &mut stall)?));
                drop(local); // as for READ: before the ack and the notification
                match received {
                    Ok(()) => {
                        let acked = write(
                            &encode_frame(FrameKind::WriteAck, header.req_id, &Ctrl::Empty),
                            &mut stall,
                        );
                        if let Some(payload) = notif {
                            ctx.deliver(Notification {
                                from: peer.clone(),
                                payload,
                            });
                        }
                        acked
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
        },
        (kind, _) => Err(format!("unexpected {kind:?} frame")),
    }
}

/// Reads and discards `total` bytes through a fixed buffer.
fn drain(
    stream: &TcpStream,
    mut total: u64,
    stall: &mut dyn FnMut(bool) -> bool,
) -> std::result::Result<(), String> {
    let mut sink = [0u8; DRAIN_CHUNK];
    while total > 0 {
        let n = total.min(DRAIN_CHUNK as u64) as usize;
        conn::read_full(stream, &mut sink[..n], stall).map_err(|e| e.to_string())?;
        total -= n as u64;
    }
    Ok(())
}
