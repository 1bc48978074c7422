//! `pd_floor_ring`: the floor of `pd_floor` on a ring of pdx's own (`pdx_uring_sys::ring`), io_uring used on
//! its own terms; `benches/compare_routers.sh` measures it as row `floor-ring` (issue 19).
//!
//! A benchmark reference, not a router. Per client connection (HTTP/1.1 keep-alive), for every request it does
//! exactly what `pd_floor` does (the flags, the prebuilt requests and the framing are the same code,
//! `examples/floor/mod.rs`): reads the request (head, then `Content-Length` bytes of body, ignored); writes the
//! prebuilt prefill request on the connection's own keep-alive connection to the prefill upstream and reads the
//! whole response; writes the prebuilt decode request to the decode upstream and reads the whole response;
//! writes that response back to the client byte for byte. No routing, no JSON, no per-request allocation.
//!
//! How: one thread, no async runtime: a state machine per connection driven by the ring's events. One
//! multishot accept; one multishot receive per socket, armed once and again only when the kernel ends it,
//! into the ring's provided buffer ring (received bytes are copied into the connection's buffer and the
//! provided buffer goes back at once, as `pd_floor` reads into its buffer); the prebuilt upstream requests are
//! `'static` and sent with `IOSQE_CQE_SKIP_SUCCESS` (no completion unless they fail); the response to the
//! client is an owned send (its buffer lent to the ring until its completion); sockets in a fixed-file table;
//! one `io_uring_enter` per loop turn submits everything queued and waits for the next completion.
//! An upstream that closes between exchanges is closed and reconnected on the next exchange; one that fails
//! during an exchange is reconnected once per exchange, as `pd_floor` does; any other error closes the client
//! connection and its upstreams.
//!
//! Variants (environment, printed at start with what the kernel gave): `PD_FLOOR_RING_SETUP=defer|coop|plain`
//! (default: the first of those the kernel accepts), `PD_FLOOR_RING_FIXED=0` (plain fds),
//! `PD_FLOOR_RING_SKIP=0` (every static send completes); `PD_FLOOR_RING_BATCH=N` with
//! `PD_FLOOR_RING_MIN_WAIT_US=W` (wake for N completions, at most one per open connection, or after W µs with
//! at least one: fewer wake-ups under load, up to W µs more latency per turn; off by default);
//! `PD_FLOOR_RING_STATS=1` prints the ring's counters
//! (enters, entries, completions, receive re-arms) after each second of activity (one clock read per loop turn,
//! so off for measurements).
//!
//! ```text
//! cargo build --release -p pdx-router --example pd_floor_ring
//! target/release/examples/pd_floor_ring --port 18306 --prefill http://127.0.0.1:18201 --decode http://127.0.0.1:18202
//! ```
//! Flags: `--host` (default 127.0.0.1), `--port` (default 18306), `--prefill URL`, `--decode URL`
//! (`http://host:port`, any path ignored).

#![forbid(unsafe_code)]

#[path = "floor/mod.rs"]
mod floor;

use std::io::{self, ErrorKind};
use std::time::Instant;

use floor::{message_len, BUF, CLIENT, DECODE, PREFILL};
use pdx_uring_sys::ring::{Event, Ring, RingConfig, Setup, Sock};

/// Where a connection is in its request cycle; `Connecting`/`Recv` carry the upstream (`PREFILL` or `DECODE`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    ReadClient,
    /// Waiting for the upstream's connect.
    Connecting(usize),
    Recv(usize),
    /// The response is lent to the ring until its send completes.
    WriteClient,
}

/// One client connection and its two upstream connections (`up[PREFILL]`, `up[DECODE]`; `up[CLIENT]` is the
/// client socket).
struct Conn {
    /// Its index in [`Floor::conns`] (what [`Net::owner`] names it by).
    idx: usize,
    up: [Option<Sock>; 3],
    state: State,
    /// Client request bytes (a pipelined next request may follow the current one).
    cbuf: Vec<u8>,
    /// Upstream response bytes: the prefill response (dropped), then the decode response (sent to the client).
    ubuf: Vec<u8>,
    /// The current upstream exchange already reconnected once.
    retried: bool,
}

/// The floor's tables: connections by index, and which connection and role (`CLIENT`, `PREFILL`, `DECODE`)
/// each ring socket slot belongs to.
struct Floor {
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    net: Net,
}

