//! `pd_floor`: the floor: the socket work a sequential PD router cannot avoid; `benches/compare_routers.sh`
//! measures it next to pdx and the peers.
//!
//! A benchmark reference, not a router. Per client connection (HTTP/1.1 keep-alive), for every request it:
//! reads the request (head up to `\r\n\r\n`, then `Content-Length` bytes of body, which it ignores); writes a
//! fixed, prebuilt prefill request (`max_tokens: 1`, `kv_transfer_params.do_remote_decode`) on the connection's
//! own keep-alive connection to the prefill upstream and reads the whole response; writes a fixed decode request
//! (`do_remote_prefill`) on its own connection to the decode upstream and reads the whole response; writes that
//! decode response back to the client byte for byte. No routing, no JSON, no per-request allocation: one thread,
//! one epoll loop (mio, edge-triggered), kernel TCP sockets with `TCP_NODELAY`, fixed buffers reused across
//! requests. Upstream connections open on a client connection's first request and are kept; an upstream that
//! closed is reconnected once per exchange; any other error closes the client connection.
//!
//! Each socket is registered once for read and write readiness and never re-registered. Reads stop at a short
//! read (the socket was drained at that moment, so later data raises a new edge) and a per-socket flag remembers
//! read edges that arrive while the connection waits on another socket: no `epoll_ctl` and no `EAGAIN` read per
//! request.
//!
//! ```text
//! cargo build --release -p pdx-router --example pd_floor
//! target/release/examples/pd_floor --port 18304 --prefill http://127.0.0.1:18201 --decode http://127.0.0.1:18202
//! ```
//! Flags: `--host` (default 127.0.0.1), `--port` (default 18304), `--prefill URL`, `--decode URL`
//! (`http://host:port`, any path ignored).
//!
//! `PD_FLOOR_WORK=1` (a benchmark variant, off by default): the floor also does the JSON work pdx does per request,
//! with pdx's own code ([`floor::Work`]); the upstream requests are built per request into the connection's
//! buffers.

#![forbid(unsafe_code)]

#[path = "floor/mod.rs"]
mod floor;

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;

use floor::{message_len, BUF, CLIENT, DECODE, PREFILL};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};

const LISTENER: Token = Token(usize::MAX);

/// Where a connection is in its request cycle; `Send`/`Recv` carry the upstream (`PREFILL` or `DECODE`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    ReadClient,
    Send(usize),
    Recv(usize),
    WriteClient,
}

/// One client connection and its two upstream connections (`up[PREFILL]`, `up[DECODE]`; `up[CLIENT]` unused).
struct Conn {
    client: TcpStream,
    up: [Option<TcpStream>; 3],
    /// A read edge arrived on socket `i` (client, prefill, decode) and it has not been drained since.
    readable: [bool; 3],
    state: State,
    /// Client request bytes (a pipelined next request may follow the current one).
    cbuf: Vec<u8>,
    clen: usize,
    /// Upstream response bytes: the prefill response (dropped), then the decode response (sent to the client).
    ubuf: Vec<u8>,
    ulen: usize,
    /// Length of the complete decode response in `ubuf`.
    resp: usize,
    /// Bytes of the current write done.
    wpos: usize,
    /// The current upstream exchange already reconnected once.
    retried: bool,
    /// `PD_FLOOR_WORK`: this request's upstream requests (head and body, by `PREFILL` / `DECODE`) and the work's
    /// state ([`floor::Work`]).
    built: [Vec<u8>; 3],
    work: Option<floor::Work>,
}

/// The upstreams and the prebuilt requests, shared by all connections.
struct Upstreams {
    addr: [SocketAddr; 3],
    req: [Vec<u8>; 3],
    /// `PD_FLOOR_WORK` is on.
    work: bool,
}

fn main() -> io::Result<()> {
    let floor::Setup { bind, addr, req } = floor::setup("pd_floor", 18304)?;
    let (pa, da) = (addr[PREFILL], addr[DECODE]);
    let work = floor::work_asked();
    let ups = Upstreams { addr, req, work };

    let socket = floor::listener(bind)?;
    socket.set_nonblocking(true)?;
    let mut listener = TcpListener::from_std(socket);
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    eprintln!("pd_floor listening on {bind}: prefill {pa}, decode {da}");

    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = Events::with_capacity(1024);
    // PD_FLOOR_COALESCE_US=W (a benchmark variant, off by default): with more than one connection open, sleep W µs
    // before each wait, so that one wake-up finds more events: the epoll counterpart of pd_floor_ring's batched
    // waits (docs/benchmarks.md "The floor on a ring of our own").
    let coalesce = std::env::var("PD_FLOOR_COALESCE_US")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(std::time::Duration::from_micros);
    loop {
        if let Some(w) = coalesce {
            if conns.len() - free.len() > 1 {
                std::thread::sleep(w);
            }
        }
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                accept(&listener, &ups, poll.registry(), &mut conns, &mut free);
                continue;
            }
            let (idx, sock) = (ev.token().0 / 3, ev.token().0 % 3);
            let Some(Some(c)) = conns.get_mut(idx) else {
                continue;
            };
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                c.readable[sock] = true;
            }
            if drive(c, idx, &ups, poll.registry()).is_err() {
                conns[idx] = None; // drops (and so closes) the client and both upstream sockets
                free.push(idx);
            }
        }
    }
}

