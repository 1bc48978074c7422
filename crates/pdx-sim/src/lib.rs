//! `pdx sim`: a discrete-event simulator in virtual time that runs pdx's own decision code on a
//! request trace, for clusters of any size:
//!
//! * the global router grid (`pdx_router_core::grid`) and the pools' local policies
//!   (`pdx_router_core::policy`), fed the router's view of in-flight load;
//! * per worker, `pdx mock`'s sans-IO continuous-batching scheduler
//!   (`pdx_mock::scheduler::Scheduler`) timed by its `TimingProfile`, and its KV block manager
//!   with prefix caching (`pdx_mock::kv_cache::BlockManager`);
//! * the KV handoff between prefill and decode as `latency + bytes / bandwidth`;
//! * optionally the planner (`pdx_planner`) with the `virtual` connector: workers added or
//!   drained in virtual time, with a startup delay.
//!
//! It prints `pdx replay`'s report (built by `pdx_replay::report`), plus per-pool counts and
//! GPU-hours. See `docs/planner.md`.
#![forbid(unsafe_code)]

pub mod config;
pub mod engine;
pub mod profile;
pub mod workload;

pub use config::Cluster;
pub use engine::{PoolSummary, RunOptions, Sim, SimOutput, TimelinePoint};

use pdx_planner::Planner;
use pdx_replay::rate::RateCurve;
use pdx_replay::Slo;
use std::path::PathBuf;

/// Errors of the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The cluster file is unreadable or inconsistent (fatal).
    #[error("cluster config: {0}")]
    Config(String),
    /// Bad arguments or an empty workload (fatal).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The trace could not be read or reshaped (fatal).
    #[error(transparent)]
    Replay(#[from] pdx_replay::ReplayError),
    /// The planner configuration is invalid (fatal).
    #[error(transparent)]
    Planner(#[from] pdx_planner::PlannerError),
}

/// `pdx sim` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct SimArgs {
    /// Cluster file (TOML): pools, workers and their profiles, grid, KV handoff, planner.
    #[arg(long)]
    pub cluster: PathBuf,
    /// Trace file (Mooncake jsonl or Azure CSV). Default: the Mooncake slice shipped with pdx.
    #[arg(long, conflicts_with = "synthetic")]
    pub trace: Option<PathBuf>,
    /// Synthetic workload instead of a trace:
    /// `requests=N,rate=R,isl=I,osl=O[,long_isl=L,long_fraction=F,jitter=J,seed=S]`.
    #[arg(long)]
    pub synthetic: Option<String>,
    /// Re-time arrivals to a rate curve: `diurnal:period=S,ratio=K[,phase=F]` or
    /// `steps:T0=M0,T1=M1,...` (see `docs/planner.md`).
    #[arg(long)]
    pub rate_curve: Option<String>,
    /// Mean arrival rate after `--rate-curve`, req/s (default: the trace's own).
    #[arg(long, requires = "rate_curve")]
    pub mean_rate: Option<f64>,
    /// Time factor, as `pdx replay --speed`.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Only requests arriving within this many seconds (after `--speed`).
    #[arg(long)]
    pub duration: Option<f64>,
    /// At most this many requests.
    #[arg(long)]
    pub max_requests: Option<usize>,
    /// Multiply input and output lengths by this factor, as `pdx replay --scale-tokens`.
    #[arg(long, default_value_t = 1.0)]
    pub scale_tokens: f64,
    /// Prompts as `/v1/completions` sends them (no chat-template tokens).
    #[arg(long)]
    pub completions: bool,
    /// TTFT target for SLO attainment and goodput, ms.
    #[arg(long)]
    pub slo_ttft_ms: Option<f64>,
    /// ITL (TPOT) target, ms.
    #[arg(long)]
    pub slo_itl_ms: Option<f64>,
    /// Ignore the cluster file's `[planner]`: static pools.
    #[arg(long)]
    pub no_planner: bool,
    /// Ignore the planner's diversions (capped pools keep all the grid sends them).
    #[arg(long)]
    pub no_divert: bool,
    /// Override the planner's GPU budget.
    #[arg(long)]
    pub budget_gpus: Option<u64>,
    /// Seed of `power_of_two` choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Write a PNG of TTFT and TPOT per request over (virtual) time.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Write the planner's decisions and inputs, one JSON object per interval.
    #[arg(long)]
    pub planner_log: Option<PathBuf>,
    /// Write a PNG of the arrival rate and each pool's replicas over time.
    #[arg(long)]
    pub planner_plot: Option<PathBuf>,
}