/// What a connection's state machine needs besides itself: the socket slots' owners and the upstreams.
struct Net {
    /// By socket slot: the connection and role (`CLIENT`, `PREFILL`, `DECODE`) it belongs to.
    owner: Vec<Option<(usize, usize)>>,
    addr: [std::net::SocketAddr; 3],
    req: [&'static [u8]; 3],
}

fn env_flag(name: &str, default: bool) -> bool {
    std::env::var(name).map_or(default, |v| v != "0")
}

fn main() -> io::Result<()> {
    let floor::Setup { bind, addr, req } = floor::setup("pd_floor_ring", 18306)?;
    let [c, p, d] = req.map(|r| &*Box::leak(r.into_boxed_slice()));
    let setup = match std::env::var("PD_FLOOR_RING_SETUP")
        .unwrap_or_default()
        .as_str()
    {
        "" => vec![Setup::Defer, Setup::Coop, Setup::Plain],
        "defer" => vec![Setup::Defer],
        "coop" => vec![Setup::Coop],
        "plain" => vec![Setup::Plain],
        other => {
            return Err(floor::invalid(format!(
                "PD_FLOOR_RING_SETUP={other} (defer, coop or plain)"
            )))
        }
    };
    let cfg = RingConfig {
        setup,
        fixed_files: env_flag("PD_FLOOR_RING_FIXED", true),
        skip_static_sends: env_flag("PD_FLOOR_RING_SKIP", true),
        max_sockets: 3 * 4096,
        buf_count: 1024,
        buf_size: BUF as u32,
        ..RingConfig::default()
    };
    let stats = env_flag("PD_FLOOR_RING_STATS", false);
    let num = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    let batch = num("PD_FLOOR_RING_BATCH").unwrap_or(1).max(1);
    let min_wait =
        std::time::Duration::from_micros(num("PD_FLOOR_RING_MIN_WAIT_US").unwrap_or(0).into());
    let mut ring = Ring::new(&cfg)?;
    ring.listen(floor::listener(bind)?)?;
    eprintln!(
        "pd_floor_ring listening on {bind} (own io_uring: {}; batched waits: {}): prefill {}, decode {}",
        ring.features(),
        if batch > 1 && !min_wait.is_zero() {
            format!("up to {batch} completions or {} us", min_wait.as_micros())
        } else {
            "no".into()
        },
        addr[PREFILL],
        addr[DECODE]
    );

    let mut f = Floor {
        conns: Vec::new(),
        free: Vec::new(),
        net: Net {
            owner: vec![None; cfg.max_sockets as usize],
            addr,
            req: [c, p, d],
        },
    };
    let mut events = Vec::with_capacity(1024);
    let (mut last, mut requests) = (Instant::now(), 0u64);
    loop {
        // Wait for up to one completion per open connection (each awaits one thing at a time), at most `batch`.
        let open = (f.conns.len() - f.free.len()) as u32;
        ring.wait_batch(&mut events, batch.min(open.max(1)), min_wait)?;
        for ev in events.drain(..) {
            requests += f.event(&mut ring, ev)?;
        }
        if stats && last.elapsed().as_secs() >= 1 {
            let s = ring.stats();
            eprintln!(
                "{requests} requests; ring: {} enters, {} sqes, {} cqes, {} recv re-arms, {} ENOBUFS",
                s.enters, s.sqes, s.cqes, s.recv_rearms, s.enobufs
            );
            last = Instant::now();
        }
    }
}

impl Floor {
    /// Handles one event; the number of requests it completed (0 or 1). `Err` only for the ring itself failing.
    fn event(&mut self, ring: &mut Ring, ev: Event) -> io::Result<u64> {
        let (sock, r) = match ev {
            Event::Accepted(s) => {
                let idx = self.free.pop().unwrap_or_else(|| {
                    self.conns.push(None);
                    self.conns.len() - 1
                });
                self.conns[idx] = Some(Conn {
                    idx,
                    up: [Some(s), None, None],
                    state: State::ReadClient,
                    cbuf: Vec::with_capacity(BUF),
                    ubuf: Vec::with_capacity(BUF),
                    retried: false,
                });
                self.net.owner[s.slot()] = Some((idx, CLIENT));
                ring.recv(s)?;
                return Ok(0);
            }
            Event::AcceptFailed(e) => {
                eprintln!("accept: {e}");
                return Ok(0);
            }
            Event::Connected(s, r) => (s, r.map(|()| Input::Connected)),
            Event::Data(s, buf) => (s, Ok(Input::Data(buf))),
            Event::RecvEnded(s, e) => (s, Err(e.unwrap_or(ErrorKind::UnexpectedEof.into()))),
            Event::Sent(s, r, v) => (s, r.map(|()| Input::Sent(v))),
        };
        let Some((idx, role)) = self.net.owner[sock.slot()] else {
            return Ok(0);
        };
        let Some(c) = self.conns[idx].as_mut() else {
            return Ok(0);
        };
        if c.up[role] != Some(sock) {
            // An event reaped in the same batch as its socket's close: the slot may hold a new socket now.
            return Ok(0);
        }
        match c.input(ring, &mut self.net, role, r) {
            Ok(done) => Ok(done),
            Err(_) => {
                // Close the client connection and both upstream ones.
                let c = self.conns[idx].take().expect("checked above");
                for s in c.up.into_iter().flatten() {
                    self.net.owner[s.slot()] = None;
                    ring.close(s)?;
                }
                self.free.push(idx);
                Ok(0)
            }
        }
    }
}

/// What happened on one of a connection's sockets.
enum Input {
    Connected,
    Data(pdx_uring_sys::ring::RecvBuf),
    /// A send completed (the client response's buffer comes back; a static send completes only without
    /// skip-success).
    Sent(Option<Vec<u8>>),
}

impl Conn {
    /// Feeds `r` (on socket `role`) into the state machine and advances it until it waits for a socket.
    /// `Ok(1)` when a response went out to the client. `Err`: close the connection.
    fn input(
        &mut self,
        ring: &mut Ring,
        net: &mut Net,
        role: usize,
        r: io::Result<Input>,
    ) -> io::Result<u64> {
        let mut done = 0;
        match r {
            Ok(Input::Data(buf)) if role == CLIENT => self.cbuf.extend_from_slice(&buf),
            Ok(Input::Data(buf)) if self.state == State::Recv(role) => {
                self.ubuf.extend_from_slice(&buf)
            }
            Ok(Input::Data(_)) => return Err(ErrorKind::InvalidData.into()), // an upstream spoke out of turn
            Ok(Input::Connected) => {
                if self.state != State::Connecting(role) {
                    return Err(ErrorKind::InvalidData.into());
                }
                let s = self.up[role].expect("connecting");
                ring.recv(s)?;
                self.send(ring, net, role)?;
            }
            Ok(Input::Sent(v)) => {
                if role == CLIENT && self.state == State::WriteClient {
                    self.ubuf = v.expect("owned send");
                    self.state = State::ReadClient;
                    done = 1;
                }
            }
            Err(e) if role == CLIENT => return Err(e),
            Err(e) => {
                // An upstream's receive ended or its send failed: reconnect once if it is the one we are in an
                // exchange with and nothing of its answer came yet; drop it if it was idle (it reconnects on
                // the next exchange); else give up.
                let s = self.up[role].take().expect("owned socket");
                net.owner[s.slot()] = None;
                ring.close(s)?;
                match self.state {
                    State::Recv(u) | State::Connecting(u) if u == role => {
                        if self.retried || !self.ubuf.is_empty() {
                            return Err(e);
                        }
                        self.retried = true;
                        self.connect(ring, net, role)?;
                    }
                    _ => {}
                }
            }
        }
        self.drive(ring, net)?;
        Ok(done)
    }

