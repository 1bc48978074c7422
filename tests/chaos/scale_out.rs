//! Scale-out (issue 16): two `pdx serve` processes sharing their workers through a real etcd on loopback
//! (`--discovery etcd://…`), driven through the real binary. Skipped, saying so, without an `etcd` binary
//! (`.ci/run` installs Debian's `etcd-server`).
//!
//! * a worker registered through one router is routed to by both;
//! * killing workers (one registered through a router, one registered in etcd itself) removes them from both
//!   routers within their lease TTL;
//! * a restarted router gets its workers back from etcd;
//! * etcd down for 30 s: both routers keep serving their last known workers, and catch up when it returns
//!   (the one long test, about 40 s);
//! * workers that publish vLLM KV events: each router subscribes itself, so both hold the same exact index
//!   and route a shared prefix to the same worker, whichever router saw the first request;
//! * `--discovery k8s` through the binary, against a small API-server double (kubeconfig, list, a held
//!   watch): a ready pod is routed to, a pod that goes not ready leaves at once. (The watch protocol itself,
//!   bookmarks, 410 Gone and reconnects, is tested in `crates/pdx-discovery/tests/k8s.rs`.)
//!
//! Every child process (etcd included) is killed when its guard drops. Each test prints what it measured
//! (`cargo test --test chaos scale_out -- --nocapture`).

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// Heartbeat TTL of the routers, seconds: the lease of a registration written through to etcd.
const TTL: u64 = 3;

/// An etcd server of its own (one member, loopback ports, a temporary data folder), killed on drop.
struct Etcd {
    child: Option<Child>,
    port: u16,
    peer: u16,
    dir: TempDir,
}

