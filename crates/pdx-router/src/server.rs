//! HTTP/1.1 server connections on monoio's native io_uring operations ([`crate::sock`]).
//!
//! One task per client connection: read a request (head with `httparse`, body by
//! `Content-Length` or chunked), run [`crate::api::handle`], write the response, repeat
//! (keep-alive). While the request is routed and while its body streams, a read is in flight on the
//! client socket: when it ends with EOF or an error, the client is gone, and the request future or the
//! response body is dropped at once, and with it the upstream connection, so the engine aborts the
//! request. When the answer is done, that read is already the read of the next request.
//!
//! Memory: between requests and while a response streams, the connection holds only the small buffer of
//! that read ([`WATCH_READ`] bytes; the request's own buffer is released once the request is taken out of
//! it); response body frames are written as they are (`writev` of chunk-size line, the frame's own `Bytes`,
//! CRLF, from a per-thread [`pdx_uring_sys::WriteBatch`]), up to [`BATCH`] frames per operation, with no copy
//! and no allocation per frame.
//!
//! Allocations per request: the request's head is split off its read buffer once and its target and header
//! values are slices of it ([`parse_head`]); the watch read's buffer is a reused one ([`sock::Recycler`]: the
//! buffer the previous request came in, once that request is gone), so a keep-alive connection reads request
//! after request without a new buffer.

use crate::api::{self, Shared};
use crate::body::RouterBody;
use crate::h1::{self, Chunk, Framing, Step};
use crate::shutdown;
use crate::sock::{self, Reader};
use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::{Body, Frame};
use hyper::header::{HeaderValue, CONTENT_LENGTH};
use hyper::{Request, Response};
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use pdx_uring_sys::WriteBatch;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

/// Largest request head accepted, bytes (431 above).
const MAX_HEAD: usize = 64 * 1024;
/// Headers parsed per request head at most (431 above).
const MAX_HEADERS: usize = 64;
/// Response body frames written per `writev` at most. A stream read at full speed brings up to
/// [`crate::upstream::MAX_READ_BUF`] bytes per read, about 90 token events: 64 per write keeps it to one or two
/// writes per read (16 made it four to six: 1.70 M forwarded chunks per router CPU-second against 1.51–1.53 M,
/// docs/benchmarks.md). A batch's arrays (about 10 KiB) are the thread's, held only while a write is in flight.
pub const BATCH: usize = 64;
/// A read of a request head or body asks for at least this much room, bytes.
const FIRST_READ: usize = 2048;
/// The read in flight while a request is routed or its answer streams (and then the first read of the next
/// request) gets a buffer of this size, bytes: a usual completion request fits, and an in-flight stream holds
/// no more than this on its client side.
pub const WATCH_READ: usize = 512;

