//! Cancellation, registration, heartbeats, auth, bad input.

mod common;
use common::*;
use http_body_util::BodyExt;
use std::time::Duration;

#[tokio::test(flavor = "current_thread")]
async fn cancellation_reaches_decode_and_prefill() {
    // Decode: the client drops the stream after the first chunk.
    let p = mock(&["--role", "prefill", "--instant"]);
    let d = mock(&["--role", "decode"]);
    let r = pd(&[&p], &[&d], &[]);
    let resp = send(
        r.addr,
        "POST",
        "/v1/chat/completions",
        &[],
        chat(5000, true).to_string(),
    )
    .await;
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    assert!(
        eventually(|| mock_metric(&d, "vllm:request_success_total", "abort") == 1.0).await,
        "decode did not see the abort"
    );
    assert!(
        eventually(|| r
            .shared
            .registry
            .workers()
            .iter()
            .all(|w| w.in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0))
        .await
    );
    // Prefill: a slow prefill (long prompt, slowed-down timing) is cancelled by the client.
    let p2 = mock(&["--role", "prefill", "--speedup", "0.005"]);
    let r2 = pd(&[&p2], &[&d], &[]);
    let body = serde_json::json!({"model":"mock","prompt": pdx_mock::synthetic_prompt(3000, 1),"max_tokens":4}).to_string();
    let _ = tokio::time::timeout(
        Duration::from_millis(300),
        send(r2.addr, "POST", "/v1/completions", &[], body),
    )
    .await;
    assert!(
        eventually(|| mock_metric(&p2, "vllm:request_success_total", "abort") == 1.0).await,
        "prefill did not see the abort"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn registration_heartbeat_expiry_and_auth() {
    let r = router(&["--auth-token", "s3cret", "--heartbeat-ttl-secs", "0.6"]);
    let reg = serde_json::json!({"role":"aggregated","pool":"agg","url":"http://127.0.0.1:1","model":"m"}).to_string();
    let call_auth = |tok: Option<&'static str>, method: &'static str, body: String| {
        let addr = r.addr;
        async move {
            let h: Vec<(&str, &str)> = tok.map(|t| vec![("authorization", t)]).unwrap_or_default();
            send(addr, method, "/v1/workers", &h, body)
                .await
                .status()
                .as_u16()
        }
    };
    assert_eq!(call_auth(None, "POST", reg.clone()).await, 401);
    assert_eq!(
        call_auth(Some("Bearer nope"), "POST", reg.clone()).await,
        401
    );
    assert_eq!(
        call_auth(Some("Bearer s3cret"), "POST", "{".into()).await,
        400
    );
    assert_eq!(
        call_auth(Some("Bearer s3cret"), "POST", reg.clone()).await,
        200
    );
    assert_eq!(r.shared.registry.workers().len(), 1);
    // DELETE drains; an idle drained worker is removed.
    assert_eq!(
        call_auth(None, "DELETE", r#"{"url":"http://127.0.0.1:1"}"#.into()).await,
        401
    );
    assert_eq!(
        call_auth(
            Some("Bearer s3cret"),
            "DELETE",
            r#"{"url":"http://127.0.0.1:1"}"#.into()
        )
        .await,
        200
    );
    assert!(eventually(|| r.shared.registry.workers().is_empty()).await);

    // A mock that registers itself serves traffic, then expires when its heartbeats stop.
    let r = router(&["--heartbeat-ttl-secs", "0.6"]);
    let router_url = format!("http://{}", r.addr);
    let w = mock(&[
        "--instant",
        "--register",
        &router_url,
        "--heartbeat-secs",
        "0.1",
        "--pool",
        "agg",
    ]);
    assert!(eventually(|| r.shared.registry.workers().len() == 1).await);
    let (s, v) = post(r.addr, "/v1/chat/completions", &chat(3, false)).await;
    assert_eq!(s, 200, "{v}");
    // Heartbeats keep it past the TTL.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(r.shared.registry.workers().len(), 1);
    w.stop();
    assert!(
        eventually(|| r.shared.registry.workers().is_empty()).await,
        "not expired"
    );
    let (s, v) = post(r.addr, "/v1/chat/completions", &chat(3, false)).await;
    assert_eq!(s, 503, "{v}");
}

#[tokio::test(flavor = "current_thread")]
async fn bad_input_gets_openai_errors() {
    let a = mock(&["--instant"]);
    let dir = std::env::temp_dir().join(format!("pdx-router-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("pdx.toml");
    std::fs::write(
        &cfg,
        format!(
            "max_body_bytes = 2048\n[[models]]\nname = \"mock\"\n[[models.pools]]\nname = \"agg\"\nrole = \"aggregated\"\nworkers = [\"{}\"]\n",
            url(&a)
        ),
    )
    .unwrap();
    let r = router(&["--config", cfg.to_str().unwrap()]);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/chat/completions", "{not json".into(), 400, "BadRequestError"),
        ("/v1/chat/completions", r#"{"model":"mock","messages":5}"#.into(), 400, "BadRequestError"),
        ("/v1/chat/completions", r#"{"model":"mock","messages":[]}"#.into(), 400, "BadRequestError"),
        ("/v1/completions", r#"{"model":"mock"}"#.into(), 400, "BadRequestError"),
        ("/v1/chat/completions", r#"{"model":"mock","messages":[{"role":"user","content":"x"}],"ttft_target_ms":"fast"}"#.into(), 400, "BadRequestError"),
        ("/v1/chat/completions", format!(r#"{{"model":"mock","messages":[{{"role":"user","content":"{}"}}]}}"#, "x ".repeat(2000)), 413, "RequestEntityTooLarge"),
        ("/v1/chat/completions", r#"{"model":"other","messages":[{"role":"user","content":"x"}]}"#.into(), 404, "NotFoundError"),
        ("/v1/nothing", "{}".into(), 404, "NotFoundError"),
    ];
    for (path, body, status, kind) in cases {
        let (s, b) = call(r.addr, "POST", path, &body).await;
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(s, status, "{path} {body:.80}: {v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert_eq!(v["error"]["code"], status);
    }
    let (s, _) = call(r.addr, "GET", "/v1/chat/completions", "").await;
    assert_eq!(s, 405);
    let (s, b) = call(r.addr, "GET", "/v1/models", "").await;
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&b).contains("\"mock\""));
    // The good request still works after all that.
    let (s, v) = post(r.addr, "/v1/chat/completions", &chat(2, false)).await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = call(r.addr, "GET", "/ready", "").await;
    assert_eq!(s, 200);

    // 503: the only worker refuses connections.
    let dead = router(&["--worker", "http://127.0.0.1:1"]);
    let (s, v) = post(dead.addr, "/v1/chat/completions", &chat(2, false)).await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["type"], "ServiceUnavailableError");

    // 504: the only worker never answers.
    let hang = mock(&["--instant", "--fault-hang-rate", "1"]);
    let slow = router(&["--worker", &url(&hang), "--upstream-timeout-secs", "0.3"]);
    let (s, v) = post(slow.addr, "/v1/chat/completions", &chat(2, false)).await;
    assert_eq!(s, 504, "{v}");
    let m = router_metrics(&slow);
    assert!(m.contains("pdx_worker_state"), "{m}");
}

#[test]
fn example_config_parses_with_its_grid() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples/pdx.toml");
    let args = <pdx_router::ServeArgs as clap::Parser>::parse_from([
        "pdx-serve",
        "--config",
        p.to_str().unwrap(),
    ]);
    let cfg = pdx_router::Config::from_args(&args).expect("example config");
    let m = &cfg.models[0];
    let g = m.grid.as_ref().expect("grid");
    assert_eq!(m.pools.len(), 3);
    assert_eq!(g.select_prefill_pool(100, Some(50.0)), 0);
    assert_eq!(g.select_prefill_pool(100, None), 1);
}

/// A client that stops sending part-way through a request head or body gets 408 and the connection closes
/// after `--client-timeout-secs`, so slow clients cannot hold connections and memory.
#[test]
fn slow_request_head_or_body_gets_408() {
    use std::io::{Read, Write};
    let w = mock(&["--role", "aggregated", "--instant"]);
    let r = router(&["--worker", &url(&w), "--client-timeout-secs", "0.3"]);
    let partial_body = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\":",
        r.addr
    );
    let chunked_body = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {}\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{{\"mod",
        r.addr
    );
    for (what, sent) in [
        (
            "head",
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n".to_string(),
        ),
        ("content-length body", partial_body),
        ("chunked body", chunked_body),
    ] {
        let mut c = std::net::TcpStream::connect(r.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(sent.as_bytes()).unwrap();
        let mut answer = String::new();
        // Ends when the router closes the connection: with the 0.3 s client timeout, not the default 30 s,
        // which would run into this socket's 10 s read timeout and fail the read.
        c.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{what}: {answer:?}");
    }
    assert!(
        pdx_router::Config::from_args(&<pdx_router::ServeArgs as clap::Parser>::parse_from([
            "pdx-serve",
            "--worker",
            "http://127.0.0.1:1",
            "--client-timeout-secs",
            "0",
        ]))
        .is_err()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn registration_urls_are_checked_and_the_registry_is_bounded() {
    let r = router(&[
        "--admin-token",
        "t0k",
        "--max-workers",
        "2",
        "--worker-allow-cidr",
        "127.0.0.0/8",
        "--heartbeat-ttl-secs",
        "0.5",
    ]);
    let auth = [("authorization", "Bearer t0k")];
    let post_reg = |url: &str, pool: &str| {
        let body =
            serde_json::json!({"role":"decode","pool":pool,"url":url,"model":"m"}).to_string();
        let addr = r.addr;
        async move {
            let resp = send(addr, "POST", "/v1/workers", &auth, body).await;
            let s = resp.status().as_u16();
            let b = resp.into_body().collect().await.unwrap().to_bytes();
            (s, String::from_utf8_lossy(&b).to_string())
        }
    };
    // Reads need the token too.
    let resp = send(r.addr, "GET", "/v1/workers", &[], "").await;
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("www-authenticate").is_some());
    // Every malformed URL is a 400 naming `url`.
    for bad in [
        "https://127.0.0.1:1",
        "http://127.0.0.1:0",
        "http://127.0.0.1:65536",
        "http://127.0.0.1:1/v1/completions",
        "http://127.0.0.1:1?a=b",
        "http://127.0.0.1:1#x",
        "http://u:p@127.0.0.1:1",
        "http://127.0.0.1:1\r\nX-Injected: 1",
        "http://127.0.0.1:1\u{7f}",
        "http://",
        "127.0.0.1:1",
    ] {
        let (s, b) = post_reg(bad, "d").await;
        assert_eq!(s, 400, "{bad:?}: {b}");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["error"]["code"], 400, "{b}");
    }
    // Outside the allow-list (or a name that could resolve anywhere): 403.
    for outside in ["http://10.0.0.1:8000", "http://worker.example:8000"] {
        let (s, b) = post_reg(outside, "d").await;
        assert_eq!(s, 403, "{outside}: {b}");
        assert!(b.contains("PermissionDeniedError"), "{b}");
    }
    assert!(r.shared.registry.workers().is_empty());
    // The cap: two registered workers, the third is refused; a heartbeat of a known one is not.
    assert_eq!(post_reg("http://127.0.0.1:1", "d1").await.0, 200);
    assert_eq!(post_reg("http://127.0.0.1:2", "d2").await.0, 200);
    let (s, b) = post_reg("http://127.0.0.1:3", "d3").await;
    assert_eq!(s, 429, "{b}");
    assert!(b.contains("--max-workers"), "{b}");
    assert_eq!(
        post_reg("http://127.0.0.1:1", "d1").await.0,
        200,
        "heartbeat"
    );
    // Their metric series exist, then go with them (and so do the pools registration created).
    for w in r.shared.registry.workers() {
        w.note_series(&w.model.as_str().into(), 200);
        r.shared
            .metrics
            .requests
            .get_or_create(&pdx_router::metrics::RequestLabels {
                model: w.model.as_str().into(),
                pool: w.pool.clone(),
                worker: w.url.clone(),
                status: 200,
                class: "2xx",
            })
            .inc();
    }
    assert!(eventually(|| router_metrics(&r).contains("pdx_worker_state{worker=\"http://127.0.0.1:2\"")).await);
    let m = router_metrics(&r);
    assert!(m.contains("worker=\"http://127.0.0.1:2\""), "{m}");
    // Heartbeats stop: both expire, their series are deleted, and after another TTL their pools too.
    assert!(
        eventually(|| {
            let m = router_metrics(&r);
            r.shared.registry.workers().is_empty()
                && !m.contains("127.0.0.1:1\"")
                && !m.contains("127.0.0.1:2\"")
        })
        .await,
        "{}",
        router_metrics(&r)
    );
    assert!(
        eventually(|| r.shared.registry.snap.load().models.is_empty()).await,
        "pools and models created by registration are removed"
    );
    // Room again.
    assert_eq!(post_reg("http://127.0.0.1:3", "d3").await.0, 200);
}