impl Etcd {
    /// Starts one, or `None` (printing "skipped: etcd not installed") without an `etcd` binary.
    fn start(name: &str) -> Option<Etcd> {
        let installed = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            println!("skipped: etcd not installed");
            return None;
        }
        let mut e = Etcd {
            child: None,
            port: free_port(),
            peer: free_port(),
            dir: TempDir::new(&format!("etcd-{name}")),
        };
        e.spawn();
        Some(e)
    }

    /// Starts the process (again: same ports, same data) and waits until it answers.
    fn spawn(&mut self) {
        let (c, p) = (url(self.port), url(self.peer));
        self.child = Some(
            Command::new("etcd")
                .args(["--name", "t", "--data-dir"])
                .arg(self.dir.0.join("data"))
                .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
                .args([
                    "--listen-peer-urls",
                    &p,
                    "--initial-advertise-peer-urls",
                    &p,
                ])
                .args(["--initial-cluster", &format!("t={p}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("etcd starts"),
        );
        let port = self.port;
        let up = wait_until(GUARD, || {
            http(port, "GET", "/health", &[], "", Duration::from_secs(1))
                .is_ok_and(|r| r.body.contains("\"health\":\"true\""))
        });
        assert!(up, "etcd did not become healthy");
    }

    /// Kills it (SIGKILL: a crash); the data stays.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `--discovery` / `--register-etcd` value.
    fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.port)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A router on `port` discovering workers through `etcd`, with short heartbeat TTL and health checks.
fn etcd_router(port: u16, etcd: &Etcd) -> Proc {
    etcd_router_with(port, etcd, &[])
}

/// [`etcd_router`] with `extra` flags.
fn etcd_router_with(port: u16, etcd: &Etcd, extra: &[&str]) -> Proc {
    let ttl = TTL.to_string();
    let url = etcd.url();
    let base = [
        "--discovery",
        &url,
        "--heartbeat-ttl-secs",
        &ttl,
        "--health-check-interval-secs",
        "1",
    ];
    let mut r = router(port, &[&base[..], extra].concat());
    wait_healthy(&mut r, port);
    r
}

/// The URLs of the workers the router on `port` lists that are not draining.
fn listed(port: u16) -> BTreeSet<String> {
    let Ok(r) = http(port, "GET", "/v1/workers", &[], "", Duration::from_secs(2)) else {
        return BTreeSet::new();
    };
    if r.status != 200 {
        return BTreeSet::new();
    }
    r.json()["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["state"] != "draining")
        .filter_map(|w| w["url"].as_str().map(str::to_string))
        .collect()
}

/// The set of `urls`.
fn set(urls: &[&str]) -> BTreeSet<String> {
    urls.iter().map(|u| u.to_string()).collect()
}

/// One completion through the router on `port`: the worker that answered (`x-pdx-worker`), or `None`
/// unless it answered 200.
fn served_by(port: u16) -> Option<String> {
    let body = r#"{"model":"m","prompt":"hello there","max_tokens":2}"#;
    let r = http(
        port,
        "POST",
        "/v1/completions",
        &[],
        body,
        Duration::from_secs(5),
    )
    .ok()?;
    (r.status == 200).then(|| r.header("x-pdx-worker").unwrap_or("").to_string())
}

/// The registration body of an aggregated worker of model `m` at `port`.
fn registration(port: u16) -> serde_json::Value {
    serde_json::json!({"role": "aggregated", "pool": "aggregated", "url": url(port), "model": "m"})
}

/// `pdx mock --instant` of model `m` on `port` with `extra` flags, healthy.
fn worker(port: u16, extra: &[&str]) -> Proc {
    mock(port, &[&["--model", "m"], extra].concat())
}

#[test]
fn a_worker_registered_at_one_router_is_routed_to_by_both() {
    let Some(etcd) = Etcd::start("both") else {
        return;
    };
    let (a, b, w) = (free_port(), free_port(), free_port());
    let _ra = etcd_router(a, &etcd);
    let _rb = etcd_router(b, &etcd);
    let _w = worker(w, &[]);
    assert_eq!(served_by(b), None, "no worker yet");
    let (status, _) = post_json(a, "/v1/workers", &registration(w));
    assert_eq!(status, 200);
    let t0 = Instant::now();
    let mut at_a = None;
    let mut at_b = None;
    assert!(wait_until(GUARD, || {
        if at_a.is_none() && served_by(a).as_deref() == Some(url(w).as_str()) {
            at_a = Some(t0.elapsed());
        }
        if at_b.is_none() && served_by(b).as_deref() == Some(url(w).as_str()) {
            at_b = Some(t0.elapsed());
        }
        at_a.is_some() && at_b.is_some()
    }));
    println!(
        "registered at router A: first request served through it by A after {:?}, by B after {:?}",
        at_a.unwrap(),
        at_b.unwrap()
    );
    assert_eq!(listed(b), set(&[&url(w)]));
}

#[test]
fn killed_workers_leave_both_routers_within_their_lease_ttl() {
    let Some(etcd) = Etcd::start("kill") else {
        return;
    };
    let (a, b) = (free_port(), free_port());
    let _ra = etcd_router(a, &etcd);
    let _rb = etcd_router(b, &etcd);
    // One worker heartbeats router A (written through with a lease of the heartbeat TTL), one registers in
    // etcd itself with a lease of the same TTL.
    let (w1, w2) = (free_port(), free_port());
    let mut k1 = worker(w1, &["--register", &url(a), "--heartbeat-secs", "1"]);
    let ttl = TTL.to_string();
    let mut k2 = worker(
        w2,
        &["--register-etcd", &etcd.url(), "--etcd-ttl-secs", &ttl],
    );
    let both = set(&[&url(w1), &url(w2)]);
    assert!(wait_until(GUARD, || listed(a) == both && listed(b) == both));
    k1.kill();
    k2.kill();
    let t0 = Instant::now();
    let mut gone = [None, None];
    assert!(wait_until(GUARD, || {
        for (i, p) in [a, b].into_iter().enumerate() {
            if gone[i].is_none() && listed(p).is_empty() {
                gone[i] = Some(t0.elapsed());
            }
        }
        gone.iter().all(Option::is_some)
    }));
    println!(
        "lease TTL {TTL} s: both killed workers gone from router A after {:?}, from B after {:?}",
        gone[0].unwrap(),
        gone[1].unwrap()
    );
    // Lease expiry, not something slower (health checks only mark a worker down; they never remove it).
    let limit = Duration::from_secs(TTL + 3);
    assert!(
        gone.iter().all(|g| g.unwrap() < limit),
        "{gone:?} (lease TTL {TTL} s)"
    );
}

#[test]
fn a_restarted_router_gets_its_workers_back_from_etcd() {
    let Some(etcd) = Etcd::start("restart") else {
        return;
    };
    let (a, b) = (free_port(), free_port());
    let _ra = etcd_router(a, &etcd);
    let mut rb = etcd_router(b, &etcd);
    let (w1, w2) = (free_port(), free_port());
    let _k1 = worker(w1, &["--register", &url(a), "--heartbeat-secs", "1"]);
    let _k2 = worker(w2, &["--register-etcd", &etcd.url()]);
    let both = set(&[&url(w1), &url(w2)]);
    assert!(wait_until(GUARD, || listed(b) == both));
    rb.kill();
    let _rb = etcd_router(b, &etcd);
    let t0 = Instant::now();
    assert!(wait_until(GUARD, || listed(b) == both), "{:?}", listed(b));
    println!(
        "router B restarted: both workers back {:?} after it answered",
        t0.elapsed()
    );
    let mut seen = BTreeSet::new();
    assert!(wait_until(GUARD, || {
        seen.extend(served_by(b));
        seen == both
    }));
}

#[test]
fn etcd_down_30s_leaves_both_routers_serving_and_they_catch_up() {
    let Some(mut etcd) = Etcd::start("outage") else {
        return;
    };
    let (a, b) = (free_port(), free_port());
    let _ra = etcd_router(a, &etcd);
    let _rb = etcd_router(b, &etcd);
    let ttl = TTL.to_string();
    let (w1, w2, w3) = (free_port(), free_port(), free_port());
    let _k1 = worker(
        w1,
        &["--register-etcd", &etcd.url(), "--etcd-ttl-secs", &ttl],
    );
    let mut k2 = worker(w2, &["--register", &url(a), "--heartbeat-secs", "1"]);
    let both = set(&[&url(w1), &url(w2)]);
    assert!(wait_until(GUARD, || listed(a) == both && listed(b) == both));

    etcd.kill();
    let down = Instant::now();
    // While etcd is away: a worker registers at B only, and W2 dies.
    let _k3 = worker(w3, &["--register", &url(b), "--heartbeat-secs", "1"]);
    std::thread::sleep(Duration::from_secs(2));
    k2.kill();
    let mut failed = 0;
    let mut served = 0;
    while down.elapsed() < Duration::from_secs(30) {
        for p in [a, b] {
            // No mass removal: every worker known before the outage is still listed.
            let l = listed(p);
            assert!(
                l.is_superset(&set(&[&url(w1), &url(w2)])),
                "router {p} lost workers while etcd was down: {l:?}"
            );
            match served_by(p) {
                Some(_) => served += 1,
                None => failed += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(listed(a), both, "A has not heard of W3");
    assert!(
        listed(b).contains(&url(w3)),
        "B serves W3 from its own registration"
    );
    println!("etcd down 30 s: {served} requests served, {failed} failed (through both routers)");
    assert_eq!(failed, 0, "routers kept serving their last known workers");

    etcd.spawn();
    let back = Instant::now();
    // W3 reaches A (B's write-through is retried), W2's lease runs out (no router renews it any more).
    let after = set(&[&url(w1), &url(w3)]);
    let mut caught = [None, None];
    assert!(
        wait_until(GUARD, || {
            for (i, p) in [a, b].into_iter().enumerate() {
                if caught[i].is_none() && listed(p) == after {
                    caught[i] = Some(back.elapsed());
                }
            }
            caught.iter().all(Option::is_some)
        }),
        "A {:?}, B {:?}",
        listed(a),
        listed(b)
    );
    println!(
        "etcd back: router A caught up after {:?}, B after {:?} (lease TTL {TTL} s)",
        caught[0].unwrap(),
        caught[1].unwrap()
    );
    let mut seen = BTreeSet::new();
    assert!(wait_until(GUARD, || {
        seen.extend(served_by(a));
        seen == after
    }));
}

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

/// A completion of `prompt` (model `m`, 2 tokens) through the router on `port`: the worker that served it.
fn served_prompt(port: u16, prompt: &str) -> String {
    let body = serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 2});
    let r = http(
        port,
        "POST",
        "/v1/completions",
        &[],
        &body.to_string(),
        GUARD,
    )
    .expect("an answer");
    assert_eq!(r.status, 200, "{}", r.body);
    r.header("x-pdx-worker").expect("x-pdx-worker").to_string()
}

#[test]
fn both_routers_hold_the_same_exact_index_from_the_workers_kv_events() {
    let Some(etcd) = Etcd::start("events") else {
        return;
    };
    let (a, b) = (free_port(), free_port());
    let extra = ["--policy", "kv_aware", "--orchestration", "aggregated"];
    let _ra = etcd_router_with(a, &etcd, &extra);
    let _rb = etcd_router_with(b, &etcd, &extra);
    let mut workers = Vec::new();
    let mut urls = Vec::new();
    for _ in 0..2 {
        let (w, e, r) = (free_port(), free_port(), free_port());
        let cfg = format!(
            r#"{{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://127.0.0.1:{e}","replay_endpoint":"tcp://127.0.0.1:{r}","topic":"kv-events","buffer_steps":10000}}"#
        );
        workers.push(worker(
            w,
            &["--kv-events-config", &cfg, "--register-etcd", &etcd.url()],
        ));
        urls.push(url(w));
    }
    // Each router found both workers in etcd, with their publishers, and subscribed itself.
    let exact = |p: u16, w: &str| worker_metric(p, "pdx_kv_index_exact", w) == Some(1.0);
    assert!(
        wait_until(GUARD, || [a, b]
            .iter()
            .all(|p| urls.iter().all(|w| exact(*p, w)))),
        "the routers' indexes never became exact for both workers"
    );
    let blocks = |p: u16, w: &str| worker_metric(p, "pdx_kv_index_blocks", w).unwrap_or(-1.0);
    // A long prompt through router A only: router B indexes it too (43 full blocks of 16 tokens), from the
    // serving worker's events.
    let served = served_prompt(a, &pdx_mock::synthetic_prompt(700, 1));
    assert!(
        wait_until(GUARD, || blocks(a, &served) >= 43.0
            && blocks(b, &served) == blocks(a, &served)),
        "A {} blocks, B {} blocks",
        blocks(a, &served),
        blocks(b, &served)
    );
    // Requests sharing that prefix go to that worker through either router, every time.
    for k in 0..3 {
        let p = format!(
            "{} {}",
            pdx_mock::synthetic_prompt(700, 1),
            pdx_mock::synthetic_prompt(20 + k, 900 + k as u64)
        );
        for r in [b, a] {
            assert_eq!(served_prompt(r, &p), served, "request {k} through {r}");
        }
    }
    for w in &urls {
        assert!(
            wait_until(GUARD, || blocks(a, w) == blocks(b, w)),
            "the two indexes of {w} differ: {} and {}",
            blocks(a, w),
            blocks(b, w)
        );
    }
}

/// A pod of the API-server double: `name` at 127.0.0.1, port `port` by annotation, ready or not.
fn pod(name: &str, port: u16, ready: bool, rv: u64) -> serde_json::Value {
    serde_json::json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv.to_string(),
                     "labels": {"app": "pdx"}, "annotations": {"pdx.io/port": port.to_string(), "pdx.io/model": "m"}},
        "spec": {"containers": [{"name": "engine"}]},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
    })
}

/// A minimal Kubernetes API server on loopback: `GET …/pods` answers `list` (one `PodList`), a watch gets a
/// chunked 200 that stays open; [`send`] writes an event line to every open watch.
struct KubeDouble {
    port: u16,
    watches: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl KubeDouble {
    fn start(list: serde_json::Value) -> KubeDouble {
        use std::io::{BufRead, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let watches: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> =
            Default::default();
        let w2 = watches.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut r = std::io::BufReader::new(s.try_clone().unwrap());
                let mut head = String::new();
                if r.read_line(&mut head).is_err() {
                    continue;
                }
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                        break;
                    }
                }
                if head.contains("watch=true") {
                    let _ = s.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                    );
                    w2.lock().unwrap().push(s);
                } else {
                    let body = list.to_string();
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
            }
        });
        KubeDouble { port, watches }
    }

    /// Writes one watch event to every open watch.
    fn send(&self, ty: &str, object: &serde_json::Value) {
        use std::io::Write;
        let line = format!("{}\n", serde_json::json!({"type": ty, "object": object}));
        for s in self.watches.lock().unwrap().iter_mut() {
            let _ = write!(s, "{:x}\r\n{line}\r\n", line.len());
        }
    }

    /// A kubeconfig naming it, in `dir`.
    fn kubeconfig(&self, dir: &TempDir) -> String {
        let p = dir.0.join("kubeconfig");
        std::fs::write(
            &p,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: http://127.0.0.1:{}\n\
                 contexts:\n- name: double\n  context:\n    cluster: double\n    user: nobody\n    namespace: ns\n\
                 current-context: double\nusers:\n- name: nobody\n  user: {{}}\n",
                self.port
            ),
        )
        .unwrap();
        p.to_string_lossy().into_owned()
    }
}

