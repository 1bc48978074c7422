//! `pdx demo`: the whole path on a real trace, with nothing to configure.
//!
//! It starts, on loopback, the hierarchy of Dynamo's `examples/hierarchical_planner`: two prefill pools
//! (`short` and `long`, split on the ISL axis of a Dynamo-format global-router grid) and one decode pool of
//! two workers, all `pdx mock` processes with the timing model of a small model on an H100 and real KV bytes
//! moved by pdx's transfer engine. It puts `pdx serve` in front, replays a slice of the Mooncake
//! conversation trace through it, and prints what happened. Every child process is stopped at the end,
//! also on Ctrl-C.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// `pdx demo` arguments.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Trace to replay (Mooncake jsonl or Azure CSV, told apart by content) [default: the Mooncake
    /// conversation slice shipped with pdx]
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Requests to replay (the first ones of the trace).
    #[arg(long, alias = "requests", default_value_t = 300)]
    max_requests: usize,
    /// Replay speed factor (the conversation trace has about 3.4 requests/s).
    #[arg(long, default_value_t = 4.0)]
    speed: f64,
    /// Scale the trace's input and output lengths so the cluster fits a small machine.
    #[arg(long, default_value_t = 0.1)]
    scale_tokens: f64,
    /// TTFT target, ms (for SLO attainment).
    #[arg(long, default_value_t = 500.0)]
    slo_ttft_ms: f64,
    /// ITL target, ms (for SLO attainment).
    #[arg(long, default_value_t = 30.0)]
    slo_itl_ms: f64,
    /// Keep the generated config and the processes' logs in this folder [default: a new folder in the
    /// system's temporary directory]
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Listen on fixed ports: the four workers on PORT_BASE..PORT_BASE+3 and the router on PORT_BASE+4
    /// (127.0.0.1) [default: free ports chosen by the system]
    #[arg(long)]
    port_base: Option<u16>,
    /// Print the result as JSON (the replay report plus the cluster's counters).
    #[arg(long)]
    json: bool,
}

/// What the cluster's own counters say after the replay (part of `--json`).
#[derive(serde::Serialize, Debug, Default)]
struct ClusterCounters {
    /// KV blocks the decode workers read from prefill workers and verified byte for byte.
    kv_blocks_received: f64,
    /// Bytes of those blocks.
    kv_bytes_received: f64,
    /// Remote KV reads that failed or did not verify.
    kv_transfer_errors: f64,
    /// Blocks prefill workers still hold for a decode read after the replay (0: every block handed out was
    /// read, and its read notification arrived).
    prefill_blocks_still_held: f64,
    /// Prefix-cache hits / queries at the prefill workers, prompt tokens.
    prefill_prefix_hits: f64,
    /// Prompt tokens the prefill workers looked up.
    prefill_prefix_queries: f64,
    /// Requests completed per pool, then per worker (`pool` → `port` → count).
    requests_by_pool: BTreeMap<String, BTreeMap<u16, f64>>,
}

#[derive(serde::Serialize)]
struct DemoResult<'a> {
    report: &'a pdx_replay::Report,
    cluster: &'a ClusterCounters,
}

/// Child processes of the demo with their log files, killed on drop and by the Ctrl-C handler.
static CHILDREN: Mutex<Vec<(Child, PathBuf)>> = Mutex::new(Vec::new());

fn stop_children() {
    let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    for (c, _) in children.iter_mut() {
        let _ = c.kill();
    }
    for (mut c, _) in children.drain(..) {
        let _ = c.wait();
    }
}

/// Stops every child when the demo ends, however it ends.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        stop_children();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The demo's five ports (four workers, then the router): `--port-base` and the four after it, or free ones.
fn ports(base: Option<u16>) -> Result<[u16; 5]> {
    match base {
        Some(b) => {
            if b == 0 || b.checked_add(4).is_none() {
                bail!("--port-base {b}: the demo needs ports {b}..{b}+4, within 1..=65535");
            }
            Ok([b, b + 1, b + 2, b + 3, b + 4])
        }
        None => Ok([
            free_port()?,
            free_port()?,
            free_port()?,
            free_port()?,
            free_port()?,
        ]),
    }
}

/// One worker of the demo cluster.
struct Worker {
    pool: &'static str,
    role: &'static str,
    port: u16,
}

fn spawn(exe: &Path, args: &[String], log: &Path) -> Result<()> {
    let log_file = std::fs::File::create(log)?;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {}", args.join(" ")))?;
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((child, log.to_path_buf()));
    Ok(())
}

