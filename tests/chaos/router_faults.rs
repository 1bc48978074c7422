//! Router faults (issue 13, router side), driven through the real `pdx` binary: `pdx serve` in front of
//! `pdx mock` child processes on loopback.
//!
//! * a worker (prefill or decode) killed and restarted on the same port under load, 1P1D and 2P2D: the
//!   router serves through it again, and no request sent after it does fails;
//! * a worker stopped (SIGSTOP, a partition longer than every timeout) and continued;
//! * a router started before its workers routes to them as soon as they are up;
//! * a router restarted on the same port: self-registering workers come back to it;
//! * an early-disconnect storm (150 clients dropping 0-60 ms after sending a long prompt): the prefill
//!   workers' held KV (`pdx:kv_blocks_held`) returns to 0, and clients that stay get their answers;
//! * a rogue registration chain against a router with an admin token.
//!
//! Every child process is killed when its guard drops (also on a failed assertion). Each test prints
//! what it measured (`cargo test --test chaos router_faults -- --nocapture`).

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

/// A `pdx serve` config file with `text` (settings every build reads from the file).
fn config(name: &str, text: &str) -> String {
    let p = std::env::temp_dir().join(format!("pdx-chaos-{}-{name}.toml", std::process::id()));
    std::fs::write(&p, text).expect("write config");
    p.to_string_lossy().into_owned()
}

/// The arguments of a `pdx mock` of `role` (not `--instant`), KV moved by pdx's transfer engine on loopback.
fn worker_args<'a>(role: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let kv = [
        "--role",
        role,
        "--kv-listen",
        "127.0.0.1:0",
        "--kv-scale-down",
        "1024",
    ];
    [&kv[..], extra].concat()
}

/// A `pdx mock` of `role` on `port` ([`worker_args`]).
fn worker(role: &str, port: u16, extra: &[&str]) -> Proc {
    spawn_mock(port, &worker_args(role, extra))
}

/// `POST /v1/completions` of `body` to the router on `port`, answered within `secs` seconds.
fn complete(port: u16, body: &str, secs: u64) -> std::io::Result<Resp> {
    let timeout = Duration::from_secs(secs);
    http(port, "POST", "/v1/completions", &[], body, timeout)
}

/// The router on `port` answers `/health` (with any status).
fn answers(port: u16) -> bool {
    http(port, "GET", "/health", &[], "", Duration::from_secs(1)).is_ok()
}

/// One prefill and one decode worker with a router in front of them, all up.
struct OnePOneD {
    /// Kept to be killed when the cluster drops.
    _prefill: Proc,
    decode: Proc,
    /// Kept to be killed when the cluster drops.
    _router: Proc,
    /// The router's port.
    rp: u16,
    /// The decode worker's port.
    dp: u16,
}

impl OnePOneD {
    /// Starts the workers, then the router with `--prefill`, `--decode` and `router_args`.
    fn start(router_args: &[&str]) -> OnePOneD {
        let (pp, dp, rp) = (free_port(), free_port(), free_port());
        let prefill = worker("prefill", pp, &[]);
        let decode = worker("decode", dp, &[]);
        assert!(wait_until(GUARD, || health_ok(pp) && health_ok(dp)));
        let (pu, du) = (url(pp), url(dp));
        let workers = ["--prefill", &pu, "--decode", &du];
        let router = router(rp, &[&workers[..], router_args].concat());
        assert!(wait_until(GUARD, || ready(rp)), "the router is ready");
        OnePOneD {
            _prefill: prefill,
            decode,
            _router: router,
            rp,
            dp,
        }
    }
}

const SHORT: &str =
    r#"{"model":"mock","prompt":"the quick brown fox jumps over the lazy dog","max_tokens":4}"#;

/// One finished client request: when it was sent and its status (0: no HTTP answer).
#[derive(Debug, Clone, Copy)]
struct Sample {
    start: Instant,
    status: u16,
}

/// Closed-loop load: `clients` threads sending `body` to the router until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, clients: usize, body: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, log) = (stop.clone(), log.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let start = Instant::now();
                        let status = complete(port, body, 15).map_or(0, |r| r.status);
                        log.lock().unwrap().push(Sample { start, status });
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        Load { stop, log, threads }
    }
    fn samples(&self) -> Vec<Sample> {
        self.log.lock().unwrap().clone()
    }
    fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.samples()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The first request sent after `t` that succeeded.
