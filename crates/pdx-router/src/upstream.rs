//! Upstream HTTP/1.1 client on monoio's native io_uring operations ([`crate::sock`]), with a keep-alive
//! pool per thread.
//!
//! A request owns its connection: [`send`] writes the request and parses the response head
//! ([`crate::h1`]); the response body ([`UpBody`]) reads and decodes from the socket itself when
//! polled (one read operation in flight at a time, into the connection's own buffer), handing out
//! slices of the connection's read buffer (no copy, no allocation per chunk). There is no driver task
//! and no channel per connection, so an in-flight stream costs the socket, one read buffer, the read loop
//! and this struct. When the body ends cleanly the connection goes back to the pool with a read in flight
//! into a [`FIRST_READ_BUF`] buffer (the next response's first read; a reused one, [`crate::sock::Recycler`]:
//! the buffer an earlier response came in, once its head and frames are gone); when the body is dropped early
//! (client disconnect, error) the read is cancelled and the socket closes with it, so the engine sees the
//! disconnect and aborts the request (vLLM and the mock free its KV then).
//!
//! A pooled connection is only reused while it is known good: one idle for [`MAX_IDLE`] or longer is
//! closed, and one the server has closed meanwhile (its pending read ended: EOF, an error, or bytes nobody
//! asked for) is dropped when it is taken from the pool, without a request on it (no system call: the
//! read's completion tells). A worker that restarts
//! on the same address leaves every pooled connection to its old process half closed (CLOSE-WAIT); they
//! are all skipped, and a failed connect flushes the address's pool. [`send`] tells a request that never
//! fully left ([`SendError::NotSent`]) and one a reused connection dropped before answering
//! ([`SendError::Closed`]): both are safe to send again, on a new connection ([`connect`]).

use crate::h1::{self, DecodeError, Framing, Step};
use crate::sock::{self, Reader};
use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use hyper::Response;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use std::cell::RefCell;
use std::collections::HashMap;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Read buffer of an upstream connection once a response is past its first read, bytes.
/// Forwarded body frames are slices of this buffer. A read asks for at most its free room.
pub const READ_BUF: usize = 4096;
/// The first read of a response gets a buffer of this size, bytes: a response head of an
/// inference engine and a non-streamed answer or a stream's first events fit, so a stream that
/// stalls early (or a short answer) holds 1 KiB, not [`READ_BUF`].
pub const FIRST_READ_BUF: usize = 1024;
/// Room below which the buffer is refilled before a read, bytes (or an eighth of the room a refill gives, when
/// that is more). A stream that stalls after its first events keeps reading into what is left of its
/// [`FIRST_READ_BUF`] buffer.
const MIN_READ_ROOM: usize = 512;
/// Largest room a refill gives, bytes. A response's refills give [`READ_BUF`] at first; each read that fills all
/// the room it was given doubles it, up to this, for the rest of the response: a stream whose engine writes
/// faster than the router reads it is read in fewer, larger reads (and written to its client in as many
/// writes), while a stream at an engine's usual pace (a token event every few milliseconds) never fills its room
/// and keeps [`READ_BUF`].
pub const MAX_READ_BUF: usize = 16 * 1024;

/// A keep-alive upstream connection.
#[derive(Debug)]
pub struct Conn {
    rd: Reader,
    wr: OwnedWriteHalf<TcpStream>,
    /// Bytes read and not yet decoded; empty while a read is in flight (the buffer is the operation's).
    buf: BytesMut,
    /// `host:port` (pool key).
    pub authority: Rc<str>,
    /// Taken from the pool (it may have been closed by the server meanwhile).
    pub reused: bool,
    /// When it went back to the pool.
    idle_since: Instant,
    /// The first-read buffers in use here (the one read into, the one the last response came in), given back
    /// to [`FIRST_BUFS`] once nothing shares them.
    kept: sock::Kept,
    /// The next read is a response's first (the connection is new, or back in the pool): it gets a
    /// [`FIRST_READ_BUF`] buffer. Told by this flag, not by an empty buffer: a read that filled all its room
    /// leaves the buffer empty too, once its frames are split off.
    first_read: bool,
    /// The room the next refill gives, bytes ([`READ_BUF`] ..= [`MAX_READ_BUF`]; see [`MAX_READ_BUF`]).
    read_room: usize,
    /// The free room the read in flight was started with, bytes.
    asked: usize,
}