fn accept(
    listener: &TcpListener,
    ups: &Upstreams,
    registry: &Registry,
    conns: &mut Vec<Option<Conn>>,
    free: &mut Vec<usize>,
) {
    loop {
        let mut client = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e)
                if e.kind() == ErrorKind::Interrupted
                    || e.kind() == ErrorKind::ConnectionAborted =>
            {
                continue
            }
            Err(e) => {
                eprintln!("accept: {e}");
                return;
            }
        };
        let idx = free.pop().unwrap_or_else(|| {
            conns.push(None);
            conns.len() - 1
        });
        // Registering an already-readable socket queues its edge, so `readable` starts false.
        if client.set_nodelay(true).is_err()
            || registry
                .register(
                    &mut client,
                    Token(idx * 3 + CLIENT),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_err()
        {
            free.push(idx);
            continue;
        }
        conns[idx] = Some(Conn {
            client,
            up: [None, None, None],
            readable: [false; 3],
            state: State::ReadClient,
            cbuf: vec![0; BUF],
            clen: 0,
            ubuf: vec![0; BUF],
            ulen: 0,
            resp: 0,
            wpos: 0,
            retried: false,
            built: [Vec::new(), Vec::new(), Vec::new()],
            work: ups
                .work
                .then(|| floor::Work::new(&ups.req[PREFILL], &ups.req[DECODE])),
        });
    }
}

/// Advances `c` until it has to wait for a socket. `Err`: close the client connection.
fn drive(c: &mut Conn, idx: usize, ups: &Upstreams, registry: &Registry) -> io::Result<()> {
    loop {
        match c.state {
            State::ReadClient => {
                let n = loop {
                    if let Some(n) = message_len(&c.cbuf[..c.clen], false)? {
                        break n;
                    }
                    if !c.readable[CLIENT] {
                        return Ok(());
                    }
                    if fill(
                        &mut c.client,
                        &mut c.cbuf,
                        &mut c.clen,
                        &mut c.readable[CLIENT],
                    )? {
                        return Err(ErrorKind::UnexpectedEof.into()); // client closed (between requests or not)
                    }
                };
                if let Some(w) = c.work.as_mut() {
                    w.prefill_request(&c.cbuf[..n], &mut c.built[PREFILL])?;
                }
                c.cbuf.copy_within(n..c.clen, 0); // keep a pipelined next request
                c.clen -= n;
                (c.state, c.wpos, c.retried) = (State::Send(PREFILL), 0, false);
            }
            State::Send(u) => {
                if c.up[u].is_none() {
                    let mut s = TcpStream::connect(ups.addr[u])?;
                    s.set_nodelay(true)?;
                    registry.register(
                        &mut s,
                        Token(idx * 3 + u),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    (c.up[u], c.readable[u]) = (Some(s), false);
                }
                let s = c.up[u].as_mut().expect("connected above");
                let req = if ups.work { &c.built[u] } else { &ups.req[u] };
                match write_all(s, req, &mut c.wpos) {
                    Ok(true) => (c.state, c.ulen) = (State::Recv(u), 0),
                    Ok(false) => return Ok(()),
                    Err(e) => reconnect(c, u, e)?,
                }
            }
            State::Recv(u) => {
                if !c.readable[u] {
                    return Ok(());
                }
                let s = c.up[u].as_mut().expect("sent on it");
                if fill(s, &mut c.ubuf, &mut c.ulen, &mut c.readable[u])? {
                    // Closed before answering: a keep-alive connection the upstream had dropped.
                    if c.ulen == 0 {
                        reconnect(c, u, ErrorKind::UnexpectedEof.into())?;
                        continue;
                    }
                    return Err(ErrorKind::UnexpectedEof.into());
                }
                if let Some(n) = message_len(&c.ubuf[..c.ulen], true)? {
                    if u == PREFILL {
                        if let Some(w) = c.work.as_mut() {
                            w.decode_request(&c.ubuf[..n], &mut c.built[DECODE])?;
                        }
                        (c.state, c.wpos, c.retried) = (State::Send(DECODE), 0, false);
                    } else {
                        (c.state, c.wpos, c.resp) = (State::WriteClient, 0, n);
                    }
                }
            }
            State::WriteClient => {
                if !write_all(&mut c.client, &c.ubuf[..c.resp], &mut c.wpos)? {
                    return Ok(());
                }
                c.state = State::ReadClient;
            }
        }
    }
}

/// Drops upstream `u` after `err` and starts its exchange over on a new connection, once per exchange.
fn reconnect(c: &mut Conn, u: usize, err: io::Error) -> io::Result<()> {
    if c.retried {
        return Err(err);
    }
    (c.up[u], c.readable[u], c.retried, c.wpos, c.state) = (None, false, true, 0, State::Send(u));
    Ok(())
}

/// One read into `buf[*len..]` (grown when full). Clears `readable` unless the read filled the buffer: a short
/// read or `WouldBlock` means the socket was drained, and data arriving later raises a new edge. `Ok(true)`: EOF.
fn fill(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    len: &mut usize,
    readable: &mut bool,
) -> io::Result<bool> {
    if *len == buf.len() {
        buf.resize(buf.len() * 2, 0);
    }
    loop {
        return match s.read(&mut buf[*len..]) {
            Ok(0) => Ok(true),
            Ok(n) => {
                *readable = *len + n == buf.len();
                *len += n;
                Ok(false)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                *readable = false;
                Ok(false)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
    }
}

/// Writes `data[*pos..]`; `Ok(true)` when all of it is written, `Ok(false)` on `WouldBlock` (a write edge follows).
fn write_all(s: &mut TcpStream, data: &[u8], pos: &mut usize) -> io::Result<bool> {
    while *pos < data.len() {
        match s.write(&data[*pos..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => *pos += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}
