//! What idle connections cost an agent: the threads and resident memory of a process running one agent (a
//! 64 MiB registered region, default configuration), measured before `N` idle connections (default 1000) are
//! opened to its listener, 2 s after, and 12 s after (connection handlers that served the burst of `Hello`s exit
//! after 10 s without work). Each connection sends one `Hello` (so it is past its handshake, as a real peer's
//! is) and then nothing.
//!
//! ```text
//! cargo run -p pdx-transfer --example idle_connections [-- N]
//! ```
//!
//! The agent runs in a child process (this example re-executed with `PDX_IDLE_AGENT=1`), so the numbers are the
//! agent's alone, read from `/proc/<pid>/status`. Needs `N` + a few dozen file descriptors (`ulimit -n`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use pdx_transfer::wire::{encode_frame, Ctrl, FrameKind};
use pdx_transfer::{Agent, AgentConfig};

fn status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn still_open(s: &mut TcpStream) -> bool {
    let _ = s.set_nonblocking(true);
    let mut b = [0u8; 64];
    let open = matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    let _ = s.set_nonblocking(false);
    open
}

fn main() {
    if std::env::var_os("PDX_IDLE_AGENT").is_some() {
        let agent = Agent::new(AgentConfig::new("idle-target")).expect("agent");
        let _kv = agent.allocate(64 << 20).expect("memory");
        println!("READY {}", agent.listen_addr().expect("listener"));
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        return;
    }
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("N: a number of connections"))
        .unwrap_or(1000);
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env("PDX_IDLE_AGENT", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("agent process");
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = lines
        .find_map(|l| l.ok()?.strip_prefix("READY ").map(str::to_string))
        .expect("agent did not start");
    std::thread::sleep(Duration::from_millis(500));
    let (threads0, rss0) = (status(pid, "Threads"), status(pid, "VmRSS"));
    let hello = encode_frame(
        FrameKind::Hello,
        0,
        &Ctrl::Hello {
            name: "idler".into(),
            instance_id: 1,
        },
    );
    let mut conns: Vec<TcpStream> = (0..n)
        .filter_map(|_| {
            let mut s = TcpStream::connect(&addr).ok()?;
            s.write_all(&hello).ok()?;
            Some(s)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let (threads1, rss1) = (status(pid, "Threads"), status(pid, "VmRSS"));
    let open = conns.iter_mut().map(still_open).filter(|o| *o).count();
    println!("agent process {pid}, listener {addr}");
    println!("{:>24} {:>8} {:>12}", "", "threads", "VmRSS (KiB)");
    println!("{:>24} {threads0:>8} {rss0:>12}", "no connections");
    println!(
        "{:>24} {threads1:>8} {rss1:>12}",
        format!("{n} idle ({open} open)")
    );
    std::thread::sleep(Duration::from_secs(10));
    let (threads2, rss2) = (status(pid, "Threads"), status(pid, "VmRSS"));
    let open2 = conns.iter_mut().map(still_open).filter(|o| *o).count();
    println!(
        "{:>24} {threads2:>8} {rss2:>12}",
        format!("12 s later ({open2} open)")
    );
    println!(
        "per idle connection, 2 s after opening: {:.3} threads, {:.1} KiB",
        (threads1 as f64 - threads0 as f64) / n as f64,
        (rss1 as f64 - rss0 as f64) / n as f64
    );
    drop(conns);
    let _ = child.kill();
    let _ = child.wait();
}
