//! The client-facing front (issue 14, "The first hour"): API keys on the front and upstream, `/v1/models`
//! from the workers' own lists, validation before any prefill, every answer counted, and the
//! configurations and states that used to answer the wrong error.

mod common;

use common::*;
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::time::Duration;

/// `(status, JSON body, WWW-Authenticate)` of a request with optional `Authorization`.
async fn req(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &serde_json::Value,
) -> (u16, serde_json::Value, Option<String>) {
    let h = auth.map(|a| ("authorization", a));
    let r = send(
        addr,
        method,
        path,
        h.as_slice(),
        if method == "GET" {
            String::new()
        } else {
            body.to_string()
        },
    )
    .await;
    let s = r.status().as_u16();
    let www = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let b = r.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&b)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&b).into_owned()));
    (s, v, www)
}

fn assert_openai_error(v: &serde_json::Value, status: u16, kind: &str) {
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert_eq!(v["error"]["code"], status, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pdx-front-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("pdx.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Bullet 1: `--api-key` guards the OpenAI routes with a constant-time check (401 OpenAI JSON), and the
/// workers started with `--api-key` get a key: the client's, forwarded, or the one configured for the pool
/// or worker (file), or sent in the registration body.
#[tokio::test(flavor = "current_thread")]
async fn api_keys_on_the_front_and_upstream() {
    let p = mock(&["--role", "prefill", "--instant", "--api-key", "sk-worker"]);
    let d = mock(&["--role", "decode", "--instant", "--api-key", "sk-worker"]);
    // The mock is as strict as vLLM: /v1 needs the key, /health does not.
    let (s, v, _) = req(
        p.addr,
        "POST",
        "/v1/chat/completions",
        None,
        &chat(2, false),
    )
    .await;
    assert_eq!((s, v), (401, serde_json::json!({"error": "Unauthorized"})));
    let (s, _, _) = req(p.addr, "GET", "/health", None, &serde_json::Value::Null).await;
    assert_eq!(s, 200);

    // Same key on the router: the client's header goes upstream to the prefill and the decode.
    let r = pd(
        &[&p],
        &[&d],
        &["--api-key", "sk-other", "--api-key", "sk-worker"],
    );
    let good = Some("Bearer sk-worker");
    let (s, v, _) = req(
        r.addr,
        "POST",
        "/v1/chat/completions",
        good,
        &chat(3, false),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let mut streamed = chat(3, true);
    streamed["stream_options"] = serde_json::json!({"include_usage": true});
    let (s, v, _) = req(r.addr, "POST", "/v1/chat/completions", good, &streamed).await;
    assert_eq!(s, 200);
    assert!(
        v.as_str().unwrap().contains("\"completion_tokens\":3"),
        "{v}"
    );
    let completion = serde_json::json!({"model": "mock", "prompt": "a b c", "max_tokens": 2});
    let (s, _, _) = req(r.addr, "POST", "/v1/completions", good, &completion).await;
    assert_eq!(s, 200);
    for (path, method, auth) in [
        ("/v1/chat/completions", "POST", None),
        ("/v1/chat/completions", "POST", Some("Bearer sk-wrong")),
        ("/v1/chat/completions", "POST", Some("Bearer sk-worke")),
        ("/v1/chat/completions", "POST", Some("Bearer sk-worker2")),
        ("/v1/chat/completions", "POST", Some("Basic sk-worker")),
        ("/v1/completions", "POST", Some("sk-worker")),
        ("/v1/models", "GET", None),
        ("/v1/models/mock", "GET", None),
        ("/v1/nothing", "GET", None),
    ] {
        let body = if path == "/v1/completions" {
            &completion
        } else {
            &chat(2, false)
        };
        let (s, v, www) = req(r.addr, method, path, auth, body).await;
        assert_eq!(s, 401, "{path} {auth:?}: {v}");
        assert_openai_error(&v, 401, "AuthenticationError");
        assert_eq!(www.as_deref(), Some("Bearer"));
    }
    // The other key works too; probes and metrics stay open.
    let (s, v, _) = req(
        r.addr,
        "GET",
        "/v1/models",
        Some("Bearer sk-other"),
        &serde_json::Value::Null,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    for path in ["/health", "/ready", "/metrics"] {
        let (s, _, _) = req(r.addr, "GET", path, None, &serde_json::Value::Null).await;
        assert_eq!(s, 200, "{path}");
    }
    // No worker saw the refused requests: 3 prefills (chat, stream, completion) only.
    assert_eq!(p.engine.completions_seen(), 3);

    // An upstream key per pool and per worker (file) replaces the client's: the router's own clients use
    // another key, or none.
    let p2 = mock(&[
        "--role",
        "prefill",
        "--instant",
        "--api-key",
        "sk-prefill-only",
    ]);
    let cfg = temp_file(
        "upstream",
        &format!(
            "api_key = \"sk-client\"\n[[models]]\nname = \"mock\"\n\
             [[models.pools]]\nname = \"p\"\nrole = \"prefill\"\napi_key = \"sk-wrong\"\n\
             workers = [{{ url = \"{}\", api_key = \"sk-prefill-only\" }}]\n\
             [[models.pools]]\nname = \"d\"\nrole = \"decode\"\napi_key = \"sk-worker\"\nworkers = [\"{}\"]\n",
            url(&p2),
            url(&d)
        ),
    );
    let r2 = router(&[
        "--config",
        cfg.to_str().unwrap(),
        "--prefill-fallback",
        "fail",
    ]);
    let (s, v, _) = req(
        r2.addr,
        "POST",
        "/v1/chat/completions",
        Some("Bearer sk-client"),
        &chat(2, false),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(p2.engine.completions_seen(), 1);
    let (s, _, _) = req(
        r2.addr,
        "POST",
        "/v1/chat/completions",
        Some("Bearer sk-worker"),
        &chat(2, false),
    )
    .await;
    assert_eq!(
        s, 401,
        "the router's own keys are the file's, not the workers'"
    );

    // No key anywhere on the router: the engine's own 401 reaches the client (not a retry, not a 503).
    let r3 = pd(&[&p], &[&d], &["--prefill-fallback", "fail"]);
    let (s, v, _) = req(
        r3.addr,
        "POST",
        "/v1/chat/completions",
        None,
        &chat(2, false),
    )
    .await;
    assert_eq!(s, 401, "{v}");
    let (s, _, _) = req(
        r3.addr,
        "POST",
        "/v1/chat/completions",
        good,
        &chat(2, false),
    )
    .await;
    assert_eq!(s, 200);

    // A worker that registers with its key gets it upstream.
    let r4 = router(&["--prefill-fallback", "fail"]);
    let base = format!("http://{}", r4.addr);
    let _rp = mock(&[
        "--role",
        "prefill",
        "--instant",
        "--api-key",
        "sk-reg",
        "--register",
        &base,
        "--heartbeat-secs",
        "0.2",
    ]);
    let _rd = mock(&[
        "--role",
        "decode",
        "--instant",
        "--api-key",
        "sk-reg",
        "--register",
        &base,
        "--heartbeat-secs",
        "0.2",
    ]);
    assert!(
        eventually(|| r4.shared.registry.workers().len() == 2).await,
        "both registered"
    );
    let (s, v, _) = req(
        r4.addr,
        "POST",
        "/v1/chat/completions",
        None,
        &chat(2, false),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v, _) = req(
        r4.addr,
        "GET",
        "/v1/workers",
        None,
        &serde_json::Value::Null,
    )
    .await;
    assert_eq!(s, 200);
    assert!(
        !v.to_string().contains("sk-reg"),
        "keys are never listed: {v}"
    );
}

/// Polls `GET /v1/models` until `pred` holds on its `data` (the control loop fetches the workers' lists).
async fn models_until(
    addr: SocketAddr,
    auth: Option<&str>,
    pred: impl Fn(&[serde_json::Value]) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..500 {
        let (s, v, _) = req(addr, "GET", "/v1/models", auth, &serde_json::Value::Null).await;
        assert_eq!(s, 200, "{v}");
        if v["data"].as_array().is_some_and(|d| pred(d)) {
            return v;
        }
        last = v;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("models never matched: {last}");
}

fn ids(data: &[serde_json::Value]) -> Vec<&str> {
    data.iter().filter_map(|e| e["id"].as_str()).collect()
}

/// Bullet 2: `/v1/models` lists what the workers serve (OpenAI list shape), `/v1/models/{id}` answers the
/// entry or a 404 OpenAI error.
#[tokio::test(flavor = "current_thread")]
async fn models_come_from_the_workers() {
    let a = mock(&[
        "--instant",
        "--model",
        "org/alpha",
        "--max-model-len",
        "4096",
    ]);
    let b = mock(&["--instant", "--model", "beta", "--api-key", "sk-b"]);
    // Quick start without --model (any name is routed): every worker's models are listed; worker b needs a
    // key, and gets the router's.
    let r = router(&[
        "--worker",
        &url(&a),
        "--worker",
        &url(&b),
        "--api-key",
        "sk-b",
    ]);
    let auth = Some("Bearer sk-b");
    let v = models_until(r.addr, auth, |d| d.len() == 2).await;
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(ids(data), ["org/alpha", "beta"], "{v}");
    for e in data {
        assert_eq!(e["object"], "model");
        assert!(e["created"].as_u64().is_some(), "{e}");
        assert_eq!(e["owned_by"], "pdx-mock");
    }
    assert_eq!(data[0]["max_model_len"], 4096);
    for path in ["/v1/models/org/alpha", "/v1/models/org%2Falpha"] {
        let (s, e, _) = req(r.addr, "GET", path, auth, &serde_json::Value::Null).await;
        assert_eq!(s, 200, "{path}: {e}");
        assert_eq!(e, data[0], "{path}");
    }
    for path in ["/v1/models/gamma", "/v1/models/org", "/v1/models/%zz"] {
        let (s, e, _) = req(r.addr, "GET", path, auth, &serde_json::Value::Null).await;
        assert_eq!(s, 404, "{path}: {e}");
        assert_openai_error(&e, 404, "NotFoundError");
        assert_eq!(e["error"]["param"], "model");
    }
    let (s, _, _) = req(r.addr, "POST", "/v1/models", auth, &serde_json::Value::Null).await;
    assert_eq!(s, 405);

    // A configured name is listed as itself, with its worker's card; a registered worker's model joins.
    let p = mock(&["--role", "prefill", "--instant"]);
    let d = mock(&["--role", "decode", "--instant"]);
    let r = pd(&[&p], &[&d], &["--model", "mock"]);
    let v = models_until(r.addr, None, |d| {
        d.first().is_some_and(|e| e["owned_by"] == "pdx-mock")
    })
    .await;
    assert_eq!(ids(v["data"].as_array().unwrap()), ["mock"], "{v}");
    let base = format!("http://{}", r.addr);
    let _g = mock(&["--instant", "--model", "gamma", "--register", &base]);
    let v = models_until(r.addr, None, |d| d.len() == 2).await;
    assert_eq!(ids(v["data"].as_array().unwrap()), ["gamma", "mock"], "{v}");
    let (s, e, _) = req(
        r.addr,
        "GET",
        "/v1/models/gamma",
        None,
        &serde_json::Value::Null,
    )
    .await;
    assert_eq!((s, &e["id"]), (200, &serde_json::json!("gamma")), "{e}");
}

/// Bullet 3: a bad request is refused once, at the router, with vLLM's 400, before any worker sees it.
#[tokio::test(flavor = "current_thread")]
async fn bad_requests_never_reach_a_worker() {
    let p = mock(&["--role", "prefill", "--instant"]);
    let d = mock(&["--role", "decode", "--instant"]);
    let r = pd(&[&p], &[&d], &[]);
    let with = |f: serde_json::Value| {
        let mut b = chat(4, false);
        for (k, v) in f.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (body, param) in [
        (with(serde_json::json!({"max_tokens": 0})), "max_tokens"),
        (
            with(serde_json::json!({"max_completion_tokens": 0})),
            "max_completion_tokens",
        ),
        (with(serde_json::json!({"n": 0})), "n"),
        (with(serde_json::json!({"temperature": -1})), "temperature"),
        (
            with(serde_json::json!({"temperature": "warm"})),
            "temperature",
        ),
        (with(serde_json::json!({"top_p": 0})), "top_p"),
        (with(serde_json::json!({"min_tokens": 9})), "min_tokens"),
        (
            with(serde_json::json!({"stream_options": {"include_usage": true}})),
            "stream_options",
        ),
        (with(serde_json::json!({"messages": []})), "messages"),
    ] {
        let (s, v, _) = req(r.addr, "POST", "/v1/chat/completions", None, &body).await;
        assert_eq!(s, 400, "{body}: {v}");
        assert_openai_error(&v, 400, "BadRequestError");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    let (s, v, _) = req(
        r.addr,
        "POST",
        "/v1/completions",
        None,
        &serde_json::json!({"model": "mock", "prompt": "a b", "max_tokens": 0}),
    )
    .await;
    assert_eq!(
        (s, &v["error"]["message"]),
        (
            400,
            &serde_json::json!("max_tokens must be at least 1, got 0.")
        )
    );
    assert_eq!(p.engine.completions_seen(), 0, "no prefill ran");
    assert_eq!(d.engine.completions_seen(), 0, "no decode ran");
    let (s, v, _) = req(
        r.addr,
        "POST",
        "/v1/chat/completions",
        None,
        &chat(2, false),
    )
    .await;
    assert_eq!(s, 200, "{v}");
}

/// Bullet 3: every answer of the completion routes is counted, by status class and the real model name,
/// and names the router does not list share one label.
#[tokio::test(flavor = "current_thread")]
async fn every_answer_is_counted_by_model_and_class() {
    let p = mock(&["--role", "prefill", "--instant"]);
    let d = mock(&["--role", "decode", "--instant"]);
    let r = pd(&[&p], &[&d], &["--api-key", "k"]);
    let auth = Some("Bearer k");
    models_until(r.addr, auth, |d| ids(d) == ["mock"]).await;
    let (s, _, _) = req(
        r.addr,
        "POST",
        "/v1/chat/completions",
        auth,
        &chat(2, false),
    )
    .await;
    assert_eq!(s, 200);
    // The prefill's 404 (a model it does not serve) goes to the client and is counted.
    for name in ["nope-1", "nope-2", "nope-3"] {
        let mut b = chat(2, false);
        b["model"] = name.into();
        let (s, v, _) = req(r.addr, "POST", "/v1/chat/completions", auth, &b).await;
        assert_eq!(s, 404, "{v}");
    }
    let mut bad = chat(2, false);
    bad["max_tokens"] = 0.into();
    let (s, _, _) = req(r.addr, "POST", "/v1/chat/completions", auth, &bad).await;
    assert_eq!(s, 400);
    let (s, _, _) = req(
        r.addr,
        "POST",
        "/v1/chat/completions",
        None,
        &chat(2, false),
    )
    .await;
    assert_eq!(s, 401);
    let m = router_metrics(&r);
    let count = |filters: &[&str]| -> f64 {
        m.lines()
            .filter(|l| {
                l.starts_with("pdx_requests_total{") && filters.iter().all(|f| l.contains(f))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        count(&["model=\"mock\"", "class=\"2xx\"", "status=\"200\""]),
        1.0,
        "{m}"
    );
    assert_eq!(
        count(&["model=\"other\"", "class=\"4xx\"", "status=\"404\""]),
        3.0,
        "{m}"
    );
    assert_eq!(
        count(&["model=\"mock\"", "class=\"4xx\"", "status=\"400\""]),
        1.0,
        "{m}"
    );
    assert_eq!(
        count(&["model=\"other\"", "class=\"4xx\"", "status=\"401\""]),
        1.0,
        "{m}"
    );
    assert_eq!(count(&[]), 6.0, "{m}");
    assert!(
        !m.lines().any(|l| l.starts_with("pdx_requests_total")
            && (l.contains("nope-") || l.contains("model=\"*\""))),
        "{m}"
    );
    // The 200 names the decode worker that produced it.
    assert_eq!(
        count(&[&format!("worker=\"{}\"", url(&d)), "pool=\"decode\""]),
        1.0,
        "{m}"
    );
}

/// Bullet 3: `--prefill` without `--decode` (every request would get 503) is refused at start.
#[test]
fn prefill_without_decode_is_refused_at_start() {
    let args = |extra: &[&str]| {
        let mut v = vec![
            "pdx-serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--threads",
            "1",
        ];
        v.extend_from_slice(extra);
        <pdx_router::ServeArgs as clap::Parser>::parse_from(v)
    };
    let e = pdx_router::start(args(&["--prefill", "http://127.0.0.1:9"])).expect_err("refused");
    assert!(
        e.to_string().contains("no decode worker") && e.to_string().contains("--decode"),
        "{e}"
    );
    let e = pdx_router::start(args(&[
        "--decode",
        "http://127.0.0.1:9",
        "--orchestration",
        "aggregated",
    ]))
    .expect_err("refused");
    assert!(e.to_string().contains("aggregated"), "{e}");
    // A decode pool declared for registration is enough.
    let cfg = temp_file(
        "topology",
        "[[models]]\nname = \"m\"\n[[models.pools]]\nname = \"p\"\nrole = \"prefill\"\nworkers = [\"http://127.0.0.1:9\"]\n\
         [[models.pools]]\nname = \"d\"\nrole = \"decode\"\nworkers = []\n",
    );
    let ok = pdx_router::start(args(&["--config", cfg.to_str().unwrap()])).expect("starts");
    drop(ok);
}

/// Bullet 3: with no worker at all, a completion gets 503 "no workers registered", not an unknown-model 404.
#[tokio::test(flavor = "current_thread")]
async fn no_workers_is_503_not_404() {
    let r = router(&[]);
    for body in [
        chat(2, false),
        serde_json::json!({"messages": [{"role": "user", "content": "x"}]}),
    ] {
        let (s, v, _) = req(r.addr, "POST", "/v1/chat/completions", None, &body).await;
        assert_eq!(s, 503, "{v}");
        assert_openai_error(&v, 503, "ServiceUnavailableError");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("no workers registered"),
            "{v}"
        );
    }
    // Once a worker exists, an unknown model is a 404 again.
    let base = format!("http://{}", r.addr);
    let _w = mock(&["--instant", "--register", &base]);
    assert!(eventually(|| r.shared.registry.workers().len() == 1).await);
    let mut b = chat(2, false);
    b["model"] = "other-model".into();
    let (s, v, _) = req(r.addr, "POST", "/v1/chat/completions", None, &b).await;
    assert_eq!(s, 404, "{v}");
    let (s, v, _) = req(
        r.addr,
        "POST",
        "/v1/chat/completions",
        None,
        &chat(2, false),
    )
    .await;
    assert_eq!(s, 200, "{v}");
}