thread_local! {
    /// Idle connections per authority, oldest first. A list taken empty stays (its allocation is reused by the
    /// next [`put`]) until [`prune`] drops it.
    static POOL: RefCell<HashMap<Rc<str>, Vec<Conn>>> = RefCell::new(HashMap::new());
    /// Responses' first-read buffers ([`FIRST_READ_BUF`] bytes), reused once the response read into one is gone
    /// (its head and frames dropped).
    static FIRST_BUFS: sock::Recycler = const { sock::Recycler::new(FIRST_READ_BUF) };
}

/// Idle connections kept per upstream per thread (an idle connection holds its socket and its pending read:
/// a [`FIRST_READ_BUF`] buffer and the read's state, about 1.3 KiB).
const MAX_IDLE_PER_HOST: usize = 256;

/// An idle connection is reused for at most this long, then closed. Below the keep-alive timeout of
/// uvicorn (5 s by default), the HTTP server of vLLM and SGLang: the router never writes a request on a
/// connection the engine is closing at that moment.
pub const MAX_IDLE: Duration = Duration::from_secs(4);

/// Why getting a connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    /// Connect failed.
    Failed,
    /// Took longer than the timeout.
    Timeout,
}

/// A pooled connection to `authority` that is still good, or a new one (connect within `timeout`).
///
/// Errors: as [`connect`].
pub async fn get(authority: &str, timeout: Duration) -> Result<Conn, ConnectError> {
    if let Some(c) = take_pooled(authority) {
        return Ok(c);
    }
    connect(authority, timeout).await
}

/// The most recently pooled connection to `authority` that is still good. Connections idle for
/// [`MAX_IDLE`] or more, or closed by the server, are dropped on the way.
fn take_pooled(authority: &str) -> Option<Conn> {
    let now = Instant::now();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let list = p.get_mut(authority)?;
        drop_expired(list, now);
        let mut found = None;
        while let Some(mut c) = list.pop() {
            if !c.peer_closed() {
                c.reused = true;
                found = Some(c);
                break;
            }
        }
        found
    })
}

/// Drops the connections of `list` (oldest first) idle for [`MAX_IDLE`] or more.
fn drop_expired(list: &mut Vec<Conn>, now: Instant) {
    let n = list
        .iter()
        .take_while(|c| now.saturating_duration_since(c.idle_since) >= MAX_IDLE)
        .count();
    list.drain(..n);
}

/// Closes this thread's idle connections that are too old or that their server closed (called about once
/// a second by each server thread, so sockets of a worker that went away do not sit in CLOSE-WAIT).
pub fn prune() {
    let now = Instant::now();
    POOL.with(|p| {
        p.borrow_mut().retain(|_, list| {
            drop_expired(list, now);
            list.retain_mut(|c| !c.peer_closed());
            // An idle connection holds on to its last response's buffer no longer than this.
            let _ = FIRST_BUFS.try_with(|r| list.iter_mut().for_each(|c| c.kept.recycle(r)));
            !list.is_empty()
        });
    });
}

/// Drops every idle connection to `authority` on this thread (its worker refused a connect: the pooled
/// ones belong to a process that is gone).
pub fn flush(authority: &str) {
    POOL.with(|p| p.borrow_mut().remove(authority));
}

/// Idle connections to `authority` on this thread (tests).
pub fn idle_count(authority: &str) -> usize {
    POOL.with(|p| p.borrow().get(authority).map_or(0, Vec::len))
}

/// A new connection to `authority` (connect within `timeout`), never a pooled one. A failed connect
/// flushes the authority's pool on this thread.
///
/// Errors: [`ConnectError::Failed`] (refused, unreachable, bad address), [`ConnectError::Timeout`].
pub async fn connect(authority: &str, timeout: Duration) -> Result<Conn, ConnectError> {
    let fut = async {
        let s = monoio::net::TcpStream::connect(authority)
            .await
            .map_err(|_| ConnectError::Failed)?;
        let _ = s.set_nodelay(true);
        let (rh, wr) = s.into_split();
        Ok(Conn {
            rd: Reader::new(rh),
            wr,
            buf: BytesMut::new(),
            authority: Rc::from(authority),
            reused: false,
            idle_since: Instant::now(),
            kept: sock::Kept::default(),
            first_read: true,
            read_room: READ_BUF,
            asked: 0,
        })
    };
    let r = match monoio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout),
    };
    if r.is_err() {
        flush(authority);
    }
    r
}

