//! The router's data path on io_uring's own terms (issue 19): requests that reach it in pieces, pipelined or
//! longer than the read posted while the last answer streamed, answered on both I/O paths (io_uring native, and
//! monoio's legacy epoll driver, the fallback where io_uring is unavailable); and a client that goes away
//! mid-stream ending the engine's request (the pending read on the client sees the EOF, the upstream read in
//! flight is cancelled and its socket closed).

use crate::support::*;
use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A router process, killed on drop.
struct Router(Child);

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `pdx serve` on `port` (monoio's legacy driver forced when `legacy`); returns it with the line it
/// logged about its I/O path.
fn router_logging(port: u16, args: &[&str], legacy: bool) -> (Router, String) {
    let mut cmd = pdx();
    cmd.args(server_args(
        "serve",
        port,
        &[&["--threads", "1"], args].concat(),
    ))
    .env("RUST_LOG", "info")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if legacy {
        cmd.env("MONOIO_FORCE_LEGACY_DRIVER", "1");
    }
    let mut child = cmd.spawn().expect("pdx starts");
    let err = child.stderr.take().expect("stderr piped");
    let r = Router(child);
    let mut lines = std::io::BufReader::new(err).lines();
    let mut found = None;
    for _ in 0..100 {
        match lines.next() {
            Some(Ok(l)) if l.contains("router I/O path") => {
                found = Some(l);
                break;
            }
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    // Keep reading, so the router never blocks on a full pipe; ends when it exits.
    std::thread::spawn(move || lines.for_each(drop));
    (r, found.expect("pdx serve logs its I/O path at start"))
}

fn request(body: &str) -> String {
    format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn completion(prompt: &str, stream: bool) -> String {
    serde_json::json!({"model": "mock", "prompt": prompt, "max_tokens": 4, "stream": stream})
        .to_string()
}

/// Reads more of `s` into `buf`; panics at EOF or after the guard.
fn more(s: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    match s.read(&mut chunk) {
        Ok(0) => panic!("connection closed; got {:?}", String::from_utf8_lossy(buf)),
        Ok(n) => buf.extend_from_slice(&chunk[..n]),
        Err(e) => panic!("read: {e}; got {:?}", String::from_utf8_lossy(buf)),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response off a keep-alive connection (bytes past it stay in `buf`): status and body, dechunked.
fn response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (u16, String) {
    let end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        more(s, buf);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status: u16 = head[9..12].parse().expect("a status code");
    buf.drain(..end);
    let mut body = Vec::new();
    if head.contains("transfer-encoding: chunked") {
        loop {
            let line = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                more(s, buf);
            };
            let size = usize::from_str_radix(std::str::from_utf8(&buf[..line]).unwrap().trim(), 16)
                .expect("a chunk size");
            while buf.len() < line + 2 + size + 2 {
                more(s, buf);
            }
            body.extend_from_slice(&buf[line + 2..line + 2 + size]);
            buf.drain(..line + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
    } else {
        let n: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().expect("a length"))
            .unwrap_or(0);
        while buf.len() < n {
            more(s, buf);
        }
        body.extend(buf.drain(..n));
    }
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn requests_in_pieces_pipelined_and_long_are_answered_on_both_io_paths() {
    let (pp, dp) = (free_port(), free_port());
    let _p = mock(pp, &["--role", "prefill"]);
    let _d = mock(dp, &["--role", "decode"]);
    for legacy in [false, true] {
        let rp = free_port();
        let (_r, io) = router_logging(rp, &["--prefill", &url(pp), "--decode", &url(dp)], legacy);
        if legacy {
            assert!(io.contains("legacy epoll fallback"), "{io}");
        } else if io.contains("legacy epoll fallback") {
            eprintln!(
                "skipped: the io_uring path (io_uring unavailable here; the fallback runs): {io}"
            );
            continue;
        } else {
            assert!(io.contains("io_uring native"), "{io}");
        }
        assert!(wait_until(GUARD, || ready(rp)), "router up ({io})");
        let mut s = TcpStream::connect(("127.0.0.1", rp)).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(GUARD)).unwrap();
        let mut buf = Vec::new();
        // Head and body in 7-byte pieces: every read finds part of a request.
        let r = request(&completion("one two three", false));
        for piece in r.as_bytes().chunks(7) {
            s.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        let (st, body) = response(&mut s, &mut buf);
        assert_eq!(st, 200, "in pieces ({io}): {body}");
        // Two requests in one write: both answered, in order, on the same connection.
        let two = format!(
            "{}{}",
            request(&completion("first", false)),
            request(&completion("second", false))
        );
        s.write_all(two.as_bytes()).unwrap();
        for i in 0..2 {
            let (st, body) = response(&mut s, &mut buf);
            assert_eq!(st, 200, "pipelined request {i} ({io}): {body}");
        }
        // A streamed answer, then a request far longer than the read posted while it streamed.
        s.write_all(request(&completion("stream me", true)).as_bytes())
            .unwrap();
        let (st, body) = response(&mut s, &mut buf);
        assert!(
            st == 200 && body.contains("data: [DONE]"),
            "stream ({io}): {st} {body}"
        );
        let long = "word ".repeat(2000);
        s.write_all(request(&completion(&long, false)).as_bytes())
            .unwrap();
        let (st, body) = response(&mut s, &mut buf);
        assert_eq!(st, 200, "long request after a stream ({io}): {body}");
        assert!(buf.is_empty(), "nothing past the answers ({io})");
    }
}

#[test]
fn a_client_gone_mid_stream_ends_the_engine_request() {
    // A decode engine that takes its time (no --instant): the stream is still running when the client goes.
    let (pp, dp, rp) = (free_port(), free_port(), free_port());
    let _p = mock(pp, &["--role", "prefill"]);
    let mut d = spawn_mock(dp, &["--role", "decode"]);
    wait_healthy(&mut d, dp);
    let (_r, io) = router_logging(rp, &["--prefill", &url(pp), "--decode", &url(dp)], false);
    assert!(wait_until(GUARD, || ready(rp)), "router up ({io})");
    let running = || metric(dp, "vllm:num_requests_running").unwrap_or(-1.0);
    let mut s = TcpStream::connect(("127.0.0.1", rp)).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    let body = serde_json::json!({"model": "mock", "prompt": "go on", "max_tokens": 5000, "ignore_eos": true, "stream": true})
        .to_string();
    s.write_all(request(&body).as_bytes()).unwrap();
    let mut buf = Vec::new();
    while find(&buf, b"data: ").is_none() {
        more(&mut s, &mut buf);
    }
    assert_eq!(running(), 1.0, "the engine runs the stream ({io})");
    drop(s);
    let t = Instant::now();
    assert!(
        wait_until(GUARD, || running() == 0.0),
        "the engine still runs the request {:?} after the client went ({io})",
        t.elapsed()
    );
}
