//! KsanaLLM node side (`--ksana-router`): registration, heartbeats and comm ids against a small in-test
//! router that answers as KsanaLLM's simple_router does, and requests sent to a prefill and a decode at once
//! with `kv-comm-*` headers (as the router sends them): the decode reads the prefill's KV through pdx-transfer,
//! verifies it, and answers what an aggregated engine answers. The real simple_router is driven by the root
//! crate's `tests/ksana_peer.rs`.

mod common;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use pdx_mock::synthetic_prompt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
struct Node {
    id: String,
    role: String,
    rank: u64,
    inference: String,
    coordinator: String,
}

/// The node API of KsanaLLM's simple_router, reduced to what a node sees: nodes, comm ids, and per heartbeat
/// one `prefill__decode` group per opposite-role rank-0 node (tuples and id once the prefill registered one).
#[derive(Default)]
struct FakeRouter {
    nodes: Mutex<Vec<Node>>,
    ids: Mutex<HashMap<String, String>>,
    registrations: Mutex<u32>,
}

impl FakeRouter {
    fn answer(&self, path: &str, body: &[u8]) -> (u16, Value) {
        let v: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(_) => return (422, json!({"detail": "bad json"})),
        };
        match path {
            "/RegisterNode" => {
                let devices = v["devices"].as_array().map_or(0, Vec::len) as u64;
                if devices == 0 || v["world_size"].as_u64().unwrap_or(0) < devices {
                    return (
                        400,
                        json!({"detail": "world_size or devices must be provided"}),
                    );
                }
                let coordinator = v["coordinator_addr"].as_str().unwrap_or("").to_string();
                let mut nodes = self.nodes.lock().unwrap();
                *self.registrations.lock().unwrap() += 1;
                let id = match nodes.iter().find(|n| n.coordinator == coordinator) {
                    Some(n) => n.id.clone(),
                    None => {
                        let id = format!("node{}", nodes.len() + 100);
                        nodes.push(Node {
                            id: id.clone(),
                            role: v["group_role"].as_str().unwrap_or("").into(),
                            rank: v["node_rank"].as_u64().unwrap_or(0),
                            inference: v["inference_addr"].as_str().unwrap_or("").into(),
                            coordinator,
                        });
                        id
                    }
                };
                (
                    201,
                    json!({"node_id": id, "is_online": true, "last_heartbeat": "2025-01-01T00:00:00Z"}),
                )
            }
            "/Heartbeat" => {
                let nodes = self.nodes.lock().unwrap();
                let Some(me) = nodes.iter().find(|n| v["node_id"] == n.id.as_str()) else {
                    return (404, json!({"detail": "Node not found"}));
                };
                let ids = self.ids.lock().unwrap();
                let (mut addrs, mut cids) = (serde_json::Map::new(), serde_json::Map::new());
                for other in nodes.iter().filter(|n| n.role != me.role && n.rank == 0) {
                    let (p, d) = if me.role == "prefill" {
                        (me, other)
                    } else {
                        (other, me)
                    };
                    let key = format!("{}__{}", p.inference, d.inference);
                    let id = ids.get(&key).cloned().unwrap_or_default();
                    let tuples = if id.is_empty() {
                        json!([])
                    } else {
                        json!([[0, 0, p.coordinator], [0, 0, d.coordinator]])
                    };
                    addrs.insert(key.clone(), tuples);
                    cids.insert(key, id.into());
                }
                (
                    200,
                    json!({"node_id": me.id, "is_online": true, "group_ready": true,
                    "coordinator_addr": me.coordinator, "node_role": me.role, "timestamp": "2025-01-01T00:00:00",
                    "comm_group_to_address": addrs, "comm_group_to_id": cids}),
                )
            }
            "/RegisterCommId" => {
                let nodes = self.nodes.lock().unwrap();
                let Some(me) = nodes.iter().find(|n| v["node_id"] == n.id.as_str()) else {
                    return (404, json!({"detail": "Node not found"}));
                };
                if me.role != "prefill" || me.rank != 0 {
                    return (
                        403,
                        json!({"detail": "Only prefill rank-0 nodes may register comm ids"}),
                    );
                }
                let (key, id) = (
                    v["comm_key"].as_str().unwrap_or(""),
                    v["comm_id"].as_str().unwrap_or(""),
                );
                self.ids.lock().unwrap().insert(key.into(), id.into());
                (200, json!({"status": "OK", "comm_id": id}))
            }
            _ => (404, json!({"detail": "Not Found"})),
        }
    }

    /// Forgets every node and comm id (a router that lost its database).
    fn reset(&self) {
        self.nodes.lock().unwrap().clear();
        self.ids.lock().unwrap().clear();
    }
}

