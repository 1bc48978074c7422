//! The router's client-facing front, as a user meets it in the first hour: a router started with
//! `--prefill` and no `--decode`, a router with no worker yet, a wrong API key, and `max_tokens: 0`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Guard against a hang, not a speed assertion.
const GUARD: Duration = Duration::from_secs(20);

/// A child process killed (and reaped) when dropped, so a failed assertion leaves nothing running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(args: &[&str]) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_pdx"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pdx starts"),
    )
}

/// One HTTP/1.1 exchange (`connection: close`): status and body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(GUARD)).unwrap();
    let auth = auth.map_or(String::new(), |a| format!("authorization: Bearer {a}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n{auth}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("response");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Waits until `GET path` answers 200.
fn wait_ok(addr: SocketAddr, path: &str) {
    let end = Instant::now() + GUARD;
    while Instant::now() < end {
        if TcpStream::connect(addr).is_ok() && http(addr, "GET", path, None, "").0 == 200 {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{addr}{path} never answered 200");
}

fn chat(max_tokens: u32) -> String {
    serde_json::json!({"model": "mock", "messages": [{"role": "user", "content": "a b c d"}], "max_tokens": max_tokens})
        .to_string()
}

/// `--prefill` without `--decode` used to start and answer 503 to everything: now it exits at once, saying
/// what is missing.
#[test]
fn prefill_without_decode_exits_with_a_clear_error() {
    let port = free_port().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pdx"))
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--prefill",
            "http://127.0.0.1:9",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pdx starts");
    let end = Instant::now() + GUARD;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pdx serve --prefill alone kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    assert!(
        err.contains("no decode worker") && err.contains("--decode"),
        "{err}"
    );
}

/// A router with no worker answers 503 "no workers registered"; with workers behind `--api-key`, a wrong key
/// is a 401 and `max_tokens: 0` a 400 that no engine ever sees.
#[test]
fn keys_and_bad_requests_are_answered_at_the_front() {
    let empty: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _empty = spawn(&[
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        &empty.port().to_string(),
    ]);
    wait_ok(empty, "/health");
    let (s, b) = http(empty, "POST", "/v1/chat/completions", None, &chat(2));
    assert_eq!(s, 503, "{b}");
    assert!(b.contains("no workers registered"), "{b}");

    let (pp, dp, rp) = (free_port(), free_port(), free_port());
    let mock = |role: &str, port: u16| {
        spawn(&[
            "mock",
            "--role",
            role,
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--instant",
            "--api-key",
            "sk-chaos",
        ])
    };
    let (_p, _d) = (mock("prefill", pp), mock("decode", dp));
    let prefill: SocketAddr = format!("127.0.0.1:{pp}").parse().unwrap();
    let _r = spawn(&[
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        &rp.to_string(),
        "--prefill",
        &format!("http://{prefill}"),
        "--decode",
        &format!("http://127.0.0.1:{dp}"),
        "--api-key",
        "sk-chaos",
    ]);
    let router: SocketAddr = format!("127.0.0.1:{rp}").parse().unwrap();
    wait_ok(prefill, "/health");
    wait_ok(router, "/ready");
    let prompt_tokens = || {
        let (_, m) = http(prefill, "GET", "/metrics", None, "");
        m.lines()
            .filter(|l| l.starts_with("vllm:prompt_tokens_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    for key in [None, Some("sk-wrong")] {
        let (s, b) = http(router, "POST", "/v1/chat/completions", key, &chat(2));
        assert_eq!(s, 401, "{b}");
        assert!(b.contains("AuthenticationError"), "{b}");
    }
    let (s, b) = http(
        router,
        "POST",
        "/v1/chat/completions",
        Some("sk-chaos"),
        &chat(0),
    );
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("max_tokens must be at least 1"), "{b}");
    assert_eq!(
        prompt_tokens(),
        0.0,
        "the prefill engine saw a refused request"
    );
    // The client's key reaches both engines: a good request is served.
    let (s, b) = http(
        router,
        "POST",
        "/v1/chat/completions",
        Some("sk-chaos"),
        &chat(3),
    );
    assert_eq!(s, 200, "{b}");
    assert!(prompt_tokens() > 0.0);
}
