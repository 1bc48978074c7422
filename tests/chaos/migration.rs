//! Stream migration (issue 17, item 5): a decode worker killed (SIGKILL) mid-stream under load loses no client
//! stream. Every stream continues on another decode worker and ends with exactly the tokens it asked for,
//! one `id`, one role chunk, one usage block (the original prompt's tokens, every completion token) and
//! `[DONE]`; the router counts the moves in `pdx_migrations_total`.

use std::time::Duration;

use crate::support::*;

/// Concurrent client streams.
const STREAMS: usize = 12;
/// Tokens each asks for.
const MAX_TOKENS: usize = 120;
/// Words of each prompt after `request N`: with the mock's built-in tokenizer one token each, so a prompt is
/// `2 + WORDS` tokens, plus 2 of the chat template.
const WORDS: usize = 60;

/// One streamed chat completion through the router: the status and the SSE payloads.
fn stream(port: u16, i: usize) -> (u16, Vec<String>) {
    let prompt = format!("request {i} {}", "lorem ".repeat(WORDS));
    let body = serde_json::json!({
        "model": "mock",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": true,
    });
    let r = http(
        port,
        "POST",
        "/v1/chat/completions",
        &[],
        &body.to_string(),
        Duration::from_secs(30),
    )
    .expect("an answer");
    let events = r
        .body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect();
    (r.status, events)
}

/// Checks one client stream; returns its id.
fn check(i: usize, status: u16, events: &[String]) -> String {
    assert_eq!(status, 200, "stream {i}");
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "stream {i}: {events:?}"
    );
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|_| panic!("stream {i}: not JSON: {e}")))
        .collect();
    assert!(
        chunks.iter().all(|c| c.get("error").is_none()),
        "stream {i}: an error event: {events:?}"
    );
    let id = chunks[0]["id"].as_str().expect("an id").to_string();
    assert!(
        chunks.iter().all(|c| c["id"] == id.as_str()),
        "stream {i}: more than one id"
    );
    let roles = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["role"].is_string())
        .count();
    assert_eq!(roles, 1, "stream {i}: role chunks");
    let tokens = chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count();
    assert_eq!(tokens, MAX_TOKENS, "stream {i}: tokens");
    let finishes = chunks
        .iter()
        .filter(|c| c["choices"][0]["finish_reason"].is_string())
        .count();
    assert_eq!(finishes, 1, "stream {i}: finish reasons");
    let usage: Vec<&serde_json::Value> = chunks.iter().filter(|c| c["usage"].is_object()).collect();
    assert_eq!(usage.len(), 1, "stream {i}: usage blocks");
    let u = &usage[0]["usage"];
    assert_eq!(u["completion_tokens"], MAX_TOKENS, "stream {i}: {u}");
    assert_eq!(u["prompt_tokens"], 2 + WORDS + 2, "stream {i}: {u}");
    assert_eq!(
        u["total_tokens"],
        2 + WORDS + 2 + MAX_TOKENS,
        "stream {i}: {u}"
    );
    id
}

/// The three ways `pdx serve` spreads a request: the decode worker of a PD pair, or an aggregated worker, is
/// killed mid-stream.
#[derive(Clone, Copy, PartialEq)]
enum Flow {
    /// vLLM NixlConnector: prefill, then a decode that reads the KV (the continuation is prefilled again).
    VllmNixl,
    /// SGLang bootstrap: prefill and decode at once (the continuation is a new pair).
    Sglang,
    /// Aggregated workers only.
    Aggregated,
}

fn kill_one_worker_mid_stream(flow: Flow) {
    // Decodes at a tenth of the modelled speed: a step is about 20 ms, so a stream lasts about 2.4 s.
    let prefill_port = free_port();
    let mut prefill = spawn_mock(prefill_port, &["--role", "prefill", "--instant"]);
    wait_healthy(&mut prefill, prefill_port);
    let role = if flow == Flow::Aggregated {
        "aggregated"
    } else {
        "decode"
    };
    let mut decodes: Vec<(u16, Proc)> = (0..3)
        .map(|_| {
            let port = free_port();
            (port, spawn_mock(port, &["--role", role, "--speed", "0.1"]))
        })
        .collect();
    for (port, p) in &mut decodes {
        wait_healthy(p, *port);
    }
    let rport = free_port();
    let mut args: Vec<String> = Vec::new();
    match flow {
        Flow::VllmNixl => args.extend(["--prefill".into(), url(prefill_port)]),
        // The mock serves SGLang's bootstrap route on its HTTP port: that is its bootstrap port.
        Flow::Sglang => args.extend([
            "--orchestration".into(),
            "sglang-bootstrap".into(),
            "--prefill".into(),
            url(prefill_port),
            prefill_port.to_string(),
        ]),
        Flow::Aggregated => {}
    }
    let flag = if flow == Flow::Aggregated {
        "--worker"
    } else {
        "--decode"
    };
    for (port, _) in &decodes {
        args.extend([flag.to_string(), url(*port)]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut router = router(rport, &args);
    wait_healthy(&mut router, rport);
    assert!(wait_until(GUARD, || ready(rport)), "router not ready");

    let clients: Vec<_> = (0..STREAMS)
        .map(|i| std::thread::spawn(move || stream(rport, i)))
        .collect();
    // The victim: the first decode worker, once it runs streams and has sent some of their tokens.
    let victim = decodes[0].0;
    assert!(
        wait_until(GUARD, || metric(victim, "vllm:num_requests_running")
            .is_some_and(|n| n >= 2.0)),
        "the victim never ran streams"
    );
    std::thread::sleep(Duration::from_millis(400));
    decodes[0].1.kill();

    let mut ids = std::collections::HashSet::new();
    for (i, c) in clients.into_iter().enumerate() {
        let (status, events) = c.join().expect("client thread");
        ids.insert(check(i, status, &events));
    }
    assert_eq!(ids.len(), STREAMS, "every stream its own id");
    let moved = metric(rport, "pdx_migrations_total").unwrap_or(0.0);
    assert!(moved >= 1.0, "no stream moved");
    assert_eq!(
        metric(rport, "pdx_migrations_failed_total").unwrap_or(0.0),
        0.0
    );
    let ok = metric(rport, "pdx_requests_total").unwrap_or(0.0);
    assert_eq!(ok, STREAMS as f64, "one answer per client request");
}

#[test]
fn killing_a_decode_worker_mid_stream_loses_no_stream() {
    kill_one_worker_mid_stream(Flow::VllmNixl);
}

#[test]
fn killing_a_bootstrap_decode_worker_mid_stream_loses_no_stream() {
    kill_one_worker_mid_stream(Flow::Sglang);
}

#[test]
fn killing_an_aggregated_worker_mid_stream_loses_no_stream() {
    kill_one_worker_mid_stream(Flow::Aggregated);
}
