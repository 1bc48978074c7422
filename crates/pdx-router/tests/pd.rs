//! PD (vLLM NixlConnector) flow end to end against mock prefill/decode workers.

mod common;
use common::*;
use http_body_util::BodyExt;

#[tokio::test(flavor = "current_thread")]
async fn pd_non_streaming_and_request_id() {
    let p = mock(&["--role", "prefill", "--instant"]);
    let d = mock(&["--role", "decode", "--instant"]);
    let r = pd(&[&p], &[&d], &[]);
    let resp = send(
        r.addr,
        "POST",
        "/v1/chat/completions",
        &[("x-request-id", "req-abc")],
        chat(8, false).to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-abc");
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // The prefill ran one 1-token request, the decode read its KV and produced 8 tokens.
    assert_eq!(mock_metric(&p, "vllm:generation_tokens_total", ""), 1.0);
    assert_eq!(mock_metric(&d, "vllm:generation_tokens_total", ""), 8.0);
    assert!(eventually(|| mock_metric(&p, "pdx:kv_blocks_held", "") == 0.0).await);
    // A generated request id when none is sent.
    let resp = send(
        r.addr,
        "POST",
        "/v1/completions",
        &[],
        serde_json::json!({"model":"mock","prompt":"a b c","max_tokens":3}).to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("pdx-"));
    let m = router_metrics(&r);
    assert!(
        sample(&m, "pdx_requests_total", "status=\"200\"") >= 1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "pdx_pd_phase_seconds_count", "phase=\"prefill\""),
        2.0,
        "{m}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn pd_streaming_forwards_every_event() {
    let p = mock(&["--role", "prefill", "--instant"]);
    let d = mock(&["--role", "decode", "--instant"]);
    let r = pd(&[&p], &[&d], &["--policy", "kv_aware"]);
    let ev = stream_with_usage(r.addr, 300).await;
    // Same bytes as the decode worker's own stream for the same prompt (text is a function of it).
    let text: String = ev[..ev.len() - 2]
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert!(!text.is_empty());
    let m = router_metrics(&r);
    assert_eq!(sample(&m, "pdx_ttft_seconds_count", ""), 1.0, "{m}");
    assert_eq!(
        sample(&m, "pdx_pd_phase_seconds_count", "decode_first_token"),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn client_kv_transfer_params_are_removed() {
    let p = mock(&["--role", "prefill", "--instant"]);
    let d = mock(&["--role", "decode", "--instant"]);
    let r = pd(&[&p], &[&d], &[]);
    let mut body = chat(4, false);
    body["kv_transfer_params"] = serde_json::json!({"do_remote_prefill": true, "remote_engine_id": "bogus",
        "remote_block_ids": [1,2,3], "remote_host": "127.0.0.1", "remote_port": 1});
    let (s, v) = post(r.addr, "/v1/chat/completions", &body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);
}

#[tokio::test(flavor = "current_thread")]
async fn prefill_retry_on_another_worker() {
    let bad = mock(&["--role", "prefill", "--instant", "--fault-error-rate", "1"]);
    let good = mock(&["--role", "prefill", "--instant"]);
    let d = mock(&["--role", "decode", "--instant"]);
    let r = pd(&[&bad, &good], &[&d], &["--prefill-fallback", "fail"]);
    for _ in 0..4 {
        let (s, v) = post(r.addr, "/v1/chat/completions", &chat(2, false)).await;
        assert_eq!(s, 200, "{v}");
    }
    assert_eq!(mock_metric(&good, "vllm:generation_tokens_total", ""), 4.0);
    assert_prefill_retried(&r);
}

#[tokio::test(flavor = "current_thread")]
async fn prefill_exhausted_fails_or_falls_back() {
    let bad = mock(&["--role", "prefill", "--instant", "--fault-error-rate", "1"]);
    let d = mock(&["--role", "decode", "--instant"]);
    let r = pd(&[&bad], &[&d], &["--prefill-fallback", "fail"]);
    let (s, v) = post(r.addr, "/v1/chat/completions", &chat(2, false)).await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["type"], "ServiceUnavailableError");
    let r2 = pd(&[&bad], &[&d], &["--prefill-fallback", "decode_only"]);
    let (s, v) = post(r2.addr, "/v1/chat/completions", &chat(3, false)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let m = router_metrics(&r2);
    assert_eq!(sample(&m, "pdx_fallbacks_total", "decode_only"), 1.0, "{m}");
}

#[tokio::test(flavor = "current_thread")]
async fn decode_failure_mid_stream_sends_error_event() {
    let p = mock(&["--role", "prefill", "--instant"]);
    let d = mock(&["--role", "decode", "--fault-crash-after", "1"]);
    let r = pd(&[&p], &[&d], &[]);
    let resp = send(
        r.addr,
        "POST",
        "/v1/chat/completions",
        &[],
        chat(2000, true).to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: "));
    // A second request makes the decode worker crash: every connection drops.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let b = chat(1, false).to_string();
        let mut s = tokio::net::TcpStream::connect(d.addr).await.unwrap();
        let req = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}", b.len());
        s.write_all(req.as_bytes()).await.unwrap();
        let mut sink = Vec::new();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut sink)).await;
    }
    let mut rest = Vec::new();
    while let Some(f) = body.frame().await {
        rest.extend_from_slice(
            &f.expect("router ends the stream cleanly")
                .into_data()
                .unwrap(),
        );
    }
    let ev = events(&rest);
    let last = ev.last().expect("an error event");
    assert!(last.contains("\"error\""), "{last}");
    assert!(!ev.iter().any(|e| e == "[DONE]"));
}

