//! The mock answers `n`, `stop`, `logprobs`/`top_logprobs` and `seed` as vLLM does, and refuses what vLLM
//! refuses (wrong types, `tool_choice: "auto"` without a tool parser, ...) with vLLM's status and message.
//! Before: every one of these was answered 200 and ignored.

mod common;
use common::*;
use serde_json::json;

fn chat(extra: serde_json::Value) -> serde_json::Value {
    let mut v = json!({"model": "mock", "messages": [{"role": "user", "content": "tell me about ducks"}],
                       "max_tokens": 12, "ignore_eos": true});
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    v
}

fn completion(extra: serde_json::Value) -> serde_json::Value {
    let mut v = json!({"model": "mock", "prompt": "tell me about ducks", "max_tokens": 12, "ignore_eos": true});
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    v
}

fn texts(v: &serde_json::Value, chat: bool) -> Vec<String> {
    v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            if chat {
                c["message"]["content"].as_str().unwrap().to_string()
            } else {
                c["text"].as_str().unwrap().to_string()
            }
        })
        .collect()
}

#[tokio::test]
async fn n_gives_n_indexed_choices() {
    // Instant, and timed (the scheduler's token events drive the steps).
    for flags in [&["--instant"][..], &["--speed", "1000"][..]] {
        n_choices(start(flags)).await;
    }
}

async fn n_choices(s: pdx_mock::MockServer) {
    for (path, body, is_chat) in [
        ("/v1/chat/completions", chat(json!({"n": 3})), true),
        ("/v1/completions", completion(json!({"n": 3})), false),
    ] {
        let (st, v) = post_json(s.addr, path, &body).await;
        assert_eq!(st, 200, "{v}");
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 3);
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i);
            assert_eq!(c["finish_reason"], "length");
        }
        let t = texts(&v, is_chat);
        assert!(t[0] != t[1] && t[1] != t[2], "choices differ: {t:?}");
        assert_eq!(v["usage"]["completion_tokens"], 36, "3 choices × 12 tokens");
        // Streamed: every choice index gets its tokens and its own final chunk.
        let mut b = body.clone();
        b["stream"] = true.into();
        let events = stream_events(s.addr, path, &b).await;
        let mut streamed = vec![String::new(); 3];
        let mut finished = [0; 3];
        for e in events.iter().filter(|e| *e != "[DONE]") {
            let v: serde_json::Value = serde_json::from_str(e).unwrap();
            for c in v["choices"].as_array().unwrap() {
                let i = c["index"].as_u64().unwrap() as usize;
                let piece = if is_chat {
                    c["delta"]["content"].as_str()
                } else {
                    c["text"].as_str()
                };
                streamed[i] += piece.unwrap_or_default();
                if !c["finish_reason"].is_null() {
                    finished[i] += 1;
                }
            }
        }
        assert_eq!(streamed, t, "the stream says what the response says");
        assert_eq!(finished, [1, 1, 1]);
    }
}

#[tokio::test]
async fn seed_gives_deterministic_output_per_seed() {
    let s = start(&["--instant"]);
    let text = |v: &serde_json::Value| texts(v, true)[0].clone();
    let (_, a) = post_json(s.addr, "/v1/chat/completions", &chat(json!({"seed": 7}))).await;
    let (_, b) = post_json(s.addr, "/v1/chat/completions", &chat(json!({"seed": 7}))).await;
    let (_, c) = post_json(s.addr, "/v1/chat/completions", &chat(json!({"seed": 8}))).await;
    let (_, none) = post_json(s.addr, "/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(text(&a), text(&b));
    assert_ne!(text(&a), text(&c));
    assert_ne!(text(&a), text(&none));
}

#[tokio::test]
async fn stop_strings_end_the_text_with_finish_reason_stop() {
    let s = start(&["--instant"]);
    for (path, make, is_chat) in [
        (
            "/v1/chat/completions",
            chat as fn(serde_json::Value) -> serde_json::Value,
            true,
        ),
        ("/v1/completions", completion, false),
    ] {
        let (_, whole) = post_json(s.addr, path, &make(json!({}))).await;
        let whole = texts(&whole, is_chat)[0].clone();
        // Stop on the fourth word of the text the request would give.
        let words: Vec<&str> = whole.split(' ').filter(|w| !w.is_empty()).collect();
        let stop = format!(" {}", words[3]);
        let cut = whole.find(&stop).unwrap();
        let (st, v) = post_json(s.addr, path, &make(json!({"stop": [stop.clone()]}))).await;
        assert_eq!(st, 200, "{v}");
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "stop");
        assert_eq!(c["stop_reason"], stop.as_str());
        assert_eq!(
            texts(&v, is_chat)[0],
            whole[..cut],
            "the text ends before the stop string"
        );
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 12);
        // Streamed, the same text.
        let mut b = make(json!({"stop": stop.clone(), "stream": true}));
        b["stream"] = true.into();
        let streamed: String = stream_events(s.addr, path, &b)
            .await
            .iter()
            .filter(|e| *e != "[DONE]")
            .filter_map(|e| {
                let v: serde_json::Value = serde_json::from_str(e).unwrap();
                let c = v["choices"].get(0)?.clone();
                let p = if is_chat {
                    &c["delta"]["content"]
                } else {
                    &c["text"]
                };
                p.as_str().map(str::to_owned)
            })
            .collect();
        assert_eq!(streamed, whole[..cut]);
    }
}