thread_local! {
    /// The watch reads' buffers ([`WATCH_READ`] bytes), reused once the request that came in one is gone.
    static WATCH_BUFS: sock::Recycler = const { sock::Recycler::new(WATCH_READ) };
    /// The header names of the request heads parsed on this thread, by position ([`h1::cached_name`]).
    static REQUEST_NAMES: std::cell::RefCell<Vec<h1::CachedName>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct Conn {
    rd: Reader,
    wr: OwnedWriteHalf<TcpStream>,
    /// Bytes read and not yet consumed. While a read started by [`Conn::fill`] is in flight this is empty
    /// (the buffer is the operation's); a watch read fills a buffer of its own, appended here when done.
    buf: BytesMut,
    /// The watch buffers in use here (the one read into, the one the request came in), given back to
    /// [`WATCH_BUFS`] once nothing shares them.
    kept: sock::Kept,
}

enum Watch<T> {
    Done(T),
    Gone,
}

impl Conn {
    /// Takes a finished read's bytes in: its buffer becomes the connection's, or is appended to what is
    /// buffered (a request that spans a watch read and the reads after it).
    fn take_read(&mut self, got: BytesMut) {
        if self.buf.is_empty() {
            self.buf = got;
        } else {
            self.buf.extend_from_slice(&got);
        }
    }

    /// Starts the watch read (while a request is routed or its answer streams): into the connection's
    /// buffer when it is empty (its allocation is dropped for a small one), else into a buffer of its own, so
    /// bytes already buffered (a pipelined request) stay readable.
    fn start_watch(&mut self) {
        let b = if self.buf.is_empty() && self.buf.capacity() >= WATCH_READ {
            std::mem::take(&mut self.buf)
        } else {
            // (A plain buffer while the thread's locals are being torn down.)
            WATCH_BUFS
                .try_with(|r| self.kept.take(r))
                .unwrap_or_else(|_| BytesMut::with_capacity(WATCH_READ))
        };
        self.rd.start(b);
    }

    /// Gives the watch buffers nothing shares any more back for reuse (the request is done with its buffer).
    fn recycle(&mut self) {
        let _ = WATCH_BUFS.try_with(|r| self.kept.recycle(r));
    }

    /// Reads more: waits for the read in flight, or starts one with at least `want` bytes of room (within
    /// reason). `in_place`: into the free room of the buffer (a body: a timeout ends the connection), else
    /// into a buffer of its own when bytes are buffered, so they stay readable while the read is in flight (a
    /// head: its wait is cut in slices for drain checks). Ok(0) at EOF.
    async fn fill(&mut self, want: usize, in_place: bool) -> std::io::Result<usize> {
        if !self.rd.in_flight() {
            let b = if in_place || self.buf.is_empty() {
                if self.buf.capacity() - self.buf.len() < want.clamp(1, 512) {
                    self.buf.reserve(want.max(1));
                }
                std::mem::take(&mut self.buf)
            } else {
                BytesMut::with_capacity(want.max(1))
            };
            self.rd.start(b);
        }
        let (r, got) = self.rd.done().await;
        self.take_read(got);
        r
    }

    /// Polls `fut`; while it is pending, a read is in flight on the client socket: EOF or an error means
    /// the client is gone (`fut` is dropped by the caller). Bytes the client sends meanwhile (a pipelined
    /// request) are kept in the buffer. The read stays in flight when `fut` is done.
    async fn watch<F: Future + Unpin>(&mut self, fut: &mut F) -> Watch<F::Output> {
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = Pin::new(&mut *fut).poll(cx) {
                return Poll::Ready(Watch::Done(v));
            }
            loop {
                if !self.rd.in_flight() {
                    if self.buf.len() > MAX_HEAD {
                        return Poll::Ready(Watch::Gone);
                    }
                    self.start_watch();
                }
                match self.rd.poll_done(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready((Ok(n), got)) if n > 0 => self.take_read(got),
                    Poll::Ready(_) => return Poll::Ready(Watch::Gone),
                }
            }
        })
        .await
    }

    /// Reads more of a request body. A body may take as long as it needs, but not `timeout` without a byte:
    /// then it answers 408. False when the connection must end (closed, failed, or timed out).
    async fn fill_body(&mut self, want: usize, timeout: std::time::Duration) -> bool {
        match monoio::time::timeout(timeout, self.fill(want, true)).await {
            Ok(Ok(n)) => n > 0,
            Ok(Err(_)) => false,
            Err(_elapsed) => {
                let _ = self.write_all(simple(408, "Request Timeout")).await;
                false
            }
        }
    }

    async fn write_all<B: monoio::buf::IoBuf>(&mut self, data: B) -> std::io::Result<()> {
        self.wr.write_all(data).await.0.map(drop)
    }

    /// Writes all of `b` (`writev`, again after a short write); the batch comes back emptied of what went out.
    async fn write_batch(&mut self, mut b: WriteBatch) -> (std::io::Result<()>, WriteBatch) {
        while !b.is_empty() {
            let (r, back) = self.wr.writev(b).await;
            b = back;
            match r {
                Ok(0) => return (Err(std::io::ErrorKind::WriteZero.into()), b),
                Ok(n) => b.advance(n),
                Err(e) => return (Err(e), b),
            }
        }
        (Ok(()), b)
    }
}