async fn fake_router() -> (SocketAddr, Arc<FakeRouter>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let router = Arc::new(FakeRouter::default());
    let r = router.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let r = r.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let r = r.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let (status, v) = r.answer(&path, &body);
                            let mut resp =
                                hyper::Response::new(Full::new(Bytes::from(v.to_string())));
                            *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, router)
}

/// POST `body` to `addr` with `headers`: the status and the whole body.
async fn post_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, Bytes) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tx
        .send_request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

/// A prefill and a decode registered with `router`, their comm group usable on both.
async fn pair(router: SocketAddr, extra: &[&str]) -> (pdx_mock::MockServer, pdx_mock::MockServer) {
    let url = format!("http://{router}");
    let common = [
        &[
            "--ksana-router",
            &url,
            "--ksana-heartbeat-ms",
            "50",
            "--num-blocks",
            "64",
            "--kv-scale-down",
            "64",
        ][..],
        extra,
    ]
    .concat();
    let p = start(&[&["--role", "prefill"][..], &common].concat());
    let d = start(&[&["--role", "decode"][..], &common].concat());
    let ready = |s: &pdx_mock::MockServer| s.metric("pdx:ksana_comm_groups_ready", "") == Some(1.0);
    assert!(
        eventually(|| ready(&p) && ready(&d)).await,
        "the comm group did not become ready:\n{}\n{}",
        p.engine.metrics.render(),
        d.engine.metrics.render()
    );
    assert_eq!(p.metric("pdx:ksana_registered", ""), Some(1.0));
    (p, d)
}

fn key(p: &pdx_mock::MockServer, d: &pdx_mock::MockServer) -> String {
    format!("{}__{}", p.addr, d.addr)
}

/// Sends `body` to the prefill and the decode at once, as a KsanaLLM router does.
async fn both(
    p: &pdx_mock::MockServer,
    d: &pdx_mock::MockServer,
    path: &str,
    rid: &str,
    body: &Value,
) -> ((u16, Bytes), (u16, Bytes)) {
    let k = key(p, d);
    let h = [
        ("kv-comm-group-key", k.as_str()),
        ("kv-comm-request-id", rid),
    ];
    tokio::join!(
        post_with(p.addr, path, &h, body),
        post_with(d.addr, path, &h, body)
    )
}

fn chunks(b: &[u8]) -> Vec<Value> {
    assert_eq!(b.last(), Some(&0), "a /generate stream ends with \\0");
    b.split(|c| *c == 0)
        .filter(|c| !c.is_empty())
        .map(|c| serde_json::from_slice(c).unwrap())
        .collect()
}