fn first_success_after(samples: &[Sample], t: Instant) -> Option<Instant> {
    samples
        .iter()
        .filter(|s| s.start >= t && s.status == 200)
        .map(|s| s.start)
        .min()
}

fn failures_sent_after(samples: &[Sample], t: Instant) -> Vec<u16> {
    samples
        .iter()
        .filter(|s| s.start > t && s.status != 200)
        .map(|s| s.status)
        .collect()
}

/// Health-check interval of the restart tests, seconds.
const INTERVAL: f64 = 2.0;

/// What a restart under load measured.
struct Restart {
    /// From the restart to the first request the router served through the restarted worker.
    back_after: Duration,
    /// Requests sent after that which failed (their statuses).
    failed_after: Vec<u16>,
    /// Requests sent between the kill and that point which failed.
    failed_during: usize,
    /// Requests in all.
    total: usize,
}

/// Kills the `victim` worker (index into `roles`) under load, restarts it on its port after 1 s, and
/// measures when the router serves through it again and what failed. The router must serve through it
/// within a generous bound of three health intervals (it rechecks a down worker every 0.5 s).
fn restart_under_load(roles: &[&str], victim: usize, extra_router: &[&str]) -> Restart {
    let ports: Vec<u16> = roles.iter().map(|_| free_port()).collect();
    let rp = free_port();
    let mut workers: Vec<Proc> = roles
        .iter()
        .zip(&ports)
        .map(|(r, p)| worker(r, *p, &[]))
        .collect();
    for p in &ports {
        assert!(wait_until(GUARD, || health_ok(*p)), "worker {p} up");
    }
    let mut args = Vec::new();
    for (r, p) in roles.iter().zip(&ports) {
        args.push(format!("--{r}"));
        args.push(url(*p));
    }
    let name = format!("restart-{}", roles.len() * 10 + victim);
    let file = config(
        &name,
        &format!("health_check_interval_secs = {INTERVAL:.1}"),
    );
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--config", &file, "--upstream-timeout-secs", "10"]);
    args.extend(extra_router);
    let _r = router(rp, &args);
    assert!(wait_until(GUARD, || ready(rp)), "router ready");
    let load = Load::start(rp, 6, SHORT);
    // Warm: every router thread pools connections to every worker.
    std::thread::sleep(Duration::from_millis(1500));
    let before = load.samples().len();
    assert!(before > 0, "no traffic before the restart");
    let killed = Instant::now();
    workers[victim].kill();
    std::thread::sleep(Duration::from_secs(1));
    workers[victim] = worker(roles[victim], ports[victim], &[]);
    let restarted = Instant::now();
    assert!(
        wait_until(GUARD, || health_ok(ports[victim])),
        "restarted worker up"
    );
    // The restarted process counts from 0: its first success is the router serving through it again.
    let vport = ports[victim];
    let bound = Duration::from_secs_f64(3.0 * INTERVAL);
    let served = wait_until(bound, || {
        metric(vport, "vllm:request_success_total").unwrap_or(0.0) > 0.0
    });
    let back_after = restarted.elapsed();
    assert!(
        served,
        "the router did not serve through the restarted worker within {bound:?}"
    );
    let back = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let samples = load.finish();
    let failed_during = samples
        .iter()
        .filter(|s| s.start >= killed && s.start <= back && s.status != 200)
        .count();
    drop(workers);
    Restart {
        back_after,
        failed_after: failures_sent_after(&samples, back),
        failed_during,
        total: samples.len(),
    }
}

/// Prints what a restart of `what` measured, and checks that no request sent after the router served through
/// the restarted worker again failed.
fn check(what: &str, r: &Restart) {
    eprintln!(
        "{what}: restart -> first request through it {:.2} s (health interval {INTERVAL} s); {} failed between kill and then, {} after; {} requests",
        r.back_after.as_secs_f64(),
        r.failed_during,
        r.failed_after.len(),
        r.total
    );
    assert!(
        r.failed_after.is_empty(),
        "{what}: requests failed after the worker was back: {:?}",
        r.failed_after
    );
}

#[test]
fn decode_restart_under_load_1p1d() {
    let r = restart_under_load(&["prefill", "decode"], 1, &[]);
    check("1P1D decode restart", &r);
}

#[test]
fn prefill_restart_under_load_1p1d() {
    // Without the decode-only fallback, a prefill outage is visible to clients, and so is its end.
    let r = restart_under_load(&["prefill", "decode"], 0, &["--prefill-fallback", "fail"]);
    check("1P1D prefill restart", &r);
}