/// A parsed request head.
pub(crate) struct ReqHead {
    /// Method, URI, version and headers (no extensions).
    req: hyper::http::request::Parts,
    pub(crate) length: Option<u64>,
    pub(crate) chunked: bool,
    keep_alive: bool,
    expect_continue: bool,
    head_method: bool,
}

pub(crate) enum HeadError {
    Bad,
    TooLarge,
}

/// Parses a request head from the start of `buf`. `Ok(None)`: incomplete, read more. On success the head's bytes
/// are removed from `buf`; after an error the connection ends (the head may be gone from `buf`).
///
/// The head leaves `buf` as one shared slice (`split_to(n).freeze()`); the target and the header values are
/// slices of it, validated in place (`from_maybe_shared`): no copy, no allocation per value. Header names come
/// from [`h1::cached_name`].
pub(crate) fn parse_head(buf: &mut BytesMut) -> Result<Option<ReqHead>, HeadError> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut hs);
    let n = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Bad),
    };
    let method = hyper::Method::from_bytes(r.method.ok_or(HeadError::Bad)?.as_bytes())
        .map_err(|_| HeadError::Bad)?;
    let path = h1::span_in(buf, r.path.ok_or(HeadError::Bad)?.as_bytes());
    let version = r.version;
    let mut spans = [h1::HeaderSpan::default(); MAX_HEADERS];
    let count = r.headers.len();
    for (s, h) in spans.iter_mut().zip(r.headers.iter()) {
        *s = h1::HeaderSpan::of(buf, h);
    }
    let head = buf.split_to(n).freeze();
    // Set in place (not through `http`'s request builder, which moves the whole head at every step); a
    // method, target or header `http` refuses is a 400, as from the builder.
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri =
        hyper::Uri::from_maybe_shared(head.slice(path.0..path.1)).map_err(|_| HeadError::Bad)?;
    parts.headers.reserve(count);
    let mut length = None;
    let mut chunked = false;
    let mut keep_alive = version == Some(1);
    let mut expect_continue = false;
    REQUEST_NAMES.with(|names| {
        let mut names = names.borrow_mut();
        for (i, s) in spans[..count].iter().enumerate() {
            let name =
                h1::cached_name(&mut names, i, &head[s.name()]).map_err(|_| HeadError::Bad)?;
            let raw = &head[s.value()];
            if name == hyper::header::CONTENT_LENGTH {
                length = Some(h1::content_length(raw, length).ok_or(HeadError::Bad)?);
            } else if name == hyper::header::TRANSFER_ENCODING {
                chunked = h1::chunked_last(raw);
                if !chunked {
                    return Err(HeadError::Bad);
                }
            } else if name == hyper::header::CONNECTION {
                for t in raw.split(|&b| b == b',') {
                    let t = t.trim_ascii();
                    if t.eq_ignore_ascii_case(b"close") {
                        keep_alive = false;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive = true;
                    }
                }
            } else if name == hyper::header::EXPECT {
                expect_continue = raw.eq_ignore_ascii_case(b"100-continue");
            }
            let value = HeaderValue::from_maybe_shared(head.slice(s.value()))
                .map_err(|_| HeadError::Bad)?;
            parts.headers.append(name, value);
        }
        Ok(())
    })?;
    if chunked && length.is_some() {
        // Both framings: a request-smuggling vector (RFC 9112 §6.3 lets a server reject it); refuse.
        return Err(HeadError::Bad);
    }
    let head_method = parts.method == hyper::Method::HEAD;
    Ok(Some(ReqHead {
        req: parts,
        length: if chunked { None } else { length },
        chunked,
        keep_alive,
        expect_continue,
        head_method,
    }))
}

fn simple(status: u16, reason: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .into_bytes()
}

