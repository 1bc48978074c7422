//! Closed-loop routing end to end against in-process mocks: engine telemetry (scrapes, staleness, what the
//! router exports), the `score` policy seeing worker speed, admission shaping (429 with `Retry-After` past
//! the queue, 503 past the deadline, nothing leaked).

mod common;
use common::*;
use http_body_util::BodyExt;

/// A streamed completion of `prompt_tokens` distinct tokens (seed `seed`) and `max_tokens` output tokens.
fn long_prompt(prompt_tokens: usize, seed: u64, max_tokens: u32) -> serde_json::Value {
    serde_json::json!({
        "model": "mock",
        "prompt": pdx_mock::synthetic_prompt(prompt_tokens, seed),
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": true,
    })
}

/// Sends `body` and reads the answer: status, `Retry-After`, body.
async fn exchange(
    addr: std::net::SocketAddr,
    body: &serde_json::Value,
) -> (u16, Option<String>, bytes::Bytes) {
    let r = send(addr, "POST", "/v1/completions", &[], body.to_string()).await;
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (
        status,
        retry,
        r.into_body().collect().await.unwrap().to_bytes(),
    )
}

#[tokio::test(flavor = "current_thread")]
async fn telemetry_scrapes_engines_and_a_silent_worker_turns_unknown_not_idle() {
    let w = mock(&["--instant"]);
    let u = url(&w);
    let r = router(&[
        "--worker",
        &u,
        "--telemetry-interval-ms",
        "50",
        "--telemetry-stale-ms",
        "400",
    ]);
    // The mock's gauges reach the router's beliefs and its exported metrics.
    let label = format!("worker=\"{u}\"");
    assert!(
        eventually(|| {
            let m = router_metrics(&r);
            m.contains(&format!("pdx_worker_kv_usage{{{label}}}"))
                && m.contains(&format!("pdx_worker_waiting{{{label}}}"))
        })
        .await,
        "{}",
        router_metrics(&r)
    );
    // A stream feeds the worker's TTFT and TPOT (once, at its end).
    let ev = stream_with_usage(r.addr, 8).await;
    assert!(ev.len() > 8);
    let worker = r.shared.registry.workers()[0].clone();
    assert!(
        eventually(|| {
            let s = worker.telemetry_snapshot(r.shared.registry.now_us());
            s.ttft_s.is_some() && s.tpot_s.is_some() && s.engine_known
        })
        .await
    );
    assert!(
        eventually(
            || router_metrics(&r).contains(&format!("pdx_worker_ewma_ttft_seconds{{{label}}}"))
        )
        .await
    );
    let m = router_metrics(&r);
    assert!(
        sample(&m, "pdx_telemetry_scrapes_total", "outcome=\"ok\"") >= 1.0,
        "{m}"
    );
    // The worker goes silent: its last values stand for the staleness bound, then it is unknown (no
    // gauges exported, as opposed to zeros), while the age of its last good scrape keeps growing.
    w.stop();
    assert!(
        eventually(|| {
            let s = worker.telemetry_snapshot(r.shared.registry.now_us());
            !s.engine_known && s.waiting.is_none() && s.kv_usage.is_none()
        })
        .await
    );
    assert!(
        eventually(|| {
            let m = router_metrics(&r);
            !m.contains(&format!("pdx_worker_waiting{{{label}}}"))
                && sample(&m, "pdx_worker_telemetry_age_seconds", &label) >= 0.4
                && sample(&m, "pdx_telemetry_scrapes_total", "outcome=\"failed\"") >= 1.0
        })
        .await,
        "{}",
        router_metrics(&r)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn score_sends_most_prefill_load_to_the_faster_worker() {
    // Two prefill workers, the second four times as fast (timing model: step time / speed).
    let slow = mock(&["--role", "prefill", "--speed", "0.01"]);
    let fast = mock(&["--role", "prefill", "--speed", "0.04"]);
    let d = mock(&["--role", "decode", "--instant"]);
    let r = pd(
        &[&slow, &fast],
        &[&d],
        &["--policy", "score", "--telemetry-interval-ms", "50"],
    );
    // 6 clients, 8 requests each, one after another, distinct 400-token prompts (no prefix-cache hits).
    let mut tasks = Vec::new();
    for c in 0..6u64 {
        let addr = r.addr;
        tasks.push(tokio::spawn(async move {
            for k in 0..8u64 {
                let (s, _, b) = exchange(addr, &long_prompt(400, c * 100 + k, 2)).await;
                assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = |m: &pdx_mock::MockServer| mock_metric(m, "vllm:request_success_total", "");
    let (ns, nf) = (n(&slow), n(&fast));
    println!("prefills: slow {ns}, fast {nf}");
    assert_eq!(ns + nf, 48.0);
    // Round robin would split 24/24; the score sees the fast worker's speed and queue.
    assert!(nf >= 1.5 * ns, "slow {ns}, fast {nf}");
    // Both speeds were observed.
    let now = r.shared.registry.now_us();
    let speeds: Vec<f64> = r
        .shared
        .registry
        .workers()
        .iter()
        .filter(|w| w.role == pdx_protocol::Role::Prefill)
        .filter_map(|w| w.telemetry_snapshot(now).prefill_tokens_per_s)
        .collect();
    assert_eq!(speeds.len(), 2, "{speeds:?}");
}

/// The prefill pool's admission counts (limit, in flight, queued).
fn admission_counts(r: &pdx_router::RouterServer) -> (u32, u32, usize) {
    let snap = r.shared.registry.snap.load();
    let m = snap.models.values().next().unwrap();
    m.prefill[0]
        .admission
        .as_ref()
        .expect("admission on")
        .counts()
}

#[tokio::test(flavor = "current_thread")]
async fn admission_past_the_queue_answers_429_with_retry_after_at_once() {
    // Each prefill takes at least ~0.3 s (modelled, slept); 20 requests arrive together.
    let p = mock(&["--role", "prefill", "--speed", "0.01"]);
    let d = mock(&["--role", "decode", "--instant"]);
    let r = pd(
        &[&p],
        &[&d],
        &[
            "--admission-ttft-target-ms",
            "5000",
            "--admission-initial-limit",
            "2",
            "--admission-max-queue",
            "2",
            "--admission-max-wait-ms",
            "10000",
        ],
    );
    let mut tasks = Vec::new();
    for k in 0..20u64 {
        let addr = r.addr;
        tasks.push(tokio::spawn(async move {
            exchange(addr, &long_prompt(400, 1000 + k, 2)).await
        }));
    }
    let mut by_status = std::collections::BTreeMap::<u16, u32>::new();
    for t in tasks {
        let (s, retry, b) = t.await.unwrap();
        *by_status.entry(s).or_default() += 1;
        if s == 429 {
            assert_eq!(retry.as_deref(), Some("1"));
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(v["error"]["type"], "RateLimitError", "{v}");
            assert_eq!(v["error"]["code"], 429, "{v}");
        }
    }
    println!("statuses: {by_status:?}");
    let ok = by_status.get(&200).copied().unwrap_or(0);
    let refused = by_status.get(&429).copied().unwrap_or(0);
    assert_eq!(ok + refused, 20, "{by_status:?}");
    // Two run, two wait, the rest is refused (a few more may get in if arrivals spread out).
    assert!(refused >= 10 && ok >= 4, "{by_status:?}");
    assert_eq!(
        mock_metric(&p, "vllm:request_success_total", ""),
        f64::from(ok)
    );
    let m = router_metrics(&r);
    assert_eq!(
        sample(&m, "pdx_admission_total", "outcome=\"rejected\""),
        f64::from(refused),
        "{m}"
    );
    assert!(sample(&m, "pdx_admission_total", "outcome=\"queued\"") >= 2.0);
    // Nothing in flight or queued is left behind.
    let (_, in_flight, queued) = admission_counts(&r);
    assert_eq!((in_flight, queued), (0, 0));
}

#[tokio::test(flavor = "current_thread")]
async fn admission_waiting_past_the_deadline_answers_503() {
    let p = mock(&["--role", "prefill", "--speed", "0.01"]);
    let d = mock(&["--role", "decode", "--instant"]);
    let r = pd(
        &[&p],
        &[&d],
        &[
            "--admission-ttft-target-ms",
            "5000",
            "--admission-initial-limit",
            "1",
            "--admission-max-wait-ms",
            "50",
        ],
    );
    let mut tasks = Vec::new();
    for k in 0..4u64 {
        let addr = r.addr;
        tasks.push(tokio::spawn(async move {
            exchange(addr, &long_prompt(400, 2000 + k, 2)).await
        }));
    }
    let mut timed_out = 0;
    for t in tasks {
        let (s, retry, b) = t.await.unwrap();
        assert!(s == 200 || s == 503, "{s}");
        if s == 503 {
            timed_out += 1;
            assert_eq!(retry.as_deref(), Some("1"));
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(v["error"]["type"], "ServiceUnavailableError", "{v}");
            assert!(
                v["error"]["message"].as_str().unwrap().contains("deadline"),
                "{v}"
            );
        }
    }
    // One prefill at a time (each ≥ 0.3 s), waits of at most 50 ms: the others time out.
    assert!(timed_out >= 2, "{timed_out}");
    let m = router_metrics(&r);
    assert_eq!(
        sample(&m, "pdx_admission_total", "outcome=\"timed_out\""),
        f64::from(timed_out),
        "{m}"
    );
    let (_, in_flight, queued) = admission_counts(&r);
    assert_eq!((in_flight, queued), (0, 0));
}

#[tokio::test(flavor = "current_thread")]
async fn aggregated_admission_gives_slots_back_at_the_first_token_and_on_disconnect() {
    let w = mock(&["--speed", "0.01"]);
    let r = router(&[
        "--worker",
        &url(&w),
        "--admission-ttft-target-ms",
        "5000",
        "--admission-initial-limit",
        "1",
        "--admission-max-queue",
        "8",
    ]);
    let counts = || {
        let snap = r.shared.registry.snap.load();
        let m = snap.models.values().next().unwrap();
        m.aggregated[0].admission.as_ref().unwrap().counts()
    };
    // Streamed and whole answers, one after another: each slot comes back.
    for (k, stream) in [(0u64, true), (1, false), (2, true)] {
        let mut body = long_prompt(50, 3000 + k, 2);
        body["stream"] = serde_json::Value::Bool(stream);
        let (s, _, _) = exchange(r.addr, &body).await;
        assert_eq!(s, 200);
    }
    assert!(eventually(|| counts().1 == 0).await, "{:?}", counts());
    // A client that leaves while its request waits for a slot takes its ticket with it. The limit has grown
    // with the healthy samples above: as many 3000-token prefills as it allows (about a second each) hold
    // every slot.
    let limit = counts().0;
    assert!(limit >= 1);
    let held: Vec<_> = (0..u64::from(limit))
        .map(|k| {
            let addr = r.addr;
            tokio::spawn(async move { exchange(addr, &long_prompt(3000, 3100 + k, 2)).await })
        })
        .collect();
    assert!(eventually(|| counts().1 == limit).await, "{:?}", counts());
    let waiter = tokio::spawn({
        let addr = r.addr;
        async move { exchange(addr, &long_prompt(400, 3200, 4)).await }
    });
    assert!(eventually(|| counts().2 == 1).await, "{:?}", counts());
    waiter.abort();
    assert!(eventually(|| counts().2 == 0).await, "{:?}", counts());
    for h in held {
        let (s, _, _) = h.await.unwrap();
        assert_eq!(s, 200);
    }
    assert!(
        eventually(|| counts().1 == 0 && counts().2 == 0).await,
        "{:?}",
        counts()
    );
    let m = router_metrics(&r);
    assert!(
        sample(&m, "pdx_admission_ewma_ttft_seconds", "pool=\"aggregated\"") > 0.0,
        "{m}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_decode_pool_over_its_itl_target_narrows_and_turns_new_requests_away() {
    // Each decode step takes ~40 ms (modelled, slept): over the 20 ms ITL target whatever the batch.
    let p = mock(&["--role", "prefill", "--instant"]);
    let d = mock(&["--role", "decode", "--speed", "0.05"]);
    let r = pd(&[&p], &[&d], &["--admission-itl-target-ms", "20"]);
    let counts = || {
        let snap = r.shared.registry.snap.load();
        let m = snap.models.values().next().unwrap();
        m.decode[0]
            .admission
            .as_ref()
            .expect("decode admission on")
            .counts()
    };
    assert_eq!(counts(), (8, 0, 0), "the decode defaults: 8 in slow start");
    // Six streams of 64 tokens (~2.6 s each) hold six slots from before their prefill to their end.
    let streams: Vec<_> = (0..6u64)
        .map(|k| {
            let addr = r.addr;
            tokio::spawn(async move { exchange(addr, &long_prompt(50, 4000 + k, 64)).await })
        })
        .collect();
    assert!(eventually(|| counts().1 == 6).await, "{:?}", counts());
    // Their first window of 16 token events (~0.65 s) is over the set point (0.9 x 20 ms): the limit goes to
    // 0.8 of the six in flight, and a new request waits for a slot past its 100 ms and gets 503.
    assert!(eventually(|| counts().0 <= 5).await, "{:?}", counts());
    let (s, retry, b) = exchange(r.addr, &long_prompt(50, 4100, 4)).await;
    assert_eq!(s, 503, "{}", String::from_utf8_lossy(&b));
    assert_eq!(retry.as_deref(), Some("1"));
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ITL over its target"),
        "{v}"
    );
    // The admitted streams finish whole, and every slot comes back.
    for t in streams {
        let (s, _, body) = t.await.unwrap();
        assert_eq!(s, 200);
        let text = String::from_utf8_lossy(&body);
        let usage = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|l| *l != "[DONE]")
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["choices"][0]["text"].is_string())
            .count();
        assert_eq!(usage, 64, "token events of a stream: {text}");
    }
    assert!(
        eventually(|| counts().1 == 0 && counts().2 == 0).await,
        "{:?}",
        counts()
    );
    assert!(counts().0 < 8, "{:?}", counts());
    // The prefill never ran for the request turned away.
    assert_eq!(mock_metric(&p, "vllm:request_success_total", ""), 6.0);
    let m = router_metrics(&r);
    assert!(
        sample(&m, "pdx_admission_ewma_tpot_seconds", "pool=\"decode\"") > 0.016,
        "{m}"
    );
    assert_eq!(
        sample(&m, "pdx_admission_total", "outcome=\"timed_out\""),
        1.0,
        "{m}"
    );
}
