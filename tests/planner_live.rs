//! Live checks of issue #20, driving the real `pdx` binary on loopback:
//! * `pdx sim` agrees with a live `pdx replay` through `pdx serve` and timed `pdx mock` workers on
//!   the same short trace, within the tolerance documented in `docs/planner.md`;
//! * `pdx plan --connector local` under a load step adds decode workers, the router routes to
//!   them, and they are removed after the load falls, with no request lost.
//!
//! Every child process is killed when its guard drops, also when an assertion fails.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::free_port;

const PDX: &str = env!("CARGO_BIN_EXE_pdx");

/// The two tests run one at a time: each times live processes on a small machine.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// KV bytes per token divided by this on the mocks and in the simulator: the mocks fill and
/// check every KV byte (a cost the simulator does not model), which a debug build makes slow.
const KV_SCALE_DOWN: &str = "512";

/// Kills its process on drop (SIGTERM first, so `pdx plan` stops the workers it started).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], dir: &Path) -> Guard {
    spawn_env(args, dir, &[])
}

fn spawn_env(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Guard {
    Guard(
        Command::new(PDX)
            .args(args)
            .envs(env.iter().copied())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pdx starts"),
    )
}

fn get(url: &str) -> Option<String> {
    let (status, body) =
        pdx_planner::live::http::request("GET", url, None, Duration::from_secs(2)).ok()?;
    (status == 200).then(|| String::from_utf8_lossy(&body).into_owned())
}

fn wait_for(url: &str) {
    let t = Instant::now();
    while get(url).is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{url} never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pdx-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A mock profile whose steps (10 ms and more) dwarf the HTTP and router costs the simulator
/// does not model.
const SLOW: &str = "[timing]\nstep_overhead_us = 10000.0\nprefill_token_us = 50.0\n\
                    prefill_attn_ns = 0.0\ndecode_seq_us = 1000.0\ndecode_ctx_ns = 0.0\n\
                    [scheduler]\nmax_num_seqs = 8\n";

/// The agreement test's profile: 30 ms steps, 16 sequences at once.
const COMPARE: &str = "[timing]\nstep_overhead_us = 30000.0\nprefill_token_us = 50.0\n\
                       prefill_attn_ns = 0.0\ndecode_seq_us = 1000.0\ndecode_ctx_ns = 0.0\n\
                       [scheduler]\nmax_num_seqs = 16\n";

/// Mooncake lines: `(seconds, rate)` phases, 200-token prompts, 30-token outputs.
fn step_trace(phases: &[(f64, f64)]) -> String {
    let mut s = String::new();
    let mut t = 0.0;
    for &(secs, rate) in phases {
        let end = t + secs;
        while t < end {
            s += &format!(
                "{{\"timestamp\": {}, \"input_length\": 200, \"output_length\": 30}}\n",
                (t * 1000.0) as u64
            );
            t += 1.0 / rate;
        }
    }
    s
}

fn replay(url: &str, trace: &Path, slo: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "replay",
        "--url",
        url,
        "--quiet",
        "--json",
        "--timeout",
        "60",
    ];
    args.extend(["--trace", trace.to_str().unwrap()]);
    args.extend(slo);
    let out = Command::new(PDX).args(&args).output().expect("replay runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("replay JSON")
}

#[test]
fn sim_agrees_with_a_live_replay() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("simlive");
    std::fs::write(dir.join("slow.toml"), COMPARE).unwrap();
    // 4 req/s for 4 s, then 8 req/s for 8 s: the decode worker (16 sequences of 46 ms steps,
    // about 11.6 req/s of 30 tokens) runs at up to ~70 % of its capacity: queues form and
    // batches grow, but the run does not hinge on an overload's backlog.
    let trace = dir.join("trace.jsonl");
    std::fs::write(&trace, step_trace(&[(4.0, 4.0), (8.0, 8.0)])).unwrap();
    std::fs::write(
        dir.join("sim.toml"),
        "[kv_handoff]\nbandwidth_gbps = 2.0\nlatency_us = 1000.0\nkv_scale_down = 512\n\
         [[pools]]\nname = \"prefill\"\nrole = \"prefill\"\nworkers = 1\nprofile_file = \"slow.toml\"\n\
         [[pools]]\nname = \"decode\"\nrole = \"decode\"\nworkers = 1\nprofile_file = \"slow.toml\"\n",
    )
    .unwrap();
    let slo = ["--slo-ttft-ms", "250", "--slo-itl-ms", "45"];
    let mut args = vec![
        "sim",
        "--cluster",
        "sim.toml",
        "--json",
        "--trace",
        "trace.jsonl",
    ];
    args.extend(slo);
    let out = Command::new(PDX)
        .args(&args)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sim: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The live side is timed on a shared machine: a run disturbed by other processes (seen:
    // TTFT p90 four times the usual) is run again, on fresh workers (the prefix caches of the
    // last run would shorten prefills), up to three times; one run must agree.
    let mut failures = Vec::new();
    for attempt in 1..=3 {
        let live = live_pd_replay(&dir, &trace, &slo);
        match agreement(&live, &sim) {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&dir);
                return;
            }
            Err(why) => {
                println!("attempt {attempt}: {why}");
                failures.push(why);
            }
        }
    }
    panic!("pdx sim disagrees with every live run: {failures:?}");
}

