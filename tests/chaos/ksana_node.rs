//! A `pdx mock` KsanaLLM node (`--ksana-router`) against what a router or a client can get wrong: a router that
//! answers heartbeats with oversized, malformed or absurd bodies, or names a prefill that never sends the KV.
//! The node must stay up, take nothing it cannot check, and fail the requests that cannot be served with a clear
//! error within its wait, holding nothing afterwards.

use crate::support::*;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A KsanaLLM router that registers every node as `n1` and answers its `n`-th heartbeat with `heartbeat(n)`.
fn hostile_router(heartbeat: fn(usize) -> String) -> (u16, Arc<AtomicUsize>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let beats = Arc::new(AtomicUsize::new(0));
    let b = beats.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // The head, then as many body bytes as it announces.
            let (head, need) = loop {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break (String::new(), 0),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    break (head, i + 4 + len);
                }
            };
            while buf.len() < need {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let (status, body) = if head.starts_with("POST /RegisterNode") {
                (
                    "201 Created",
                    r#"{"node_id":"n1","is_online":true,"last_heartbeat":"2025-01-01T00:00:00Z"}"#
                        .to_string(),
                )
            } else if head.starts_with("POST /Heartbeat") {
                ("200 OK", heartbeat(b.fetch_add(1, Ordering::SeqCst)))
            } else {
                ("404 Not Found", r#"{"detail":"Not Found"}"#.to_string())
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, beats)
}

/// The decode under test listens on this port (the heartbeat answers name it).
static DECODE_PORT: AtomicUsize = AtomicUsize::new(0);

fn key() -> String {
    format!(
        "127.0.0.1:1__127.0.0.1:{}",
        DECODE_PORT.load(Ordering::SeqCst)
    )
}

/// Four hostile answers, then a good one whose comm id names an agent that never sends anything.
fn heartbeat(n: usize) -> String {
    match n {
        // Over the 1 MiB the node reads.
        0 => format!(r#"{{"node_id":"n1","pad":"{}"}}"#, "x".repeat(2 << 20)),
        1 => "{not json".into(),
        // More groups than a node takes.
        2 => {
            let groups: Vec<String> = (0..5000)
                .map(|i| {
                    format!(
                        r#""127.0.0.1:{i}__{}":"""#,
                        key().split("__").nth(1).unwrap()
                    )
                })
                .collect();
            format!(r#"{{"comm_group_to_id":{{{}}}}}"#, groups.join(","))
        }
        // Wrong types.
        3 => format!(
            r#"{{"comm_group_to_id":{{"{}":5}},"comm_group_to_address":7}}"#,
            key()
        ),
        _ => format!(
            r#"{{"node_id":"n1","is_online":true,"group_ready":true,"comm_group_to_address":{{"{k}":[[0,0,"127.0.0.1:1"],[0,0,"127.0.0.1:2"]]}},"comm_group_to_id":{{"{k}":"pdx1;ghost;127.0.0.1:9"}}}}"#,
            k = key()
        ),
    }
}

#[test]
fn a_hostile_ksana_router_or_a_missing_prefill_cannot_wedge_a_node() {
    let (router, beats) = hostile_router(heartbeat);
    let port = free_port();
    DECODE_PORT.store(usize::from(port), Ordering::SeqCst);
    let args = [
        "--role",
        "decode",
        "--ksana-router",
        &url(router),
        "--ksana-heartbeat-ms",
        "50",
        "--ksana-kv-wait-secs",
        "1",
        "--num-blocks",
        "64",
        "--kv-scale-down",
        "64",
    ];
    let mut node = mock(port, &args);
    // Through the four hostile answers the node stays up and takes no group.
    assert!(
        wait_until(GUARD, || beats.load(Ordering::SeqCst) >= 4),
        "the node stopped heartbeating"
    );
    assert!(health_ok(port));
    assert!(node.exited().is_none());
    assert!(
        wait_until(GUARD, || metric(port, "pdx:ksana_comm_groups_ready")
            == Some(1.0)),
        "the node did not take the good answer after the bad ones"
    );
    assert_eq!(metric(port, "pdx:ksana_registered"), Some(1.0));
    // A request whose prefill never sends the KV: 504 within the wait, nothing held.
    let body = r#"{"prompt":"the quick brown fox","stream":false}"#;
    let k = key();
    let h = [
        ("kv-comm-group-key", k.as_str()),
        ("kv-comm-request-id", "77"),
    ];
    let t0 = Instant::now();
    let r = http(port, "POST", "/generate", &h, body, GUARD).expect("an answer");
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(r.body.contains("no KV from the prefill"), "{}", r.body);
    assert!(t0.elapsed() < Duration::from_secs(10));
    // A group the router never named for this node: 503 within the wait (no comm id), also for OpenAI routes.
    let other = format!("127.0.0.1:3__127.0.0.1:{port}");
    let h = [
        ("kv-comm-group-key", other.as_str()),
        ("kv-comm-request-id", "78"),
    ];
    let r = http(
        port,
        "POST",
        "/v1/completions",
        &h,
        r#"{"prompt":"a b","max_tokens":2}"#,
        GUARD,
    )
    .expect("an answer");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("not ready"), "{}", r.body);
    assert_eq!(metric(port, "vllm:num_requests_running"), Some(0.0));
    assert_eq!(metric(port, "vllm:kv_cache_usage_perc"), Some(0.0));
    assert!(health_ok(port));
}
