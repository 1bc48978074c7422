//! KsanaLLM orchestration faults (issue 15), through the real `pdx` binary: `pdx serve --orchestration ksana`
//! in front of `pdx mock` engines that this test registers and heartbeats as KsanaLLM nodes (each node's
//! heartbeats stop when its process is killed, as a real node's would).
//!
//! * a decode node killed (SIGKILL) under streaming load: the streams it was serving end at once with an
//!   error event, not a hang; new requests go to the other pairs (a refused connection is retried on another
//!   pair at once, and once its heartbeat times out the node leaves the ready pairs);
//! * the same for a prefill node;
//! * the router killed and started again on its SQLite file: it serves the nodes at once, without a
//!   registration.
//!
//! Every child process is killed when its guard drops. `cargo test --test chaos ksana -- --nocapture` prints
//! what each test measured.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

/// Heartbeat timeout of the router under test, seconds.
const TIMEOUT_SECS: f64 = 1.0;

/// A `pdx mock` engine registered as a KsanaLLM node.
struct Node {
    proc: Proc,
    port: u16,
    role: &'static str,
    id: String,
    /// Its heartbeats run while this is set.
    alive: Arc<AtomicBool>,
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

/// Starts an engine (streams of about 25 ms per token: `--speed 0.1`) and registers it at the router on
/// `rp` as a rank-0 node of `role` with one device.
fn node(rp: u16, role: &'static str, coord: u16) -> Node {
    let port = free_port();
    let mut proc = spawn_mock(port, &["--speed", "0.1"]);
    wait_healthy(&mut proc, port);
    let (s, v) = post_json(
        rp,
        "/RegisterNode",
        &serde_json::json!({"inference_addr": format!("127.0.0.1:{port}"),
            "coordinator_addr": format!("127.0.0.1:{coord}"), "group_role": role, "node_rank": 0,
            "world_size": 1, "devices": [{"device_id": 0, "device_ip": "127.0.0.1"}]}),
    );
    assert_eq!(s, 201, "{v}");
    Node {
        proc,
        port,
        role,
        id: v["node_id"].as_str().expect("node_id").to_string(),
        alive: Arc::new(AtomicBool::new(true)),
    }
}

/// Heartbeats every node whose `alive` is set every 200 ms; a rank-0 prefill registers a comm id for each of
/// its comm groups that has none (as a KsanaLLM prefill does once its decode partner is ready). Stops when
/// `stop` is set.
fn heartbeats(
    rp: u16,
    nodes: Vec<(String, &'static str, Arc<AtomicBool>)>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            for (id, role, alive) in &nodes {
                if !alive.load(Ordering::Relaxed) {
                    continue;
                }
                let Ok(r) = http(
                    rp,
                    "POST",
                    "/Heartbeat",
                    &[],
                    &serde_json::json!({ "node_id": id }).to_string(),
                    Duration::from_secs(2),
                ) else {
                    continue;
                };
                if *role != "prefill" || r.status != 200 {
                    continue;
                }
                let v = r.json();
                let Some(ids) = v["comm_group_to_id"].as_object() else {
                    continue;
                };
                for (key, comm) in ids {
                    if comm == "" {
                        let _ = http(
                            rp,
                            "POST",
                            "/RegisterCommId",
                            &[],
                            &serde_json::json!({"node_id": id, "comm_key": key, "comm_id": format!("c-{key}")})
                                .to_string(),
                            Duration::from_secs(2),
                        );
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
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
        node(rp, "prefill", 19601),
        node(rp, "prefill", 19602),
        node(rp, "decode", 19603),
        node(rp, "decode", 19604),
    ];
    let stop_beats = Arc::new(AtomicBool::new(false));
    let beats = heartbeats(
        rp,
        nodes
            .iter()
            .map(|n| (n.id.clone(), n.role, n.alive.clone()))
            .collect(),
        stop_beats.clone(),
    );
    // Four pairs ready: requests succeed.
    assert!(
        wait_until(GUARD, || http(
            rp,
            "POST",
            "/v1/completions",
            &[],
            r#"{"model":"mock","prompt":"x","max_tokens":1}"#,
            Duration::from_secs(5)
        )
        .is_ok_and(|r| r.status == 200)),
        "the pairs never became ready"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (clients, outcomes) = load(rp, 4, stop.clone());
    std::thread::sleep(Duration::from_millis(1500));
    let i = nodes.iter().position(|n| n.role == victim_role).unwrap();
    let victim_url = url(nodes[i].port);
    nodes[i].alive.store(false, Ordering::Relaxed);
    // Taken before the kill: the streams it breaks end within the kill call.
    let killed = Instant::now();
    nodes[i].proc.kill();
    std::thread::sleep(Duration::from_millis(3000));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client");
    }
    stop_beats.store(true, Ordering::Relaxed);
    let _ = beats.join();
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
    let nodes = [node(rp, "prefill", 19701), node(rp, "decode", 19702)];
    let stop = Arc::new(AtomicBool::new(false));
    let beats = heartbeats(
        rp,
        nodes
            .iter()
            .map(|n| (n.id.clone(), n.role, n.alive.clone()))
            .collect(),
        stop.clone(),
    );
    let body = r#"{"model":"mock","prompt":"x","max_tokens":2}"#;
    assert!(wait_until(GUARD, || http(
        rp,
        "POST",
        "/v1/completions",
        &[],
        body,
        Duration::from_secs(5)
    )
    .is_ok_and(|r| r.status == 200)));
    stop.store(true, Ordering::Relaxed);
    let _ = beats.join();
    r.kill();
    let t = Instant::now();
    let _r = ksana_router(rp, &db);
    let resp = http(
        rp,
        "POST",
        "/v1/completions",
        &[],
        body,
        Duration::from_secs(5),
    )
    .expect("answer");
    assert_eq!(resp.status, 200, "{resp:?}");
    println!(
        "restarted router served its first request {:?} after the restart",
        t.elapsed()
    );
    // The nodes' ids are known to it: their next heartbeat is a 200 with the pair's comm id.
    let mut seen = HashMap::new();
    for n in &nodes {
        let (s, v) = post_json(rp, "/Heartbeat", &serde_json::json!({ "node_id": n.id }));
        assert_eq!(s, 200, "{v}");
        seen.insert(n.role, v);
    }
    let key = format!("127.0.0.1:{}__127.0.0.1:{}", nodes[0].port, nodes[1].port);
    assert_eq!(seen["decode"]["comm_group_to_id"][&key], format!("c-{key}"));
    let _ = std::fs::remove_dir_all(std::path::Path::new(&db).parent().unwrap());
}