async fn handoff(extra: &[&str]) {
    let (router, _) = fake_router().await;
    let (p, d) = pair(router, extra).await;
    let agg = start(&["--instant"]);
    let prompt = synthetic_prompt(100, 3);
    let gen = json!({"prompt": prompt, "sampling_config": {"max_new_tokens": 9, "temperature": 0.0, "topk": 1, "stop_token_ids": []}, "stream": false});
    let (st, want) = call(agg.addr, "POST", "/generate", Some(&gen.to_string())).await;
    assert_eq!(st, 200);
    let want: Value = serde_json::from_slice(&want).unwrap();
    assert_eq!(want["output_token_ids"][0].as_array().unwrap().len(), 9);
    assert_eq!(want["input_token_ids"].as_array().unwrap().len(), 100);

    // Not streamed: the prefill answers one token, the decode the whole answer, after reading 7 blocks.
    let ((ps, pb), (ds, db)) = both(&p, &d, "/generate", "101", &gen).await;
    assert_eq!(ps, 200, "{}", String::from_utf8_lossy(&pb));
    assert_eq!(ds, 200, "{}", String::from_utf8_lossy(&db));
    let pv: Value = serde_json::from_slice(&pb).unwrap();
    let dv: Value = serde_json::from_slice(&db).unwrap();
    assert_eq!(dv, want);
    assert_eq!(
        pv["output_token_ids"][0],
        json!([want["output_token_ids"][0][0]])
    );
    assert_eq!(metric(&d, "pdx:kv_blocks_received_total"), 7.0);
    assert_eq!(metric(&p, "pdx:ksana_kv_handoffs_total"), 1.0);
    assert!(eventually(|| p.engine.held_requests() == 0 && p.engine.used_blocks() == 0).await);

    // Streamed: cumulative chunks; the decode's last is the whole answer, the prefill's one its first token.
    let mut sgen = gen.clone();
    sgen["stream"] = json!(true);
    sgen["prompt"] = json!(synthetic_prompt(40, 4));
    let mut agen = sgen.clone();
    agen["stream"] = json!(false);
    let (_, want) = call(agg.addr, "POST", "/generate", Some(&agen.to_string())).await;
    let want: Value = serde_json::from_slice(&want).unwrap();
    let ((ps, pb), (ds, db)) = both(&p, &d, "/generate", "102", &sgen).await;
    assert_eq!((ps, ds), (200, 200), "{}", String::from_utf8_lossy(&db));
    let pc = chunks(&pb);
    assert_eq!(pc.len(), 1);
    assert_eq!(
        pc[0]["output_token_ids"][0],
        json!([want["output_token_ids"][0][0]])
    );
    let dc = chunks(&db);
    assert_eq!(dc.last().unwrap(), &want);
    assert_eq!(
        dc[0]["output_token_ids"][0][0],
        want["output_token_ids"][0][0]
    );
    assert_eq!(metric(&d, "pdx:kv_blocks_received_total"), 7.0 + 3.0);

    // OpenAI chat, streamed and not: the decode's answer is the aggregated one.
    let chat = json!({"model": "mock", "messages": [{"role": "user", "content": synthetic_prompt(60, 5)}], "max_tokens": 6});
    let (_, av) = post_json(agg.addr, "/v1/chat/completions", &chat).await;
    let ((ps, pb), (ds, db)) = both(&p, &d, "/v1/chat/completions", "103", &chat).await;
    assert_eq!((ps, ds), (200, 200), "{}", String::from_utf8_lossy(&db));
    let pv: Value = serde_json::from_slice(&pb).unwrap();
    let dv: Value = serde_json::from_slice(&db).unwrap();
    assert_eq!(pv["usage"]["completion_tokens"], 1);
    assert_eq!(
        dv["choices"][0]["message"]["content"],
        av["choices"][0]["message"]["content"]
    );
    let mut schat = chat.clone();
    schat["stream"] = json!(true);
    schat["messages"][0]["content"] = json!(synthetic_prompt(61, 6));
    let ((ps, _), (ds, db)) = both(&p, &d, "/v1/chat/completions", "104", &schat).await;
    assert_eq!((ps, ds), (200, 200));
    let text: String = pdx_protocol::sse::SseParser::new()
        .feed(&db)
        .into_iter()
        .filter_map(|e| serde_json::from_slice::<Value>(&e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    let mut achat = schat.clone();
    achat["stream"] = json!(false);
    let (_, av) = post_json(agg.addr, "/v1/chat/completions", &achat).await;
    assert_eq!(json!(text), av["choices"][0]["message"]["content"]);
    assert_eq!(metric(&p, "pdx:ksana_kv_handoffs_total"), 4.0);
    assert_eq!(metric(&d, "pdx:kv_transfer_errors_total"), 0.0);
    assert!(eventually(|| p.engine.held_requests() == 0 && p.engine.used_blocks() == 0).await);
    assert!(eventually(|| d.engine.used_blocks() == 0).await);
}

#[tokio::test]
async fn prefill_and_decode_hand_kv_over_per_request_instant() {
    handoff(&["--instant"]).await;
}

#[tokio::test]
async fn prefill_and_decode_hand_kv_over_per_request_timed() {
    handoff(&["--speed", "50"]).await;
}

#[tokio::test]
async fn bad_or_orphan_ksana_requests_fail_clearly_and_leak_nothing() {
    let (router, _) = fake_router().await;
    let (p, d) = pair(router, &["--instant", "--ksana-kv-wait-secs", "0.3"]).await;
    let gen = json!({"prompt": synthetic_prompt(40, 9), "stream": false});
    let k = key(&p, &d);
    // A decode whose prefill never got the request: 504 after the wait, nothing held.
    let h = [
        ("kv-comm-group-key", k.as_str()),
        ("kv-comm-request-id", "7"),
    ];
    let (st, b) = post_with(d.addr, "/generate", &h, &gen).await;
    assert_eq!(st, 504, "{}", String::from_utf8_lossy(&b));
    assert!(String::from_utf8_lossy(&b).contains("no KV from the prefill"));
    assert_eq!(d.engine.used_blocks(), 0);
    // A prefill whose decode never comes: its blocks are released when the decode's notice expires.
    let (st, _) = post_with(
        p.addr,
        "/generate",
        &[("kv-comm-group-key", &k), ("kv-comm-request-id", "8")],
        &gen,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(p.engine.held_requests(), 1);
    assert!(eventually(|| p.engine.held_requests() == 0 && p.engine.used_blocks() == 0).await);
    // Groups without this node, malformed or half headers: 400.
    for h in [
        vec![
            ("kv-comm-group-key", "127.0.0.1:1__127.0.0.1:2"),
            ("kv-comm-request-id", "1"),
        ],
        vec![
            ("kv-comm-group-key", "nonsense"),
            ("kv-comm-request-id", "1"),
        ],
        vec![("kv-comm-group-key", k.as_str())],
        vec![
            ("kv-comm-group-key", k.as_str()),
            ("kv-comm-request-id", "a/b"),
        ],
    ] {
        for s in [&p, &d] {
            let (st, b) = post_with(s.addr, "/generate", &h, &gen).await;
            assert_eq!(st, 400, "{h:?}: {}", String::from_utf8_lossy(&b));
            let (st, _) = post_with(
                s.addr,
                "/v1/completions",
                &h,
                &json!({"prompt": "a b", "max_tokens": 2}),
            )
            .await;
            assert_eq!(st, 400);
        }
    }
    // A prefill or decode started without --ksana-router refuses the headers; an aggregated engine serves whole.
    let plain = start(&["--instant", "--role", "decode"]);
    let agg = start(&["--instant"]);
    let h = [
        ("kv-comm-group-key", k.as_str()),
        ("kv-comm-request-id", "9"),
    ];
    let (st, b) = post_with(plain.addr, "/generate", &h, &gen).await;
    assert_eq!(st, 400, "{}", String::from_utf8_lossy(&b));
    assert!(String::from_utf8_lossy(&b).contains("--ksana-router"));
    let (st, _) = post_with(agg.addr, "/generate", &h, &gen).await;
    assert_eq!(st, 200);
    assert_eq!(metric(&p, "pdx:kv_blocks_held"), 0.0);
}

#[tokio::test]
async fn nodes_register_again_when_the_router_forgets_them() {
    let (router, fake) = fake_router().await;
    let (p, d) = pair(router, &["--instant"]).await;
    let before = *fake.registrations.lock().unwrap();
    fake.reset();
    // Heartbeats are refused (404), both register again, the prefill registers its comm id again.
    assert!(
        eventually(|| fake.nodes.lock().unwrap().len() == 2 && fake.ids.lock().unwrap().len() == 1)
            .await
    );
    assert!(*fake.registrations.lock().unwrap() >= before + 2);
    let ready = |s: &pdx_mock::MockServer| s.metric("pdx:ksana_comm_groups_ready", "") == Some(1.0);
    assert!(eventually(|| ready(&p) && ready(&d)).await);
    let gen = json!({"prompt": synthetic_prompt(20, 1), "stream": false});
    let ((ps, _), (ds, db)) = both(&p, &d, "/generate", "1", &gen).await;
    assert_eq!((ps, ds), (200, 200), "{}", String::from_utf8_lossy(&db));
}

#[test]
fn ksana_flags_are_checked_at_start() {
    let bad = |extra: &[&str]| {
        let mut argv = vec![
            "pdx-mock",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--instant",
        ];
        argv.extend_from_slice(extra);
        pdx_mock::start(<pdx_mock::MockArgs as clap::Parser>::parse_from(argv)).unwrap_err()
    };
    for extra in [
        &["--ksana-router", "http://127.0.0.1:9"][..],
        &["--role", "decode", "--ksana-router", "ftp://x"],
        &[
            "--role",
            "decode",
            "--ksana-router",
            "http://127.0.0.1:9",
            "--world-size",
            "0",
        ],
        &[
            "--role",
            "decode",
            "--ksana-router",
            "http://127.0.0.1:9",
            "--ksana-kv-wait-secs",
            "0",
        ],
        &[
            "--role",
            "prefill",
            "--ksana-router",
            "http://127.0.0.1:9",
            "--ksana-inference-addr",
            "a__b:1",
        ],
    ] {
        assert!(
            matches!(bad(extra), pdx_mock::MockError::Config(_)),
            "{extra:?}"
        );
    }
}
