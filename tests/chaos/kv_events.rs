//! KV events end to end (issue 17): `pdx mock` publishes vLLM's KV events, `pdx serve --policy kv_aware`
//! subscribes, keeps an exact prefix index per worker and routes by it; and what a worker can do wrong on
//! that channel (a hostile publisher, a bad endpoint in a registration) does not hurt the router.

use crate::support::*;
use std::io::{Read, Write};
use std::time::Duration;

/// The value of `name{worker="URL"}` on the router's `/metrics`.
fn worker_metric(port: u16, name: &str, worker: &str) -> Option<f64> {
    let r = http(port, "GET", "/metrics", &[], "", Duration::from_secs(2)).ok()?;
    let label = format!("worker=\"{worker}\"");
    r.body
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .find(|l| l.contains(&label))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn events_config(pub_port: u16, replay_port: u16) -> String {
    format!(
        r#"{{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://127.0.0.1:{pub_port}","replay_endpoint":"tcp://127.0.0.1:{replay_port}","topic":"kv-events","buffer_steps":10000}}"#
    )
}

fn complete(port: u16, prompt: &str) -> Resp {
    let body = serde_json::json!({"model": "mock", "prompt": prompt, "max_tokens": 2});
    let r = http(
        port,
        "POST",
        "/v1/completions",
        &[],
        &body.to_string(),
        GUARD,
    )
    .expect("answer");
    assert_eq!(r.status, 200, "{}", r.body);
    r
}

#[test]
fn kv_aware_routes_by_the_engines_kv_events() {
    let (pa, pb, pr) = (free_port(), free_port(), free_port());
    let (ea, ra, eb, rb) = (free_port(), free_port(), free_port(), free_port());
    let _a = mock(pa, &["--kv-events-config", &events_config(ea, ra)]);
    let _b = mock(pb, &["--kv-events-config", &events_config(eb, rb)]);
    let (ua, ub) = (url(pa), url(pb));
    let dir = TempDir::new("kv-events");
    let cfg = dir.0.join("pdx.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"orchestration = "aggregated"
[[models]]
name = "mock"
block_size = 16
[[models.pools]]
name = "agg"
role = "aggregated"
policy = "kv_aware"
workers = [
  {{ url = "{ua}", kv_events_endpoint = "tcp://127.0.0.1:{ea}", kv_events_replay_endpoint = "tcp://127.0.0.1:{ra}" }},
  {{ url = "{ub}", kv_events_endpoint = "tcp://127.0.0.1:{eb}", kv_events_replay_endpoint = "tcp://127.0.0.1:{rb}" }},
]
"#
        ),
    )
    .unwrap();
    let mut rt = router(pr, &["--config", cfg.to_str().unwrap()]);
    wait_healthy(&mut rt, pr);
    // Both subscriptions replayed the (empty) history: the index knows both workers exactly.
    let exact = |w: &str| worker_metric(pr, "pdx_kv_index_exact", w) == Some(1.0);
    assert!(
        wait_until(GUARD, || exact(&ua) && exact(&ub)),
        "the router's index never became exact for both workers"
    );
    let blocks = |w: &str| worker_metric(pr, "pdx_kv_index_blocks", w).unwrap_or(-1.0);

    // A long prompt through the router: its 43 full blocks (700 tokens, 16 per block) are indexed on the
    // worker that served it, and on no other.
    let long = pdx_mock::synthetic_prompt(700, 1);
    let r = complete(pr, &long);
    let served = r.header("x-pdx-worker").expect("x-pdx-worker").to_string();
    let other = if served == ua { ub.clone() } else { ua.clone() };
    assert!(
        wait_until(GUARD, || blocks(&served) >= 43.0),
        "index of {served}: {} blocks",
        blocks(&served)
    );
    assert_eq!(blocks(&other), 0.0);

    // A prompt each worker computed behind the router's back (sent to it directly): the router learns of
    // it only through the KV events. Requests sharing that prefix go to that worker every time, whatever
    // the round-robin order of ties (the router's own decisions know nothing of these prompts).
    for (i, (port, owner)) in [(pa, &ua), (pb, &ub), (pa, &ua)].into_iter().enumerate() {
        let seed = 100 + i as u64;
        let before = blocks(owner);
        complete(port, &pdx_mock::synthetic_prompt(640, seed));
        assert!(
            wait_until(GUARD, || blocks(owner) >= before + 40.0),
            "the router never indexed the prompt sent to {owner}"
        );
        for k in 0..3 {
            // 640 shared tokens, then a different tail.
            let p = format!(
                "{} {}",
                pdx_mock::synthetic_prompt(640, seed),
                pdx_mock::synthetic_prompt(20 + k, 900 + k as u64)
            );
            let r = complete(pr, &p);
            assert_eq!(
                r.header("x-pdx-worker"),
                Some(owner.as_str()),
                "request {k} on prefix {seed} went elsewhere"
            );
        }
    }
    let gaps = metric(pr, "pdx_kv_events_gaps_total").unwrap_or(0.0);
    let resets = metric(pr, "pdx_kv_events_resets_total").unwrap_or(0.0);
    assert_eq!((gaps, resets), (0.0, 0.0), "a clean stream has no gaps");
}