/// Returns a connection whose last response was read to the end. It waits in the pool with a read in flight
/// (a [`FIRST_READ_BUF`] buffer): its completion tells that the server closed the connection, and once a
/// request is written it is the read of the response.
pub fn put(mut c: Conn) {
    if !c.buf.is_empty() || c.rd.in_flight() {
        return; // bytes beyond the response: not a clean keep-alive connection
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let list = p.entry(c.authority.clone()).or_default();
        if list.len() < MAX_IDLE_PER_HOST {
            // The last response's buffer is still shared by its frames: a new one for the next response.
            c.buf = BytesMut::new();
            c.first_read = true;
            c.start_read();
            c.idle_since = Instant::now();
            list.push(c);
        }
    });
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum SendError {
    /// Writing the request failed: it never fully left, so no server acted on it (safe to send again, on
    /// a new connection).
    NotSent,
    /// The connection closed before any response byte (on a pooled connection: most likely closed by the
    /// server while idle, so safe to retry on a new one; after [`Abandon`]: the server aborted the request).
    Closed,
    /// I/O error after response bytes arrived.
    Io(std::io::Error),
    /// The response is malformed.
    Decode(DecodeError),
}

/// A request the caller no longer wants, signalled while [`send_abandonable`] waits for its answer.
///
/// HTTP/1.1 has no way to cancel one request but closing; a close in the instant the server finishes
/// would lose its answer, and with a prefill's answer the KV blocks it holds for a decode (vLLM keeps them
/// until `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`). So an abandoned request half-closes its connection instead
/// (FIN: the server sees the client go and aborts a request still running) and keeps reading for
/// [`ABANDON_GRACE`]: an answer already on its way still arrives and is returned, and the caller can undo it.
#[derive(Default)]
pub struct Abandon {
    fired: std::cell::Cell<bool>,
    waker: RefCell<Option<std::task::Waker>>,
}

impl std::fmt::Debug for Abandon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Abandon")
            .field("fired", &self.fired.get())
            .finish()
    }
}

/// How long an abandoned request waits for an answer already on its way (see [`Abandon`]).
pub const ABANDON_GRACE: Duration = Duration::from_secs(2);

impl Abandon {
    /// Signals the request's owner.
    pub fn fire(&self) {
        self.fired.set(true);
        let w = self.waker.borrow_mut().take();
        if let Some(w) = w {
            w.wake();
        }
    }
    /// True once fired.
    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }
    fn poll_fired(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.fired.get() {
            return Poll::Ready(());
        }
        let mut w = self.waker.borrow_mut();
        match w.as_ref() {
            Some(old) if old.will_wake(cx.waker()) => {}
            _ => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Conn {
    /// True when the server closed the connection (EOF or an error), or sent bytes nobody asked for, while
    /// it was idle: its pending read has finished. Either way it is not a clean idle keep-alive connection.
    /// No system call: it looks at the read's completion.
    fn peer_closed(&mut self) -> bool {
        !self.rd.in_flight() || self.rd.is_done()
    }

    async fn shutdown_write(&mut self) {
        let _ = self.wr.shutdown().await;
    }

    /// Starts a read into the buffer's free room (made first: a [`FIRST_READ_BUF`] buffer from [`FIRST_BUFS`]
    /// for a response's first read; `read_room` more when less than an eighth of it, or [`MIN_READ_ROOM`], is
    /// left).
    fn start_read(&mut self) {
        if std::mem::take(&mut self.first_read) {
            debug_assert!(
                self.buf.is_empty(),
                "a response's first read starts on an empty buffer"
            );
            // (A plain buffer while the thread's locals are being torn down.)
            self.buf = FIRST_BUFS
                .try_with(|r| self.kept.take(r))
                .unwrap_or_else(|_| BytesMut::with_capacity(FIRST_READ_BUF));
            self.read_room = READ_BUF;
        } else if self.buf.capacity() - self.buf.len() < MIN_READ_ROOM.max(self.read_room / 8) {
            // A long answer (a stream): its buffers are not kept. A new buffer of exactly the room (with the bytes
            // of an event not yet complete), not `reserve`: that may reclaim the old allocation at up to twice
            // its size. The old one is freed once the frames split off it are written.
            let _ = FIRST_BUFS.try_with(|r| self.kept.release(r));
            let mut fresh = BytesMut::with_capacity(self.buf.len() + self.read_room);
            fresh.extend_from_slice(&self.buf);
            self.buf = fresh;
        }
        self.asked = self.buf.capacity() - self.buf.len();
        self.rd.start(std::mem::take(&mut self.buf));
    }

    /// Waits for the read in flight, started now when none is: bytes read (0 at EOF). A read that filled all
    /// its room doubles the room of the response's next refills (see [`MAX_READ_BUF`]).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if !self.rd.in_flight() {
            self.start_read();
        }
        let (r, buf) = std::task::ready!(self.rd.poll_done(cx));
        self.buf = buf;
        if matches!(r, Ok(n) if n > 0 && n == self.asked) {
            self.read_room = (self.read_room * 2).min(MAX_READ_BUF);
        }
        Poll::Ready(r)
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }
}