/// The requests of a run: trace or synthetic, reshaped to a rate curve, shaped as `pdx replay`.
///
/// Errors: unreadable or bad traces, bad specs.
pub fn workload(a: &SimArgs) -> Result<Vec<workload::SimRequest>, SimError> {
    let mut trace = match (&a.synthetic, &a.trace) {
        (Some(spec), _) => spec.parse::<workload::Synthetic>()?.trace(),
        (None, Some(p)) => {
            pdx_replay::trace::parse(
                &std::fs::read_to_string(p)
                    .map_err(|e| pdx_replay::ReplayError::Trace(format!("{}: {e}", p.display())))?,
            )?
            .requests
        }
        (None, None) => pdx_replay::trace::parse(pdx_replay::MOONCAKE_CONVERSATION_SLICE)?.requests,
    };
    if let Some(spec) = &a.rate_curve {
        let curve: RateCurve = spec.parse()?;
        pdx_replay::rate::reshape(&mut trace, &curve, a.mean_rate)?;
    }
    workload::from_trace(
        trace,
        &workload::Shaping {
            speed: a.speed,
            duration_s: a.duration,
            max_requests: a.max_requests,
            scale_tokens: a.scale_tokens,
            overhead_tokens: if a.completions {
                0
            } else {
                pdx_tokens::CHAT_OVERHEAD_TOKENS as u32
            },
        },
    )
}

/// The planner of a cluster, its pools' missing profiles derived from their workers' timing
/// models ([`profile::derive`]) and a `gpus_per_replica` left at its default of 1 taken from
/// the pool's `gpus_per_worker`; `None` without a `[planner]`.
///
/// Errors: [`SimError::Planner`] for an invalid planner config.
pub fn planner(cluster: &Cluster, budget: Option<u64>) -> Result<Option<Planner>, SimError> {
    let Some(mut cfg) = cluster.planner.clone() else {
        return Ok(None);
    };
    if let Some(b) = budget {
        cfg.budget_gpus = b;
    }
    for pp in &mut cfg.pools {
        if pp.profile.prefill.is_empty() && pp.profile.decode.is_empty() {
            if let Some(p) = cluster.pools.iter().find(|p| p.spec.name == pp.name) {
                pp.profile = profile::derive(&p.profile, p.spec.num_blocks, cluster.block_size);
            }
        }
        if pp.gpus_per_replica == 1 {
            if let Some(p) = cluster.pools.iter().find(|p| p.spec.name == pp.name) {
                pp.gpus_per_replica = p.spec.gpus_per_worker;
            }
        }
    }
    Ok(Some(Planner::new(cfg)?))
}

/// Runs `pdx sim`: loads the cluster and workload, simulates, returns the output.
///
/// Errors: [`SimError`] for bad files or arguments.
pub fn run(a: &SimArgs) -> Result<SimOutput, SimError> {
    let cluster = Cluster::load(&a.cluster)?;
    let reqs = workload(a)?;
    let planner = if a.no_planner {
        None
    } else {
        planner(&cluster, a.budget_gpus)?
    };
    let opts = RunOptions {
        slo: Slo {
            ttft_ms: a.slo_ttft_ms,
            itl_ms: a.slo_itl_ms,
        },
        progress: !(a.quiet || a.json),
        seed: a.seed,
        no_divert: a.no_divert,
    };
    Ok(Sim::new(&cluster, &reqs, planner, &opts)?.run())
}

impl SimOutput {
    /// The report as `pdx replay` prints it, then per-pool counts and GPU-hours.
    pub fn to_table(&self) -> String {
        let mut s = self.report.to_table();
        s += "pool            role        requests  workers(min-max)  GPU-hours\n";
        for p in &self.pools {
            s += &format!(
                "{:<15} {:<11} {:>8}  {:>7}-{:<8} {:>9.3}\n",
                p.name,
                format!("{:?}", p.role).to_lowercase(),
                p.requests,
                p.min_workers,
                p.max_workers,
                p.gpu_hours
            );
        }
        s += &format!("GPU-hours total {:.3}\n", self.gpu_hours);
        s
    }

    /// The planner plot's panels: arrival rate, then replicas per pool.
    pub fn planner_panels(&self, pool_names: &[String]) -> Vec<pdx_replay::plot::Panel> {
        let rate = self.timeline.iter().map(|t| (t.at_s, t.rate)).collect();
        let replicas = pool_names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                (
                    n.clone(),
                    self.timeline
                        .iter()
                        .map(|t| (t.at_s, f64::from(t.replicas[i])))
                        .collect(),
                )
            })
            .collect();
        vec![
            ("arrivals (req/s)".into(), vec![("rate".into(), rate)]),
            ("workers".into(), replicas),
        ]
    }
}
