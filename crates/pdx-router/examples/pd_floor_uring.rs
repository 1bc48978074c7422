//! `pd_floor_uring`: the floor of `pd_floor` on io_uring: the same socket work, with completions instead of
//! readiness; `benches/compare_routers.sh` measures it as row `floor-uring`.
//!
//! A benchmark reference, not a router. Per client connection (HTTP/1.1 keep-alive), for every request it does
//! exactly what `pd_floor` does (the flags, the prebuilt requests and the framing are the same code,
//! `examples/floor/mod.rs`): reads the request (head, then `Content-Length` bytes of body, ignored); writes the
//! prebuilt prefill request on the connection's own keep-alive connection to the prefill upstream and reads the
//! whole response; writes the prebuilt decode request to the decode upstream and reads the whole response;
//! writes that response back to the client byte for byte. No routing, no JSON, no per-request allocation.
//!
//! How: one thread, a monoio runtime on its io_uring driver only (no epoll fallback: it fails at start where
//! io_uring is missing), one task per client connection, and monoio's native operations: `accept`, `connect`,
//! `recv` and `send` submitted as io_uring entries with owned buffers (`AsyncReadRent` / `AsyncWriteRent`), never
//! a readiness poll. Each operation is awaited before the next (the router's request cycle is sequential), and
//! monoio submits every entry queued in a loop turn with one `io_uring_enter` when the thread has nothing left
//! to run, which also waits for the next completion: with many connections one enter carries many operations.
//! Reads end at the first completion (a short read), so there is no `EAGAIN` read; a full buffer doubles. The
//! ring is set up for a single thread (`DEFER_TASKRUN`, see [`runtime`]): 16–17 % more requests per CPU-second
//! than a plain ring here.
//!
//! Why monoio's operations and not the `io-uring` crate directly: they are the operations `pdx serve`'s own
//! data path uses (issue 19), so this row measures what the router's runtime can reach; a hand-rolled ring would
//! need its `unsafe` in a `-sys` crate (buffers lent to the kernel) for features monoio does not offer
//! (multishot receive with provided buffer rings, registered files, skipping send completions), which is the
//! next step if this floor is not low enough.
//!
//! ```text
//! cargo build --release -p pdx-router --example pd_floor_uring
//! target/release/examples/pd_floor_uring --port 18305 --prefill http://127.0.0.1:18201 --decode http://127.0.0.1:18202
//! ```
//! Flags: `--host` (default 127.0.0.1), `--port` (default 18305), `--prefill URL`, `--decode URL`
//! (`http://host:port`, any path ignored).
//!
//! `PD_FLOOR_STREAM=1` (a benchmark variant, off by default): every request's decode is a streamed completion
//! relayed to the client read by read ([`floor::stream_asked`]): the floor of forwarding SSE chunks, which
//! `benches/stream_cpu.sh` runs with `FLOOR=1`. It takes precedence over `PD_FLOOR_WORK`.
//!
//! `PD_FLOOR_WORK=1` (a benchmark variant, off by default): the floor also does the JSON work pdx does per request,
//! with pdx's own code ([`floor::Work`]), as `pd_floor` does with it: the floor a request path of pdx's written as
//! a plain sequence of operations on monoio could reach.

#![forbid(unsafe_code)]

#[path = "floor/mod.rs"]
mod floor;

use std::io::{self, ErrorKind};
use std::net::SocketAddr;

use floor::{message_len, BUF, DECODE, PREFILL};
use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{ListenerOpts, TcpListener, TcpStream};

/// The upstreams and the prebuilt requests, shared by all connections (made once, kept for the process).
struct Upstreams {
    addr: [SocketAddr; 3],
    /// `PD_FLOOR_STREAM`: the streamed decode request, relayed as it comes.
    stream: Option<&'static [u8]>,
    req: [&'static [u8]; 3],
}

fn main() -> io::Result<()> {
    let floor::Setup { bind, addr, req } = floor::setup("pd_floor_uring", 18305)?;
    let stream = floor::stream_asked()
        .then(|| &*Box::leak(floor::stream_request(&req[DECODE]).into_boxed_slice()));
    let [c, p, d] = req.map(|r| &*Box::leak(r.into_boxed_slice()));
    let ups: &'static Upstreams = Box::leak(Box::new(Upstreams {
        addr,
        stream,
        req: [c, p, d],
    }));
    let (mut rt, ring) = runtime()?;
    rt.block_on(async move {
        // Backlog 1024 as `pd_floor`'s; no SO_REUSEPORT, so a second floor on the port fails instead of sharing.
        let opts = ListenerOpts::new().reuse_port(false).backlog(1024);
        let listener = TcpListener::bind_with_config(bind, &opts)?;
        eprintln!(
            "pd_floor_uring listening on {bind} (io_uring {ring}, monoio native operations): prefill {}, decode {}",
            ups.addr[PREFILL], ups.addr[DECODE]
        );
        loop {
            match listener.accept().await {
                Ok((client, _)) => {
                    if client.set_nodelay(true).is_ok() {
                        // Any error closes the client connection and both upstream ones (dropped with the task).
                        monoio::spawn(async move {
                            let _ = serve(client, ups).await;
                        });
                    }
                }
                Err(e)
                    if e.kind() == ErrorKind::Interrupted
                        || e.kind() == ErrorKind::ConnectionAborted => {}
                Err(e) => eprintln!("accept: {e}"),
            }
        }
    })
}