/// One prefill and one decode mock behind `pdx serve`, started for one replay of `trace`.
fn live_pd_replay(dir: &Path, trace: &Path, slo: &[&str]) -> serde_json::Value {
    let (pp, dp, rp) = (free_port(), free_port(), free_port());
    let mock = |role: &str, port: u16| {
        spawn(
            &[
                "mock",
                "--role",
                role,
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--profile",
                "slow.toml",
                "--kv-scale-down",
                KV_SCALE_DOWN,
            ],
            dir,
        )
    };
    let (_p, _d) = (mock("prefill", pp), mock("decode", dp));
    wait_for(&format!("http://127.0.0.1:{pp}/health"));
    wait_for(&format!("http://127.0.0.1:{dp}/health"));
    let _r = spawn(
        &[
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            &rp.to_string(),
            "--threads",
            "1",
            "--prefill",
            &format!("http://127.0.0.1:{pp}"),
            "--decode",
            &format!("http://127.0.0.1:{dp}"),
        ],
        dir,
    );
    wait_for(&format!("http://127.0.0.1:{rp}/ready"));
    replay(&format!("http://127.0.0.1:{rp}"), trace, slo)
}

/// The tolerance of docs/planner.md: TTFT within 25 % + 30 ms (the simulator leaves out HTTP,
/// the router, the tokenizer and the KV bytes, and the live side here is a debug build; typical:
/// live 7–14 ms above), ITL and TPOT within 10 % + 3 ms, SLO attainment within 0.1; every
/// request served on both sides.
fn agreement(live: &serde_json::Value, sim: &serde_json::Value) -> Result<(), String> {
    let n = live["requests"].as_u64().unwrap();
    if live["succeeded"] != n || sim["succeeded"] != n {
        return Err(format!(
            "failures: live {}, sim {}",
            live["errors"], sim["errors"]
        ));
    }
    let f = |v: &serde_json::Value, k: &str, q: &str| v[k][q].as_f64().unwrap();
    for (k, q, rel, extra) in [
        ("ttft_ms", "p50", 0.25, 30.0),
        ("ttft_ms", "p90", 0.25, 30.0),
        ("itl_ms", "p50", 0.1, 3.0),
        ("tpot_ms", "p50", 0.1, 3.0),
    ] {
        let (a, b) = (f(live, k, q), f(sim, k, q));
        println!("{k} {q}: live {a:.1} ms, sim {b:.1} ms");
        if (a - b).abs() > rel * a + extra {
            return Err(format!("{k} {q}: live {a:.1} ms, sim {b:.1} ms"));
        }
    }
    let (a, b) = (
        live["slo_attainment"].as_f64().unwrap(),
        sim["slo_attainment"].as_f64().unwrap(),
    );
    println!("SLO attainment: live {a:.3}, sim {b:.3}");
    if (a - b).abs() > 0.1 {
        return Err(format!("SLO attainment: live {a}, sim {b}"));
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct Listed {
    url: String,
    pool: String,
}

/// The admin token of the router `serve_with_planner…` starts (a router without one ignores it).
const ADMIN_TOKEN: &str = "planner-live-admin-token";

fn decode_workers(router: &str) -> Vec<String> {
    let url = format!("{router}/v1/workers");
    let body = match pdx_planner::live::http::request_with(
        "GET",
        &url,
        None,
        Some(ADMIN_TOKEN),
        Duration::from_secs(2),
    ) {
        Ok((200, body)) => String::from_utf8_lossy(&body).into_owned(),
        _ => return vec![],
    };
    #[derive(serde::Deserialize)]
    struct L {
        workers: Vec<Listed>,
    }
    serde_json::from_str::<L>(&body)
        .map(|l| {
            l.workers
                .into_iter()
                .filter(|w| w.pool == "decode")
                .map(|w| w.url)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn plan_local_scales_decode_up_under_a_load_step_and_back_down_losing_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("planlive");
    std::fs::write(dir.join("slow.toml"), SLOW).unwrap();
    let rp = free_port();
    let router = format!("http://127.0.0.1:{rp}");
    std::fs::write(
        dir.join("pdx.toml"),
        format!(
            "host = \"127.0.0.1\"\nport = {rp}\nthreads = 1\ndefault_policy = \"least_loaded\"\n\
             heartbeat_ttl_secs = 5\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("plan.toml"),
        format!(
            "router = \"{router}\"\nmodel = \"mock\"\nconnector = \"local\"\n\
             [planner]\ninterval_secs = 1\nbudget_gpus = 6\npredictor = {{ kind = \"constant\" }}\n\
             [[planner.pools]]\nname = \"prefill\"\nrole = \"prefill\"\nttft_ms = 500\nlookahead = 1\n\
             [[planner.pools]]\nname = \"decode\"\nrole = \"decode\"\nitl_ms = 40\nlookahead = 1\n\
             [local]\npdx = \"{PDX}\"\nheartbeat_secs = 1\n\
             [[local.pools]]\nname = \"prefill\"\nargs = [\"--profile\", \"slow.toml\"]\n\
             [[local.pools]]\nname = \"decode\"\nargs = [\"--profile\", \"slow.toml\"]\n"
        ),
    )
    .unwrap();
    // 2 req/s, then 14 req/s for 8 s (about 3 decode workers' worth), then 1 req/s.
    let trace = dir.join("step.jsonl");
    std::fs::write(&trace, step_trace(&[(3.0, 2.0), (8.0, 14.0), (8.0, 1.0)])).unwrap();
    let _r = spawn(&["serve", "--config", "pdx.toml"], &dir);
    wait_for(&format!("{router}/health"));
    let log = dir.join("plan.jsonl");
    let mp = free_port();
    let _plan = spawn(
        &[
            "plan",
            "--config",
            "plan.toml",
            "--duration-secs",
            "60",
            "--log",
            log.to_str().unwrap(),
            "--metrics-port",
            &mp.to_string(),
        ],
        &dir,
    );
    // The planner starts each pool's minimum: one prefill and one decode worker register.
    let t = Instant::now();
    while decode_workers(&router).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no decode worker registered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let first = decode_workers(&router);
    // Watch the decode pool while the load runs.
    let watch_router = router.clone();
    // The router's answers per worker are read while the workers live: a worker's series go with it once the
    // planner drains and removes it.
    let watcher = std::thread::spawn(move || {
        let mut seen: Vec<String> = Vec::new();
        let mut served: std::collections::HashMap<String, f64> = Default::default();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(22) {
            for u in decode_workers(&watch_router) {
                if !seen.contains(&u) {
                    seen.push(u);
                }
            }
            if let Some(metrics) = get(&format!("{watch_router}/metrics")) {
                for u in &seen {
                    let n: f64 = metrics
                        .lines()
                        .filter(|l| {
                            l.starts_with("pdx_requests_total")
                                && l.contains(&format!("worker=\"{u}\""))
                        })
                        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                        .sum();
                    let e = served.entry(u.clone()).or_default();
                    *e = e.max(n);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        (seen, served)
    });
    let report = replay(&router, &trace, &[]);
    let (seen, served) = watcher.join().unwrap();
    let n = report["requests"].as_u64().unwrap();
    assert_eq!(
        report["succeeded"], n,
        "no request lost: {}",
        report["errors"]
    );
    assert_eq!(report["length_mismatches"], 0);
    let added: Vec<&String> = seen.iter().filter(|u| !first.contains(u)).collect();
    assert!(
        !added.is_empty(),
        "the planner added decode workers: {seen:?}"
    );
    // The router sent decodes to an added worker.
    assert!(
        added
            .iter()
            .any(|u| served.get(*u).copied().unwrap_or(0.0) > 0.0),
        "an added worker served requests: {served:?}"
    );
    // The planner's last decision is exported as gauges.
    let exported = get(&format!("http://127.0.0.1:{mp}/metrics")).expect("planner metrics");
    assert!(
        exported.contains("pdx_planner_target_replicas{pool=\"decode\"}"),
        "{exported}"
    );
    // After the load falls the pool shrinks back, and the stopped workers no longer listen.
    let t = Instant::now();
    while decode_workers(&router).len() > 1 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "decode pool did not shrink: {:?}",
            decode_workers(&router)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let gone: Vec<&&String> = added
        .iter()
        .filter(|u| !decode_workers(&router).contains(u))
        .collect();
    assert!(!gone.is_empty());
    let t = Instant::now();
    while gone.iter().any(|u| get(&format!("{u}/health")).is_some()) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "a removed worker still runs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Decisions were logged per interval, with their inputs.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 5);
    assert!(lines.iter().any(|d| d["targets"][1].as_u64().unwrap() >= 2));
    assert!(lines[0]["observed"].is_array() && lines[0]["requests"].is_array());
    let _ = std::io::stderr().flush();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pdx_profile_of_a_live_mock_matches_the_profile_derived_from_its_timing_model() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("profile");
    std::fs::write(dir.join("cmp.toml"), COMPARE).unwrap();
    let model: pdx_mock::Profile = toml::from_str(COMPARE).unwrap();
    let derived = pdx_sim::profile::derive(&model, 2048, 16);
    // As in the agreement test: a measurement disturbed by other processes is taken again on
    // a fresh worker, up to three times; one must agree.
    let mut failures = Vec::new();
    for _ in 0..3 {
        match profile_once(&dir, &derived) {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&dir);
                return;
            }
            Err(why) => {
                println!("{why}");
                failures.push(why);
            }
        }
    }
    panic!("pdx profile disagrees with the timing model: {failures:?}");
}

fn profile_once(dir: &Path, derived: &pdx_planner::PoolProfile) -> Result<(), String> {
    let port = free_port();
    let _m = spawn(
        &[
            "mock",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--profile",
            "cmp.toml",
        ],
        dir,
    );
    wait_for(&format!("http://127.0.0.1:{port}/health"));
    let out = Command::new(PDX)
        .args([
            "profile",
            "--url",
            &format!("http://127.0.0.1:{port}"),
            "--isl",
            "128,512",
            "--context",
            "256,1024",
            "--batch",
            "1,8",
            "--output-tokens",
            "16",
        ])
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(format!(
            "pdx profile failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let measured: pdx_planner::PoolProfile =
        toml::from_str(&String::from_utf8_lossy(&out.stdout)).expect("profile TOML");
    let measured = measured.validated().unwrap();
    for isl in [128.0, 512.0] {
        let (m, d) = (
            measured.prefill_service_ms(isl),
            derived.prefill_service_ms(isl),
        );
        println!("prefill {isl}: TTFT measured {m:.1} ms, model {d:.1} ms");
        if (m - d).abs() > 0.25 * d + 15.0 {
            return Err(format!("TTFT at {isl}: {m} vs {d}"));
        }
        // The derivation keeps up to 32 prompts busy, the measurement 8: lower, same scale.
        let (m, d) = (
            measured.prefill_tokens_per_s(isl),
            derived.prefill_tokens_per_s(isl),
        );
        println!("prefill {isl}: measured {m:.0} tok/s, model {d:.0} tok/s (busy)");
        if !(m > 0.3 * d && m < 1.2 * d) {
            return Err(format!("throughput at {isl}: {m} vs {d}"));
        }
    }
    for (ctx, b) in [(256.0, 1.0), (256.0, 8.0), (1024.0, 1.0), (1024.0, 8.0)] {
        let (m, d) = (
            measured.decode_itl_ms(ctx, b),
            derived.decode_itl_ms(ctx, b),
        );
        println!("decode {ctx} × {b}: ITL measured {m:.2} ms, model {d:.2} ms");
        if (m - d).abs() > 0.15 * d + 3.0 {
            return Err(format!("ITL at {ctx} × {b}: {m} vs {d}"));
        }
    }
    Ok(())
}

#[test]
fn serve_with_planner_starts_the_planned_workers_logs_decisions_and_stops_them_on_shutdown() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("serveplan");
    std::fs::write(dir.join("slow.toml"), SLOW).unwrap();
    let rp = free_port();
    let router = format!("http://127.0.0.1:{rp}");
    std::fs::write(
        dir.join("pdx.toml"),
        format!(
            "host = \"127.0.0.1\"\nport = {rp}\nthreads = 1\ndefault_policy = \"least_loaded\"\n\
             heartbeat_ttl_secs = 5\nadmin_token = \"{ADMIN_TOKEN}\"\n"
        ),
    )
    .unwrap();
    // No `router =`: `pdx serve --planner` plans against itself, with the admin token from `PDX_ADMIN_TOKEN`
    // (its workers register with it too).
    std::fs::write(
        dir.join("plan.toml"),
        format!(
            "model = \"mock\"\nconnector = \"local\"\n\
             [planner]\ninterval_secs = 1\nbudget_gpus = 4\npredictor = {{ kind = \"constant\" }}\n\
             [[planner.pools]]\nname = \"prefill\"\nrole = \"prefill\"\nttft_ms = 500\nlookahead = 1\n\
             [[planner.pools]]\nname = \"decode\"\nrole = \"decode\"\nitl_ms = 40\nlookahead = 1\n\
             [local]\npdx = \"{PDX}\"\nheartbeat_secs = 1\n\
             [[local.pools]]\nname = \"prefill\"\nargs = [\"--profile\", \"slow.toml\"]\n\
             [[local.pools]]\nname = \"decode\"\nargs = [\"--profile\", \"slow.toml\"]\n"
        ),
    )
    .unwrap();
    let log = dir.join("decisions.jsonl");
    let mut serve = spawn_env(
        &[
            "serve",
            "--config",
            "pdx.toml",
            "--planner",
            "plan.toml",
            "--planner-log",
            log.to_str().unwrap(),
        ],
        &dir,
        &[("PDX_ADMIN_TOKEN", ADMIN_TOKEN)],
    );
    wait_for(&format!("{router}/health"));
    // The planner thread starts each pool's minimum: a decode worker registers.
    let t = Instant::now();
    while decode_workers(&router).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no decode worker registered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let workers = decode_workers(&router);
    // Its first decisions are logged, for both pools.
    let t = Instant::now();
    let first = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().next() {
            break serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no decision logged");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        first["targets"].as_array().map(Vec::len),
        Some(2),
        "{first}"
    );
    // SIGTERM: the router drains and exits, the planner stops the workers it started.
    let pid = serve.0.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let t = Instant::now();
    let status = loop {
        if let Ok(Some(s)) = serve.0.try_wait() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "pdx serve did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    for w in &workers {
        assert!(
            get(&format!("{w}/health")).is_none(),
            "{w} still serves after pdx serve ended"
        );
    }
}