/// Errors when a child process has already exited (it failed to start), with the error its log ends with.
fn check_children_alive() -> Result<()> {
    let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    for (c, log) in children.iter_mut() {
        if let Ok(Some(status)) = c.try_wait() {
            let text = std::fs::read_to_string(&*log).unwrap_or_default();
            let why = text
                .lines()
                .rev()
                .find(|l| l.starts_with("pdx: error:"))
                .map_or_else(
                    || format!("{status}"),
                    |l| l.trim_start_matches("pdx: error: ").to_string(),
                );
            bail!("a demo process exited at start ({}): {why}", log.display());
        }
    }
    Ok(())
}

fn wait_healthy(port: u16, what: &str, deadline: Instant) -> Result<()> {
    use std::io::Read;
    loop {
        check_children_alive()?;
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let req = format!(
                "GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
            );
            let mut resp = String::new();
            if s.write_all(req.as_bytes()).is_ok()
                && s.read_to_string(&mut resp).is_ok()
                && resp.starts_with("HTTP/1.1 200")
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{what} on port {port} did not become healthy");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn scrape(port: u16) -> Result<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Sum of the samples of a metric family (`name{…} value` lines).
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The Dynamo-format global-router grid: ISL < 1024 tokens → prefill pool 0 (`short`), else 1 (`long`).
const GRID_JSON: &str = r#"{
  "mode": "disagg",
  "num_prefill_pools": 2,
  "num_decode_pools": 1,
  "prefill_pool_selection_strategy": {
    "ttft_min": 10, "ttft_max": 3000, "ttft_resolution": 1,
    "isl_min": 0, "isl_max": 2048, "isl_resolution": 2,
    "prefill_pool_mapping": [[0], [1]]
  },
  "decode_pool_selection_strategy": {
    "itl_min": 5, "itl_max": 100, "itl_resolution": 1,
    "context_length_min": 0, "context_length_max": 32768, "context_length_resolution": 1,
    "decode_pool_mapping": [[0]]
  }
}
"#;

fn router_config(port: u16, grid: &Path, workers: &[Worker]) -> String {
    let urls = |pool: &str| {
        workers
            .iter()
            .filter(|w| w.pool == pool)
            .map(|w| format!("\"http://127.0.0.1:{}\"", w.port))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"# Generated by `pdx demo`: Dynamo's hierarchical_planner layout (2 prefill pools, 1 decode pool).
host = "127.0.0.1"
port = {port}
threads = 1
orchestration = "vllm-nixl"

[[models]]
name = "mock"
global_router_config = "{grid}"

[[models.pools]]
name = "short"
role = "prefill"
policy = "kv_aware"
workers = [{short}]

[[models.pools]]
name = "long"
role = "prefill"
policy = "kv_aware"
workers = [{long}]

[[models.pools]]
name = "decode"
role = "decode"
policy = "least_loaded"
workers = [{decode}]
"#,
        grid = grid.display(),
        short = urls("short"),
        long = urls("long"),
        decode = urls("decode"),
    )
}

/// Runs `pdx demo`; its child processes log with the same `--log-level` and `--log-format`.
pub fn run(args: DemoArgs, log: &crate::logging::LogArgs) -> Result<()> {
    let _cleanup = Cleanup;
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: stopping the demo cluster");
        stop_children();
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;
    let exe = std::env::current_exe().context("locating the pdx binary")?;
    let dir = match &args.workdir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("pdx-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();

    let ports = ports(args.port_base)?;
    let workers = vec![
        Worker {
            pool: "short",
            role: "prefill",
            port: ports[0],
        },
        Worker {
            pool: "long",
            role: "prefill",
            port: ports[1],
        },
        Worker {
            pool: "decode",
            role: "decode",
            port: ports[2],
        },
        Worker {
            pool: "decode",
            role: "decode",
            port: ports[3],
        },
    ];
    let log_flags = [
        "--log-level".to_string(),
        log.log_level.clone(),
        "--log-format".to_string(),
        log.log_format.as_str().to_string(),
    ];
    eprintln!(
        "pdx demo: 2 prefill pools (short, long), 1 decode pool of 2 workers, router on loopback; logs in {}",
        dir.display()
    );
    for (i, w) in workers.iter().enumerate() {
        let mut args: Vec<String> = [
            "mock",
            "--role",
            w.role,
            "--host",
            "127.0.0.1",
            "--port",
            &w.port.to_string(),
            "--num-blocks",
            "16384",
            "--engine-id",
            &format!("{}-{i}", w.pool),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(log_flags.iter().cloned());
        spawn(&exe, &args, &dir.join(format!("{}-{i}.log", w.pool)))?;
    }
    let grid = dir.join("global_router_config.json");
    std::fs::write(&grid, GRID_JSON)?;
    let router_port = ports[4];
    let config = dir.join("pdx.toml");
    std::fs::write(&config, router_config(router_port, &grid, &workers))?;
    spawn(
        &exe,
        &[
            [
                "serve".into(),
                "--config".into(),
                config.display().to_string(),
            ]
            .as_slice(),
            log_flags.as_slice(),
        ]
        .concat(),
        &dir.join("router.log"),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for w in &workers {
        wait_healthy(w.port, "mock worker", deadline)?;
    }
    wait_healthy(router_port, "pdx serve", deadline)?;

    let replay = pdx_replay::ReplayArgs {
        url: format!("http://127.0.0.1:{router_port}"),
        trace: args.trace.clone(),
        model: Some("mock".into()),
        endpoint: pdx_replay::Endpoint::Chat,
        speed: args.speed,
        rate_curve: None,
        mean_rate: None,
        duration: None,
        max_requests: Some(args.max_requests),
        concurrency_limit: None,
        scale_tokens: args.scale_tokens,
        corpus: Vec::new(),
        slo_ttft_ms: Some(args.slo_ttft_ms),
        slo_itl_ms: Some(args.slo_itl_ms),
        timeout_secs: 60.0,
        no_ignore_eos: false,
        json: false,
        quiet: args.json,
        plot: None,
        export: None,
        max_failed_fraction: 0.0,
    };
    eprintln!(
        "replaying {} requests at {}x speed, lengths × {}",
        args.max_requests, args.speed, args.scale_tokens
    );
    let report = pdx_replay::run(&replay)?.report;
    let cluster = collect(&workers)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&DemoResult {
                report: &report,
                cluster: &cluster
            })?
        );
    } else {
        print!("{}", report.to_table());
        print!("{}", summarize(&cluster));
    }
    eprintln!(
        "demo finished in {:.1} s; every process stopped",
        started.elapsed().as_secs_f64()
    );
    let failed = report.failed();
    if failed > 0 {
        bail!("{failed} requests failed (logs in {})", dir.display());
    }
    Ok(())
}

/// Reads the workers' own counters. Prefill holds are released by the decode side's read notification,
/// which may land just after the last response: wait up to 2 s for them to drain.
fn collect(workers: &[Worker]) -> Result<ClusterCounters> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut c = ClusterCounters::default();
        for w in workers {
            let m = scrape(w.port)?;
            *c.requests_by_pool
                .entry(w.pool.to_string())
                .or_default()
                .entry(w.port)
                .or_default() += metric_sum(&m, "vllm:request_success_total");
            if w.role == "decode" {
                c.kv_blocks_received += metric_sum(&m, "pdx:kv_blocks_received_total");
                c.kv_bytes_received += metric_sum(&m, "pdx:kv_bytes_received_total");
                c.kv_transfer_errors += metric_sum(&m, "pdx:kv_transfer_errors_total");
            } else {
                c.prefill_prefix_hits += metric_sum(&m, "vllm:prefix_cache_hits_total");
                c.prefill_prefix_queries += metric_sum(&m, "vllm:prefix_cache_queries_total");
                c.prefill_blocks_still_held += metric_sum(&m, "pdx:kv_blocks_held");
            }
        }
        if c.prefill_blocks_still_held == 0.0 || Instant::now() > deadline {
            return Ok(c);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The counters as text.
fn summarize(c: &ClusterCounters) -> String {
    let mut s = format!(
        "KV moved prefill → decode by pdx-transfer: {:.0} blocks, {:.1} MiB, every byte verified ({:.0} transfer errors; {:.0} blocks left unread)\n",
        c.kv_blocks_received,
        c.kv_bytes_received / (1 << 20) as f64,
        c.kv_transfer_errors,
        c.prefill_blocks_still_held,
    );
    s += &format!(
        "prefix-cache hit rate at prefill: {:.1}% of prompt tokens\n",
        if c.prefill_prefix_queries > 0.0 {
            100.0 * c.prefill_prefix_hits / c.prefill_prefix_queries
        } else {
            0.0
        }
    );
    s += "requests by pool and worker:";
    for (pool, ws) in &c.requests_by_pool {
        let total: f64 = ws.values().sum();
        let each: Vec<String> = ws.iter().map(|(p, n)| format!(":{p} {n:.0}")).collect();
        s += &format!("  {pool} {total:.0} ({})", each.join(", "));
    }
    s + "\n"
}