/// The runtime on a ring set up for one thread: `DEFER_TASKRUN` (completions are run when the thread enters the
/// kernel to wait, not by interrupting it; Linux 6.1+) with `SINGLE_ISSUER` and `COOP_TASKRUN`, else
/// `COOP_TASKRUN` with `SINGLE_ISSUER` (6.0+), else a plain ring; `PD_FLOOR_URING_SETUP=defer|coop|plain` asks for one. Which
/// one runs is printed at start. Measured here (64 connections, requests per CPU-second of the floor): plain
/// 24.5–25.1k, coop 28.5–28.7k, defer 28.9–29.0k, the epoll floor 30.0–30.7k in the same run.
fn runtime() -> io::Result<(monoio::Runtime<monoio::IoUringDriver>, &'static str)> {
    let asked = std::env::var("PD_FLOOR_URING_SETUP").unwrap_or_default();
    let tries: &[&'static str] = match asked.as_str() {
        "" => &["defer", "coop", "plain"],
        "defer" => &["defer"],
        "coop" => &["coop"],
        "plain" => &["plain"],
        other => {
            return Err(floor::invalid(format!(
                "PD_FLOOR_URING_SETUP={other} (defer, coop or plain)"
            )))
        }
    };
    let mut last = None;
    for &ring in tries {
        let mut urb = io_uring::IoUring::builder();
        match ring {
            "defer" => {
                urb.setup_coop_taskrun()
                    .setup_single_issuer()
                    .setup_defer_taskrun();
            }
            "coop" => {
                urb.setup_coop_taskrun().setup_single_issuer();
            }
            _ => {}
        }
        match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(1024)
            .uring_builder(urb)
            .build()
        {
            Ok(rt) => return Ok((rt, ring)),
            Err(e) => last = Some(e),
        }
    }
    let e = last.expect("at least one ring setup tried");
    Err(io::Error::new(e.kind(), format!("io_uring runtime: {e}")))
}

/// One client connection: its request cycle until the client closes or an error.
async fn serve(mut client: TcpStream, ups: &'static Upstreams) -> io::Result<()> {
    // Client request bytes (a pipelined next request may follow the current one), then upstream response bytes:
    // the prefill response (dropped), then the decode response (sent to the client). Reused across requests.
    let mut cbuf = Vec::with_capacity(BUF);
    let mut ubuf = Vec::with_capacity(BUF);
    // Indexed like `pd_floor`'s (`PREFILL`, `DECODE`); slot 0 (the client's) stays empty.
    let mut up: [Option<TcpStream>; 3] = [None, None, None];
    // `PD_FLOOR_WORK`: the work's state and the request built for each upstream, reused across requests.
    let mut work = (ups.stream.is_none() && floor::work_asked())
        .then(|| floor::Work::new(ups.req[PREFILL], ups.req[DECODE]));
    let mut built = [Vec::new(), Vec::new()];
    loop {
        let n = loop {
            if let Some(n) = message_len(&cbuf, false)? {
                break n;
            }
            let eof;
            (eof, cbuf) = fill(&mut client, cbuf).await?;
            if eof {
                return Ok(()); // client closed (between requests or not)
            }
        };
        if let Some(w) = work.as_mut() {
            w.prefill_request(&cbuf[..n], &mut built[0])?;
        }
        cbuf.copy_within(n.., 0); // keep a pipelined next request
        cbuf.truncate(cbuf.len() - n);
        let resp;
        if let Some(req) = ups.stream {
            (_, _, ubuf) = exchange(&mut up, PREFILL, ups, ups.req[PREFILL], ubuf).await?;
            ubuf = relay(&mut up, ups, req, &mut client, ubuf).await?;
            continue;
        } else if let Some(w) = work.as_mut() {
            let [pre, mut dec] = std::mem::take(&mut built);
            let (n, pre, b) = exchange(&mut up, PREFILL, ups, pre, ubuf).await?;
            ubuf = b;
            w.decode_request(&ubuf[..n], &mut dec)?;
            let sent;
            (resp, sent, ubuf) = exchange(&mut up, DECODE, ups, dec, ubuf).await?;
            built = [pre, sent];
        } else {
            (_, _, ubuf) = exchange(&mut up, PREFILL, ups, ups.req[PREFILL], ubuf).await?;
            (resp, _, ubuf) = exchange(&mut up, DECODE, ups, ups.req[DECODE], ubuf).await?;
        }
        let (r, sent) = client.write_all(ubuf.slice(..resp)).await;
        ubuf = sent.into_inner();
        r?;
    }
}

