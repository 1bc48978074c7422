//! `pdx plan`: the planner against a live `pdx serve` (see `docs/planner.md`).
//!
//! The plan file (TOML):
//! ```toml
//! router = "http://127.0.0.1:8000"   # pdx serve (overridden by --router)
//! model = "mock"                     # model the local workers serve
//! connector = "local"                # or "none": decide and log only
//! [planner]                          # pdx_planner::PlannerConfig, as in a pdx sim cluster file
//! [local]                            # pdx_planner::live::LocalConfig
//! [[local.pools]]
//! name = "prefill"
//! args = ["--profile", "slow.toml"]  # extra pdx mock flags
//! ```
//! A planned pool without a profile gets one derived from its workers' `pdx mock` profile
//! (`--profile`, `--num-blocks` among its `args`; defaults otherwise).

use pdx_planner::live::{Collector, LiveOptions, LocalConfig, LocalConnector};
use pdx_planner::{Planner, PlannerConfig};
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `pdx plan` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct PlanArgs {
    /// Plan file (TOML): router, model, `[planner]`, `[local]`.
    #[arg(long)]
    pub config: std::path::PathBuf,
    /// Router URL (overrides the file's).
    #[arg(long)]
    pub router: Option<String>,
    /// Stop after this many seconds (default: until SIGINT/SIGTERM).
    #[arg(long)]
    pub duration_secs: Option<f64>,
    /// Write decisions here, one JSON object per interval (default: standard output).
    #[arg(long)]
    pub log: Option<std::path::PathBuf>,
    /// Serve the last decision as Prometheus gauges on `GET /metrics` at this port (loopback
    /// unless `--metrics-host`).
    #[arg(long)]
    pub metrics_port: Option<u16>,
    /// Address of the metrics listener.
    #[arg(long, default_value = "127.0.0.1")]
    pub metrics_host: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    #[serde(default)]
    router: Option<String>,
    #[serde(default = "mock")]
    model: String,
    #[serde(default = "local")]
    connector: String,
    planner: PlannerConfig,
    #[serde(default)]
    local: Option<LocalConfig>,
}

fn mock() -> String {
    "mock".into()
}
fn local() -> String {
    "local".into()
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// A plan file loaded, its planned pools' profiles filled in.
struct Loaded {
    planner: Planner,
    router: Option<String>,
    model: String,
    connector: String,
    local: LocalConfig,
}

/// Reads a plan file and derives the missing profiles.
fn load(path: &std::path::Path) -> anyhow::Result<Loaded> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut f: PlanFile =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let local_cfg = f.local.clone().unwrap_or(LocalConfig {
        pdx: None,
        host: "127.0.0.1".into(),
        heartbeat_secs: 1.0,
        pools: vec![],
    });
    let base = path.parent().unwrap_or(std::path::Path::new("."));
    for p in &mut f.planner.pools {
        if !(p.profile.prefill.is_empty() && p.profile.decode.is_empty()) {
            continue;
        }
        let args = local_cfg
            .pools
            .iter()
            .find(|l| l.name == p.name)
            .map(|l| l.args.clone())
            .unwrap_or_default();
        let profile = match flag(&args, "--profile") {
            Some(path) => pdx_mock::Profile::load(&base.join(path))?,
            None => pdx_mock::Profile::default(),
        };
        let blocks = flag(&args, "--num-blocks")
            .map(str::parse)
            .transpose()?
            .unwrap_or(2048);
        p.profile = pdx_sim::profile::derive(&profile, blocks, 16);
    }
    if !matches!(f.connector.as_str(), "none" | "local") {
        anyhow::bail!("unknown connector `{}` (local, none)", f.connector);
    }
    Ok(Loaded {
        planner: Planner::new(f.planner)?,
        router: f.router,
        model: f.model,
        connector: f.connector,
        local: local_cfg,
    })
}

