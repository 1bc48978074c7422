//! OpenAI/vLLM API behaviour of an aggregated mock: responses, streaming, lengths, errors,
//! probes, metrics, and that nothing leaks.

mod common;
use common::*;
use http_body_util::BodyExt;
use pdx_mock::{count_builtin_tokens, synthetic_prompt, CHAT_OVERHEAD_TOKENS};
use serde_json::json;

fn chat(n_prompt: usize, extra: serde_json::Value) -> serde_json::Value {
    let mut v = json!({"model": "mock", "messages": [{"role": "user", "content": synthetic_prompt(n_prompt, 1)}]});
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    v
}

#[tokio::test]
async fn chat_and_completions_have_exact_lengths_usage_and_finish_reasons() {
    let s = start(&["--instant", "--eos-after", "3"]);
    let (st, v) = post_json(
        s.addr,
        "/v1/chat/completions",
        &chat(40, json!({"max_tokens": 7, "ignore_eos": true})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["prompt_tokens"], 40 + CHAT_OVERHEAD_TOKENS);
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(v["usage"]["total_tokens"], 47 + CHAT_OVERHEAD_TOKENS);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(count_builtin_tokens(text), 7);
    // EOS after 3 tokens; max_completion_tokens wins over max_tokens; min_tokens delays EOS
    let (_, v) = post_json(
        s.addr,
        "/v1/chat/completions",
        &chat(5, json!({"max_tokens": 2, "max_completion_tokens": 10})),
    )
    .await;
    assert_eq!(
        (
            v["usage"]["completion_tokens"].as_u64(),
            v["choices"][0]["finish_reason"].as_str()
        ),
        (Some(3), Some("stop"))
    );
    let (_, v) = post_json(
        s.addr,
        "/v1/chat/completions",
        &chat(5, json!({"max_tokens": 10, "min_tokens": 5})),
    )
    .await;
    assert_eq!(
        (
            v["usage"]["completion_tokens"].as_u64(),
            v["choices"][0]["finish_reason"].as_str()
        ),
        (Some(5), Some("stop"))
    );
    // completions: text and token-id prompts
    let (st, v) = post_json(
        s.addr,
        "/v1/completions",
        &json!({"model": "mock", "prompt": synthetic_prompt(33, 2), "max_tokens": 2}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["prompt_tokens"], 33);
    assert_eq!(
        count_builtin_tokens(v["choices"][0]["text"].as_str().unwrap()),
        2
    );
    let (_, v) = post_json(
        s.addr,
        "/v1/completions",
        &json!({"prompt": [1, 2, 3, 4], "max_tokens": 1, "ignore_eos": true}),
    )
    .await;
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    // same prompt, same text (deterministic)
    let (_, a) = post_json(
        s.addr,
        "/v1/completions",
        &json!({"prompt": [5, 6, 7], "max_tokens": 3}),
    )
    .await;
    let (_, b) = post_json(
        s.addr,
        "/v1/completions",
        &json!({"prompt": [5, 6, 7], "max_tokens": 3}),
    )
    .await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    assert_eq!(s.engine.used_blocks(), 0);
    s.stop();
}

#[tokio::test]
async fn prefix_cache_hits_are_reported() {
    let s = start(&["--instant"]);
    let body = json!({"prompt": synthetic_prompt(100, 9), "max_tokens": 1});
    let (_, a) = post_json(s.addr, "/v1/completions", &body).await;
    assert_eq!(a["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (_, b) = post_json(s.addr, "/v1/completions", &body).await;
    assert_eq!(
        b["usage"]["prompt_tokens_details"]["cached_tokens"], 96,
        "6 full blocks of 16"
    );
    assert_eq!(metric(&s, "vllm:prefix_cache_hits_total"), 96.0);
    assert_eq!(metric(&s, "vllm:prefix_cache_queries_total"), 200.0);
    s.stop();
}

async fn check_stream(
    addr: std::net::SocketAddr,
    path: &str,
    body: serde_json::Value,
    chat: bool,
    n: usize,
) {
    let ev = stream_events(addr, path, &body).await;
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<serde_json::Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let content = if chat {
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        &chunks[1..]
    } else {
        &chunks[..]
    };
    let usage = content.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], n);
    let toks = &content[..content.len() - 1];
    assert_eq!(toks.len(), n);
    let mut text = String::new();
    for (i, c) in toks.iter().enumerate() {
        let fr = &c["choices"][0]["finish_reason"];
        assert_eq!(
            fr.is_null(),
            i + 1 < n,
            "finish_reason only on the last chunk: {c}"
        );
        text.push_str(if chat {
            c["choices"][0]["delta"]["content"].as_str().unwrap()
        } else {
            c["choices"][0]["text"].as_str().unwrap()
        });
    }
    assert_eq!(count_builtin_tokens(&text), n);
}

#[tokio::test]
async fn streaming_instant_and_timed() {
    for flags in [&["--instant"][..], &["--speed", "1000"][..]] {
        let s = start(flags);
        let opts =
            json!({"stream": true, "stream_options": {"include_usage": true}, "max_tokens": 150});
        check_stream(
            s.addr,
            "/v1/chat/completions",
            chat(20, opts.clone()),
            true,
            150,
        )
        .await;
        let mut b = opts.clone();
        b["prompt"] = json!(synthetic_prompt(20, 3));
        check_stream(s.addr, "/v1/completions", b, false, 150).await;
        // no usage chunk without include_usage
        let ev = stream_events(
            s.addr,
            "/v1/completions",
            &json!({"prompt": "a b", "stream": true, "max_tokens": 2}),
        )
        .await;
        assert_eq!(ev.len(), 3);
        // timed non-streaming goes through the scheduler too
        let (st, v) = post_json(
            s.addr,
            "/v1/chat/completions",
            &chat(300, json!({"max_tokens": 4})),
        )
        .await;
        assert_eq!(
            (st, v["usage"]["completion_tokens"].as_u64()),
            (200, Some(4))
        );
        assert!(eventually(|| s.engine.used_blocks() == 0).await);
        // The scheduler sets the gauge after it has sent the last token, so a client can be faster.
        assert!(eventually(|| metric(&s, "vllm:num_requests_running") == 0.0).await);
        assert!(metric(&s, "vllm:time_to_first_token_seconds_count") >= 4.0);
        s.stop();
    }
}

#[tokio::test]
async fn client_disconnect_mid_stream_aborts_and_frees_blocks() {
    let s = start(&["--speed", "10"]);
    let body = chat(64, json!({"stream": true, "max_tokens": 5000}));
    let r = send(
        s.addr,
        "POST",
        "/v1/chat/completions",
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut b = r.into_body();
    let first = b.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some());
    assert!(s.engine.used_blocks() > 0);
    drop(b); // closes the connection
    assert!(
        eventually(|| s.engine.used_blocks() == 0).await,
        "blocks freed after disconnect"
    );
    assert!(eventually(|| metric(&s, "vllm:num_requests_running") == 0.0).await);
    let text = s.engine.metrics.render();
    assert!(text.contains("finished_reason=\"abort\"} 1"), "{text}");
    s.stop();
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_leak_nothing() {
    let s = start(&["--instant", "--max-model-len", "100", "--num-blocks", "64"]);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "/v1/chat/completions",
            "{not json".into(),
            400,
            "BadRequestError",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": "x"}).to_string(),
            400,
            "BadRequestError",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "other", "messages": [{"role": "user", "content": "hi"}]}).to_string(),
            404,
            "NotFoundError",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}).to_string(),
            400,
            "BadRequestError",
        ),
        (
            "/v1/chat/completions",
            chat(5, json!({"max_tokens": 0})).to_string(),
            400,
            "BadRequestError",
        ),
        (
            "/v1/chat/completions",
            chat(5, json!({"max_tokens": 95})).to_string(),
            400,
            "BadRequestError",
        ),
        (
            "/v1/chat/completions",
            chat(5, json!({"max_tokens": -1})).to_string(),
            400,
            "BadRequestError",
        ),
        (
            "/v1/chat/completions",
            chat(5, json!({"max_tokens": 3, "min_tokens": 4})).to_string(),
            400,
            "BadRequestError",
        ),
        (
            "/v1/completions",
            json!({"prompt": synthetic_prompt(100, 1)}).to_string(),
            400,
            "BadRequestError",
        ),
        (
            "/v1/completions",
            json!({"prompt": ""}).to_string(),
            400,
            "BadRequestError",
        ),
        (
            "/v1/completions",
            json!({"prompt": ["a", "b"]}).to_string(),
            400,
            "BadRequestError",
        ),
        (
            "/v1/completions",
            json!({"prompt": [1], "kv_transfer_params": {"do_remote_prefill": 3}}).to_string(),
            400,
            "BadRequestError",
        ),
        ("/v1/nope", "{}".into(), 404, "NotFoundError"),
    ];
    for (path, body, status, kind) in cases {
        let (st, b) = call(s.addr, "POST", path, Some(&body)).await;
        let v: serde_json::Value =
            serde_json::from_slice(&b).unwrap_or_else(|_| panic!("{path} {body}: not JSON"));
        assert_eq!(st, status, "{path} {body}: {v}");
        assert_eq!(v["error"]["type"], kind, "{body}");
        assert_eq!(v["error"]["code"], status);
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    let (st, _) = call(s.addr, "GET", "/v1/chat/completions", None).await;
    assert_eq!(st, 405);
    assert_eq!(s.engine.used_blocks(), 0);
    assert_eq!(metric(&s, "vllm:num_requests_running"), 0.0);
    // still serving
    let (st, _) = post_json(s.addr, "/v1/chat/completions", &chat(5, json!({}))).await;
    assert_eq!(st, 200);
    s.stop();
}