/// Sends upstream `u` the request `req` and reads the whole response into `buf` (cleared first): its length, the
/// request and the buffer. A keep-alive connection the upstream had dropped (the send fails, or it closes before
/// answering) is reconnected once per exchange, as `pd_floor` does; any other error ends the connection.
async fn exchange<R: IoBuf>(
    up: &mut [Option<TcpStream>; 3],
    u: usize,
    ups: &'static Upstreams,
    mut req: R,
    mut buf: Vec<u8>,
) -> io::Result<(usize, R, Vec<u8>)> {
    let mut retried = false;
    loop {
        if up[u].is_none() {
            let s = TcpStream::connect_addr(ups.addr[u]).await?;
            s.set_nodelay(true)?;
            up[u] = Some(s);
        }
        let s = up[u].as_mut().expect("connected above");
        buf.clear();
        let sent;
        (sent, req) = s.write_all(req).await;
        let failed = match sent {
            Err(e) => e,
            Ok(_) => loop {
                let eof;
                (eof, buf) = fill(s, buf).await?;
                if eof {
                    if buf.is_empty() {
                        break ErrorKind::UnexpectedEof.into();
                    }
                    return Err(ErrorKind::UnexpectedEof.into());
                }
                if let Some(n) = message_len(&buf, true)? {
                    return Ok((n, req, buf));
                }
            },
        };
        if retried {
            return Err(failed);
        }
        (up[u], retried) = (None, true);
    }
}

/// `PD_FLOOR_STREAM`: sends the decode upstream `req` and writes its answer to the client read by read, until the
/// chunked body's last chunk (`0\r\n\r\n`; an answer not chunked never ends it: the stream floor only relays
/// chunked streams). No reconnect: an upstream that closed ends the connection.
async fn relay(
    up: &mut [Option<TcpStream>; 3],
    ups: &'static Upstreams,
    req: &'static [u8],
    client: &mut TcpStream,
    mut buf: Vec<u8>,
) -> io::Result<Vec<u8>> {
    if up[DECODE].is_none() {
        let s = TcpStream::connect_addr(ups.addr[DECODE]).await?;
        s.set_nodelay(true)?;
        up[DECODE] = Some(s);
    }
    let s = up[DECODE].as_mut().expect("connected above");
    s.write_all(req).await.0?;
    // The last bytes relayed, to see the terminator when it is split across reads.
    const END: &[u8; 7] = b"\r\n0\r\n\r\n";
    let mut tail = [0u8; END.len()];
    loop {
        buf.clear();
        let eof;
        (eof, buf) = fill(s, buf).await?;
        if eof {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        // The last bytes of what was relayed so far: the old tail's end, then this read's end.
        let keep = END.len().saturating_sub(buf.len());
        tail.copy_within(END.len() - keep.., 0);
        tail[keep..].copy_from_slice(&buf[buf.len() - (END.len() - keep)..]);
        let (r, sent) = client.write_all(buf).await;
        buf = sent;
        r?;
        if &tail == END {
            return Ok(buf);
        }
    }
}

/// One `recv` into the spare capacity of `buf` (doubled when full): `(true, buf)` at EOF.
async fn fill(s: &mut TcpStream, mut buf: Vec<u8>) -> io::Result<(bool, Vec<u8>)> {
    if buf.len() == buf.capacity() {
        buf.reserve(buf.capacity().max(BUF));
    }
    let (len, cap) = (buf.len(), buf.capacity());
    let (r, buf) = s.read(buf.slice_mut(len..cap)).await;
    Ok((r? == 0, buf.into_inner()))
}