/// The planner loop of `pdx plan` and `pdx serve --planner`: until `opts` says stop, with
/// the file's connector against `router`.
fn drive(l: Loaded, router: &str, opts: LiveOptions) -> anyhow::Result<()> {
    let collector = Collector::new(router);
    if l.connector == "local" {
        let roles = l
            .planner
            .config()
            .pools
            .iter()
            .map(|p| (p.name.clone(), p.role))
            .collect();
        let mut conn = LocalConnector::new(router, &l.model, l.local, roles)?;
        pdx_planner::live::run(l.planner, collector, Some(&mut conn), opts)?;
    } else {
        pdx_planner::live::run(l.planner, collector, None, opts)?;
    }
    Ok(())
}

fn open_log(path: Option<&std::path::Path>) -> anyhow::Result<Box<dyn std::io::Write + Send>> {
    Ok(match path {
        Some(p) => {
            Box::new(std::fs::File::create(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?)
        }
        None => Box::new(std::io::stdout()),
    })
}

/// Runs `pdx plan`.
pub fn run(a: &PlanArgs) -> anyhow::Result<()> {
    let l = load(&a.config)?;
    let router = a
        .router
        .clone()
        .or(l.router.clone())
        .ok_or_else(|| anyhow::anyhow!("no router URL (--router or `router =` in the file)"))?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed));
    }
    let log = open_log(a.log.as_deref())?;
    let export = match a.metrics_port {
        Some(port) => {
            let x = pdx_planner::live::export::Exported::default();
            x.serve(std::net::TcpListener::bind((
                a.metrics_host.as_str(),
                port,
            ))?)?;
            Some(x)
        }
        None => None,
    };
    let opts = LiveOptions {
        duration: a.duration_secs.map(std::time::Duration::from_secs_f64),
        stop,
        log,
        export,
    };
    drive(l, &router, opts)
}

/// `pdx serve`, with `--planner FILE`: the router and, in a background thread, the planner
/// loop of `pdx plan` on the same plan file against the router's own address (loopback;
/// the file's `router` is ignored). On SIGTERM/SIGINT the router drains first (the
/// planner's workers keep serving what is in flight), then the planner stops and its
/// `local` connector stops the workers it started.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeCmd {
    #[command(flatten)]
    pub serve: pdx_router::ServeArgs,
    /// Plan file (as `pdx plan --config` reads): run the planner inside the router process.
    #[arg(long)]
    pub planner: Option<std::path::PathBuf>,
    /// With `--planner`: write decisions here, one JSON object per interval (default:
    /// standard output).
    #[arg(long, requires = "planner")]
    pub planner_log: Option<std::path::PathBuf>,
}

/// Runs `pdx serve [--planner FILE]`.
pub fn serve(a: ServeCmd) -> anyhow::Result<()> {
    let Some(path) = &a.planner else {
        return Ok(pdx_router::run(a.serve)?);
    };
    // Bad plan files fail before the router listens.
    let l = load(path)?;
    let log = open_log(a.planner_log.as_deref())?;
    let server = pdx_router::start(a.serve)?;
    let ip = match server.addr.ip() {
        std::net::IpAddr::V4(v) if v.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v) if v.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let router = format!(
        "http://{}",
        std::net::SocketAddr::new(ip, server.addr.port())
    );
    let stop = Arc::new(AtomicBool::new(false));
    let opts = LiveOptions {
        duration: None,
        stop: stop.clone(),
        log,
        export: None,
    };
    tracing::info!(%router, plan = %path.display(), "planner starting in the router process");
    let planner = std::thread::Builder::new()
        .name("pdx-planner".into())
        .spawn(move || {
            if let Err(e) = drive(l, &router, opts) {
                tracing::error!(error = format!("{e:#}"), "planner stopped");
            }
        })?;
    let served = pdx_router::serve_until_signal(server);
    stop.store(true, Ordering::Relaxed);
    let _ = planner.join();
    Ok(served?)
}