/// The benchmark-mode workers: `--kv-noop` answers the PD handshake without a KV read or hold,
/// and `--instant-tokens-per-chunk 1` streams one SSE event per HTTP chunk, which the router
/// forwards chunk for chunk.
#[tokio::test(flavor = "current_thread")]
async fn benchmark_mode_workers_skip_the_kv_read_and_stream_one_event_per_chunk() {
    let p = mock(&["--role", "prefill", "--instant", "--kv-noop"]);
    let d = mock(&[
        "--role",
        "decode",
        "--instant",
        "--kv-noop",
        "--instant-tokens-per-chunk",
        "1",
    ]);
    let r = pd(&[&p], &[&d], &[]);
    let (s, v) = post(r.addr, "/v1/chat/completions", &chat(40, false)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 40);
    // Without --kv-noop the decode reads the prompt's blocks (pd_non_streaming_and_request_id)
    // and the prefill holds them until then.
    assert_eq!(d.metric("pdx:kv_blocks_received_total", ""), Some(0.0));
    assert_eq!(p.metric("pdx:kv_blocks_held", ""), Some(0.0));

    let resp = send(
        r.addr,
        "POST",
        "/v1/chat/completions",
        &[],
        chat(50, true).to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut frames = 0;
    let mut all = Vec::new();
    while let Some(f) = body.frame().await {
        let d = f.expect("frame").into_data().unwrap();
        // (the mock sends the role event with the first token)
        assert!(events(&d).len() <= 2, "one token event per chunk: {d:?}");
        frames += 1;
        all.extend_from_slice(&d);
    }
    let ev = events(&all);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    assert!(
        frames >= 51 && frames + 1 >= ev.len(),
        "{frames} frames, {} events",
        ev.len()
    );
}

/// A decode that stalls mid-stream: after `--stream-idle-timeout-secs` without a byte, the client gets an
/// SSE timeout error event and the end of the stream, and the decode worker sees its request aborted.
#[tokio::test(flavor = "current_thread")]
async fn stalled_decode_stream_times_out_with_an_error_event() {
    let p = mock(&["--role", "prefill", "--instant"]);
    let d = mock(&["--role", "decode", "--fault-stall-after-tokens", "1"]);
    let r = pd(&[&p], &[&d], &["--stream-idle-timeout-secs", "0.3"]);
    let resp = send(
        r.addr,
        "POST",
        "/v1/chat/completions",
        &[],
        chat(50, true).to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let mut body = resp.into_body();
    let collected = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(f) = body.frame().await {
            rest.extend_from_slice(
                &f.expect("router ends the stream cleanly")
                    .into_data()
                    .unwrap(),
            );
        }
    })
    .await;
    assert!(collected.is_ok(), "the stalled stream was not ended");
    // Ended by the idle bound (0.3–0.6 s), not by some other timeout.
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let ev = events(&rest);
    assert!(ev.len() >= 2, "{ev:?}");
    let last = ev.last().unwrap();
    assert!(
        last.contains("\"UpstreamTimeout\"") && last.contains("504"),
        "{last}"
    );
    assert!(!ev.iter().any(|e| e == "[DONE]"));
    assert!(
        eventually(|| mock_metric(&d, "vllm:request_success_total", "abort") == 1.0).await,
        "decode did not see the abort"
    );
}

/// A prefill worker whose KV cannot be read: it answers every request with `kv` (whose engine the decode
/// does not know, so the decode answers 502 `KVTransferError`). Returns its URL.
async fn prefill_with_lost_kv(kv: serde_json::Value) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let answer = serde_json::json!({
        "id": "chatcmpl-lost", "object": "chat.completion", "created": 0, "model": "mock",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        "kv_transfer_params": kv,
    })
    .to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One request per connection: head, then `content-length` bytes of body.
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                    answer.len(),
                    answer
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

