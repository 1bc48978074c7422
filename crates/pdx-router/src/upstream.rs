//! Upstream HTTP/1.1 client: hyper's client connection over monoio sockets
//! (`monoio_compat::hyper::MonoioIo`), with a keep-alive pool per thread.
//!
//! Each connection's driver task runs until the connection closes or its [`KillSwitch`] is
//! dropped. A request holds its connection's switch until the response body ends; if the
//! request is dropped early (client disconnect, error), the switch goes with it, the driver
//! stops and the socket closes, so the engine sees the disconnect and aborts the request
//! (vLLM and the mock free its KV then). Finished connections go back to the pool.

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use monoio::io::IntoPollIo;
use monoio_compat::hyper::MonoioIo;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

#[derive(Default)]
struct KillState {
    fired: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

/// Dropping it stops the connection's driver task (closing the socket).
pub struct KillSwitch(Rc<KillState>);

impl std::fmt::Debug for KillSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KillSwitch")
            .field("fired", &self.0.fired.get())
            .finish()
    }
}

impl Drop for KillSwitch {
    fn drop(&mut self) {
        self.0.fired.set(true);
        if let Some(w) = self.0.waker.take() {
            w.wake();
        }
    }
}

/// Runs `conn` until it ends or the switch is dropped.
struct Driver<F> {
    conn: Pin<Box<F>>,
    kill: Rc<KillState>,
}

impl<F: Future> Future for Driver<F> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.kill.fired.get() {
            return Poll::Ready(());
        }
        self.kill.waker.set(Some(cx.waker().clone()));
        self.conn.as_mut().poll(cx).map(|_| ())
    }
}

/// A keep-alive upstream connection.
#[derive(Debug)]
pub struct Conn {
    /// hyper's request sender.
    pub sender: SendRequest<Full<Bytes>>,
    /// Keeps the connection alive; drop to close it.
    pub kill: KillSwitch,
    /// `host:port` (pool key).
    pub authority: Rc<str>,
    /// Taken from the pool (it may have been closed by the server meanwhile).
    pub reused: bool,
}

thread_local! {
    static POOL: RefCell<HashMap<Rc<str>, Vec<Conn>>> = RefCell::new(HashMap::new());
}

/// Idle connections kept per upstream per thread. Each idle hyper connection holds about
/// 20 KiB (buffers, driver task), so the pool is sized for the concurrency of one thread, not
/// for bursts: a burst opens more and the surplus closes when returned.
const MAX_IDLE_PER_HOST: usize = 64;

/// Read buffer of an upstream connection, bytes (hyper's exact-size strategy; the default is
/// adaptive from 8 KiB up to ~400 KiB). Response heads of inference engines are a few hundred
/// bytes, and forwarded body frames are slices of this buffer (zero-copy), so 4 KiB halves the
/// per-stream buffer of the decode connection at the cost of one read per 4 KiB of stream.
pub const UPSTREAM_READ_BUF: usize = 4096;

/// Why getting a connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    /// Connect or handshake failed.
    Failed,
    /// Took longer than the timeout.
    Timeout,
}

/// A pooled connection to `authority`, or a new one (connect + handshake within `timeout`).
pub async fn get(authority: &str, timeout: Duration) -> Result<Conn, ConnectError> {
    let pooled = POOL.with(|p| {
        let mut p = p.borrow_mut();
        let list = p.get_mut(authority)?;
        while let Some(c) = list.pop() {
            if c.sender.is_ready() {
                return Some(Conn { reused: true, ..c });
            }
        }
        None
    });
    if let Some(c) = pooled {
        return Ok(c);
    }
    let fut = async {
        let s = monoio::net::TcpStream::connect(authority)
            .await
            .map_err(|_| ConnectError::Failed)?;
        let _ = s.set_nodelay(true);
        let io = MonoioIo::new(s.into_poll_io().map_err(|_| ConnectError::Failed)?);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .read_buf_exact_size(Some(UPSTREAM_READ_BUF))
            .handshake(io)
            .await
            .map_err(|_| ConnectError::Failed)?;
        let kill = Rc::new(KillState::default());
        monoio::spawn(Driver {
            conn: Box::pin(conn),
            kill: kill.clone(),
        });
        Ok(Conn {
            sender,
            kill: KillSwitch(kill),
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
pub fn put(c: Conn) {
    if c.sender.is_closed() {
        return;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let list = p.entry(c.authority.clone()).or_default();
        if list.len() < MAX_IDLE_PER_HOST {
            list.push(c);
        }
    });
}
