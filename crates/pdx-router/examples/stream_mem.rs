//! Router memory per in-flight stream, by allocator statistics and by RSS.
//!
//! Starts `pdx serve` in this process (one thread) in front of running workers (a decode worker that
//! stalls, e.g. `pdx mock --role decode --instant --fault-stall-after-tokens 1`), opens `--streams`
//! client connections with a streamed completion each, waits until every one has its first token,
//! and prints the live heap bytes (allocated − freed, counted by `stats_alloc`) and the RSS
//! (`/proc/self/status` `VmRSS`) per in-flight stream. The client side uses plain blocking sockets
//! and stack buffers, so it adds no heap bytes. `--sequential` opens one stream at a time (no
//! concurrent prefills: the prefill pool keeps one connection), else all are opened at once (wrk
//! style: many prefills at once, up to 256 of them stay pooled).
//!
//! ```text
//! cargo run --release -p pdx-router --example stream_mem -- \
//!     --prefill http://127.0.0.1:18201 --decode http://127.0.0.1:18203 --streams 500
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

// The system allocator counted by `stats_alloc`, or (with `--features mimalloc`) mimalloc, whose live heap is not
// counted here (`stats_alloc` wraps only the system allocator on stable Rust): RSS alone then.
#[cfg(not(feature = "mimalloc"))]
#[global_allocator]
static GLOBAL: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Live heap bytes (allocated − freed), `None` under mimalloc.
fn live_heap() -> Option<i64> {
    #[cfg(not(feature = "mimalloc"))]
    {
        let s = GLOBAL.stats();
        Some(s.bytes_allocated as i64 - s.bytes_deallocated as i64 + s.bytes_reallocated as i64)
    }
    #[cfg(feature = "mimalloc")]
    None
}

fn rss_kib() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

const BODY: &str = r#"{"model":"mock","prompt":"the quick brown fox","max_tokens":1000,"ignore_eos":true,"stream":true}"#;

/// Sends the request and reads until the first SSE event has arrived.
fn open(addr: SocketAddr, req: &[u8]) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(req)?;
    let mut buf = [0u8; 4096];
    let mut seen = 0usize;
    loop {
        let n = s.read(&mut buf[seen.min(2048)..])?;
        if n == 0 {
            return Err(std::io::Error::other("closed before the first event"));
        }
        let end = seen.min(2048) + n;
        if buf[..end].windows(5).any(|w| w == b"data:") {
            return Ok(s);
        }
        seen = end;
        if seen >= 2048 {
            // keep the tail only
            buf.copy_within(seen - 8..seen, 0);
            seen = 8;
        }
    }
}

fn main() -> anyhow::Result<()> {
    let mut prefill = None;
    let mut decode = None;
    let mut streams = 500usize;
    let mut sequential = false;
    let mut exit_held = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--prefill" => prefill = args.next(),
            "--decode" => decode = args.next(),
            "--streams" => streams = args.next().and_then(|v| v.parse().ok()).unwrap_or(500),
            "--sequential" => sequential = true,
            // Exit with the streams still open (a heap profiler then lists their memory as leaks).
            "--exit-held" => exit_held = true,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let decode = decode.ok_or_else(|| anyhow::anyhow!("--decode URL is required"))?;
    let mut argv = vec![
        "pdx-serve".to_string(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        "0".into(),
        "--threads".into(),
        "1".into(),
        "--decode".into(),
        decode,
    ];
    if let Some(p) = prefill {
        argv.extend(["--prefill".into(), p]);
    }
    let server = pdx_router::start(<pdx_router::ServeArgs as clap::Parser>::parse_from(argv))?;
    let addr = server.addr;
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    // Wait until the router sees healthy workers (its first health check may predate them).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut s = TcpStream::connect(addr)?;
        s.write_all(
            format!("GET /ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )?;
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf)?;
        if &buf[9..12] == b"200" {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "router not ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Warm-up: one stream opened and closed (first-use allocations: metrics series, pools).
    drop(open(addr, req.as_bytes())?);
    std::thread::sleep(Duration::from_millis(300));
    let mut held: Vec<TcpStream> = Vec::with_capacity(streams);
    let (h0, r0) = (live_heap(), rss_kib());
    let t0 = Instant::now();
    if sequential {
        for _ in 0..streams {
            held.push(open(addr, req.as_bytes())?);
        }
    } else {
        // Write every request first, then wait for the first events (all prefills at once).
        let mut pending = Vec::with_capacity(streams);
        for _ in 0..streams {
            let mut s = TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.write_all(req.as_bytes())?;
            pending.push(s);
        }
        let mut buf = [0u8; 4096];
        for mut s in pending {
            loop {
                let n = s.read(&mut buf)?;
                anyhow::ensure!(n > 0, "closed before the first event");
                if buf[..n].windows(5).any(|w| w == b"data:") {
                    break;
                }
            }
            held.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let (h1, r1) = (live_heap(), rss_kib());
    let n = held.len() as i64;
    let heap = match (h0, h1) {
        (Some(h0), Some(h1)) => format!(
            "live heap +{} B = {} B per stream",
            h1 - h0,
            (h1 - h0) / n.max(1)
        ),
        _ => "live heap not counted (mimalloc)".to_string(),
    };
    println!(
        "{} streams in flight ({} opening, {:.2} s): {heap}; RSS +{} KiB = {} B per stream",
        n,
        if sequential {
            "sequential"
        } else {
            "concurrent"
        },
        t0.elapsed().as_secs_f64(),
        r1 - r0,
        (r1 - r0) * 1024 / n.max(1)
    );
    if exit_held {
        std::process::exit(0)
    }
    drop(held);
    std::thread::sleep(Duration::from_millis(500));
    if let (Some(h0), Some(h2)) = (h0, live_heap()) {
        println!(
            "after closing them: live heap {:+} B vs before (pooled prefill connections stay)",
            h2 - h0
        );
    }
    // Exit without tearing the server down (its threads run until the process ends).
    std::process::exit(0)
}
