//! SGLang's bootstrap path: the decode worker generates only once its prefill peer has computed the prompt's
//! KV (as SGLang's decode transfer queue does), and fails with 502 when that KV never comes.

mod common;
use common::*;
use http_body_util::BodyExt;
use pdx_mock::bootstrap::RoomState;
use pdx_mock::synthetic_prompt;
use serde_json::json;
use std::time::Duration;

fn body(prompt_tokens: usize, max_tokens: u32, port: u16, room: u64) -> serde_json::Value {
    json!({"model": "mock", "messages": [{"role": "user", "content": synthetic_prompt(prompt_tokens, room)}],
        "max_tokens": max_tokens, "stream": true,
        "bootstrap_host": "127.0.0.1", "bootstrap_port": port, "bootstrap_room": room})
}

/// Streams `b` to `addr` and returns, at the first token chunk, what `at_first` says; then reads the rest and
/// returns the number of token chunks.
async fn stream_first<T>(
    addr: std::net::SocketAddr,
    b: &serde_json::Value,
    at_first: impl FnOnce() -> T,
) -> (T, usize) {
    let r = send(addr, "POST", "/v1/chat/completions", Some(&b.to_string())).await;
    assert_eq!(r.status(), 200);
    let mut body = r.into_body();
    let mut parser = pdx_protocol::sse::SseParser::new();
    let mut first = Some(at_first);
    let mut seen = None;
    let mut tokens = 0;
    while let Some(f) = body.frame().await {
        let Ok(data) = f.expect("frame").into_data() else {
            continue;
        };
        for e in parser.feed(&data) {
            let v: serde_json::Value = match serde_json::from_slice(&e) {
                Ok(v) => v,
                Err(_) => continue, // [DONE]
            };
            let has_text = v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty());
            if has_text {
                tokens += 1;
                if let Some(f) = first.take() {
                    seen = Some(f());
                }
            }
        }
    }
    (seen.expect("a token chunk"), tokens)
}

/// A slow prefill (a long prompt at a twentieth of the modelled speed) and a fast decode: the decode's first
/// token comes only once the prefill engine has marked the room's KV ready. Without the wait the decode's
/// first token would come within a millisecond, long before the prefill is done.
#[tokio::test]
async fn decode_waits_for_the_prefill_kv() {
    let p = start(&[
        "--role",
        "prefill",
        "--kv-transport",
        "inproc",
        "--speed",
        "0.05",
    ]);
    let d = start(&[
        "--role",
        "decode",
        "--kv-transport",
        "inproc",
        "--speed",
        "50",
    ]);
    let room = 4242;
    let b = body(3000, 5, p.addr.port(), room);
    let mut pb = b.clone();
    pb["stream"] = json!(false);
    let engine = p.engine.clone();
    let (pre, (state_at_first, tokens)) = tokio::join!(
        post_json(p.addr, "/v1/chat/completions", &pb),
        stream_first(d.addr, &b, || engine.rooms.get(room))
    );
    assert_eq!(pre.0, 200, "{}", pre.1);
    assert_eq!(pre.1["usage"]["completion_tokens"], 1);
    assert_eq!(state_at_first, RoomState::Ready);
    assert_eq!(tokens, 5);
    // While it waited the decode request held its blocks and counted as waiting; now all is back.
    assert!(eventually(|| d.engine.used_blocks() == 0).await);
    assert_eq!(metric(&d, "vllm:num_requests_waiting"), 0.0);
    p.stop();
    d.stop();
}

/// The prefill's client goes away before the prompt is computed: the room fails, and the decode answers 502
/// `KVTransferError` without a token, its blocks freed.
#[tokio::test]
async fn a_failed_prefill_fails_its_decode() {
    let p = start(&[
        "--role",
        "prefill",
        "--kv-transport",
        "inproc",
        "--speed",
        "0.01",
    ]);
    let d = start(&["--role", "decode", "--kv-transport", "inproc", "--instant"]);
    let room = 77;
    let mut b = body(3000, 5, p.addr.port(), room);
    b["stream"] = json!(false);
    let prefill = tokio::spawn({
        let b = b.clone();
        let addr = p.addr;
        async move { post_json(addr, "/v1/chat/completions", &b).await }
    });
    let engine = p.engine.clone();
    assert!(
        eventually(|| engine.rooms.get(room) == RoomState::Pending && engine.used_blocks() > 0)
            .await
    );
    let decode = tokio::spawn({
        let b = b.clone();
        let addr = d.addr;
        async move { post_json(addr, "/v1/chat/completions", &b).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !decode.is_finished(),
        "the decode must wait for the prefill"
    );
    prefill.abort(); // drops the prefill's connection: the engine aborts the request
    let (st, v) = tokio::time::timeout(Duration::from_secs(20), decode)
        .await
        .expect("the decode ends")
        .unwrap();
    assert_eq!(st, 502, "{v}");
    assert_eq!(v["error"]["type"], "KVTransferError", "{v}");
    assert_eq!(p.engine.rooms.get(room), RoomState::Failed);
    assert!(eventually(|| d.engine.used_blocks() == 0).await);
    assert_eq!(metric(&d, "vllm:generation_tokens_total"), 0.0);
    p.stop();
    d.stop();
}

/// No bootstrap server at the named port: 502 at once; a decode request without the room's address: 400.
#[tokio::test]
async fn an_unreachable_bootstrap_server_is_a_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let d = start(&["--role", "decode", "--kv-transport", "inproc", "--instant"]);
    let mut b = body(20, 3, port, 9);
    b["stream"] = json!(false);
    let (st, v) = post_json(d.addr, "/v1/chat/completions", &b).await;
    assert_eq!(st, 502, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bootstrap server"),
        "{v}"
    );
    b.as_object_mut().unwrap().remove("bootstrap_host");
    let (st, v) = post_json(d.addr, "/v1/chat/completions", &b).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(d.engine.used_blocks(), 0);
    d.stop();
}

/// `--bootstrap-port` (SGLang's `--disaggregation-bootstrap-port`) serves the same route on a second port.
#[tokio::test]
async fn the_bootstrap_port_serves_the_route() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let port_s = port.to_string();
    let p = start(&[
        "--role",
        "prefill",
        "--kv-transport",
        "inproc",
        "--instant",
        "--bootstrap-port",
        &port_s,
    ]);
    let d = start(&["--role", "decode", "--kv-transport", "inproc", "--instant"]);
    let mut b = body(40, 4, port, 1234);
    b["stream"] = json!(false);
    let (a, c) = tokio::join!(
        post_json(p.addr, "/v1/chat/completions", &b),
        post_json(d.addr, "/v1/chat/completions", &b)
    );
    assert_eq!((a.0, c.0), (200, 200), "{} {}", a.1, c.1);
    assert_eq!(c.1["usage"]["completion_tokens"], 4);
    let (st, bytes) = call(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        "GET",
        "/bootstrap/kv/1234",
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(&bytes[..], br#"{"room":1234,"state":"ready"}"#);
    let (st, _) = call(p.addr, "GET", "/bootstrap/kv/x", None).await;
    assert_eq!(st, 400);
    p.stop();
    d.stop();
}