    /// Advances the request cycle as far as the bytes at hand allow.
    fn drive(&mut self, ring: &mut Ring, net: &mut Net) -> io::Result<()> {
        loop {
            match self.state {
                State::ReadClient => {
                    let Some(n) = message_len(&self.cbuf, false)? else {
                        return Ok(());
                    };
                    self.cbuf.drain(..n); // keep a pipelined next request
                    self.retried = false;
                    self.exchange(ring, net, PREFILL)?;
                }
                State::Recv(u) => {
                    let Some(n) = message_len(&self.ubuf, true)? else {
                        return Ok(());
                    };
                    if u == PREFILL {
                        self.retried = false;
                        self.exchange(ring, net, DECODE)?;
                    } else {
                        let client = self.up[CLIENT].expect("client socket");
                        ring.send_vec(client, std::mem::take(&mut self.ubuf), n)?;
                        self.state = State::WriteClient;
                    }
                }
                State::Connecting(_) | State::WriteClient => return Ok(()),
            }
        }
    }

    /// Starts the exchange with upstream `u`: its request goes out now on its open connection, or after a
    /// connect.
    fn exchange(&mut self, ring: &mut Ring, net: &mut Net, u: usize) -> io::Result<()> {
        if self.up[u].is_some() {
            self.send(ring, net, u)
        } else {
            self.connect(ring, net, u)
        }
    }

    fn connect(&mut self, ring: &mut Ring, net: &mut Net, u: usize) -> io::Result<()> {
        let s = ring.connect(net.addr[u])?;
        net.owner[s.slot()] = Some((self.idx, u));
        (self.up[u], self.state) = (Some(s), State::Connecting(u));
        Ok(())
    }

    fn send(&mut self, ring: &mut Ring, net: &Net, u: usize) -> io::Result<()> {
        self.ubuf.clear();
        ring.send_static(self.up[u].expect("connected"), net.req[u])?;
        self.state = State::Recv(u);
        Ok(())
    }
}
