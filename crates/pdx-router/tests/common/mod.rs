//! Test helpers: mock workers and a router on 127.0.0.1:0, and an HTTP/1.1 client.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use pdx_mock::{MockArgs, MockServer};
use pdx_router::{RouterServer, ServeArgs};
use std::net::SocketAddr;
use std::time::Duration;

pub fn mock(extra: &[&str]) -> MockServer {
    let mut argv = vec![
        "pdx-mock",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--kv-transport",
        "inproc",
    ];
    argv.extend_from_slice(extra);
    pdx_mock::start(<MockArgs as clap::Parser>::parse_from(argv)).expect("mock starts")
}

pub fn url(m: &MockServer) -> String {
    format!("http://{}", m.addr)
}

pub fn router(args: &[&str]) -> RouterServer {
    let mut argv = vec![
        "pdx-serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--threads",
        "1",
    ];
    argv.extend_from_slice(args);
    pdx_router::start(<ServeArgs as clap::Parser>::parse_from(argv)).expect("router starts")
}

/// A PD router in front of `p` prefill and `d` decode mocks. Each prefill mock's HTTP port is also its SGLang
/// bootstrap port (the mock serves the bootstrap route there), for `--orchestration sglang-bootstrap`.
pub fn pd(prefill: &[&MockServer], decode: &[&MockServer], extra: &[&str]) -> RouterServer {
    let prefill: Vec<(String, String)> = prefill
        .iter()
        .map(|m| (url(m), m.addr.port().to_string()))
        .collect();
    let decode: Vec<String> = decode.iter().map(|m| url(m)).collect();
    let mut args: Vec<&str> = Vec::new();
    for (u, port) in &prefill {
        args.extend(["--prefill", u, port]);
    }
    for u in &decode {
        args.extend(["--decode", u]);
    }
    args.extend_from_slice(extra);
    router(&args)
}

pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> hyper::Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    tx.send_request(b.body(Full::new(body.into())).unwrap())
        .await
        .expect("response")
}

/// A chat completion of `max_tokens` tokens (streamed or not) to the router at `addr`; the body is left unread.
pub async fn chat_request(
    addr: SocketAddr,
    max_tokens: u32,
    stream: bool,
) -> hyper::Response<Incoming> {
    send(
        addr,
        "POST",
        "/v1/chat/completions",
        &[],
        chat(max_tokens, stream).to_string(),
    )
    .await
}

/// Streams a chat completion of `max_tokens` tokens with `include_usage`, asserts a 200, the final `[DONE]` and
/// the usage event's `completion_tokens`, and returns the SSE events.
pub async fn stream_with_usage(addr: SocketAddr, max_tokens: u32) -> Vec<String> {
    let mut body = chat(max_tokens, true);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let (s, b) = call(addr, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(s, 200);
    let ev = events(&b);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    let usage: serde_json::Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], max_tokens);
    ev
}

/// Asserts that the router's metrics count at least one prefill retry.
pub fn assert_prefill_retried(r: &RouterServer) {
    let m = router_metrics(r);
    assert!(
        sample(&m, "pdx_retries_total", "phase=\"prefill\"") >= 1.0,
        "{m}"
    );
}

pub async fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Bytes) {
    let r = send(addr, method, path, &[], body.to_string()).await;
    let s = r.status().as_u16();
    (s, r.into_body().collect().await.expect("body").to_bytes())
}

pub async fn post(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let (s, b) = call(addr, "POST", path, &body.to_string()).await;
    let v = serde_json::from_slice(&b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&b)));
    (s, v)
}

pub fn events(b: &[u8]) -> Vec<String> {
    let mut p = pdx_protocol::sse::SseParser::new();
    p.feed(b)
        .into_iter()
        .map(|e| String::from_utf8(e).unwrap())
        .collect()
}

pub async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Value of the first sample of `name` whose line contains `filter` (0 if absent).
pub fn sample(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .next()
        .unwrap_or(0.0)
}

pub fn mock_metric(m: &MockServer, name: &str, filter: &str) -> f64 {
    m.metric(name, filter).unwrap_or(0.0)
}

pub fn router_metrics(r: &RouterServer) -> String {
    r.shared.metrics.encode()
}

pub fn chat(max_tokens: u32, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "mock",
        "messages": [{"role": "user", "content": pdx_mock::synthetic_prompt(40, 7)}],
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": stream,
    })
}
