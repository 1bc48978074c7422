//! Disaggregated prefill → decode with real KV bytes (vLLM NixlConnector flow), over pdx's
//! transfer engine and over the in-process transport; missing/expired/corrupt KV errors.

mod common;
use common::*;
use pdx_mock::synthetic_prompt;
use serde_json::json;

fn chat(n: usize, seed: u64) -> serde_json::Value {
    json!({"model": "mock", "messages": [{"role": "user", "content": synthetic_prompt(n, seed)}]})
}

/// vLLM's proxy flow: prefill with do_remote_decode + max_tokens 1, then decode with the
/// returned params. Returns (prefill params, decode response).
async fn pd_request(
    p: std::net::SocketAddr,
    d: std::net::SocketAddr,
    body: &serde_json::Value,
    max_tokens: u32,
) -> (serde_json::Value, u16, serde_json::Value) {
    let mut pb = body.clone();
    pb["max_tokens"] = json!(1);
    pb["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": false,
        "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null});
    let (st, pv) = post_json(p, "/v1/chat/completions", &pb).await;
    assert_eq!(st, 200, "{pv}");
    assert_eq!(pv["usage"]["completion_tokens"], 1);
    let kv = pv["kv_transfer_params"].clone();
    let mut db = body.clone();
    db["max_tokens"] = json!(max_tokens);
    db["kv_transfer_params"] = kv.clone();
    let (st, dv) = post_json(d, "/v1/chat/completions", &db).await;
    (kv, st, dv)
}

async fn round_trip(transport: &str) {
    let common = [
        "--instant",
        "--kv-transport",
        transport,
        "--num-blocks",
        "64",
        "--kv-scale-down",
        "64",
    ];
    let p = start(&[&["--role", "prefill"][..], &common].concat());
    let d = start(&[&["--role", "decode"][..], &common].concat());
    let agg = start(&["--instant"]);
    let body = chat(100, 7); // 102 prompt tokens = 7 blocks (last one partial)
    let (kv, st, dv) = pd_request(p.addr, d.addr, &body, 12).await;
    assert_eq!(kv["do_remote_prefill"], true);
    assert_eq!(kv["do_remote_decode"], false);
    assert_eq!(kv["remote_block_ids"].as_array().unwrap().len(), 7);
    assert_eq!(
        kv["remote_engine_id"],
        p.engine.kv_endpoint().unwrap().engine_id
    );
    assert_eq!(kv["remote_host"], "127.0.0.1");
    assert_eq!(kv["tp_size"], 1);
    assert!(kv["remote_request_id"].is_string());
    assert_eq!(st, 200, "{dv}");
    assert_eq!(dv["usage"]["completion_tokens"], 12);
    assert!(dv.get("kv_transfer_params").is_none());
    // same text as an aggregated worker would produce
    let mut ab = body.clone();
    ab["max_tokens"] = json!(12);
    let (_, av) = post_json(agg.addr, "/v1/chat/completions", &ab).await;
    assert_eq!(
        dv["choices"][0]["message"]["content"],
        av["choices"][0]["message"]["content"]
    );
    // every prompt block arrived and verified, and is counted
    assert_eq!(metric(&d, "pdx:kv_blocks_received_total"), 7.0);
    let block_bytes = d.engine.kv_layout().unwrap().block_bytes() as f64;
    assert_eq!(metric(&d, "pdx:kv_bytes_received_total"), 7.0 * block_bytes);
    // the decode side's notification frees the prefill's blocks
    assert!(eventually(|| p.engine.held_requests() == 0 && p.engine.used_blocks() == 0).await);
    assert_eq!(d.engine.used_blocks(), 0);
    // second request with the same prefix: decode reuses its own cached blocks, reads only the rest
    let (_, st, dv) = pd_request(p.addr, d.addr, &body, 3).await;
    assert_eq!(st, 200, "{dv}");
    assert_eq!(dv["usage"]["prompt_tokens_details"]["cached_tokens"], 96);
    // 96 cached tokens = 6 blocks; only the 7th (partial) block was read
    assert_eq!(metric(&d, "pdx:kv_blocks_received_total"), 8.0);
    assert!(eventually(|| p.engine.used_blocks() == 0).await);
    // streaming decode works too
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let (_, st, _) = pd_request(p.addr, d.addr, &chat(30, 8), 2).await;
    assert_eq!(st, 200);
    p.stop();
    d.stop();
    agg.stop();
}

#[tokio::test]
async fn nixl_round_trip_over_pdx_transfer() {
    round_trip("pdx").await;
}

#[tokio::test]
async fn nixl_round_trip_in_process() {
    round_trip("inproc").await;
}

#[tokio::test]
async fn corrupt_missing_and_expired_kv_give_errors_not_output() {
    for transport in ["pdx", "inproc"] {
        let common = [
            "--instant",
            "--kv-transport",
            transport,
            "--num-blocks",
            "16",
            "--kv-scale-down",
            "64",
        ];
        let p = start(
            &[
                &["--role", "prefill", "--kv-hold-timeout-secs", "0.2"][..],
                &common,
            ]
            .concat(),
        );
        let d = start(&[&["--role", "decode"][..], &common].concat());
        let body = chat(62, 3); // 64 tokens = 4 blocks
        let mut pb = body.clone();
        pb["max_tokens"] = json!(1);
        pb["kv_transfer_params"] = json!({"do_remote_decode": true});
        let (_, pv) = post_json(p.addr, "/v1/chat/completions", &pb).await;
        let kv = pv["kv_transfer_params"].clone();
        assert_eq!(p.engine.held_requests(), 1);
        // corrupt: blocks in the wrong order
        let mut bad = kv.clone();
        let mut ids = bad["remote_block_ids"].as_array().unwrap().clone();
        ids.reverse();
        bad["remote_block_ids"] = json!(ids);
        let mut db = body.clone();
        db["kv_transfer_params"] = bad;
        let (st, v) = post_json(d.addr, "/v1/chat/completions", &db).await;
        assert_eq!(
            (st, v["error"]["type"].as_str()),
            (502, Some("KVTransferError")),
            "{v}"
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("verification"),
            "{v}"
        );
        // wrong block count for this prompt
        let mut short = kv.clone();
        short["remote_block_ids"] = json!([0]);
        db["kv_transfer_params"] = short;
        let (st, v) = post_json(d.addr, "/v1/chat/completions", &db).await;
        assert_eq!(st, 400, "{v}");
        // missing engine
        let mut gone = kv.clone();
        gone["remote_engine_id"] = json!("no-such-engine");
        db["kv_transfer_params"] = gone;
        let (st, v) = post_json(d.addr, "/v1/chat/completions", &db).await;
        assert_eq!(st, 502, "{v}");
        // incomplete params
        db["kv_transfer_params"] =
            json!({"do_remote_prefill": true, "remote_block_ids": [1, 2, 3, 4]});
        let (st, v) = post_json(d.addr, "/v1/chat/completions", &db).await;
        assert_eq!(st, 400, "{v}");
        // expiry frees the prefill's blocks; other prompts then overwrite them
        assert!(eventually(|| p.engine.held_requests() == 0 && p.engine.used_blocks() == 0).await);
        for seed in 10..14 {
            let (st, _) = post_json(p.addr, "/v1/chat/completions", &chat(62, seed)).await;
            assert_eq!(st, 200);
        }
        db["kv_transfer_params"] = kv.clone();
        let (st, v) = post_json(d.addr, "/v1/chat/completions", &db).await;
        assert_eq!(st, 502, "expired KV must not verify: {v}");
        // nothing leaked on the decode side, and it still serves
        assert_eq!(d.engine.used_blocks(), 0);
        assert!(metric(&d, "pdx:kv_transfer_errors_total") >= 3.0);
        let (_, st, v) = pd_request(p.addr, d.addr, &body, 2).await;
        assert_eq!(st, 200, "{v}");
        // a prefill whose decode never comes: the hold times out and frees the blocks
        assert!(eventually(|| p.engine.held_requests() == 0).await);
        let (_, pv) = post_json(p.addr, "/v1/chat/completions", &pb).await;
        assert!(pv["kv_transfer_params"]["remote_block_ids"].is_array());
        assert_eq!(p.engine.held_requests(), 1);
        assert!(eventually(|| p.engine.held_requests() == 0 && p.engine.used_blocks() == 0).await);
        assert_eq!(metric(&p, "pdx:kv_blocks_held"), 0.0);
        p.stop();
        d.stop();
    }
}

#[tokio::test]
async fn sglang_bootstrap_requests_are_answered() {
    let p = start(&["--instant", "--role", "prefill", "--kv-transport", "inproc"]);
    let d = start(&["--instant", "--role", "decode", "--kv-transport", "inproc"]);
    let mut body = chat(20, 1);
    body["max_tokens"] = json!(6);
    body["bootstrap_host"] = json!("127.0.0.1");
    // The prefill's own HTTP port serves the bootstrap route the decode asks.
    body["bootstrap_port"] = json!(p.addr.port());
    body["bootstrap_room"] = json!(12345678901234u64);
    let (a, b) = tokio::join!(
        post_json(p.addr, "/v1/chat/completions", &body),
        post_json(d.addr, "/v1/chat/completions", &body)
    );
    assert_eq!(
        (a.0, a.1["usage"]["completion_tokens"].as_u64()),
        (200, Some(1))
    );
    assert_eq!(
        (b.0, b.1["usage"]["completion_tokens"].as_u64()),
        (200, Some(6))
    );
    assert_eq!(p.engine.used_blocks() + d.engine.used_blocks(), 0);
    p.stop();
    d.stop();
}
