//! End to end: `pdx demo` runs the router, two prefill pools, a decode pool and the replayer on a short slice
//! of the Mooncake conversation trace, and the result is checked from both sides.

use std::process::Command;

#[test]
fn demo_serves_every_request_with_verified_kv_through_both_prefill_pools() {
    let out = Command::new(env!("CARGO_BIN_EXE_pdx"))
        .args([
            "demo",
            "--json",
            "--max-requests",
            "60",
            "--speed",
            "20",
            "--scale-tokens",
            "0.05",
        ])
        .output()
        .expect("pdx demo runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pdx demo failed: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON result");
    let (report, cluster) = (&v["report"], &v["cluster"]);
    // Every request succeeds and streams exactly the tokens the trace asked for.
    assert_eq!(report["requests"], 60);
    assert_eq!(report["succeeded"], 60, "{}", report["errors"]);
    assert_eq!(
        report["output_tokens_received"],
        report["output_tokens_requested"]
    );
    assert_eq!(report["length_mismatches"], 0);
    // KV moved and verified: blocks arrived, none failed, and every block a prefill handed out was read.
    assert!(cluster["kv_blocks_received"].as_f64().unwrap() > 0.0);
    assert!(cluster["kv_bytes_received"].as_f64().unwrap() > 0.0);
    assert_eq!(cluster["kv_transfer_errors"], 0.0);
    assert_eq!(cluster["prefill_blocks_still_held"], 0.0);
    // The demo's grid sends ISL < 1024 tokens to prefill pool `short`, the rest to `long`. The replay gives
    // each request ISL = max(round(input_length × 0.05), 1 + the chat template's tokens), so the split
    // follows from the trace itself.
    let trace = pdx_replay::trace::parse(pdx_replay::MOONCAKE_CONVERSATION_SLICE)
        .unwrap()
        .requests;
    let overhead = pdx_mock::CHAT_OVERHEAD_TOKENS as u32;
    let short_expected = trace[..60]
        .iter()
        .map(|r| {
            ((f64::from(r.input_tokens) * 0.05).round() as u32)
                .max(1)
                .max(overhead + 1)
        })
        .filter(|&isl| isl < 1024)
        .count() as f64;
    assert!(
        short_expected > 0.0 && short_expected < 60.0,
        "the slice exercises both pools"
    );
    let pools = &cluster["requests_by_pool"];
    let total = |pool: &str| -> f64 {
        pools[pool]
            .as_object()
            .map_or(0.0, |m| m.values().filter_map(|n| n.as_f64()).sum())
    };
    assert_eq!(total("short"), short_expected, "{pools}");
    assert_eq!(total("long"), 60.0 - short_expected, "{pools}");
    // Every request went through exactly one decode worker.
    assert_eq!(total("decode"), 60.0, "{pools}");
}