#[test]
fn kubernetes_discovery_routes_to_ready_pods_and_drops_unready_ones_at_once() {
    let w = free_port();
    let _w = worker(w, &[]);
    let api = KubeDouble::start(serde_json::json!({
        "kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "10"},
        "items": [pod("w0", w, true, 9)]
    }));
    let dir = TempDir::new("kube");
    let kubeconfig = api.kubeconfig(&dir);
    let r = free_port();
    let args = server_args(
        "serve",
        r,
        &[
            "--threads",
            "2",
            "--discovery",
            "k8s",
            "--aggregated-selector",
            "app=pdx",
        ],
    );
    let mut rt = Proc::spawn_env(&args, &[("KUBECONFIG", kubeconfig.as_str())]);
    wait_healthy(&mut rt, r);
    assert!(wait_until(GUARD, || served_by(r).as_deref() == Some(url(w).as_str())));
    assert!(wait_until(GUARD, || !api
        .watches
        .lock()
        .unwrap()
        .is_empty()));
    api.send("MODIFIED", &pod("w0", w, false, 11));
    let t0 = Instant::now();
    assert!(
        wait_until(GUARD, || listed(r).is_empty()),
        "{:?}",
        listed(r)
    );
    println!(
        "pod not ready: gone from the router {:?} after the event",
        t0.elapsed()
    );
    assert_eq!(served_by(r), None, "no worker left");
    api.send("MODIFIED", &pod("w0", w, true, 12));
    assert!(wait_until(GUARD, || served_by(r).as_deref() == Some(url(w).as_str())));
}
