//! The cluster file of `pdx sim` (TOML): pools of workers, each worker with its own `pdx mock`
//! profile (timing model, scheduler limits, model shape), the global router grid, the KV
//! handoff model and, optionally, the planner.
//!
//! ```toml
//! block_size = 16                      # tokens per KV block (pdx serve's and pdx mock's 16)
//! grid = "global_router_config.json"   # Dynamo grid (path, relative to this file); optional
//! [kv_handoff]                         # prefill → decode KV move: bytes / bandwidth + latency
//! bandwidth_gbps = 10.0                # GB/s (10^9 bytes per second)
//! latency_us = 200.0
//! kv_scale_down = 16                   # as `pdx mock --kv-scale-down` (bytes per token ÷ this)
//! [[pools]]
//! name = "prefill"
//! role = "prefill"                     # prefill | decode | aggregated
//! policy = "least_loaded"              # the pool's local router policy (pdx serve's)
//! workers = 4                          # workers with the pool profile
//! gpus_per_worker = 1
//! num_blocks = 2048                    # KV blocks per worker (pdx mock --num-blocks)
//! startup_secs = 30                    # a worker added by the planner serves after this
//! profile = { timing = { step_overhead_us = 2000.0 } }   # pdx mock profile, or profile_file
//! [[pools.worker]]                     # more workers with their own profiles
//! count = 1
//! profile = { timing = { prefill_token_us = 4.4 } }
//! [planner]                            # optional: pdx_planner::PlannerConfig
//! ```
//! Fault settings of a profile are ignored: the simulator models no faults.

use crate::SimError;
use pdx_mock::profile::Profile;
use pdx_planner::{PlannerConfig, PoolRole};
use pdx_router_core::{GlobalRouterConfig, Policy};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The KV handoff model: `latency_us + bytes / bandwidth`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvHandoff {
    /// Bandwidth, GB/s (10⁹ bytes per second).
    pub bandwidth_gbps: f64,
    /// Fixed cost of one handoff (side channel, descriptor exchange, notification), µs.
    pub latency_us: f64,
    /// KV bytes per token are the model's divided by this (`pdx mock --kv-scale-down`).
    pub kv_scale_down: u32,
}

impl Default for KvHandoff {
    fn default() -> Self {
        Self {
            bandwidth_gbps: 10.0,
            latency_us: 200.0,
            kv_scale_down: 16,
        }
    }
}

impl KvHandoff {
    /// Time to move `bytes` of KV, ns.
    pub fn duration_ns(&self, bytes: u64) -> u64 {
        (self.latency_us * 1e3 + bytes as f64 / self.bandwidth_gbps) as u64
    }
}

/// Extra workers of a pool with their own profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerGroup {
    /// How many.
    #[serde(default = "one")]
    pub count: u32,
    /// Their profile (every field optional, defaults as `pdx mock`'s).
    #[serde(default)]
    pub profile: Option<Profile>,
    /// Or a profile file (TOML or JSON), relative to the cluster file.
    #[serde(default)]
    pub profile_file: Option<PathBuf>,
}

fn one() -> u32 {
    1
}
fn blocks() -> u32 {
    2048
}
fn policy() -> Policy {
    Policy::RoundRobin
}

/// One pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// Name (also the planner's pool name).
    pub name: String,
    /// Role.
    pub role: PoolRole,
    /// Local routing policy (default `round_robin`, as `pdx serve`).
    #[serde(default = "policy")]
    pub policy: Policy,
    /// Workers with the pool profile at the start.
    #[serde(default)]
    pub workers: u32,
    /// GPUs per worker (GPU-hours, the planner's budget).
    #[serde(default = "one")]
    pub gpus_per_worker: u32,
    /// KV blocks per worker.
    #[serde(default = "blocks")]
    pub num_blocks: u32,
    /// Seconds from a planner's "add" to the worker serving.
    #[serde(default)]
    pub startup_secs: f64,
    /// The pool profile (new workers the planner adds get it too).
    #[serde(default)]
    pub profile: Option<Profile>,
    /// Or a profile file, relative to the cluster file.
    #[serde(default)]
    pub profile_file: Option<PathBuf>,
    /// Workers with their own profiles, after the `workers` ones.
    #[serde(default)]
    pub worker: Vec<WorkerGroup>,
}

/// The grid: a path to Dynamo's JSON, or the same object inline.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum GridSpec {
    /// Path, relative to the cluster file.
    Path(PathBuf),
    /// Inline.
    Inline(Box<GlobalRouterConfig>),
}

/// The cluster file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// Tokens per KV block.
    #[serde(default = "block_size")]
    pub block_size: u32,
    /// Global router grid.
    #[serde(default)]
    pub grid: Option<GridSpec>,
    /// KV handoff model.
    #[serde(default)]
    pub kv_handoff: KvHandoff,
    /// Pools, in the order the grid numbers them within each role.
    pub pools: Vec<PoolSpec>,
    /// The planner (none: static pools).
    #[serde(default)]
    pub planner: Option<PlannerConfig>,
}

fn block_size() -> u32 {
    16
}

/// A pool after loading: profiles resolved.
#[derive(Debug, Clone)]
pub struct Pool {
    /// The spec.
    pub spec: PoolSpec,
    /// The pool profile (also that of workers added later).
    pub profile: Profile,
    /// One profile per initial worker.
    pub workers: Vec<Profile>,
}