/// Serves one client connection until it closes.
pub async fn serve_conn(io: TcpStream, sh: Arc<Shared>) {
    let (rh, wr) = io.into_split();
    let mut c = Conn {
        rd: Reader::new(rh),
        wr,
        buf: BytesMut::new(),
        kept: sock::Kept::default(),
    };
    let max_body = sh.cfg.max_body_bytes as u64;
    let client_timeout = sh.cfg.client_timeout;
    // Whether an answer went out on this connection (a new connection gets one request even while draining).
    let mut served = false;
    loop {
        // Request head.
        let head_deadline = std::time::Instant::now() + client_timeout;
        let head = loop {
            match parse_head(&mut c.buf) {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(HeadError::Bad) => {
                    let _ = c.write_all(simple(400, "Bad Request")).await;
                    return;
                }
                Err(HeadError::TooLarge) => {
                    let _ = c
                        .write_all(simple(431, "Request Header Fields Too Large"))
                        .await;
                    return;
                }
            }
            // A client gets `client_timeout` to send a request head (idle keep-alive connections included),
            // so slow or silent clients cannot hold connections and memory forever. An idle connection
            // waits in slices of IDLE_DRAIN_CHECK, so a graceful shutdown closes it soon.
            let idle = c.buf.is_empty();
            if idle && served && sh.drain.is_draining() {
                return;
            }
            let left = head_deadline.saturating_duration_since(std::time::Instant::now());
            let wait = if idle {
                left.min(shutdown::IDLE_DRAIN_CHECK)
            } else {
                left
            };
            match monoio::time::timeout(wait, c.fill(FIRST_READ, false)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Err(_elapsed) if wait < left => {} // a drain check, not the head timeout
                Err(_elapsed) => {
                    if !c.buf.is_empty() {
                        let _ = c.write_all(simple(408, "Request Timeout")).await;
                    }
                    return;
                }
                Ok(Ok(_)) => {}
            }
        };
        let _active = sh.drain.track();
        let mut keep_alive = head.keep_alive;
        // Request body.
        let body = if let Some(n) = head.length {
            if n > max_body {
                // The router answers 413 from the header; the unread body ends the connection.
                keep_alive = false;
                Bytes::new()
            } else {
                if head.expect_continue
                    && (c.buf.len() as u64) < n
                    && c.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err()
                {
                    return;
                }
                while (c.buf.len() as u64) < n {
                    let want = n as usize - c.buf.len();
                    if !c.fill_body(want, client_timeout).await {
                        return;
                    }
                }
                c.buf.split_to(n as usize).freeze()
            }
        } else if head.chunked {
            if head.expect_continue && c.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err()
            {
                return;
            }
            let mut f = Framing::Chunked(Chunk::Size);
            let mut out = BytesMut::new();
            loop {
                match f.step(&mut c.buf, false) {
                    Ok(Step::Data(d)) => {
                        if (out.len() + d.len()) as u64 > max_body {
                            let _ = c.write_all(simple(413, "Payload Too Large")).await;
                            return;
                        }
                        out.extend_from_slice(&d);
                    }
                    Ok(Step::Done) => break,
                    Ok(Step::More) => {
                        if !c.fill_body(FIRST_READ, client_timeout).await {
                            return;
                        }
                    }
                    Err(_) => {
                        let _ = c.write_all(simple(400, "Bad Request")).await;
                        return;
                    }
                }
            }
            out.freeze()
        } else {
            Bytes::new()
        };
        if c.buf.is_empty() {
            // Nothing pipelined: hold no buffer while the request is routed and answered.
            c.buf = BytesMut::new();
        }
        let req = Request::from_parts(head.req, Full::new(body));
        // Route; the boxed future lives only while the request is routed (its box then serves another).
        let mut fut = route_box(api::handle(sh.clone(), req));
        let routed = {
            let mut routing = std::future::poll_fn(|cx| {
                fut.as_mut()
                    .as_pin_mut()
                    .expect("route_box holds the future until it is given back")
                    .poll(cx)
            });
            c.watch(&mut routing).await
        };
        let resp = match routed {
            Watch::Done(Ok(r)) => r,
            Watch::Done(Err(never)) => match never {},
            Watch::Gone => return,
        };
        give_back_route_box(fut);
        // The request is gone (unless its answer holds on to it): its buffer can serve the next watch read.
        c.recycle();
        // While draining, this answer is the connection's last.
        let keep_alive = keep_alive && !sh.drain.is_draining();
        match write_response(&mut c, resp, keep_alive, head.head_method).await {
            Ok(true) if keep_alive => served = true,
            _ => return,
        }
        c.recycle();
    }
}

