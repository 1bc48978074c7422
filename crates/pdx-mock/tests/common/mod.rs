//! Test helpers: start mock servers on 127.0.0.1:0 and talk HTTP/1.1 to them.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use pdx_mock::{MockArgs, MockServer};
use std::net::SocketAddr;
use std::time::Duration;

pub fn start(extra: &[&str]) -> MockServer {
    let mut argv = vec!["pdx-mock", "--host", "127.0.0.1", "--port", "0"];
    argv.extend_from_slice(extra);
    pdx_mock::start(<MockArgs as clap::Parser>::parse_from(argv)).expect("mock starts")
}

pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> hyper::Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
        .unwrap();
    tx.send_request(req).await.expect("response")
}

pub async fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Bytes) {
    let r = send(addr, method, path, body).await;
    let status = r.status().as_u16();
    (
        status,
        r.into_body().collect().await.expect("body").to_bytes(),
    )
}

pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let (s, b) = call(addr, "POST", path, Some(&body.to_string())).await;
    let v = serde_json::from_slice(&b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&b)));
    (s, v)
}

/// SSE payloads of a whole streamed response.
pub async fn stream_events(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Vec<String> {
    let (s, b) = call(addr, "POST", path, Some(&body.to_string())).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let mut p = pdx_protocol::sse::SseParser::new();
    p.feed(&b)
        .into_iter()
        .map(|e| String::from_utf8(e).unwrap())
        .collect()
}

/// Polls `f` until it is true (10 s at most; returns whether it became true).
pub async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

pub fn metric(server: &MockServer, name: &str) -> f64 {
    server.metric(name, "").unwrap_or_else(|| {
        panic!(
            "metric {name} not found in\n{}",
            server.engine.metrics.render()
        )
    })
}