/// A loaded, checked cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Tokens per KV block.
    pub block_size: u32,
    /// Grid, if any.
    pub grid: Option<GlobalRouterConfig>,
    /// KV handoff model.
    pub kv_handoff: KvHandoff,
    /// Pools.
    pub pools: Vec<Pool>,
    /// Planner settings.
    pub planner: Option<PlannerConfig>,
}

fn load_profile(
    base: &Path,
    inline: &Option<Profile>,
    file: &Option<PathBuf>,
    fallback: &Profile,
) -> Result<Profile, SimError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(SimError::Config(
            "give a profile or a profile_file, not both".into(),
        )),
        (Some(p), None) => Ok(p.clone()),
        (None, Some(f)) => {
            Profile::load(&base.join(f)).map_err(|e| SimError::Config(e.to_string()))
        }
        (None, None) => Ok(fallback.clone()),
    }
}

impl Cluster {
    /// Reads and checks a cluster file.
    ///
    /// Errors: [`SimError::Config`] for unreadable files, syntax errors, unknown keys and
    /// inconsistent settings.
    pub fn load(path: &Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SimError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, base)
    }

    /// Parses and checks a cluster from TOML text; relative paths are taken from `base`.
    ///
    /// Errors: as [`Cluster::load`].
    pub fn from_toml(text: &str, base: &Path) -> Result<Self, SimError> {
        let f: ClusterFile =
            toml::from_str(text).map_err(|e| SimError::Config(format!("cluster: {e}")))?;
        if f.block_size == 0 {
            return Err(SimError::Config("block_size must be > 0".into()));
        }
        let h = &f.kv_handoff;
        if !(h.bandwidth_gbps > 0.0 && h.latency_us >= 0.0 && h.kv_scale_down > 0) {
            return Err(SimError::Config(
                "kv_handoff needs bandwidth_gbps > 0, latency_us >= 0, kv_scale_down > 0".into(),
            ));
        }
        if f.pools.is_empty() {
            return Err(SimError::Config("no pools".into()));
        }
        let mut pools = Vec::new();
        for p in &f.pools {
            if pools.iter().any(|q: &Pool| q.spec.name == p.name) {
                return Err(SimError::Config(format!("pool {} twice", p.name)));
            }
            if p.gpus_per_worker == 0 || p.num_blocks == 0 {
                return Err(SimError::Config(format!(
                    "pool {}: gpus_per_worker and num_blocks must be > 0",
                    p.name
                )));
            }
            if !(p.startup_secs >= 0.0 && p.startup_secs.is_finite()) {
                return Err(SimError::Config(format!(
                    "pool {}: startup_secs must be >= 0",
                    p.name
                )));
            }
            let profile = load_profile(base, &p.profile, &p.profile_file, &Profile::default())?;
            let mut workers = vec![profile.clone(); p.workers as usize];
            for g in &p.worker {
                let wp = load_profile(base, &g.profile, &g.profile_file, &profile)?;
                workers.extend(std::iter::repeat_n(wp, g.count as usize));
            }
            pools.push(Pool {
                spec: p.clone(),
                profile,
                workers,
            });
        }
        let n = |r: PoolRole| pools.iter().filter(|p| p.spec.role == r).count();
        let (np, nd, na) = (
            n(PoolRole::Prefill),
            n(PoolRole::Decode),
            n(PoolRole::Aggregated),
        );
        if nd == 0 && na == 0 {
            return Err(SimError::Config(
                "need a decode or an aggregated pool".into(),
            ));
        }
        let grid = match &f.grid {
            None => None,
            Some(GridSpec::Inline(g)) => {
                g.validate().map_err(|e| SimError::Config(e.to_string()))?;
                Some((**g).clone())
            }
            Some(GridSpec::Path(p)) => {
                let t = std::fs::read_to_string(base.join(p))
                    .map_err(|e| SimError::Config(format!("grid {}: {e}", p.display())))?;
                Some(
                    GlobalRouterConfig::from_json(&t)
                        .map_err(|e| SimError::Config(e.to_string()))?,
                )
            }
        };
        if let Some(g) = &grid {
            if g.num_prefill_pools > np.max(1) || g.num_decode_pools > nd.max(1) {
                return Err(SimError::Config(format!(
                    "the grid names {} prefill and {} decode pools; the cluster has {np} and {nd}",
                    g.num_prefill_pools, g.num_decode_pools
                )));
            }
        }
        if let Some(pl) = &f.planner {
            for pp in &pl.pools {
                if !pools
                    .iter()
                    .any(|q| q.spec.name == pp.name && q.spec.role == pp.role)
                {
                    return Err(SimError::Config(format!(
                        "planner pool {} ({:?}) is not a pool of the cluster",
                        pp.name, pp.role
                    )));
                }
            }
        }
        Ok(Self {
            block_size: f.block_size,
            grid,
            kv_handoff: f.kv_handoff,
            pools,
            planner: f.planner,
        })
    }

    /// True when requests go prefill → decode (there is a decode pool).
    pub fn disaggregated(&self) -> bool {
        self.pools.iter().any(|p| p.spec.role == PoolRole::Decode)
    }
}
