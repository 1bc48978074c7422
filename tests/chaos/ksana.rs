//! KsanaLLM orchestration faults (issue 15), through the real `pdx` binary: `pdx serve --orchestration ksana`
//! in front of `pdx mock --ksana-router` nodes (they register, heartbeat every 200 ms, register comm ids, and hand
//! each prompt's KV from prefill to decode over pdx-transfer, which the decode verifies).
//!
//! * a decode node killed (SIGKILL) under streaming load: the streams it was serving end at once with an
//!   error event, not a hang; new requests go to the other pairs (a refused connection is retried on another
//!   pair at once, and once its heartbeat times out the node leaves the ready pairs);
//! * the same for a prefill node: streams whose KV it already handed over finish;
//! * the router killed and started again on its SQLite file: the nodes' next requests and heartbeats are
//!   served at once, without a registration.
//!
//! Every child process is killed when its guard drops. `cargo test --test chaos ksana:: -- --nocapture` prints
//! what each test measured.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

/// Heartbeat timeout of the router under test, seconds.
const TIMEOUT_SECS: f64 = 1.0;

/// A `pdx mock` KsanaLLM node.
struct Node {
    proc: Proc,
    port: u16,
    role: &'static str,
}

fn db(name: &str) -> String {
    let d = std::env::temp_dir().join(format!("pdx-chaos-ksana-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d.join("router.db").to_string_lossy().into_owned()
}

fn ksana_router(port: u16, db: &str) -> Proc {
    let timeout = TIMEOUT_SECS.to_string();
    let mut r = router(
        port,
        &[
            "--orchestration",
            "ksana",
            "--ksana-db",
            db,
            "--ksana-heartbeat-timeout-secs",
            &timeout,
        ],
    );
    wait_healthy(&mut r, port);
    r
}

/// Starts a node of `role` (streams of about 25 ms per token: `--speed 0.1`) that registers with the router on
/// `rp`.
fn node(rp: u16, role: &'static str) -> Node {
    let port = free_port();
    let router = url(rp);
    let mut proc = spawn_mock(
        port,
        &[
            "--role",
            role,
            "--kv-listen",
            "127.0.0.1:0",
            "--kv-scale-down",
            "1024",
            "--speed",
            "0.1",
            "--ksana-router",
            &router,
            "--ksana-heartbeat-ms",
            "200",
            "--ksana-kv-wait-secs",
            "5",
        ],
    );
    wait_healthy(&mut proc, port);
    Node { proc, port, role }
}

/// A completion of 2 tokens through the router on `rp` answers 200.
fn serves(rp: u16) -> bool {
    http(
        rp,
        "POST",
        "/v1/completions",
        &[],
        r#"{"model":"mock","prompt":"x","max_tokens":2}"#,
        Duration::from_secs(10),
    )
    .is_ok_and(|r| r.status == 200)
}

/// One streamed request's outcome.
#[derive(Debug, Clone)]
struct Outcome {
    start: Instant,
    end: Instant,
    status: u16,
    /// The decode node that answered (`x-pdx-worker`).
    decode: String,
    /// The stream ended with `[DONE]`.
    done: bool,
    /// The stream ended with an error event.
    error: bool,
    /// The last 200 bytes of the body.
    tail: String,
}

/// `clients` threads sending streamed completions of 64 tokens to the router on `rp` until `stop`.
fn load(
    rp: u16,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> (Vec<std::thread::JoinHandle<()>>, Arc<Mutex<Vec<Outcome>>>) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let threads = (0..clients)
        .map(|i| {
            let (out, stop) = (out.clone(), stop.clone());
            std::thread::spawn(move || {
                let body =
                    serde_json::json!({"model": "mock", "prompt": format!("client {i} says hello"),
                    "max_tokens": 64, "ignore_eos": true, "stream": true})
                    .to_string();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    // 15 s: a guard against hangs far above any answer here.
                    let r = http(
                        rp,
                        "POST",
                        "/v1/completions",
                        &[],
                        &body,
                        Duration::from_secs(15),
                    );
                    let end = Instant::now();
                    let o = match r {
                        Ok(r) => Outcome {
                            start,
                            end,
                            status: r.status,
                            decode: r.header("x-pdx-worker").unwrap_or("").to_string(),
                            done: r.body.contains("data: [DONE]"),
                            error: r.body.contains("\"error\""),
                            tail: r.body[r.body.len().saturating_sub(200)..].to_string(),
                        },
                        Err(e) => panic!("a request got no answer within 15 s: {e}"),
                    };
                    out.lock().unwrap().push(o);
                }
            })
        })
        .collect();
    (threads, out)
}

/// Kills the node of `role` number `victim` (of two of each) under load, and checks what the clients saw.
fn kill_under_load(victim_role: &'static str) {
    let rp = free_port();
    let db = db(victim_role);
    let _router = ksana_router(rp, &db);
    let mut nodes = [
        node(rp, "prefill"),
        node(rp, "prefill"),
        node(rp, "decode"),
        node(rp, "decode"),
    ];
    // The pairs ready: requests succeed.
    assert!(
        wait_until(GUARD, || serves(rp)),
        "the pairs never became ready"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (clients, outcomes) = load(rp, 4, stop.clone());
    std::thread::sleep(Duration::from_millis(1500));
    let i = nodes.iter().position(|n| n.role == victim_role).unwrap();
    let victim_url = url(nodes[i].port);
    // Taken before the kill: the streams it breaks end within the kill call.
    let killed = Instant::now();
    nodes[i].proc.kill();
    std::thread::sleep(Duration::from_millis(3000));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client");
    }
    let all = outcomes.lock().unwrap().clone();
    let before: Vec<&Outcome> = all.iter().filter(|o| o.end < killed).collect();
    let in_flight: Vec<&Outcome> = all
        .iter()
        .filter(|o| o.start < killed && o.end >= killed)
        .collect();
    let settle = killed + Duration::from_secs_f64(TIMEOUT_SECS + 0.5);
    let after: Vec<&Outcome> = all.iter().filter(|o| o.start >= settle).collect();
    let failed_in_flight = in_flight.iter().filter(|o| !o.done).count();
    let slowest_failure = in_flight
        .iter()
        .filter(|o| !o.done)
        .map(|o| o.end - killed)
        .max()
        .unwrap_or_default();
    let between_failed = all
        .iter()
        .filter(|o| o.start >= killed && o.start < settle && !(o.status == 200 && o.done))
        .count();
    println!(
        "killed {victim_role}: {} requests before, {} in flight ({failed_in_flight} ended with an error, the last \
         {slowest_failure:?} after the kill), {between_failed} failed of those sent before its heartbeat timed out, \
         {} after",
        before.len(),
        in_flight.len(),
        after.len()
    );
    assert!(
        before.iter().all(|o| o.status == 200 && o.done),
        "before the kill: {before:?}"
    );
    // In flight: finished, or ended at once with an error event (never a silent cut or a hang).
    for o in &in_flight {
        assert!(
            o.done || (o.error && o.end - killed < Duration::from_secs(2)),
            "{:?} after the kill, ending {:?}",
            o.end.saturating_duration_since(killed),
            o.tail
        );
    }
    if victim_role == "decode" {
        // The streams the killed decode was serving are the ones that failed.
        let on_victim = in_flight.iter().filter(|o| o.decode == victim_url).count();
        assert!(
            on_victim >= 1,
            "no stream on the killed decode node: {in_flight:?}"
        );
        assert!(in_flight
            .iter()
            .filter(|o| o.decode == victim_url)
            .all(|o| o.error && !o.done));
    }
    // After its heartbeat timed out: every request succeeds, none on the killed node.
    assert!(
        after.len() >= 4,
        "too few requests after the timeout: {}",
        after.len()
    );
    for o in &after {
        assert!(o.status == 200 && o.done && o.decode != victim_url, "{o:?}");
    }
    let _ = std::fs::remove_dir_all(std::path::Path::new(&db).parent().unwrap());
}

#[test]
fn a_decode_node_killed_under_load() {
    kill_under_load("decode");
}

#[test]
fn a_prefill_node_killed_under_load() {
    kill_under_load("prefill");
}

#[test]
fn a_router_killed_and_started_on_its_sqlite_file_serves_the_nodes_at_once() {
    let rp = free_port();
    let db = db("restart");
    let mut r = ksana_router(rp, &db);
    let nodes = [node(rp, "prefill"), node(rp, "decode")];
    assert!(
        wait_until(GUARD, || serves(rp)),
        "the pair never became ready"
    );
    let read = |n: &Node| metric(n.port, "pdx:kv_blocks_received_total").unwrap_or(0.0);
    let before = read(&nodes[1]);
    assert!(before > 0.0, "the decode read the prompt's KV");
    let registrations = |n: &Node| metric(n.port, "pdx:ksana_registrations_total").unwrap_or(0.0);
    let registered_before: Vec<f64> = nodes.iter().map(registrations).collect();
    assert!(
        registered_before.iter().all(|r| *r >= 1.0),
        "every node counted its registration: {registered_before:?}"
    );
    r.kill();
    let t = Instant::now();
    let _r = ksana_router(rp, &db);
    // No registration in between: the first request is served, its KV read through the stored comm id.
    assert!(serves(rp), "the restarted router did not serve at once");
    println!(
        "restarted router served its first request {:?} after the restart",
        t.elapsed()
    );
    assert!(read(&nodes[1]) > before);
    // The nodes' heartbeats go on under the ids they had: after several heartbeat periods (200 ms) on the restarted
    // router, no node had to register again (a router that forgot them refuses their heartbeats, and they do).
    std::thread::sleep(Duration::from_millis(1000));
    for (n, before) in nodes.iter().zip(&registered_before) {
        assert_eq!(
            metric(n.port, "pdx:ksana_registered"),
            Some(1.0),
            "{} node",
            n.role
        );
        assert_eq!(
            registrations(n),
            *before,
            "{} node registered again after the restart",
            n.role
        );
    }
    let _ = std::fs::remove_dir_all(std::path::Path::new(&db).parent().unwrap());
}
