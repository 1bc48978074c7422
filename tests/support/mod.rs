//! Helpers shared by the CLI tests (`tests/first_hour.rs`, `tests/chaos/`): the `pdx` binary as child
//! processes that are killed when dropped, loopback ports, and bounded waits.

#![allow(dead_code)]

use std::io::{BufRead, Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `pdx` binary under test.
pub fn pdx() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pdx"));
    c.env_remove("RUST_LOG").env_remove("NO_COLOR");
    c
}

/// Runs `pdx ARGS` to its end, killed after 60 s (a guard against hangs, not a speed check).
pub fn run(args: &[&str]) -> Output {
    let mut child = pdx()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pdx starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("pdx {args:?} did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child `pdx` process, killed and reaped when dropped (also when a test fails).
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on 127.0.0.1:port; the status code, or `None` when nothing answers.
pub fn get_status(port: u16, path: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Starts `pdx mock --instant` on 127.0.0.1:port with `extra` flags and waits until `/health` answers 200.
pub fn mock(port: u16, extra: &[&str]) -> Guard {
    let p = port.to_string();
    let child = pdx()
        .args(["mock", "--host", "127.0.0.1", "--port", &p, "--instant"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pdx mock starts");
    let guard = Guard(child);
    wait_until(Duration::from_secs(20), || {
        get_status(port, "/health") == Some(200)
    });
    guard
}

/// Polls `f` every 20 ms until it holds; panics after `limit` (a guard against hangs).
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first stderr line of `child` that contains `needle` (reads at most 50 lines).
pub fn stderr_line_with(child: &mut Child, needle: &str) -> String {
    let err = child.stderr.take().expect("stderr piped");
    let mut lines = std::io::BufReader::new(err).lines();
    for _ in 0..50 {
        match lines.next() {
            Some(Ok(l)) if l.contains(needle) => return l,
            Some(Ok(_)) => continue,
            _ => break,
        }
    }
    panic!("no stderr line with `{needle}`");
}

/// A fresh temporary folder for one test, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// A new empty folder named after `name` and this process.
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("pdx-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