/// Sends one request on `conn` and reads the response head. `headers` are `(name, value)`
/// pairs written as given; `Content-Length` is added for a body. The response body reads from
/// the connection; a clean end returns it to the pool.
pub async fn send(
    conn: Conn,
    method: &str,
    path: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> Result<Response<UpBody>, SendError> {
    send_abandonable(conn, method, path, headers, body, None).await
}

/// [`send`], watching `abandon` while it waits for the response head (see [`Abandon`]): once it fires, the
/// connection is half closed and the head is awaited for at most [`ABANDON_GRACE`] more
/// ([`SendError::Closed`] when the server closes or nothing comes).
pub async fn send_abandonable(
    mut conn: Conn,
    method: &str,
    path: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
    abandon: Option<&Abandon>,
) -> Result<Response<UpBody>, SendError> {
    let with_length = !body.is_empty() || method == "POST";
    let len = method.len()
        + path.len()
        + 13
        + headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>()
        + if with_length { 38 } else { 0 }
        + 2
        + body.len();
    // Sized once (no growth), and reused: a request's buffer comes back when the write is done.
    let mut req = sock::write_buf(len);
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(path.as_bytes());
    req.extend_from_slice(b" HTTP/1.1\r\n");
    for (k, v) in headers {
        req.extend_from_slice(k.as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(v);
        req.extend_from_slice(b"\r\n");
    }
    if with_length {
        req.extend_from_slice(b"content-length: ");
        req.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    debug_assert!(req.len() <= len, "request sized up front");
    let (written, req) = conn.wr.write_all(req).await;
    sock::give_back_write_buf(req);
    if written.is_err() {
        return Err(SendError::NotSent);
    }
    let head_request = method == "HEAD";
    let mut got_bytes = false;
    let mut grace_until: Option<monoio::time::Instant> = None;
    let head = loop {
        // A pooled connection's read is in flight already: it reads this response.
        if !conn.rd.in_flight() {
            match h1::parse_head(&mut conn.buf, head_request) {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(e) => return Err(SendError::Decode(e)),
            }
        }
        let filled = match (abandon, grace_until) {
            (Some(a), None) => {
                let ev = std::future::poll_fn(|cx| {
                    if a.poll_fired(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    conn.poll_fill(cx).map(Some)
                })
                .await;
                match ev {
                    Some(r) => r,
                    None => {
                        // Abandoned: FIN to the server, then keep reading for an answer on its way.
                        conn.shutdown_write().await;
                        grace_until = Some(monoio::time::Instant::now() + ABANDON_GRACE);
                        continue;
                    }
                }
            }
            (_, Some(until)) => match monoio::time::timeout_at(until, conn.fill()).await {
                Ok(r) => r,
                Err(_) => return Err(SendError::Closed),
            },
            (None, None) => conn.fill().await,
        };
        match filled {
            Ok(0) if !got_bytes => return Err(SendError::Closed),
            Ok(0) => return Err(SendError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => got_bytes = true,
            Err(_) if !got_bytes => return Err(SendError::Closed),
            Err(e) => return Err(SendError::Io(e)),
        }
    };
    let mut resp = Response::new(UpBody {
        conn: Some(conn),
        framing: head.framing,
        keep_alive: head.keep_alive,
        eof: false,
    });
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers;
    Ok(resp)
}

/// An upstream response body, read and decoded from its connection as it is polled.
#[derive(Debug)]
pub struct UpBody {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    eof: bool,
}

impl UpBody {
    fn finish(&mut self) {
        if let Some(c) = self.conn.take() {
            if self.keep_alive && !self.eof {
                put(c);
            }
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(c) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // While a read is in flight the buffer is the operation's: wait for it first.
            if !c.rd.in_flight() {
                match this.framing.step(&mut c.buf, this.eof) {
                    Ok(Step::Data(b)) => {
                        if this.framing.is_done() {
                            // Pool the connection now: a reader that trusts `is_end_stream` (hyper
                            // does, for a known length) never polls for the end.
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(b))));
                    }
                    Ok(Step::Done) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Step::More) => {}
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            e,
                        ))));
                    }
                }
                if this.eof {
                    this.conn = None;
                    return Poll::Ready(Some(Err(std::io::ErrorKind::UnexpectedEof.into())));
                }
            }
            match c.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => this.eof = true,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.framing.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// `GET /health` on `authority`, on a new connection (closed after: a check must reach the worker as a
