//! Upstream HTTP/1.1 client over monoio sockets (readiness-based `poll-io`), with a keep-alive
//! pool per thread.
//!
//! A request owns its connection: [`send`] writes the request and parses the response head
//! ([`crate::h1`]); the response body ([`UpBody`]) reads and decodes from the socket itself when
//! polled, handing out slices of the connection's read buffer (no copy, no allocation per
//! chunk). There is no driver task and no channel per connection, so an in-flight stream costs
//! the socket, one read buffer and this struct. When the body ends cleanly the connection goes
//! back to the pool (its read buffer is released while idle); when the body is dropped early
//! (client disconnect, error) the socket closes with it, so the engine sees the disconnect and
//! aborts the request (vLLM and the mock free its KV then).

use crate::h1::{self, DecodeError, Framing, Step};
use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use hyper::Response;
use monoio::io::poll_io::{AsyncRead, AsyncWrite, ReadBuf};
use monoio::io::IntoPollIo;
use monoio::net::tcp::stream_poll::TcpStreamPoll;
use std::cell::RefCell;
use std::collections::HashMap;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Read buffer of an upstream connection once a response is past its first read, bytes.
/// Forwarded body frames are slices of this buffer. A read asks for at most its free room.
pub const READ_BUF: usize = 4096;
/// The first read of a response gets a buffer of this size, bytes: a response head of an
/// inference engine and a non-streamed answer or a stream's first events fit, so a stream that
/// stalls early (or a short answer) holds 1 KiB, not [`READ_BUF`].
pub const FIRST_READ_BUF: usize = 1024;
/// Room below which the buffer is refilled to [`READ_BUF`] before a read.
const MIN_READ_ROOM: usize = 512;

/// A keep-alive upstream connection.
#[derive(Debug)]
pub struct Conn {
    io: TcpStreamPoll,
    buf: BytesMut,
    /// `host:port` (pool key).
    pub authority: Rc<str>,
    /// Taken from the pool (it may have been closed by the server meanwhile).
    pub reused: bool,
}

thread_local! {
    static POOL: RefCell<HashMap<Rc<str>, Vec<Conn>>> = RefCell::new(HashMap::new());
}

/// Idle connections kept per upstream per thread (an idle connection holds its socket only).
const MAX_IDLE_PER_HOST: usize = 256;

/// Why getting a connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    /// Connect failed.
    Failed,
    /// Took longer than the timeout.
    Timeout,
}

/// A pooled connection to `authority`, or a new one (connect within `timeout`).
pub async fn get(authority: &str, timeout: Duration) -> Result<Conn, ConnectError> {
    let pooled = POOL.with(|p| p.borrow_mut().get_mut(authority)?.pop());
    if let Some(c) = pooled {
        return Ok(Conn { reused: true, ..c });
    }
    let fut = async {
        let s = monoio::net::TcpStream::connect(authority)
            .await
            .map_err(|_| ConnectError::Failed)?;
        let _ = s.set_nodelay(true);
        let io = s.into_poll_io().map_err(|_| ConnectError::Failed)?;
        Ok(Conn {
            io,
            buf: BytesMut::new(),
            authority: Rc::from(authority),
            reused: false,
        })
    };
    match monoio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout),
    }
}

/// Returns a connection whose last response was read to the end.
pub fn put(mut c: Conn) {
    if !c.buf.is_empty() {
        return; // bytes beyond the response: not a clean keep-alive connection
    }
    c.buf = BytesMut::new();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let list = p.entry(c.authority.clone()).or_default();
        if list.len() < MAX_IDLE_PER_HOST {
            list.push(c);
        }
    });
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum SendError {
    /// Writing failed, or the connection closed before any response byte (on a pooled
    /// connection: most likely closed by the server while idle; safe to retry on a new one).
    Closed,
    /// I/O error after response bytes arrived.
    Io(std::io::Error),
    /// The response is malformed.
    Decode(DecodeError),
}

impl Conn {
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() == 0 {
            self.buf.reserve(FIRST_READ_BUF);
        } else if self.buf.capacity() - self.buf.len() < MIN_READ_ROOM {
            // Reuses the allocation when every frame split off it has been dropped.
            self.buf.reserve(READ_BUF);
        }
        let len = self.buf.len();
        let cap = self.buf.capacity();
        // Zero-fill the free room so the read target is initialized memory (no `unsafe`).
        self.buf.resize(cap, 0);
        let mut rb = ReadBuf::new(&mut self.buf[len..]);
        let r = Pin::new(&mut self.io).poll_read(cx, &mut rb);
        let n = rb.filled().len();
        self.buf.truncate(len + n);
        match r {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    async fn write_all(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let n = std::future::poll_fn(|cx| Pin::new(&mut self.io).poll_write(cx, data)).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            data = &data[n..];
        }
        Ok(())
    }
}

/// Sends one request on `conn` and reads the response head. `headers` are `(name, value)`
/// pairs written as given; `Content-Length` is added for a body. The response body reads from
/// the connection; a clean end returns it to the pool.
pub async fn send(
    mut conn: Conn,
    method: &str,
    path: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> Result<Response<UpBody>, SendError> {
    let mut req = Vec::with_capacity(128 + path.len() + body.len());
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
    if !body.is_empty() || method == "POST" {
        req.extend_from_slice(b"content-length: ");
        req.extend_from_slice(body.len().to_string().as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    if conn.write_all(&req).await.is_err() {
        return Err(SendError::Closed);
    }
    drop(req);
    let head_request = method == "HEAD";
    let mut got_bytes = false;
    let head = loop {
        match h1::parse_head(&mut conn.buf, head_request) {
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(e) => return Err(SendError::Decode(e)),
        }
        match conn.fill().await {
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

/// `GET /health` on `authority`: true for a 2xx within `timeout`.
pub async fn health(authority: &str, timeout: Duration) -> bool {
    let fut = async {
        let Ok(c) = get(authority, timeout).await else {
            return false;
        };
        let Ok(r) = send(c, "GET", "/health", &[("host", authority.as_bytes())], &[]).await else {
            return false;
        };
        let ok = r.status().is_success();
        ok && http_body_util::BodyExt::collect(r.into_body())
            .await
            .is_ok()
    };
    monoio::time::timeout(timeout, fut).await.unwrap_or(false)
}