/// A fake ZMQ PUB on loopback: greeting and READY, then `then`, then holds the connection open.
fn hostile_publisher(then: Vec<u8>) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let then = then.clone();
            std::thread::spawn(move || {
                let mut g = [0u8; 64];
                g[0] = 0xff;
                g[9] = 0x7f;
                g[10] = 3;
                g[12..16].copy_from_slice(b"NULL");
                let _ = s.write_all(&g);
                let mut ready = b"\x05READY\x0bSocket-Type\x00\x00\x00\x03PUB".to_vec();
                ready.insert(0, ready.len() as u8);
                ready.insert(0, 0x04);
                let _ = s.write_all(&ready);
                let _ = s.write_all(&then);
                let mut sink = [0u8; 1024];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    });
    port
}

#[test]
fn a_hostile_kv_event_publisher_cannot_hurt_the_router() {
    // One publisher announces a 2^62-byte frame; another sends well-framed garbage batches.
    let mut huge = vec![0x02];
    huge.extend_from_slice(&(1u64 << 62).to_be_bytes());
    let e1 = hostile_publisher(huge);
    let mut junk = Vec::new();
    for seq in 0u64..3 {
        junk.extend_from_slice(&[0x01, 0x00, 0x01, 0x08]);
        junk.extend_from_slice(&seq.to_be_bytes());
        junk.extend_from_slice(&[0x00, 0x03, 0x92, 0xc1, 0xff]);
    }
    let e2 = hostile_publisher(junk);
    let (p1, p2, pr) = (free_port(), free_port(), free_port());
    let _m1 = mock(p1, &[]);
    let _m2 = mock(p2, &[]);
    let (u1, u2) = (url(p1), url(p2));
    let dir = TempDir::new("kv-events-hostile");
    let cfg = dir.0.join("pdx.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"orchestration = "aggregated"
[[models]]
name = "mock"
[[models.pools]]
name = "agg"
role = "aggregated"
policy = "kv_aware"
workers = [
  {{ url = "{u1}", kv_events_endpoint = "tcp://127.0.0.1:{e1}" }},
  {{ url = "{u2}", kv_events_endpoint = "tcp://127.0.0.1:{e2}" }},
]
"#
        ),
    )
    .unwrap();
    let mut rt = router(pr, &["--config", cfg.to_str().unwrap()]);
    wait_healthy(&mut rt, pr);
    assert!(
        wait_until(GUARD, || worker_metric(
            pr,
            "pdx_kv_events_decode_errors_total",
            &u2
        )
        .is_some_and(|v| v >= 1.0)),
        "garbage batches are counted"
    );
    // Still serving, through both workers, with the approximate index for the ones it cannot trust.
    for _ in 0..4 {
        complete(pr, &pdx_mock::synthetic_prompt(100, 3));
    }
    assert!(rt.exited().is_none());
    assert_eq!(worker_metric(pr, "pdx_kv_index_exact", &u1), Some(0.0));
    assert_eq!(worker_metric(pr, "pdx_kv_index_exact", &u2), Some(0.0));
}

#[test]
fn a_registration_with_a_bad_kv_events_endpoint_is_refused() {
    let pr = free_port();
    let mut rt = router(pr, &[]);
    wait_healthy(&mut rt, pr);
    for bad in [
        "tcp://*:5557",
        "ipc:///tmp/kv",
        "tcp://127.0.0.1",
        "tcp://h:1/x",
    ] {
        let (st, v) = post_json(
            pr,
            "/v1/workers",
            &serde_json::json!({"role": "aggregated", "pool": "a", "url": "http://127.0.0.1:9",
                                "model": "m", "kv_events_endpoint": bad}),
        );
        assert_eq!(st, 400, "{bad}: {v}");
    }
    // Inside an allow-list, the endpoints must be too.
    let pr2 = free_port();
    let mut r2 = router(pr2, &["--worker-allow-cidr", "127.0.0.0/8"]);
    wait_healthy(&mut r2, pr2);
    let (st, v) = post_json(
        pr2,
        "/v1/workers",
        &serde_json::json!({"role": "aggregated", "pool": "a", "url": "http://127.0.0.1:9",
                            "model": "m", "kv_events_endpoint": "tcp://10.1.2.3:5557"}),
    );
    assert_eq!(st, 403, "{v}");
    let (st, v) = post_json(
        pr2,
        "/v1/workers",
        &serde_json::json!({"role": "aggregated", "pool": "a", "url": "http://127.0.0.1:9",
                            "model": "m", "kv_events_endpoint": "tcp://127.0.0.1:5557"}),
    );
    assert!(st == 200 || st == 201, "{st} {v}");
}