#[tokio::test]
async fn probes_models_and_metrics() {
    let s = start(&["--instant", "--model", "Qwen/Qwen3-0.6B"]);
    let (st, b) = call(s.addr, "GET", "/health", None).await;
    assert_eq!((st, b.len()), (200, 0));
    let (_, b) = call(s.addr, "GET", "/v1/models", None).await;
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["data"][0]["id"], "Qwen/Qwen3-0.6B");
    for p in [
        "/server_info",
        "/get_server_info",
        "/model_info",
        "/get_model_info",
    ] {
        let (st, b) = call(s.addr, "GET", p, None).await;
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(st, 200, "{p}");
        assert_eq!(v["model_path"], "Qwen/Qwen3-0.6B", "{p}");
    }
    let (_, v) = post_json(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "x y z", "max_tokens": 3}),
    )
    .await;
    assert_eq!(v["model"], "Qwen/Qwen3-0.6B");
    let (_, b) = call(s.addr, "GET", "/metrics", None).await;
    let text = String::from_utf8(b.to_vec()).unwrap();
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:generation_tokens_total{model_name=\"Qwen/Qwen3-0.6B\"} 3",
        "vllm:prompt_tokens_total{model_name=\"Qwen/Qwen3-0.6B\"} 3",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    s.stop();
}

#[tokio::test]
async fn kv_cache_full_requests_wait_then_run() {
    // 4 blocks of 16 tokens; each request needs 3 blocks, so they run one at a time.
    let s = start(&["--speed", "100", "--num-blocks", "4"]);
    let body = json!({"prompt": synthetic_prompt(40, 5), "max_tokens": 8});
    let mut tasks = Vec::new();
    for i in 0..3 {
        let mut b = body.clone();
        b["prompt"] = json!(synthetic_prompt(40, i));
        let addr = s.addr;
        tasks.push(tokio::spawn(async move {
            post_json(addr, "/v1/completions", &b).await
        }));
    }
    for t in tasks {
        let (st, v) = t.await.unwrap();
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 8);
    }
    let (st, v) = post_json(
        s.addr,
        "/v1/completions",
        &json!({"prompt": synthetic_prompt(80, 1)}),
    )
    .await;
    assert_eq!(st, 400, "can never fit: {v}");
    assert_eq!(s.engine.used_blocks(), 0);
    assert_eq!(metric(&s, "vllm:num_requests_waiting"), 0.0);
    s.stop();
}