#[test]
fn decode_and_prefill_restart_under_load_2p2d() {
    for (victim, what) in [(2, "2P2D decode restart"), (0, "2P2D prefill restart")] {
        let r = restart_under_load(&["prefill", "prefill", "decode", "decode"], victim, &[]);
        check(what, &r);
    }
}

#[test]
fn stopped_worker_then_continued() {
    // A partition longer than every timeout: SIGSTOP the decode for 5 s (upstream timeout 2 s).
    let file = config("stop", "health_check_interval_secs = 1.0");
    let timeouts = [
        "--upstream-timeout-secs",
        "2",
        "--stream-idle-timeout-secs",
        "2",
    ];
    let mut c = OnePOneD::start(&[&["--config", &file][..], &timeouts].concat());
    let rp = c.rp;
    let load = Load::start(rp, 4, SHORT);
    std::thread::sleep(Duration::from_secs(1));
    c.decode.signal("STOP");
    std::thread::sleep(Duration::from_secs(5));
    let during = load.samples();
    c.decode.signal("CONT");
    let cont = Instant::now();
    let served = wait_until(GUARD, || {
        first_success_after(&load.samples(), cont).is_some()
    });
    let first = first_success_after(&load.samples(), cont);
    std::thread::sleep(Duration::from_secs(2));
    let samples = load.finish();
    assert!(served, "no request succeeded after SIGCONT");
    let first = first.expect("a success");
    let failed = failures_sent_after(&samples, first);
    let stopped_failures = during.iter().filter(|s| s.status != 200).count();
    eprintln!(
        "SIGSTOP 5 s: {stopped_failures} requests failed while stopped; SIGCONT -> first success {:.2} s; {} failures after",
        (first - cont).as_secs_f64(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed after the worker was back: {failed:?}"
    );
}

#[test]
fn router_started_before_its_workers() {
    // A long health interval: only the recheck of down workers brings them in quickly.
    let (pp, dp, rp) = (free_port(), free_port(), free_port());
    let _r = router(
        rp,
        &[
            "--prefill",
            &url(pp),
            "--decode",
            &url(dp),
            "--config",
            &config("before", "health_check_interval_secs = 30.0"),
        ],
    );
    assert!(wait_until(GUARD, || answers(rp)));
    std::thread::sleep(Duration::from_millis(300));
    let r = complete(rp, SHORT, 10).unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.head.to_ascii_lowercase().contains("retry-after:"),
        "{r:?}"
    );
    let v = r.json();
    assert_eq!(v["error"]["code"], 503, "{v}");
    let _p = worker("prefill", pp, &[]);
    let _d = worker("decode", dp, &[]);
    assert!(wait_until(GUARD, || health_ok(pp) && health_ok(dp)));
    let up = Instant::now();
    let served = wait_until(Duration::from_secs(10), || {
        complete(rp, SHORT, 10).is_ok_and(|r| r.status == 200)
    });
    eprintln!(
        "router before workers: workers up -> first success {:.2} s (health interval 30 s)",
        up.elapsed().as_secs_f64()
    );
    assert!(
        served,
        "the router did not route to workers that came up after it"
    );
}

#[test]
fn router_restart_with_registered_workers() {
    let rp = free_port();
    let ru = url(rp);
    let mut r = router(rp, &["--heartbeat-ttl-secs", "3"]);
    assert!(wait_until(GUARD, || answers(rp)));
    let (pp, dp) = (free_port(), free_port());
    let reg = |role: &str, port: u16| {
        worker(
            role,
            port,
            &["--register", &ru, "--heartbeat-secs", "0.3", "--pool", role],
        )
    };
    let _p = reg("prefill", pp);
    let _d = reg("decode", dp);
    let ok = |rp: u16| complete(rp, SHORT, 10).is_ok_and(|r| r.status == 200);
    assert!(wait_until(GUARD, || ok(rp)), "first router serves");
    r.kill();
    // Restarted at once, as a supervisor would: the dead router's listeners outlive it by some milliseconds
    // (the kernel tears its io_uring down in the background), and `pdx serve` waits for such orphans
    // (`pdx_listen::ORPHAN_GRACE`) instead of refusing the port.
    let restarted = Instant::now();
    let _r2 = router(rp, &["--heartbeat-ttl-secs", "3"]);
    let served = wait_until(Duration::from_secs(15), || ok(rp));
    eprintln!(
        "router restart: new router serves registered workers {:.2} s after it started",
        restarted.elapsed().as_secs_f64()
    );
    assert!(served, "the restarted router did not get its workers back");
}

