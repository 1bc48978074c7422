//! The router's client-facing front, as a user meets it in the first hour: a router started with
//! `--prefill` and no `--decode`, a router with no worker yet, a wrong API key, and `max_tokens: 0`.

use crate::support::*;

/// One request to the router on `port`, with the client's API key when given: status and body.
fn call(port: u16, method: &str, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let r = http(port, method, path, &headers, body, GUARD).expect("an HTTP answer");
    (r.status, r.body)
}

fn chat(max_tokens: u32) -> String {
    serde_json::json!({"model": "mock", "messages": [{"role": "user", "content": "a b c d"}], "max_tokens": max_tokens})
        .to_string()
}

/// `--prefill` without `--decode` used to start and answer 503 to everything: now it exits at once, saying
/// what is missing.
#[test]
fn prefill_without_decode_exits_with_a_clear_error() {
    let out = run(&server_args(
        "serve",
        free_port(),
        &["--prefill", "http://127.0.0.1:9"],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no decode worker") && err.contains("--decode"),
        "{err}"
    );
}

/// A router with no worker answers 503 "no workers registered"; with workers behind `--api-key`, a wrong key
/// is a 401 and `max_tokens: 0` a 400 that no engine ever sees.
#[test]
fn keys_and_bad_requests_are_answered_at_the_front() {
    let empty = free_port();
    let _empty = router(empty, &[]);
    assert!(wait_until(GUARD, || health_ok(empty)));
    let (s, b) = call(empty, "POST", "/v1/chat/completions", None, &chat(2));
    assert_eq!(s, 503, "{b}");
    assert!(b.contains("no workers registered"), "{b}");

    let (prefill, decode, rp) = (free_port(), free_port(), free_port());
    let engine = |role: &str, port: u16| mock(port, &["--role", role, "--api-key", "sk-chaos"]);
    let (_p, _d) = (engine("prefill", prefill), engine("decode", decode));
    let _r = router(
        rp,
        &[
            "--prefill",
            &url(prefill),
            "--decode",
            &url(decode),
            "--api-key",
            "sk-chaos",
        ],
    );
    assert!(wait_until(GUARD, || ready(rp)), "the router is ready");
    let prompt_tokens = || metric(prefill, "vllm:prompt_tokens_total").unwrap_or(0.0);
    for key in [None, Some("sk-wrong")] {
        let (s, b) = call(rp, "POST", "/v1/chat/completions", key, &chat(2));
        assert_eq!(s, 401, "{b}");
        assert!(b.contains("AuthenticationError"), "{b}");
    }
    let (s, b) = call(
        rp,
        "POST",
        "/v1/chat/completions",
        Some("sk-chaos"),
        &chat(0),
    );
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("max_tokens must be at least 1"), "{b}");
    assert_eq!(
        prompt_tokens(),
        0.0,
        "the prefill engine saw a refused request"
    );
    // The client's key reaches both engines: a good request is served.
    let (s, b) = call(
        rp,
        "POST",
        "/v1/chat/completions",
        Some("sk-chaos"),
        &chat(3),
    );
    assert_eq!(s, 200, "{b}");
    assert!(prompt_tokens() > 0.0);
}
