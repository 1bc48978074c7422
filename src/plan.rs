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

/// Runs `pdx plan`.
pub fn run(a: &PlanArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.config.display()))?;
    let mut f: PlanFile =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", a.config.display()))?;
    let router = a
        .router
        .clone()
        .or(f.router.clone())
        .ok_or_else(|| anyhow::anyhow!("no router URL (--router or `router =` in the file)"))?;
    let local_cfg = f.local.clone().unwrap_or(LocalConfig {
        pdx: None,
        host: "127.0.0.1".into(),
        heartbeat_secs: 1.0,
        pools: vec![],
    });
    let base = a.config.parent().unwrap_or(std::path::Path::new("."));
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
    let planner = Planner::new(f.planner)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed));
    }
    let log: Box<dyn std::io::Write + Send> = match &a.log {
        Some(p) => Box::new(std::fs::File::create(p)?),
        None => Box::new(std::io::stdout()),
    };
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
    let collector = Collector::new(&router);
    match f.connector.as_str() {
        "none" => pdx_planner::live::run(planner, collector, None, opts)?,
        "local" => {
            let roles = planner
                .config()
                .pools
                .iter()
                .map(|p| (p.name.clone(), p.role))
                .collect();
            let mut conn = LocalConnector::new(&router, &f.model, local_cfg, roles)?;
            pdx_planner::live::run(planner, collector, Some(&mut conn), opts)?;
        }
        other => anyhow::bail!("unknown connector `{other}` (local, none)"),
    }
    Ok(())
}
