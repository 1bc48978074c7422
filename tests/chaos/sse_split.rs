//! A worker whose SSE events arrive split across reads (issue 19's tenth session): the final `data: [DONE]` event
//! in one HTTP chunk and its blank line in the next, a token event cut in the middle of its JSON, sent with pauses
//! so the router reads them as separate frames. The router's event counter once took "`data: [DONE]` in this
//! chunk" for "the `[DONE]` event ended in this chunk", and subtracted one from zero completed events: a panic in a
//! debug build (the router thread gone), a token count wrapped to 2^64 - 1 in a release one. Here: every stream
//! comes back whole, ending with `[DONE]`, the router keeps serving, and its in-flight accounting returns to 0.
//!
//! Driven through the real `pdx` binary (`--worker` in front of a fake OpenAI-compatible engine on loopback).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

/// Two token events, the second cut in the middle of its JSON.
const EVENTS: [&str; 2] = [
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" a\"},\"finish_reason\":null}]}\n\ndata: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"del",
    "ta\":{\"content\":\" b\"},\"finish_reason\":\"length\"}]}\n\n",
];

/// The parts of one streamed answer, each written as its own HTTP chunk after a pause: the token events, then
/// `[DONE]` split one of two ways (chosen by the request's `max_tokens`: 2 the first, 3 the second).
fn parts(max_tokens: u32) -> Vec<&'static str> {
    let done: &[&str] = if max_tokens == 2 {
        // The whole `data: [DONE]` line in one chunk, its blank line in the next.
        &["data: [DONE]\n", "\n"]
    } else {
        // `data: [DONE]` itself cut in two.
        &["data: [DO", "NE]\n\n"]
    };
    EVENTS.iter().chain(done).copied().collect()
}

/// A fake engine: `/health` and `/v1/models` answered, every POST streamed as [`parts`]. Stops on drop.
struct SplitWorker {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl SplitWorker {
    fn start() -> SplitWorker {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let st = st.clone();
                        std::thread::spawn(move || serve(s, &st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        SplitWorker { port, stop }
    }
}

impl Drop for SplitWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Serves one keep-alive connection.
fn serve(mut s: TcpStream, stop: &AtomicBool) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = s.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // One request: the head, then Content-Length bytes.
        let len = loop {
            if let Some(head) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) {
                let text = String::from_utf8_lossy(&buf[..head]).to_ascii_lowercase();
                let body = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= head + body {
                    break head + body;
                }
            }
            match s.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(_) if stop.load(Ordering::Relaxed) => return,
                Err(_) => {}
            }
        };
        let request: Vec<u8> = buf.drain(..len).collect();
        let line = String::from_utf8_lossy(&request);
        let ok = if line.starts_with("GET /v1/models") {
            let body = r#"{"object":"list","data":[{"id":"m","object":"model","created":1,"owned_by":"fake"}]}"#;
            write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .is_ok()
        } else if line.starts_with("GET ") {
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .is_ok()
        } else {
            let max_tokens = if line.contains("\"max_tokens\":3") {
                3
            } else {
                2
            };
            stream(&mut s, &parts(max_tokens))
        };
        if !ok {
            return;
        }
    }
}

/// Writes `parts` as HTTP chunks, 30 ms apart, then the last chunk. False when the router went away.
fn stream(s: &mut TcpStream, parts: &[&str]) -> bool {
    if s.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .is_err()
    {
        return false;
    }
    for p in parts {
        std::thread::sleep(Duration::from_millis(30));
        if write!(s, "{:x}\r\n{p}\r\n", p.len()).is_err() {
            return false;
        }
    }
    s.write_all(b"0\r\n\r\n").is_ok()
}

#[test]
fn events_split_across_reads_come_back_whole_and_the_router_keeps_serving() {
    let worker = SplitWorker::start();
    let port = free_port();
    let mut router = Proc::spawn(&server_args(
        "serve",
        port,
        &["--threads", "1", "--worker", &url(worker.port)],
    ));
    wait_healthy(&mut router, port);
    for round in 0..4 {
        let max_tokens = 2 + round % 2;
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"max_tokens":{max_tokens},"stream":true}}"#
        );
        let r = http(
            port,
            "POST",
            "/v1/chat/completions",
            &[],
            &body,
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("round {round}: no answer: {e}"));
        assert_eq!(r.status, 200, "round {round}: {}", r.body);
        assert_eq!(
            r.body,
            parts(max_tokens).concat(),
            "round {round}: the stream comes back byte for byte"
        );
    }
    // Every request's load is given back (a wrapped token count would leave it far from 0).
    let idle = wait_until(Duration::from_secs(5), || {
        metric(port, "pdx_worker_in_flight").is_some_and(|v| v == 0.0)
    });
    assert!(idle, "in-flight requests did not return to 0");
    assert!(router.exited().is_none(), "the router exited");
}