/// Boxes of routing futures kept per thread for reuse.
const ROUTE_BOXES_KEPT: usize = 16;

thread_local! {
    /// Boxes of routing futures not in use: a `Vec<Pin<Box<Option<F>>>>` for `F` the future of
    /// [`api::handle`], held as `Any` since that type has no name.
    static ROUTE_BOXES: std::cell::RefCell<Option<Box<dyn std::any::Any>>> =
        const { std::cell::RefCell::new(None) };
}

/// `fut` in a box (a routing future is kilobytes: boxed, a connection's task stays small while it waits for
/// the next request), one of this thread's spare boxes when there is one.
fn route_box<F: Future + 'static>(fut: F) -> Pin<Box<Option<F>>> {
    let spare = ROUTE_BOXES
        .try_with(|s| {
            s.borrow_mut()
                .as_mut()
                .and_then(|a| a.downcast_mut::<Vec<Pin<Box<Option<F>>>>>())
                .and_then(Vec::pop)
        })
        .ok()
        .flatten();
    match spare {
        Some(mut b) => {
            b.as_mut().set(Some(fut));
            b
        }
        None => Box::pin(Some(fut)),
    }
}

/// Drops the future in `b` and keeps the box for the next [`route_box`] (at most [`ROUTE_BOXES_KEPT`]).
fn give_back_route_box<F: 'static>(mut b: Pin<Box<Option<F>>>) {
    b.as_mut().set(None);
    let _ = ROUTE_BOXES.try_with(|s| {
        let mut s = s.borrow_mut();
        let list = s
            .get_or_insert_with(|| Box::new(Vec::<Pin<Box<Option<F>>>>::new()))
            .downcast_mut::<Vec<Pin<Box<Option<F>>>>>();
        if let Some(list) = list.filter(|l| l.len() < ROUTE_BOXES_KEPT) {
            list.push(b);
        }
    });
}

