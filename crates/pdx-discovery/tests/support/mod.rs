//! Test helpers: a real etcd on loopback ports (killed on drop), a TCP proxy that can cut the connection to
//! it, and a sink that records changes.

#![allow(dead_code)]

use pdx_discovery::{Change, Sink};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A guard against hangs, not a speed check.
pub const GUARD: Duration = Duration::from_secs(20);

#[path = "../../../../tests/support/ports.rs"]
mod ports;
pub use ports::free_port;

/// Polls `f` every 20 ms until it holds or `limit` passed.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// An etcd server of its own (one member, loopback ports, a temporary data folder), killed on drop.
pub struct Etcd {
    child: Option<Child>,
    /// Client port.
    pub port: u16,
    peer: u16,
    dir: std::path::PathBuf,
}

impl Etcd {
    /// Starts one, or `None` (printing "skipped: etcd not installed") when there is no `etcd` binary.
    pub fn start(name: &str) -> Option<Etcd> {
        let installed = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            println!("skipped: etcd not installed");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("pdx-etcd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut e = Etcd {
            child: None,
            port: free_port(),
            peer: free_port(),
            dir,
        };
        e.spawn();
        Some(e)
    }

    /// Starts the process (again, on the same ports and data) and waits until it answers.
    pub fn spawn(&mut self) {
        let (c, p) = (
            format!("http://127.0.0.1:{}", self.port),
            format!("http://127.0.0.1:{}", self.peer),
        );
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args([
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args(["--initial-cluster", &format!("t={p}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_until(GUARD, || health(port)),
            "etcd did not become healthy"
        );
    }

    /// Kills the process (the data stays).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `etcd://127.0.0.1:PORT` plus `tail` (a prefix).
    pub fn url(&self, tail: &str) -> String {
        format!("etcd://127.0.0.1:{}{tail}", self.port)
    }

    /// The gRPC endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// etcd's `GET /health` answers `"health":"true"`.
fn health(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("\"health\":\"true\"")
}

/// A TCP proxy on a loopback port in front of `upstream`, whose connections can be cut (and new ones
/// refused) and restored: a network partition between a client and etcd.
pub struct Proxy {
    /// Its port.
    pub port: u16,
    up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// A proxy to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (u, s, c) = (up.clone(), stop.clone(), conns.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((down, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                if !u.load(Ordering::Relaxed) {
                    drop(down);
                    continue;
                }
                let _ = down.set_nonblocking(false);
                let Ok(upc) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let mut list = c.lock().unwrap();
                for (from, to) in [(&down, &upc), (&upc, &down)] {
                    let (mut r, mut w) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut r, &mut w);
                        let _ = w.shutdown(Shutdown::Both);
                    });
                }
                list.push(down);
                list.push(upc);
            }
        });
        Proxy {
            port,
            up,
            stop,
            conns,
        }
    }

    /// Cuts every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::Relaxed);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}

/// A sink that records every change, and a handle to read them.
pub fn recorder() -> (Sink, Arc<Mutex<Vec<Change>>>) {
    let seen: Arc<Mutex<Vec<Change>>> = Arc::default();
    let s = seen.clone();
    (Arc::new(move |cs| s.lock().unwrap().extend(cs)), seen)
}

/// `+url` / `-url` for each change.
pub fn summary(cs: &[Change]) -> Vec<String> {
    cs.iter()
        .map(|c| match c {
            Change::Upsert { worker, .. } => format!("+{}", worker.registration.url),
            Change::Remove { worker, .. } => format!("-{}", worker.registration.url),
        })
        .collect()
}