/// A prompt of about `tokens` tokens under the mock's built-in tokenizer, different for each `seed`.
fn long_prompt(tokens: usize, seed: u64) -> String {
    pdx_mock::synthetic_prompt(tokens, seed)
}

#[test]
fn early_disconnect_storm_leaves_no_prefilled_kv_held() {
    // Two prefills and one decode; prefills keep unread KV for 60 s (vLLM: 480 s), far past the guard.
    let (p1, p2, dp, rp) = (free_port(), free_port(), free_port(), free_port());
    let hold = ["--kv-hold-timeout-secs", "60"];
    let _p1 = worker("prefill", p1, &hold);
    let _p2 = worker("prefill", p2, &hold);
    let _d = worker("decode", dp, &[]);
    assert!(wait_until(GUARD, || {
        health_ok(p1) && health_ok(p2) && health_ok(dp)
    }));
    let _r = router(
        rp,
        &[
            "--prefill",
            &url(p1),
            "--prefill",
            &url(p2),
            "--decode",
            &url(dp),
            "--upstream-timeout-secs",
            "20",
        ],
    );
    assert!(wait_until(GUARD, || ready(rp)));
    // Distinct prompts (no prefix-cache sharing): each one holds its own ~188 blocks once prefilled.
    let request = |seed: u64| -> &'static str {
        let body = serde_json::json!({"model": "mock", "prompt": long_prompt(3000, seed), "max_tokens": 8})
            .to_string();
        Box::leak(body.into_boxed_str())
    };
    let reqs: Vec<&'static str> = (0..150u64)
        .map(|i| {
            let body = request(100 + i);
            let r = format!(
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            &*Box::leak(r.into_boxed_str())
        })
        .collect();
    // Clients that stay must get their answer before their deadline while the storm runs.
    let stayers: Vec<_> = (0..4u64)
        .map(|i| {
            let body = request(i);
            std::thread::spawn(move || complete(rp, body, 20).map(|r| r.status))
        })
        .collect();
    let held = |p: u16| metric(p, "pdx:kv_blocks_held").unwrap_or(0.0);
    let storm_start = Instant::now();
    let storm: Vec<_> = (0..150u64)
        .zip(reqs)
        .map(|(i, req)| {
            std::thread::spawn(move || {
                if let Ok(mut s) = TcpStream::connect(("127.0.0.1", rp)) {
                    let _ = s.write_all(req.as_bytes());
                    // 0-60 ms, spread over the clients.
                    std::thread::sleep(Duration::from_millis((i * 37) % 61));
                }
            })
        })
        .collect();
    let mut series = Vec::new();
    let mut peak = 0.0f64;
    for t in storm {
        let _ = t.join();
    }
    let storm_end = Instant::now();
    // Held KV over time, every 100 ms, until it stays 0 (or the guard ends).
    let mut zero_at = None;
    while storm_end.elapsed() < Duration::from_secs(15) {
        let h = held(p1) + held(p2);
        peak = peak.max(h);
        series.push((storm_end.elapsed().as_secs_f64(), h));
        if h == 0.0 {
            zero_at.get_or_insert(storm_end.elapsed());
            if zero_at.is_some_and(|z| storm_end.elapsed() >= z + Duration::from_millis(500)) {
                break;
            }
        } else {
            zero_at = None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let stayed: Vec<_> = stayers.into_iter().map(|t| t.join().unwrap()).collect();
    let releases = metric(rp, "pdx_kv_releases_total").unwrap_or(0.0);
    let shown: Vec<String> = series
        .iter()
        .step_by(2)
        .take(20)
        .map(|(t, h)| format!("{t:.1}s:{h}"))
        .collect();
    eprintln!(
        "disconnect storm: 150 clients over {:.0} ms; held KV blocks after it (peak {peak}): {}; zero {} s after the storm; releases through a decode {releases}",
        (storm_end - storm_start).as_secs_f64() * 1e3,
        shown.join(" "),
        zero_at.map_or("never".to_string(), |z| format!("{:.2}", z.as_secs_f64())),
    );
    for s in &stayed {
        assert!(
            matches!(s, Ok(200) | Ok(503)),
            "a client that stayed got {s:?} (deadline 20 s)"
        );
    }
    assert!(
        zero_at.is_some(),
        "prefilled KV still held 15 s after the storm: {series:?}"
    );
}

/// A router with `--admin-token`: a self-registering worker without the token (and every admin call without
/// it) is refused with 401 and never gets user traffic; workers registering with the token, given by
/// `--admin-token` or `PDX_ADMIN_TOKEN`, are listed and routed to.
#[test]
fn rogue_registration_needs_the_admin_token() {
    let c = OnePOneD::start(&["--admin-token", "s3cret"]);
    let (rp, dp, xp) = (c.rp, c.dp, free_port());
    let ru = url(rp);
    let register = [
        "--register",
        &ru,
        "--heartbeat-secs",
        "0.2",
        "--pool",
        "decode",
    ];
    // A rogue decode worker registers itself without the token.
    let _rogue = worker("decode", xp, &register);
    assert!(wait_until(GUARD, || health_ok(xp)));
    let reg = format!(
        r#"{{"role":"decode","pool":"decode","url":"{}","model":"mock"}}"#,
        url(xp)
    );
    let t = Duration::from_secs(5);
    let r = http(rp, "POST", "/v1/workers", &[], &reg, t).unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["error"]["type"], "AuthenticationError", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("Bearer"),
        "a clear error: {v}"
    );
    let wrong = [("Authorization", "Bearer s3cre")];
    assert_eq!(
        http(rp, "POST", "/v1/workers", &wrong, &reg, t)
            .unwrap()
            .status,
        401
    );
    assert_eq!(
        http(rp, "GET", "/v1/workers", &[], "", t).unwrap().status,
        401
    );
    let del = format!(r#"{{"url":"{}"}}"#, url(dp));
    assert_eq!(
        http(rp, "DELETE", "/v1/workers", &[], &del, t)
            .unwrap()
            .status,
        401
    );
    // The SSRF probe through registration: refused before any URL is looked at.
    let probe =
        r#"{"role":"decode","pool":"decode","url":"http://169.254.169.254:80","model":"mock"}"#;
    assert_eq!(
        http(rp, "POST", "/v1/workers", &[], probe, t)
            .unwrap()
            .status,
        401
    );
    // User traffic never reaches the rogue, and the real decode still serves it.
    for _ in 0..20 {
        let r = complete(rp, SHORT, 10).unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(metric(xp, "vllm:request_success_total").unwrap_or(0.0), 0.0);
    // With the token: listed, and a bad URL is a 400.
    let ok = [("Authorization", "Bearer s3cret")];
    let list = http(rp, "GET", "/v1/workers", &ok, "", t).unwrap();
    assert_eq!(list.status, 200, "{list:?}");
    assert!(
        !list.body.contains(&url(xp)),
        "the rogue is not registered: {}",
        list.body
    );
    let bad =
        r#"{"role":"decode","pool":"decode","url":"http://user@127.0.0.1:1/x","model":"mock"}"#;
    assert_eq!(
        http(rp, "POST", "/v1/workers", &ok, bad, t).unwrap().status,
        400
    );
    // Workers that register with the token, by flag and from the environment, join the decode pool and are
    // routed to; the rogue still is not.
    let (fp, ep) = (free_port(), free_port());
    let by_flag = [&register[..], &["--admin-token", "s3cret"]].concat();
    let _by_flag = worker("decode", fp, &by_flag);
    let _by_env = Proc::spawn_env(
        &server_args("mock", ep, &worker_args("decode", &register)),
        &[("PDX_ADMIN_TOKEN", "s3cret")],
    );
    let listed = || {
        http(rp, "GET", "/v1/workers", &ok, "", t)
            .is_ok_and(|l| l.body.contains(&url(fp)) && l.body.contains(&url(ep)))
    };
    assert!(
        wait_until(GUARD, listed),
        "workers with the admin token are registered"
    );
    let served = |p: u16| metric(p, "vllm:request_success_total").unwrap_or(0.0) > 0.0;
    let mut sent = 0;
    while !(served(fp) && served(ep)) && sent < 60 {
        let r = complete(rp, SHORT, 10).unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        sent += 1;
    }
    assert!(
        served(fp) && served(ep),
        "{sent} requests, none routed to a worker registered with the token (flag: {}, env: {})",
        served(fp),
        served(ep)
    );
    assert_eq!(metric(xp, "vllm:request_success_total").unwrap_or(0.0), 0.0);
}
