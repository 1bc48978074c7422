//! Fault injection modes behave as documented in docs/mock.md; self-registration.

mod common;
use common::*;
use http_body_util::BodyExt;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn req() -> serde_json::Value {
    json!({"prompt": "hello there", "max_tokens": 4})
}

#[tokio::test]
async fn error_rate_one_gives_500() {
    let s = start(&["--instant", "--fault-error-rate", "1"]);
    let (st, v) = post_json(s.addr, "/v1/completions", &req()).await;
    assert_eq!(
        (st, v["error"]["type"].as_str()),
        (500, Some("InternalServerError"))
    );
    let (st, _) = call(s.addr, "GET", "/health", None).await;
    assert_eq!(st, 200, "health is not affected");
    s.stop();
}

#[tokio::test]
async fn error_rate_half_fails_some_not_all() {
    let s = start(&["--instant", "--fault-error-rate", "0.5"]);
    let mut fails = 0;
    for _ in 0..100 {
        if post_json(s.addr, "/v1/completions", &req()).await.0 == 500 {
            fails += 1;
        }
    }
    assert!((20..=80).contains(&fails), "{fails} of 100 failed");
    s.stop();
}

#[tokio::test]
async fn hang_never_answers_and_holds_nothing() {
    let s = start(&["--instant", "--fault-hang-rate", "1"]);
    let r = tokio::time::timeout(
        Duration::from_millis(300),
        post_json(s.addr, "/v1/completions", &req()),
    )
    .await;
    assert!(r.is_err(), "hung request must not be answered");
    assert_eq!(s.engine.used_blocks(), 0);
    s.stop();
}

#[tokio::test]
async fn crash_after_n_requests_drops_connections_and_stops() {
    let s = start(&["--instant", "--fault-crash-after", "2"]);
    let addr = s.addr;
    for _ in 0..2 {
        assert_eq!(post_json(addr, "/v1/completions", &req()).await.0, 200);
    }
    // third request: the connection is closed with no response
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = req().to_string();
    c.write_all(format!("POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut buf))
        .await
        .expect("connection closed");
    assert!(
        n.is_err() || buf.is_empty(),
        "no response: {}",
        String::from_utf8_lossy(&buf)
    );
    let r = tokio::task::spawn_blocking(move || s.wait()).await.unwrap();
    assert!(matches!(r, Err(pdx_mock::MockError::Crashed(2))), "{r:?}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn slow_start_answers_503_until_loaded() {
    let s = start(&["--instant", "--fault-slow-start-secs", "600"]);
    let (st, _) = call(s.addr, "GET", "/health", None).await;
    assert_eq!(st, 503);
    let (st, v) = post_json(s.addr, "/v1/completions", &req()).await;
    assert_eq!(
        (st, v["error"]["type"].as_str()),
        (503, Some("ServiceUnavailableError"))
    );
    s.stop();
    let s = start(&["--instant", "--fault-slow-start-secs", "0.2"]);
    assert!(eventually(|| !s.engine.loading()).await);
    let (st, _) = call(s.addr, "GET", "/health", None).await;
    assert_eq!(st, 200);
    s.stop();
}

#[tokio::test]
async fn stream_stalls_after_n_tokens() {
    for flags in [&["--instant"][..], &["--speed", "1000"][..]] {
        let s = start(&[flags, &["--fault-stall-after-tokens", "3"]].concat());
        let body = json!({"prompt": "a b c", "max_tokens": 10, "stream": true});
        let r = send(s.addr, "POST", "/v1/completions", Some(&body.to_string())).await;
        let mut b = r.into_body();
        let mut p = pdx_protocol::sse::SseParser::new();
        let mut events = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_millis(300), b.frame()).await {
                Ok(Some(Ok(f))) => events.extend(p.feed(f.data_ref().unwrap())),
                Ok(_) => panic!("stream ended; it should stall"),
                Err(_) => break,
            }
        }
        assert_eq!(events.len(), 3, "3 tokens, then nothing");
        drop(b);
        assert!(eventually(|| s.engine.used_blocks() == 0).await);
        s.stop();
    }
    // a finite stall resumes and completes
    let s = start(&[
        "--instant",
        "--fault-stall-after-tokens",
        "2",
        "--fault-stall-secs",
        "0.05",
    ]);
    let ev = stream_events(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 5, "stream": true}),
    )
    .await;
    assert_eq!(ev.len(), 6);
    s.stop();
}

#[tokio::test]
async fn self_registration_posts_role_pool_url_model() {
    let router = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", router.local_addr().unwrap());
    let s = start(&[
        "--instant",
        "--role",
        "decode",
        "--kv-transport",
        "inproc",
        "--register",
        &url,
        "--pool",
        "d0",
        "--heartbeat-secs",
        "0.1",
    ]);
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let (mut c, _) = router.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut n = 0;
        while !String::from_utf8_lossy(&buf[..n]).contains('}') {
            n += c.read(&mut buf[n..]).await.unwrap();
        }
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(text.starts_with("POST /v1/workers HTTP/1.1"), "{text}");
        c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        bodies.push(text[text.find('{').unwrap()..].to_string());
    }
    let v: serde_json::Value = serde_json::from_str(&bodies[1]).unwrap();
    assert_eq!(
        v,
        json!({"role": "decode", "pool": "d0", "url": format!("http://127.0.0.1:{}", s.addr.port()), "model": "mock"})
    );
    s.stop();
}