#[tokio::test]
async fn logprobs_come_in_vllms_shape() {
    let s = start(&["--instant"]);
    let (st, v) = post_json(
        s.addr,
        "/v1/chat/completions",
        &chat(json!({"logprobs": true, "top_logprobs": 3})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 12);
    let text: String = content
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(text, texts(&v, true)[0], "one entry per output token");
    for e in content {
        assert!(e["logprob"].as_f64().unwrap() <= 0.0);
        assert!(e["bytes"].is_array());
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 3);
    }
    let (_, again) = post_json(
        s.addr,
        "/v1/chat/completions",
        &chat(json!({"logprobs": true, "top_logprobs": 3})),
    )
    .await;
    assert_eq!(
        again["choices"][0]["logprobs"], v["choices"][0]["logprobs"],
        "deterministic"
    );
    let (st, v) = post_json(
        s.addr,
        "/v1/completions",
        &completion(json!({"logprobs": 2})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    for key in ["text_offset", "token_logprobs", "tokens", "top_logprobs"] {
        assert_eq!(lp[key].as_array().unwrap().len(), 12, "{key}");
    }
    assert_eq!(lp["text_offset"][0], 0);
    // Streamed: each chunk carries its token's entry.
    let events = stream_events(
        s.addr,
        "/v1/chat/completions",
        &chat(json!({"logprobs": true, "stream": true})),
    )
    .await;
    let with_lp = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter(|e| {
            let v: serde_json::Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["logprobs"]["content"]
                .as_array()
                .is_some_and(|a| a.len() == 1)
        })
        .count();
    assert_eq!(with_lp, 12);
    // Without logprobs, none.
    let (_, v) = post_json(s.addr, "/v1/chat/completions", &chat(json!({}))).await;
    assert!(v["choices"][0]["logprobs"].is_null());
}

#[tokio::test]
async fn what_vllm_rejects_is_rejected_with_its_status_and_message() {
    let s = start(&["--instant"]);
    let tool = json!({"type": "function", "function": {"name": "get_weather", "parameters": {}}});
    let cases = [
        (
            chat(json!({"temperature": "hot"})),
            "Input should be a valid number, unable to parse string as a number",
            Some("temperature"),
        ),
        (chat(json!({"n": "two"})), "Input should be a valid integer", Some("n")),
        (
            chat(json!({"tools": [tool.clone()], "tool_choice": "auto"})),
            "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set",
            None,
        ),
        (
            chat(json!({"tools": [tool.clone()]})),
            "\"auto\" tool choice requires --enable-auto-tool-choice",
            None,
        ),
        (
            chat(json!({"tool_choice": "required"})),
            "When using `tool_choice`, `tools` must be set.",
            Some("tool_choice"),
        ),
        (
            chat(json!({"temperature": 3})),
            "temperature must be in [0, 2], got 3.0.",
            Some("temperature"),
        ),
        (
            chat(json!({"n": 2, "temperature": 0})),
            "n must be 1 when using greedy sampling, got 2.",
            Some("n"),
        ),
        (
            chat(json!({"top_logprobs": 2})),
            "when using `top_logprobs`, `logprobs` must be set to true.",
            Some("top_logprobs"),
        ),
        (
            chat(json!({"logprobs": true, "top_logprobs": 50})),
            "Requested sample logprobs of 50, which is greater than max allowed: 20",
            Some("logprobs"),
        ),
        (
            chat(json!({"stop": ["", "x"]})),
            "stop cannot contain an empty string.",
            Some("stop"),
        ),
        (
            chat(json!({"stream_options": {"include_usage": true}})),
            "Stream options can only be defined when `stream=True`.",
            Some("stream_options"),
        ),
        (
            chat(json!({"response_format": {"type": "json_schema"}})),
            "the 'json_schema' field must be provided",
            Some("response_format"),
        ),
        // Accepted by vLLM, but not something the mock can imitate: refused, not ignored.
        (
            chat(json!({"response_format": {"type": "json_object"}})),
            "pdx mock does not implement structured outputs",
            Some("response_format"),
        ),
        (
            chat(json!({"tools": [tool.clone()], "tool_choice": "required"})),
            "pdx mock does not generate tool calls",
            Some("tool_choice"),
        ),
        (chat(json!({"n": 17})), "at most 16 choices", Some("n")),
    ];
    for (body, message, param) in cases {
        let (st, v) = post_json(s.addr, "/v1/chat/completions", &body).await;
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(v["error"]["type"], "BadRequestError", "{v}");
        assert_eq!(v["error"]["code"], 400);
        let got = v["error"]["message"].as_str().unwrap();
        assert!(got.contains(message), "{body}:\n{got}\nwanted: {message}");
        assert_eq!(v["error"]["param"].as_str(), param, "{body}: {v}");
    }
    // What vLLM accepts still goes through: lax numbers, tool_choice none, response_format text.
    let (st, v) = post_json(
        s.addr,
        "/v1/chat/completions",
        &chat(
            json!({"temperature": "0.7", "top_p": 0.9, "tools": [tool], "tool_choice": "none",
                     "response_format": {"type": "text"}, "user": "u", "presence_penalty": 0.5}),
        ),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    // Nothing leaked by the refusals.
    assert_eq!(s.engine.used_blocks(), 0);
}

/// What a router needs to continue a moved stream: an assistant message continued (`continue_final_message`,
/// `add_generation_prompt: false`: no assistant-turn token after it), vLLM's refusal of both flags true, and
/// `POST /tokenize`.
#[tokio::test]
async fn a_final_assistant_message_can_be_continued_and_text_tokenized() {
    let s = start(&["--instant"]);
    let (st, plain) = post_json(s.addr, "/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(st, 200, "{plain}");
    // "tell me about ducks": 4 tokens, plus the user role token and the assistant-turn token.
    assert_eq!(plain["usage"]["prompt_tokens"], 6);
    let cont = chat(json!({
        "messages": [{"role": "user", "content": "tell me about ducks"},
                     {"role": "assistant", "content": " ducks are birds"}],
        "continue_final_message": true, "add_generation_prompt": false, "max_tokens": 3
    }));
    let (st, v) = post_json(s.addr, "/v1/chat/completions", &cont).await;
    assert_eq!(st, 200, "{v}");
    // The original prompt, plus the assistant role token and the 3 tokens of its text, less the turn token.
    assert_eq!(v["usage"]["prompt_tokens"], 6 + 1 + 3 - 1);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let mut both = cont.clone();
    both["add_generation_prompt"] = json!(true);
    let (st, v) = post_json(s.addr, "/v1/chat/completions", &both).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Cannot set both `continue_final_message` and `add_generation_prompt` to True."));
    let (st, v) = post_json(s.addr, "/tokenize", &json!({"prompt": " ducks are birds"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["count"], 3);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 3);
    let (st, v) = post_json(
        s.addr,
        "/tokenize",
        &json!({"messages": [{"role": "user", "content": "tell me about ducks"}]}),
    )
    .await;
    assert_eq!((st, v["count"].clone()), (200, json!(6)));
    let (st, _) = post_json(
        s.addr,
        "/tokenize",
        &json!({"model": "other", "prompt": "x"}),
    )
    .await;
    assert_eq!(st, 404);
    s.stop();
}
