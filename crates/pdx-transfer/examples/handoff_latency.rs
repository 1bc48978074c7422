//! The latency of the engine's thread hand-offs, between two processes of this host: the p50 and p99 of
//! - one 64 × 4 KiB `shm` READ from post to done (completes inside `post`: the request's state changes only);
//! - one 64 × 4 KiB `tcp` READ from post to done (completed by the connection's reader thread, the caller
//!   blocked in `wait`: the completion hand-off between threads);
//! - a notification round trip: this process notifies the peer, whose thread blocked in `wait_notifications`
//!   answers with a notification of its own, which this process waits for (two queue hand-offs and two TCP
//!   frames);
//! - the same round trip between two agents of this process (queue hand-offs only).
//!
//! ```text
//! cargo run --release -p pdx-transfer --example handoff_latency [-- SECONDS_PER_ROW]
//! ```
//!
//! The peer runs in a child process (this example re-executed with `PDX_HANDOFF_PEER=1`). Used to compare the
//! hand-off primitives (docs/transfer.md, "Thread hand-offs"): run old and new builds alternately.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pdx_transfer::{
    Agent, AgentConfig, TransportKind, XferDescList, XferOp, XferOptions, XferRequest, XferStatus,
};

const BATCH: u64 = 64;
const BLOCK: u64 = 4096;

fn peer() {
    let agent = Agent::new(AgentConfig::new("handoff-peer")).expect("agent");
    let _kv = agent.allocate((BATCH * BLOCK) as usize).expect("memory");
    println!("READY {}", agent.listen_addr().expect("listener"));
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .expect("initiator address");
    let initiator = agent.fetch_remote(line.trim()).expect("initiator metadata");
    // Echo every notification until stdin closes (the parent exits or kills us).
    std::thread::spawn(move || loop {
        for n in agent.wait_notifications(Duration::from_secs(1)) {
            let _ = agent.notify(&initiator, n.payload);
        }
    });
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
}

fn quantiles(mut v: Vec<f64>) -> (f64, f64, usize) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99), v.len())
}

fn row(name: &str, secs: f64, mut once: impl FnMut()) {
    for _ in 0..100 {
        once(); // warm-up
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        once();
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (p50, p99, n) = quantiles(samples);
    println!("{name:<40} p50 {p50:>8.2} µs   p99 {p99:>8.2} µs   ({n} samples)");
}

fn post_and_wait(req: &XferRequest) {
    if req.post().expect("post") == XferStatus::InProgress {
        req.wait(None).expect("wait");
    }
}

fn read_request(
    me: &Agent,
    local: u64,
    peer: &str,
    remote: u64,
    transport: TransportKind,
) -> XferRequest {
    let blocks = |base: u64| XferDescList::host_from((0..BATCH).map(|i| (base + i * BLOCK, BLOCK)));
    me.create_xfer_from_descs(
        XferOp::Read,
        &blocks(local),
        peer,
        &blocks(remote),
        XferOptions {
            transport: Some(transport),
            notif: None,
        },
    )
    .expect("request")
}

fn round_trip(from: &Agent, to: &str) {
    from.notify(to, b"ping".to_vec()).expect("notify");
    let mut got = Vec::new();
    while got.is_empty() {
        got = from.wait_notifications(Duration::from_secs(5));
    }
}

fn main() {
    if std::env::var_os("PDX_HANDOFF_PEER").is_some() {
        return peer();
    }
    let secs: f64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("seconds per row"))
        .unwrap_or(2.0);
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env("PDX_HANDOFF_PEER", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("peer process");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = lines
        .find_map(|l| l.ok()?.strip_prefix("READY ").map(str::to_string))
        .expect("peer address");
    let me = Agent::new(AgentConfig::new("handoff-initiator")).expect("agent");
    let kv = me.allocate((BATCH * BLOCK) as usize).expect("memory");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{}", me.listen_addr().expect("listener")).expect("tell the peer");
    let peer = me.fetch_remote(&addr).expect("peer metadata");
    let remote = me
        .remote_metadata(&peer)
        .expect("peer")
        .regions
        .first()
        .expect("peer region")
        .addr;
    for t in [TransportKind::Shm, TransportKind::Tcp] {
        let req = read_request(&me, kv.addr(), &peer, remote, t);
        row(&format!("{t} READ 64 x 4 KiB, post -> done"), secs, || {
            post_and_wait(&req)
        });
    }
    row("notification round trip, 2 processes", secs, || {
        round_trip(&me, &peer)
    });
    // Two agents of this process: notifications are queue pushes, the echo runs on a thread of its own.
    let a = Agent::new(AgentConfig::new("handoff-a")).expect("agent");
    let b = std::sync::Arc::new(Agent::new(AgentConfig::new("handoff-b")).expect("agent"));
    b.load_remote(&a.local_metadata().expect("metadata"))
        .expect("load");
    a.load_remote(&b.local_metadata().expect("metadata"))
        .expect("load");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let echo = {
        let (b, stop) = (b.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for n in b.wait_notifications(Duration::from_millis(100)) {
                    let _ = b.notify("handoff-a", n.payload);
                }
            }
        })
    };
    row("notification round trip, 1 process", secs, || {
        round_trip(&a, "handoff-b")
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = echo.join();
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
}