/// A decode that cannot read the prompt's KV (502 `KVTransferError`: the prefill worker lost it) makes the
/// router prefill again on another worker; the decode worker is not blamed.
#[tokio::test(flavor = "current_thread")]
async fn unreadable_kv_reruns_the_prefill_on_another_worker() {
    let good = mock(&["--role", "prefill", "--instant"]);
    let d = mock(&["--role", "decode", "--instant"]);
    // Real `kv_transfer_params` for this prompt, pointing at an engine the decode does not know.
    let mut pb = chat(3, false);
    pb["max_tokens"] = serde_json::json!(1);
    pb["kv_transfer_params"] = serde_json::json!({"do_remote_decode": true});
    let (_, pv) = post(good.addr, "/v1/chat/completions", &pb).await;
    let mut kv = pv["kv_transfer_params"].clone();
    kv["remote_engine_id"] = serde_json::json!("lost-engine");
    let lost = prefill_with_lost_kv(kv.clone()).await;
    let d2 = mock(&["--role", "decode", "--instant"]);
    let r = router(&[
        "--prefill",
        &lost,
        "--prefill",
        &url(&good),
        "--decode",
        &url(&d),
        "--decode",
        &url(&d2),
        "--prefill-fallback",
        "fail",
    ]);
    for _ in 0..4 {
        let (s, v) = post(r.addr, "/v1/chat/completions", &chat(3, false)).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 3);
    }
    let m = router_metrics(&r);
    assert!(
        sample(&m, "pdx_retries_total", "phase=\"kv_handoff\"") >= 1.0,
        "{m}"
    );
    // Another decode worker would fail the same way: no decode retry, no failure held against it.
    assert_eq!(
        sample(&m, "pdx_retries_total", "phase=\"decode\""),
        0.0,
        "{m}"
    );
    let now = r.shared.registry.now_us();
    assert!(r
        .shared
        .registry
        .workers()
        .iter()
        .all(|w| w.state(now) == "healthy"));

    // With every prefill worker losing its KV: 502 KVTransferError JSON after the attempts.
    let lost2 = prefill_with_lost_kv(kv).await;
    let r2 = router(&[
        "--prefill",
        &lost,
        "--prefill",
        &lost2,
        "--decode",
        &url(&d),
        "--prefill-fallback",
        "fail",
    ]);
    let (s, v) = post(r2.addr, "/v1/chat/completions", &chat(3, false)).await;
    assert_eq!(s, 502, "{v}");
    assert_eq!(v["error"]["type"], "KVTransferError", "{v}");
}

#[tokio::test(flavor = "current_thread")]
async fn no_prefill_runs_without_an_eligible_decode() {
    let p = mock(&["--role", "prefill", "--instant"]);
    // A decode worker that is not there: the first failed health check marks it down.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r = router(&[
        "--prefill",
        &url(&p),
        "--decode",
        &format!("http://127.0.0.1:{dead}"),
    ]);
    let now = || r.shared.registry.now_us();
    assert!(
        eventually(|| r
            .shared
            .registry
            .workers()
            .iter()
            .any(|w| w.state(now()) == "unhealthy"))
        .await
    );
    let resp = send(
        r.addr,
        "POST",
        "/v1/chat/completions",
        &[],
        chat(3, false).to_string(),
    )
    .await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["code"], 503, "{v}");
    assert_eq!(
        mock_metric(&p, "vllm:prompt_tokens_total", ""),
        0.0,
        "the prefill ran without a decode to take its KV"
    );
    assert_eq!(mock_metric(&p, "pdx:kv_blocks_held", ""), 0.0);
}

/// Every completion the router forwards names the worker that produced it in `x-pdx-worker`, by URL: the
/// decode worker of a PD pair (streamed or not; never the prefill, and not the engine's own name), the worker
/// of an aggregated pool.
#[tokio::test(flavor = "current_thread")]
async fn responses_name_the_decode_or_aggregated_worker() {
    let p = mock(&["--role", "prefill", "--instant"]);
    let (d1, d2) = (
        mock(&["--role", "decode", "--instant"]),
        mock(&["--role", "decode", "--instant"]),
    );
    let r = pd(&[&p], &[&d1, &d2], &[]);
    let decodes = [url(&d1), url(&d2)];
    let mut named = Vec::new();
    for stream in [false, true, false, true] {
        let resp = chat_request(r.addr, 3, stream).await;
        assert_eq!(resp.status(), 200);
        let worker = resp.headers()["x-pdx-worker"].to_str().unwrap().to_string();
        assert!(decodes.contains(&worker), "{worker} is not a decode worker");
        let _ = resp.into_body().collect().await.unwrap();
        named.push(worker);
    }
    assert!(
        decodes.iter().all(|d| named.contains(d)),
        "round robin over both decodes: {named:?}"
    );
    let a = mock(&["--instant"]);
    let r = router(&["--worker", &url(&a)]);
    let resp = chat_request(r.addr, 2, false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-pdx-worker"], url(&a).as_str());
}