/// Writes `resp`; `Ok(false)` when the connection cannot be reused.
async fn write_response(
    c: &mut Conn,
    resp: Response<RouterBody>,
    keep_alive: bool,
    head_method: bool,
) -> std::io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let exact = body.size_hint().exact();
    let mut batch = sock::batch();
    {
        let head = batch.head_mut().expect("an empty batch");
        head.extend_from_slice(b"HTTP/1.1 ");
        head.extend_from_slice(parts.status.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(
            parts
                .status
                .canonical_reason()
                .unwrap_or("Unknown")
                .as_bytes(),
        );
        head.extend_from_slice(b"\r\n");
        for (k, v) in parts.headers.iter() {
            if k == CONTENT_LENGTH || k == hyper::header::TRANSFER_ENCODING {
                continue;
            }
            head.extend_from_slice(k.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(v.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        match exact {
            Some(n) => {
                head.extend_from_slice(b"content-length: ");
                head.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                head.extend_from_slice(b"\r\n");
            }
            None => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
        if !keep_alive {
            head.extend_from_slice(b"connection: close\r\n");
        }
        head.extend_from_slice(b"\r\n");
    }
    let pushed = batch.push_head().is_ok();
    debug_assert!(pushed, "an empty batch takes its head");
    drop(parts);
    if head_method {
        let (r, b) = c.write_batch(batch).await;
        sock::give_back(b);
        r?;
        return Ok(keep_alive);
    }
    // A whole body goes out with the head in one write.
    if let RouterBody::Full(b) = &mut body {
        let pushed = batch.push_bytes(b.take().unwrap_or_default()).is_ok();
        debug_assert!(pushed, "a batch with only its head takes a body");
        let (r, b) = c.write_batch(batch).await;
        sock::give_back(b);
        r?;
        return Ok(true);
    }
    // The head goes out with the frames that are ready at once (one segment for a whole
    // answer), or alone when the first frame is not ready (a stream's client gets it now).
    let mut batch = Some(batch);
    let chunked = exact.is_none();
    let mut written: u64 = 0;
    loop {
        let mut state = Next::More;
        let mut b = match batch.take() {
            Some(b) => b,
            None => {
                // Wait for the next frame while watching the client (holding no write batch).
                let first = {
                    let mut next = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx));
                    match c.watch(&mut next).await {
                        Watch::Done(f) => f,
                        Watch::Gone => return Ok(false),
                    }
                };
                let mut b = sock::batch();
                state = push_frame(first, &mut b, chunked, &mut written);
                b
            }
        };
        // Frames that are ready now go out in the same write. Polled with the task's own waker: a body's
        // timers (the stream idle timer, a moving stream's connect and answer timeouts) keep the first waker
        // they are polled with, so they must never see a no-op one; a wake-up during the write costs a
        // spurious poll.
        std::future::poll_fn(|cx| {
            while state == Next::More && b.room() >= 4 && b.line_room() >= FRAME_LINE_BYTES {
                match Pin::new(&mut body).poll_frame(cx) {
                    Poll::Ready(f) => state = push_frame(f, &mut b, chunked, &mut written),
                    Poll::Pending => break,
                }
            }
            Poll::Ready(())
        })
        .await;
        let (end, failed) = (state == Next::End, state == Next::Failed);
        if end && chunked {
            let pushed = b.push_static(b"0\r\n\r\n").is_ok();
            debug_assert!(pushed, "write batch sized for BATCH frames");
        }
        let (r, b) = c.write_batch(b).await;
        sock::give_back(b);
        r?;
        if failed {
            return Ok(false); // the response cannot be completed: close
        }
        if end {
            return Ok(exact.is_none_or(|n| n == written));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    More,
    End,
    Failed,
}

/// Copied framing bytes one frame takes at most: its size line (`{n:x}\r\n`, 18 bytes for a 64-bit length) and
/// its closing CRLF.
pub(crate) const FRAME_LINE_BYTES: usize = 20;

/// Adds a polled frame's data to `b` (a chunk when `chunked`: size line, the frame's own `Bytes`, CRLF).
/// `b` must have room for 3 more parts and [`FRAME_LINE_BYTES`] copied bytes.
fn push_frame(
    f: Option<Result<Frame<Bytes>, std::io::Error>>,
    b: &mut WriteBatch,
    chunked: bool,
    written: &mut u64,
) -> Next {
    match f {
        None => Next::End,
        Some(Err(_)) => Next::Failed,
        Some(Ok(fr)) => {
            if let Ok(d) = fr.into_data() {
                if !d.is_empty() {
                    *written += d.len() as u64;
                    if chunked {
                        let mut line = [0u8; 18];
                        let n = hex_line(&mut line, d.len());
                        // The caller leaves room for a frame's three parts and its lines.
                        // The closing CRLF is a copy, so the next frame's size line joins its part.
                        let pushed = b.push_copy(&line[..n]).is_ok()
                            && b.push_bytes(d).is_ok()
                            && b.push_copy(b"\r\n").is_ok();
                        debug_assert!(pushed, "write batch sized for BATCH frames");
                    } else {
                        let pushed = b.push_bytes(d).is_ok();
                        debug_assert!(pushed, "write batch sized for BATCH frames");
                    }
                }
            }
            Next::More
        }
    }
}

/// Writes `{n:x}\r\n` into `out`; returns its length.
fn hex_line(out: &mut [u8; 18], mut n: usize) -> usize {
    let mut tmp = [0u8; 16];
    let mut i = 16;
    loop {
        i -= 1;
        tmp[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    let len = 16 - i;
    out[..len].copy_from_slice(&tmp[i..]);
    out[len] = b'\r';
    out[len + 1] = b'\n';
    len + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_boxes_are_reused_and_their_futures_dropped() {
        // One future type, as `api::handle` has.
        use std::rc::Rc;
        async fn job(x: Rc<u64>) -> u64 {
            *x
        }
        let x = Rc::new(7);
        let mut b = route_box(job(x.clone()));
        let at = &*b as *const Option<_> as usize;
        let size = std::mem::size_of_val(&*b);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert_eq!(
            b.as_mut().as_pin_mut().unwrap().poll(&mut cx),
            Poll::Ready(7)
        );
        give_back_route_box(b);
        assert_eq!(
            Rc::strong_count(&x),
            1,
            "the future is dropped when its box is given back"
        );
        // Were the box freed, an allocation of its size would most likely take its place.
        let decoy = Vec::<u8>::with_capacity(size);
        let b = route_box(job(x.clone()));
        drop(decoy);
        assert_eq!(&*b as *const Option<_> as usize, at, "the same box");
        drop(b);
        assert_eq!(Rc::strong_count(&x), 1);
    }

    #[test]
    fn chunk_size_lines() {
        let mut b = [0u8; 18];
        for (n, s) in [
            (0, "0\r\n"),
            (10, "a\r\n"),
            (255, "ff\r\n"),
            (4096, "1000\r\n"),
        ] {
            let l = hex_line(&mut b, n);
            assert_eq!(&b[..l], s.as_bytes());
        }
        let l = hex_line(&mut b, usize::MAX);
        assert_eq!(&b[..l], b"ffffffffffffffff\r\n");
    }

    #[test]
    fn the_target_and_header_values_are_slices_of_the_read_buffer() {
        let mut buf = BytesMut::from(
            &b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: pdx\r\nX-Request-Id: abc\r\nContent-Length: 2\r\n\r\n{}"[..],
        );
        let read = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let h = parse_head(&mut buf).ok().flatten().expect("parsed");
        assert_eq!(h.req.method, hyper::Method::POST);
        assert_eq!(h.req.uri.path(), "/v1/chat/completions");
        assert_eq!(h.req.uri.query(), Some("x=1"));
        assert!(
            read.contains(&(h.req.uri.path().as_ptr() as usize)),
            "the target: a copy"
        );
        assert_eq!(h.req.headers.len(), 3);
        for (k, v) in &h.req.headers {
            assert!(
                read.contains(&(v.as_bytes().as_ptr() as usize)),
                "{k}: a copy"
            );
        }
        assert_eq!(h.req.headers["x-request-id"], "abc");
        assert_eq!(&buf[..], b"{}");
        // A target or a method `http` refuses is still a 400.
        for bad in [
            &b"GET /a b HTTP/1.1\r\n\r\n"[..],
            b"GET http://[::1 HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(&mut BytesMut::from(bad)), Err(HeadError::Bad)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn request_heads() {
        let mut buf = BytesMut::from(
            &b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc"[..],
        );
        let h = parse_head(&mut buf).ok().flatten().expect("parsed");
        assert_eq!(
            (h.length, h.chunked, h.keep_alive, h.expect_continue),
            (Some(3), false, true, true)
        );
        assert_eq!(&buf[..], b"abc");
        let mut buf = BytesMut::from(&b"GET / HTTP/1.0\r\n\r\n"[..]);
        assert!(!parse_head(&mut buf).ok().flatten().unwrap().keep_alive);
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"[..]);
        assert!(!parse_head(&mut buf).ok().flatten().unwrap().keep_alive);
        assert!(parse_head(&mut BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]))
            .ok()
            .unwrap()
            .is_none());
        assert!(matches!(
            parse_head(&mut BytesMut::from(&b"BAD\x01 / HTTP/1.1\r\n\r\n"[..])),
            Err(HeadError::Bad)
        ));
        assert!(matches!(
            parse_head(&mut BytesMut::from(
                &b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"[..]
            )),
            Err(HeadError::Bad)
        )); // Content-Length and chunked together (request smuggling) and conflicting lengths are refused.
        for bad in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        ] {
            assert!(matches!(
                parse_head(&mut BytesMut::from(bad)),
                Err(HeadError::Bad)
            ));
        }
    }
}
