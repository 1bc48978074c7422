//! SGLang bootstrap orchestration (`--orchestration sglang-bootstrap`) end to end: against `pdx mock`
//! workers (which answer bootstrap requests), and against small fake workers that record what they
//! receive and behave as SGLang's engines do in PD mode (the decode waits for its prefill peer).

mod common;
use common::*;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SGL: [&str; 2] = ["--orchestration", "sglang-bootstrap"];

/// What a fake worker does with a request.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Prefill: waits until the decode fake has the same room (so the two were sent together), then
    /// answers 200 and marks the room done. Without the decode's request within 5 s it answers 500.
    Prefill,
    /// Prefill that fails: waits for the decode's request as `Prefill`, then answers this status.
    PrefillFail(u16),
    /// Never answers; counts the connection closing.
    Hold,
    /// Decode: records the room, answers once the prefill of that room is done (its KV "arrived"); a
    /// connection closed before that counts as an abort.
    Decode,
}

/// Rooms seen by the decode fakes and rooms whose prefill finished, shared by one set of fakes.
#[derive(Default)]
struct Pairing {
    decode_rooms: Mutex<HashSet<u64>>,
    prefill_done: Mutex<HashSet<u64>>,
}

#[derive(Clone, Debug)]
struct Seen {
    body: serde_json::Value,
    request_id: Option<String>,
}

struct Fake {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    aborted: Arc<AtomicUsize>,
}

impl Fake {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    fn aborted(&self) -> usize {
        self.aborted.load(Ordering::SeqCst)
    }
}

fn room(v: &serde_json::Value) -> u64 {
    v["bootstrap_room"].as_u64().expect("bootstrap_room")
}

/// Reads one request (head and `content-length` body); `None` at EOF and for the router's
/// `GET /health` checks, which it answers.
async fn read_request(s: &mut tokio::net::TcpStream) -> Option<(Seen, Vec<u8>)> {
    let mut buf = Vec::new();
    loop {
        let mut tmp = [0u8; 4096];
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = req.parse(&buf) {
            let header = |name: &str| {
                req.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).to_string())
            };
            if req.path == Some("/health") {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                return None;
            }
            let len: usize = header("content-length")?.parse().ok()?;
            let request_id = header("x-request-id");
            while buf.len() < head + len {
                let n = s.read(&mut tmp).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            let body = serde_json::from_slice(&buf[head..head + len]).ok()?;
            return Some((Seen { body, request_id }, buf));
        }
    }
}

