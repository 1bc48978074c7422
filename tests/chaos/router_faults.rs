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

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `pdx` binary: this build's, or `PDX_CHAOS_BIN` (to measure another build, e.g. the one before a
/// fix, with the same scenarios).
fn pdx() -> String {
    std::env::var("PDX_CHAOS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_pdx").to_string())
}

/// A `pdx serve` config file with `text` (settings every build reads from the file).
fn config(name: &str, text: &str) -> String {
    let p = std::env::temp_dir().join(format!("pdx-chaos-{}-{name}.toml", std::process::id()));
    std::fs::write(&p, text).expect("write config");
    p.to_string_lossy().into_owned()
}

/// A child process, killed (SIGKILL) and reaped when dropped.
struct Proc {
    child: Option<Child>,
}

impl Proc {
    fn spawn(args: &[String]) -> Proc {
        let log = std::env::var_os("PDX_CHAOS_LOG").is_some();
        let child = Command::new(pdx())
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(if log { Stdio::inherit() } else { Stdio::null() })
            .stderr(if log { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .expect("spawn pdx");
        Proc { child: Some(child) }
    }
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{sig} failed");
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A stopped child must be continued to die cleanly under some kernels' reaping.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(c.id().to_string())
                .status();
        }
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// A `pdx mock` of `role` on `port`, KV moved by pdx's transfer engine on loopback.
fn mock(role: &str, port: u16, extra: &[&str]) -> Proc {
    let mut a: Vec<String> = [
        "mock",
        "--role",
        role,
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--kv-listen",
        "127.0.0.1:0",
        "--kv-scale-down",
        "1024",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn(&a)
}

/// `pdx serve` on `port` (two threads), with `args`.
fn router(port: u16, args: &[String]) -> Proc {
    let mut a: Vec<String> = [
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--threads",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(args.iter().cloned());
    Proc::spawn(&a)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A whole HTTP/1.1 response.
#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: String,
}

/// One request on a new connection (`Connection: close`), read to the end within `timeout`.
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    timeout: Duration,
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no response head: {text:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        let mut out = String::new();
        let mut r = rest;
        while let Some((size, after)) = r.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            r = after[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        rest.to_string()
    };
    Ok(Resp {
        status,
        head: head.to_string(),
        body,
    })
}

fn wait_until(guard: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + guard;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

fn health_ok(port: u16) -> bool {
    http(port, "GET", "/health", &[], "", Duration::from_secs(1)).is_ok_and(|r| r.status == 200)
}

fn ready(port: u16) -> bool {
    http(port, "GET", "/ready", &[], "", Duration::from_secs(1)).is_ok_and(|r| r.status == 200)
}

/// Sum of the samples of metric `name` on a `/metrics` page (lines `name{...} v` or `name v`).
fn metric(port: u16, name: &str) -> Option<f64> {
    let r = http(port, "GET", "/metrics", &[], "", Duration::from_secs(2)).ok()?;
    let vals: Vec<f64> = r
        .body
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!vals.is_empty()).then(|| vals.iter().sum())
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
                        let status = http(
                            port,
                            "POST",
                            "/v1/completions",
                            &[],
                            body,
                            Duration::from_secs(15),
                        )
                        .map_or(0, |r| r.status);
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
        .map(|(r, p)| mock(r, *p, &[]))
        .collect();
    for p in &ports {
        assert!(
            wait_until(Duration::from_secs(20), || health_ok(*p)),
            "worker {p} up"
        );
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
    args.extend(strings(&[
        "--config",
        &file,
        "--upstream-timeout-secs",
        "10",
    ]));
    args.extend(strings(extra_router));
    let _r = router(rp, &args);
    assert!(
        wait_until(Duration::from_secs(20), || ready(rp)),
        "router ready"
    );
    let load = Load::start(rp, 6, SHORT);
    // Warm: every router thread pools connections to every worker.
    std::thread::sleep(Duration::from_millis(1500));
    let before = load.samples().len();
    assert!(before > 0, "no traffic before the restart");
    let killed = Instant::now();
    workers[victim].kill();
    std::thread::sleep(Duration::from_secs(1));
    workers[victim] = mock(roles[victim], ports[victim], &[]);
    let restarted = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || health_ok(ports[victim])),
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

fn report(what: &str, r: &Restart) {
    eprintln!(
        "{what}: restart -> first request through it {:.2} s (health interval {INTERVAL} s); {} failed between kill and then, {} after; {} requests",
        r.back_after.as_secs_f64(),
        r.failed_during,
        r.failed_after.len(),
        r.total
    );
}

#[test]
fn decode_restart_under_load_1p1d() {
    let r = restart_under_load(&["prefill", "decode"], 1, &[]);
    report("1P1D decode restart", &r);
    assert!(
        r.failed_after.is_empty(),
        "requests failed after the decode was back: {:?}",
        r.failed_after
    );
}

#[test]
fn prefill_restart_under_load_1p1d() {
    // Without the decode-only fallback, a prefill outage is visible to clients, and so is its end.
    let r = restart_under_load(&["prefill", "decode"], 0, &["--prefill-fallback", "fail"]);
    report("1P1D prefill restart", &r);
    assert!(
        r.failed_after.is_empty(),
        "requests failed after the prefill was back: {:?}",
        r.failed_after
    );
}

#[test]
fn decode_and_prefill_restart_under_load_2p2d() {
    for (victim, what) in [(2, "2P2D decode restart"), (0, "2P2D prefill restart")] {
        let r = restart_under_load(&["prefill", "prefill", "decode", "decode"], victim, &[]);
        report(what, &r);
        assert!(
            r.failed_after.is_empty(),
            "requests failed after the worker was back: {:?}",
            r.failed_after
        );
    }
}

#[test]
fn stopped_worker_then_continued() {
    // A partition longer than every timeout: SIGSTOP the decode for 5 s (upstream timeout 2 s).
    let (pp, dp, rp) = (free_port(), free_port(), free_port());
    let _p = mock("prefill", pp, &[]);
    let d = mock("decode", dp, &[]);
    assert!(wait_until(Duration::from_secs(20), || health_ok(pp) && health_ok(dp)));
    let _r = router(
        rp,
        &strings(&[
            "--prefill",
            &url(pp),
            "--decode",
            &url(dp),
            "--config",
            &config("stop", "health_check_interval_secs = 1.0"),
            "--upstream-timeout-secs",
            "2",
            "--stream-idle-timeout-secs",
            "2",
        ]),
    );
    assert!(wait_until(Duration::from_secs(20), || ready(rp)));
    let load = Load::start(rp, 4, SHORT);
    std::thread::sleep(Duration::from_secs(1));
    d.signal("STOP");
    std::thread::sleep(Duration::from_secs(5));
    let during = load.samples();
    d.signal("CONT");
    let cont = Instant::now();
    let served = wait_until(Duration::from_secs(20), || {
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
        &strings(&[
            "--prefill",
            &url(pp),
            "--decode",
            &url(dp),
            "--config",
            &config("before", "health_check_interval_secs = 30.0"),
        ]),
    );
    assert!(wait_until(Duration::from_secs(20), || {
        http(rp, "GET", "/health", &[], "", Duration::from_secs(1)).is_ok()
    }));
    std::thread::sleep(Duration::from_millis(300));
    let r = http(
        rp,
        "POST",
        "/v1/completions",
        &[],
        SHORT,
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.head.to_ascii_lowercase().contains("retry-after:"),
        "{r:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("OpenAI error JSON");
    assert_eq!(v["error"]["code"], 503, "{v}");
    let _p = mock("prefill", pp, &[]);
    let _d = mock("decode", dp, &[]);
    assert!(wait_until(Duration::from_secs(20), || health_ok(pp) && health_ok(dp)));
    let up = Instant::now();
    let served = wait_until(Duration::from_secs(10), || {
        http(
            rp,
            "POST",
            "/v1/completions",
            &[],
            SHORT,
            Duration::from_secs(10),
        )
        .is_ok_and(|r| r.status == 200)
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
    let mut r = router(rp, &strings(&["--heartbeat-ttl-secs", "3"]));
    assert!(wait_until(Duration::from_secs(20), || {
        http(rp, "GET", "/health", &[], "", Duration::from_secs(1)).is_ok()
    }));
    let (pp, dp) = (free_port(), free_port());
    let reg = |role: &str, port: u16| {
        mock(
            role,
            port,
            &["--register", &ru, "--heartbeat-secs", "0.3", "--pool", role],
        )
    };
    let _p = reg("prefill", pp);
    let _d = reg("decode", dp);
    let ok = |rp: u16| {
        http(
            rp,
            "POST",
            "/v1/completions",
            &[],
            SHORT,
            Duration::from_secs(10),
        )
        .is_ok_and(|r| r.status == 200)
    };
    assert!(
        wait_until(Duration::from_secs(20), || ok(rp)),
        "first router serves"
    );
    r.kill();
    let restarted = Instant::now();
    let _r2 = router(rp, &strings(&["--heartbeat-ttl-secs", "3"]));
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
    let _p1 = mock("prefill", p1, &hold);
    let _p2 = mock("prefill", p2, &hold);
    let _d = mock("decode", dp, &[]);
    assert!(wait_until(Duration::from_secs(20), || {
        health_ok(p1) && health_ok(p2) && health_ok(dp)
    }));
    let _r = router(
        rp,
        &strings(&[
            "--prefill",
            &url(p1),
            "--prefill",
            &url(p2),
            "--decode",
            &url(dp),
            "--upstream-timeout-secs",
            "20",
        ]),
    );
    assert!(wait_until(Duration::from_secs(20), || ready(rp)));
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
            std::thread::spawn(move || {
                http(
                    rp,
                    "POST",
                    "/v1/completions",
                    &[],
                    body,
                    Duration::from_secs(20),
                )
                .map(|r| r.status)
            })
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

#[test]
fn rogue_registration_needs_the_admin_token() {
    let (pp, dp, xp, rp) = (free_port(), free_port(), free_port(), free_port());
    let _p = mock("prefill", pp, &[]);
    let _d = mock("decode", dp, &[]);
    assert!(wait_until(Duration::from_secs(20), || health_ok(pp) && health_ok(dp)));
    let _r = router(
        rp,
        &strings(&[
            "--prefill",
            &url(pp),
            "--decode",
            &url(dp),
            "--admin-token",
            "s3cret",
        ]),
    );
    assert!(wait_until(Duration::from_secs(20), || ready(rp)));
    // A rogue decode worker registers itself (no token: `pdx mock --register` sends none).
    let _rogue = mock(
        "decode",
        xp,
        &[
            "--register",
            &url(rp),
            "--heartbeat-secs",
            "0.2",
            "--pool",
            "decode",
        ],
    );
    assert!(wait_until(Duration::from_secs(20), || health_ok(xp)));
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
        let r = http(
            rp,
            "POST",
            "/v1/completions",
            &[],
            SHORT,
            Duration::from_secs(10),
        )
        .unwrap();
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
}