/// request would, not ride a connection to a process that is gone): true for a 2xx within `timeout`.
pub async fn health(authority: &str, timeout: Duration) -> bool {
    let fut = async {
        let Ok(c) = connect(authority, timeout).await else {
            return false;
        };
        let headers: [(&str, &[u8]); 2] =
            [("host", authority.as_bytes()), ("connection", b"close")];
        let Ok(r) = send(c, "GET", "/health", &headers, &[]).await else {
            return false;
        };
        let ok = r.status().is_success();
        ok && http_body_util::BodyExt::collect(r.into_body())
            .await
            .is_ok()
    };
    monoio::time::timeout(timeout, fut).await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Reads one request head from `s`; false when the client closed or failed first.
    fn read_head(s: &mut std::net::TcpStream) -> bool {
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        true
    }

    /// Serves `answers` requests on each accepted connection, then closes it; returns the listener port.
    fn server(answers_per_conn: usize, conns: usize) -> (u16, std::thread::JoinHandle<usize>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let mut accepted = 0;
            for _ in 0..conns {
                let Ok((mut s, _)) = l.accept() else { break };
                accepted += 1;
                for _ in 0..answers_per_conn {
                    if !read_head(&mut s) {
                        return accepted;
                    }
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                }
                // Dropped: the server closes the connection (a restart does this to every idle one).
            }
            accepted
        });
        (port, t)
    }

    async fn exchange(authority: &str) -> bool {
        let c = get(authority, Duration::from_secs(2)).await.unwrap();
        let reused = c.reused;
        let r = send(c, "GET", "/", &[("host", authority.as_bytes())], &[])
            .await
            .unwrap();
        http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap();
        reused
    }

    fn rt() -> crate::Runtime {
        crate::runtime().expect("runtime")
    }

    /// A server for one request: answers with a head of `content-length: total` and then `pieces`, each written
    /// `pause` after the one before (the head with the first), says so on the channel once all are written, and
    /// keeps the connection open until the client closes it.
    fn paced_server(
        total: usize,
        pieces: Vec<Vec<u8>>,
        pause: Duration,
    ) -> (
        u16,
        std::thread::JoinHandle<()>,
        std::sync::mpsc::Receiver<()>,
    ) {
        let (written, all_written) = std::sync::mpsc::channel();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_nodelay(true).unwrap();
            assert!(read_head(&mut s), "request head");
            let mut out =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\n\r\n").into_bytes();
            for p in pieces {
                std::thread::sleep(pause);
                // The head goes out with the first piece.
                out.extend_from_slice(&p);
                s.write_all(&out).unwrap();
                out.clear();
            }
            let _ = written.send(());
            let _ = s.read(&mut [0u8; 1]);
        });
        (port, t, all_written)
    }

    /// Sends a request to the server on `port`, waits for `all_written` when given (the whole answer is then in the
    /// socket), then reads the answer's body: the sizes of its frames (one per read once the head is parsed), the
    /// room of the read each came from, and the room the connection's refills had grown to at the end.
    async fn frame_sizes(
        port: u16,
        all_written: Option<std::sync::mpsc::Receiver<()>>,
    ) -> (Vec<usize>, Vec<usize>, usize) {
        let auth = format!("127.0.0.1:{port}");
        let c = get(&auth, Duration::from_secs(2)).await.unwrap();
        let r = send(c, "GET", "/", &[("host", auth.as_bytes())], &[])
            .await
            .unwrap();
        if let Some(w) = all_written {
            // (Blocks the test's runtime thread: nothing else runs on it.)
            w.recv().expect("the server writes the answer");
        }
        let mut body = r.into_body();
        let (mut sizes, mut asked) = (Vec::new(), Vec::new());
        let mut room = 0;
        loop {
            if let Some(c) = &body.conn {
                room = c.read_room;
            }
            match http_body_util::BodyExt::frame(&mut body).await {
                Some(f) => {
                    sizes.push(f.unwrap().into_data().unwrap().len());
                    asked.push(body.conn.as_ref().map_or(0, |c| c.asked));
                }
                None => break,
            }
        }
        POOL.with(|p| p.borrow_mut().clear());
        (sizes, asked, room)
    }

    #[test]
    fn a_fast_answer_is_read_in_growing_pieces_after_its_first_read() {
        // A 64 KiB answer, all of it waiting in the socket: the first read gets a FIRST_READ_BUF buffer, later ones
        // READ_BUF of room, doubled after each read that fills it, up to MAX_READ_BUF. Also after a read that
        // filled its buffer exactly: that leaves the buffer empty, which once passed for a new response's first
        // read, so a stream was read 1 KiB at a time.
        const BODY: usize = 64 * 1024;
        let (port, t, written) = paced_server(BODY, vec![vec![b'x'; BODY]], Duration::ZERO);
        let (sizes, _, room) = rt().block_on(frame_sizes(port, Some(written)));
        t.join().unwrap();
        assert_eq!(sizes.iter().sum::<usize>(), BODY);
        assert!(
            sizes[0] < FIRST_READ_BUF,
            "the rest of the first read: {sizes:?}"
        );
        assert!(sizes[1..].iter().all(|&n| n <= MAX_READ_BUF), "{sizes:?}");
        assert!(
            sizes.contains(&MAX_READ_BUF),
            "reads that fill their room grow: {sizes:?}"
        );
        assert!(
            sizes.len() <= BODY / READ_BUF + 2,
            "never 1 KiB reads again: {sizes:?}"
        );
        assert_eq!(room, MAX_READ_BUF);
    }

    #[test]
    fn a_slow_answer_keeps_read_buf_of_room() {
        // An answer in 100-byte pieces 5 ms apart (an engine's tokens): no read fills its room, so the refills stay at
        // READ_BUF; the first reads after the first go on into what is left of its 1 KiB buffer (a stream that stalls
        // early holds no more).
        let pieces = vec![vec![b'y'; 100]; 20];
        let (port, t, _) = paced_server(2000, pieces, Duration::from_millis(5));
        let (sizes, asked, room) = rt().block_on(frame_sizes(port, None));
        t.join().unwrap();
        assert_eq!(sizes.iter().sum::<usize>(), 2000);
        // The pieces came in more than one read (how many depends on scheduling: not asserted).
        assert!(sizes.len() >= 2, "{sizes:?}");
        assert!(asked[1] < FIRST_READ_BUF, "{asked:?}");
        assert_eq!(room, READ_BUF, "{sizes:?}");
    }

    #[test]
    fn a_connection_the_server_closed_is_never_reused() {
        rt().block_on(async {
            // One answer per connection, then the server closes it.
            let (port, t) = server(1, 2);
            let auth = format!("127.0.0.1:{port}");
            assert!(!exchange(&auth).await);
            assert_eq!(idle_count(&auth), 1, "a clean keep-alive answer is pooled");
            // Let the FIN arrive and the runtime see it.
            monoio::time::sleep(Duration::from_millis(100)).await;
            assert!(
                !exchange(&auth).await,
                "the closed connection was taken from the pool"
            );
            POOL.with(|p| p.borrow_mut().clear());
            assert_eq!(t.join().unwrap(), 2);

            // A server that keeps its connections: the pooled one is reused.
            let (port, t) = server(2, 1);
            let auth = format!("127.0.0.1:{port}");
            assert!(!exchange(&auth).await);
            monoio::time::sleep(Duration::from_millis(50)).await;
            assert!(exchange(&auth).await, "a live pooled connection is reused");
            POOL.with(|p| p.borrow_mut().clear());
            assert_eq!(t.join().unwrap(), 1);
        });
    }

    #[test]
    fn a_failed_connect_flushes_the_pool_and_prune_drops_closed_ones() {
        rt().block_on(async {
            let (port, t) = server(1, 1);
            let auth = format!("127.0.0.1:{port}");
            assert!(!exchange(&auth).await);
            assert_eq!(idle_count(&auth), 1);
            monoio::time::sleep(Duration::from_millis(100)).await;
            prune();
            assert_eq!(
                idle_count(&auth),
                0,
                "prune drops connections the server closed"
            );
            assert_eq!(t.join().unwrap(), 1);

            // A pooled connection to an address that then refuses connects is flushed by the failure.
            let (port, t) = server(2, 1);
            let auth = format!("127.0.0.1:{port}");
            assert!(!exchange(&auth).await);
            assert_eq!(idle_count(&auth), 1);
            let dead = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            };
            let dead = format!("127.0.0.1:{dead}");
            // Fake a pooled entry under the dead address by moving the live one there.
            POOL.with(|p| {
                let mut p = p.borrow_mut();
                let c = p.remove(auth.as_str()).unwrap();
                p.insert(Rc::from(dead.as_str()), c);
            });
            assert_eq!(idle_count(&dead), 1);
            assert_eq!(
                connect(&dead, Duration::from_secs(2)).await.unwrap_err(),
                ConnectError::Failed
            );
            assert_eq!(idle_count(&dead), 0, "the failed connect flushed the pool");
            drop(t);
        });
    }

    #[test]
    fn responses_are_read_into_reused_buffers() {
        rt().block_on(async {
            let (port, t) = server(4, 1);
            let auth = format!("127.0.0.1:{port}");
            // Each answer's body is a slice of the buffer it was read into; where it lies tells the buffer.
            let mut at = Vec::new();
            for _ in 0..4 {
                let c = get(&auth, Duration::from_secs(2)).await.unwrap();
                let r = send(c, "GET", "/", &[("host", auth.as_bytes())], &[])
                    .await
                    .unwrap();
                assert_eq!(r.headers()["content-length"], "2");
                let body = http_body_util::BodyExt::collect(r.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                assert_eq!(&body[..], b"ok");
                at.push(body.as_ptr() as usize);
            }
            // The first two answers need two buffers (the second is read while the first's frames are still
            // held); after that the connection alternates between them, allocating none.
            assert_ne!(at[0], at[1]);
            assert_eq!((at[2], at[3]), (at[0], at[1]));
            POOL.with(|p| p.borrow_mut().clear());
            assert_eq!(t.join().unwrap(), 1);
        });
    }

    #[test]
    fn abandon_half_closes_and_still_reads_an_answer_on_its_way() {
        rt().block_on(async {
            // The server answers only once it sees the client's FIN (a prefill finishing as the client
            // goes away): the answer must still be read.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            let t = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                let mut buf = [0u8; 4096];
                let mut saw_eof = false;
                let mut got = Vec::new();
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => {
                            saw_eof = true;
                            break;
                        }
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(_) => break,
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nkept");
                saw_eof
            });
            let auth = format!("127.0.0.1:{port}");
            let c = connect(&auth, Duration::from_secs(2)).await.unwrap();
            let abandon = Rc::new(Abandon::default());
            let a2 = abandon.clone();
            monoio::spawn(async move {
                monoio::time::sleep(Duration::from_millis(50)).await;
                a2.fire();
            });
            let r = send_abandonable(c, "POST", "/", &[("host", b"x")], b"{}", Some(&abandon))
                .await
                .expect("the answer sent after the FIN arrives");
            let body = http_body_util::BodyExt::collect(r.into_body())
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(&body[..], b"kept");
            assert!(t.join().unwrap(), "the server saw the half close");
        });
    }
}