/// The answer of a fake engine: 1 token from a prefill, `max_tokens` from a decode; SSE when asked.
fn answer(status: u16, body: &serde_json::Value, who: &str, tokens: u64) -> Vec<u8> {
    let (ctype, text) = if status != 200 {
        (
            "application/json",
            r#"{"error":{"message":"fake failure","type":"InternalServerError","param":null,"code":500}}"#
                .to_string(),
        )
    } else if body["stream"] == true {
        let mut t = String::new();
        for i in 0..tokens {
            t += &format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{who}{i} \"}}}}]}}\n\n"
            );
        }
        t += "data: [DONE]\n\n";
        ("text/event-stream", t)
    } else {
        let v = serde_json::json!({"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("from-{who}")},
                "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}});
        ("application/json", v.to_string())
    };
    format!(
        "HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    )
    .into_bytes()
}

/// Waits until `done()` or the peer closes the connection (`false`), polling every 5 ms.
async fn wait_or_closed(s: &mut tokio::net::TcpStream, mut done: impl FnMut() -> bool) -> bool {
    let mut b = [0u8; 64];
    loop {
        if done() {
            return true;
        }
        match tokio::time::timeout(Duration::from_millis(5), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return false,
            _ => {}
        }
    }
}

async fn fake(mode: Mode, pairing: Arc<Pairing>) -> Fake {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let aborted = Arc::new(AtomicUsize::new(0));
    let (seen2, aborted2) = (seen.clone(), aborted.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let (seen, aborted, pairing) = (seen2.clone(), aborted2.clone(), pairing.clone());
            tokio::spawn(async move {
                let Some((req, _)) = read_request(&mut s).await else {
                    return;
                };
                seen.lock().unwrap().push(req.clone());
                let r = req.body.get("bootstrap_room").and_then(|v| v.as_u64());
                let tokens = req.body["max_tokens"].as_u64().unwrap_or(16);
                let out = match mode {
                    Mode::Prefill | Mode::PrefillFail(_) => {
                        let paired =
                            || r.is_some_and(|r| pairing.decode_rooms.lock().unwrap().contains(&r));
                        let mut waited = 0;
                        while !paired() && waited < 1000 {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            waited += 1;
                        }
                        match (mode, paired()) {
                            (Mode::Prefill, true) => {
                                pairing.prefill_done.lock().unwrap().extend(r);
                                answer(200, &req.body, "prefill", 1)
                            }
                            (Mode::PrefillFail(st), true) => answer(st, &req.body, "prefill", 1),
                            _ => answer(500, &req.body, "prefill", 1),
                        }
                    }
                    Mode::Hold => {
                        wait_or_closed(&mut s, || false).await;
                        aborted.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    Mode::Decode => {
                        pairing.decode_rooms.lock().unwrap().extend(r);
                        let done =
                            || r.is_some_and(|r| pairing.prefill_done.lock().unwrap().contains(&r));
                        if !wait_or_closed(&mut s, done).await {
                            aborted.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        answer(200, &req.body, "decode", tokens)
                    }
                };
                let _ = s.write_all(&out).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Fake {
        addr,
        seen,
        aborted,
    }
}

fn sgl_router(
    prefill: &[(&str, Option<&str>)],
    decode: &[&str],
    extra: &[&str],
) -> pdx_router::RouterServer {
    let mut args: Vec<&str> = Vec::new();
    for (u, port) in prefill {
        args.extend(["--prefill", u]);
        args.extend(port.iter());
    }
    for u in decode {
        args.extend(["--decode", u]);
    }
    args.extend(SGL);
    args.extend_from_slice(extra);
    router(&args)
}

/// Through `pdx mock` workers: the prefill computes one token, the decode generates the rest with the KV
/// taken as arrived (no NIXL read: the bootstrap path, not the `vllm-nixl` one), streamed or not.
#[tokio::test(flavor = "current_thread")]
async fn sglang_bootstrap_through_mock_workers() {
    let p = mock(&["--role", "prefill", "--instant"]);
    let d = mock(&["--role", "decode", "--instant"]);
    let r = pd(&[&p], &[&d], &SGL);
    let (s, v) = post(r.addr, "/v1/chat/completions", &chat(8, false)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    stream_with_usage(r.addr, 300).await;

    // Each request ran once on each worker: 1 token on the prefill, the rest on the decode.
    assert_eq!(mock_metric(&p, "vllm:generation_tokens_total", ""), 2.0);
    assert_eq!(mock_metric(&d, "vllm:generation_tokens_total", ""), 308.0);
    assert_eq!(d.metric("pdx:kv_blocks_received_total", ""), Some(0.0));
    assert!(eventually(|| mock_metric(&p, "pdx:kv_blocks_held", "") == 0.0).await);
    let m = router_metrics(&r);
    assert_eq!(
        sample(&m, "pdx_pd_phase_seconds_count", "phase=\"prefill\""),
        2.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "pdx_pd_phase_seconds_count",
            "phase=\"decode_first_token\""
        ),
        1.0,
        "{m}"
    );
    assert_eq!(sample(&m, "pdx_ttft_seconds_count", ""), 1.0, "{m}");
    assert_eq!(
        sample(&m, "pdx_pool_choices_total", "role=\"prefill\""),
        2.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "pdx_pool_choices_total", "role=\"decode\""),
        2.0,
        "{m}"
    );
}

/// The same body, with the prefill's host, its bootstrap port and one room, reaches both workers while
/// both are in flight (the fake prefill answers only once the decode has the room); client `bootstrap_*`
/// and `kv_transfer_params` are replaced and removed; each request gets a new room.
#[tokio::test(flavor = "current_thread")]
async fn both_workers_get_the_same_body_at_once() {
    let pairing = Arc::new(Pairing::default());
    let p = fake(Mode::Prefill, pairing.clone()).await;
    let d = fake(Mode::Decode, pairing.clone()).await;
    let r = sgl_router(&[(&p.url(), Some("9123"))], &[&d.url()], &[]);

    let mut body = chat(4, false);
    body["bootstrap_room"] = serde_json::json!(5);
    body["bootstrap_host"] = serde_json::json!("client.example");
    body["bootstrap_port"] = serde_json::json!(1);
    body["kv_transfer_params"] =
        serde_json::json!({"do_remote_prefill": true, "remote_engine_id": "x"});
    body["temperature"] = serde_json::json!(0.25);
    let resp = send(
        r.addr,
        "POST",
        "/v1/chat/completions",
        &[("x-request-id", "req-sgl")],
        body.to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-sgl");
    let v: serde_json::Value = serde_json::from_slice(
        &http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes(),
    )
    .unwrap();
    // The decode's answer, not the prefill's.
    assert_eq!(v["choices"][0]["message"]["content"], "from-decode", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);

    let (ps, ds) = (p.seen(), d.seen());
    assert_eq!((ps.len(), ds.len()), (1, 1));
    assert_eq!(ps[0].body, ds[0].body, "prefill and decode bodies differ");
    let b = &ps[0].body;
    assert_eq!(b["bootstrap_host"], "127.0.0.1");
    assert_eq!(b["bootstrap_port"], 9123);
    assert_ne!(room(b), 5);
    assert!(room(b) < 1 << 63);
    assert!(b.get("kv_transfer_params").is_none(), "{b}");
    assert_eq!(b["temperature"], 0.25);
    assert_eq!(b["max_tokens"], 4);
    assert_eq!(ps[0].request_id.as_deref(), Some("req-sgl"));
    assert_eq!(ds[0].request_id.as_deref(), Some("req-sgl"));

    // Streamed: the decode's events are forwarded; a new room, the default port when none is named.
    let r2 = sgl_router(&[(&p.url(), None)], &[&d.url()], &[]);
    let (s, b) = call(
        r2.addr,
        "POST",
        "/v1/chat/completions",
        &chat(6, true).to_string(),
    )
    .await;
    assert_eq!(s, 200);
    let ev = events(&b);
    assert_eq!(ev.len(), 7, "{ev:?}");
    assert!(ev[0].contains("decode0"), "{ev:?}");
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let (ps, ds) = (p.seen(), d.seen());
    assert_eq!((ps.len(), ds.len()), (2, 2));
    assert_eq!(ps[1].body, ds[1].body);
    assert_eq!(ps[1].body["bootstrap_port"], 8998);
    assert_eq!(ps[1].body["stream"], true);
    assert_ne!(room(&ps[1].body), room(&ps[0].body));
    assert_eq!(p.aborted() + d.aborted(), 0);
}

/// A prefill that fails while its decode waits: the decode request is dropped (its connection closes)
/// and the pair is retried, with a new room, on the other prefill worker.
#[tokio::test(flavor = "current_thread")]
async fn prefill_failure_aborts_the_decode_and_retries_the_pair() {
    let pairing = Arc::new(Pairing::default());
    let bad = fake(Mode::PrefillFail(503), pairing.clone()).await;
    let good = fake(Mode::Prefill, pairing.clone()).await;
    let d = fake(Mode::Decode, pairing.clone()).await;
    let r = sgl_router(
        &[(&bad.url(), None), (&good.url(), None)],
        &[&d.url()],
        &["--prefill-fallback", "fail"],
    );
    for _ in 0..3 {
        let (s, v) = post(r.addr, "/v1/chat/completions", &chat(3, false)).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], "from-decode");
    }
    let failed = bad.seen().len();
    assert!(failed >= 1, "round robin never chose the failing prefill");
    assert_eq!(good.seen().len(), 3);
    // Every failed pair's decode was dropped; every answered one completed.
    assert!(
        eventually(|| d.aborted() == failed).await,
        "{} aborted of {failed}",
        d.aborted()
    );
    assert_eq!(d.seen().len(), 3 + failed);
    let failed_rooms: HashSet<u64> = bad.seen().iter().map(|s| room(&s.body)).collect();
    assert!(good
        .seen()
        .iter()
        .all(|s| !failed_rooms.contains(&room(&s.body))));
    let m = router_metrics(&r);
    assert_eq!(
        sample(&m, "pdx_retries_total", "phase=\"prefill\""),
        failed as f64,
        "{m}"
    );
}

/// The same with `pdx mock` workers and the mock's fault flag: every request succeeds on the good prefill.
#[tokio::test(flavor = "current_thread")]
async fn mock_prefill_fault_is_retried_on_another_prefill() {
    let bad = mock(&["--role", "prefill", "--instant", "--fault-error-rate", "1"]);
    let good = mock(&["--role", "prefill", "--instant"]);
    let d = mock(&["--role", "decode", "--instant"]);
    let r = pd(
        &[&bad, &good],
        &[&d],
        &["--prefill-fallback", "fail", SGL[0], SGL[1]],
    );
    for _ in 0..4 {
        let (s, v) = post(r.addr, "/v1/chat/completions", &chat(2, false)).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 2);
    }
    assert_eq!(mock_metric(&good, "vllm:generation_tokens_total", ""), 4.0);
    assert_eq!(mock_metric(&bad, "vllm:generation_tokens_total", ""), 0.0);
    assert_prefill_retried(&r);
}

/// No prefill worker that can be reached (or none at all): 503 OpenAI error JSON, also with the
/// `decode_only` fallback (an SGLang decode server cannot run without its prefill peer).
#[tokio::test(flavor = "current_thread")]
async fn no_healthy_prefill_is_a_503() {
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let d = mock(&["--role", "decode", "--instant"]);
    let r = sgl_router(
        &[(&refused, None)],
        &[&url(&d)],
        &["--prefill-fallback", "decode_only"],
    );
    let (s, v) = post(r.addr, "/v1/chat/completions", &chat(2, false)).await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["type"], "ServiceUnavailableError");
    assert_eq!(v["error"]["code"], 503);
    let m = router_metrics(&r);
    assert_eq!(
        sample(&m, "pdx_requests_total", "status=\"200\""),
        0.0,
        "{m}"
    );

    // Decode pools but no prefill pool.
    let r = router(&["--decode", &url(&d), SGL[0], SGL[1]]);
    let (s, v) = post(r.addr, "/v1/chat/completions", &chat(2, false)).await;
    assert_eq!(s, 503, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("prefill"),
        "{v}"
    );
}

/// A client that goes away while the pair is in flight takes both upstream requests with it.
#[tokio::test(flavor = "current_thread")]
async fn client_disconnect_aborts_prefill_and_decode() {
    let pairing = Arc::new(Pairing::default());
    let p = fake(Mode::Hold, pairing.clone()).await;
    let d = fake(Mode::Decode, pairing.clone()).await;
    let r = sgl_router(&[(&p.url(), None)], &[&d.url()], &[]);
    let body = chat(4, true).to_string();
    let mut s = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    assert!(eventually(|| p.seen().len() == 1 && d.seen().len() == 1).await);
    drop(s);
    assert!(
        eventually(|| p.aborted() == 1 && d.aborted() == 1).await,
        "prefill aborted {}, decode aborted {}",
        p.aborted(),
        d.aborted()
    );
}

/// A prefill worker registered through `POST /v1/workers` may name its bootstrap port.
#[tokio::test(flavor = "current_thread")]
async fn registered_prefill_worker_brings_its_bootstrap_port() {
    let pairing = Arc::new(Pairing::default());
    let p = fake(Mode::Prefill, pairing.clone()).await;
    let d = fake(Mode::Decode, pairing.clone()).await;
    let r = router(&SGL);
    let reg = |role: &str, url: &str, port: serde_json::Value| serde_json::json!({"role": role, "pool": role, "url": url, "model": "mock", "bootstrap_port": port});
    let (s, v) = post(
        r.addr,
        "/v1/workers",
        &reg("prefill", &p.url(), 70000.into()),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = post(
        r.addr,
        "/v1/workers",
        &reg("prefill", &p.url(), 9555.into()),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = post(
        r.addr,
        "/v1/workers",
        &reg("decode", &d.url(), serde_json::Value::Null),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = post(r.addr, "/v1/chat/completions", &chat(2, false)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(p.seen()[0].body["bootstrap_port"], 9555);
    assert_eq!(p.seen()[0].body, d.seen()[0].body);
}

/// Under the other orchestrations the router pairs nobody: client `bootstrap_*` fields never reach a worker
/// (an engine would wait for a KV handoff that no one set up).
#[tokio::test(flavor = "current_thread")]
async fn client_bootstrap_fields_are_removed_under_other_orchestrations() {
    let worker = fake(Mode::Hold, Arc::new(Pairing::default())).await;
    let r = router(&["--worker", &worker.url()]);
    let mut body = chat(4, false);
    body["bootstrap_host"] = serde_json::json!("10.0.0.9");
    body["bootstrap_port"] = serde_json::json!(1);
    body["bootstrap_room"] = serde_json::json!(7);
    let addr = r.addr;
    let client = tokio::spawn(async move { post(addr, "/v1/chat/completions", &body).await });
    assert!(
        eventually(|| !worker.seen().is_empty()).await,
        "the worker got no request"
    );
    client.abort();
    let got = &worker.seen()[0].body;
    for k in ["bootstrap_host", "bootstrap_port", "bootstrap_room"] {
        assert!(got.get(k).is_none(), "{k} reached the worker: {got}");
    }
    assert_eq!(got["max_tokens"], 4);
}
