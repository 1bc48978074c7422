//! `pdx-planner`: the hierarchical SLA planner of pdx, after NVIDIA Dynamo's SLA planner
//! (`components/planner`: load predictors, profile interpolation, correction factors,
//! connectors) and its hierarchical-planner example (pools chosen by the global router's
//! grid, one planner per pool, one GPU budget).
//!
//! The core is sans-IO: it is fed per-interval [`Observation`]s and answers with replica
//! targets; drivers collect the observations and apply the targets through a [`Connector`]:
//!
//! * [`predictor`]: next interval's request rate, ISL and OSL (`constant`, `holt`);
//! * [`profile`]: what one replica does (prefill TTFT and throughput vs ISL, decode ITL vs
//!   batch and context), interpolated;
//! * [`local`]: one pool's replicas at its SLO, with correction factors;
//! * [`global`]: the GPU budget split across pools;
//! * [`Planner`]: the local planners plus the global split, one call per interval;
//! * [`connector`]: the [`Connector`] trait (virtual in `pdx sim`, local processes,
//!   Kubernetes);
//! * [`live`]: `pdx plan`, the standalone driver reading `pdx serve`'s `/metrics` and
//!   registration API, and the local connector.
#![forbid(unsafe_code)]

pub mod connector;
pub mod error;
pub mod global;
pub mod live;
pub mod local;
pub mod predictor;
pub mod profile;

pub use connector::Connector;
pub use error::PlannerError;
pub use local::{LocalPlanner, Observation, PoolPlan, PoolRole, ReplicaRequest};
pub use predictor::{Predictor, PredictorKind};
pub use profile::{DecodePoint, PoolProfile, PrefillPoint};

use serde::{Deserialize, Serialize};

/// The planner's settings (TOML; the `[planner]` table of a `pdx sim` cluster file, or the
/// file of `pdx plan`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannerConfig {
    /// Adjustment interval, s (Dynamo's `adjustment_interval`, default 30).
    #[serde(default = "interval")]
    pub interval_secs: f64,
    /// GPUs all pools together may use.
    pub budget_gpus: u64,
    /// Load predictor of every pool (default: Holt, α = 0.5, β = 0.3).
    #[serde(default)]
    pub predictor: PredictorKind,
    /// The pools planned for.
    pub pools: Vec<PoolPlan>,
}

fn interval() -> f64 {
    30.0
}

impl PlannerConfig {
    /// Checks the interval, the predictor and every pool.
    ///
    /// Errors: [`PlannerError::Config`].
    pub fn validate(&mut self) -> Result<(), PlannerError> {
        if !(self.interval_secs.is_finite() && self.interval_secs > 0.0) {
            return Err(PlannerError::Config(
                "interval_secs must be positive".into(),
            ));
        }
        self.predictor.validate().map_err(PlannerError::Config)?;
        if self.pools.is_empty() {
            return Err(PlannerError::Config("no pools to plan".into()));
        }
        for (i, p) in self.pools.iter().enumerate() {
            if self.pools[..i].iter().any(|q| q.name == p.name) {
                return Err(PlannerError::Config(format!("pool {} twice", p.name)));
            }
        }
        for p in &mut self.pools {
            p.validate()?;
        }
        Ok(())
    }
}

/// One interval's decision, with its inputs (what `pdx plan` and `pdx sim` log per interval).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// Time of the decision, s (virtual time in `pdx sim`, since start in `pdx plan`).
    pub at_s: f64,
    /// What each pool observed over the interval that ended.
    pub observed: Vec<Observation>,
    /// What each pool asked for.
    pub requests: Vec<ReplicaRequest>,
    /// Replicas given to each pool within the budget.
    pub targets: Vec<u32>,
    /// GPUs the targets use.
    pub gpus: u64,
    /// Routing adjustments for pools the budget capped ([`global::diversions`]): the share of
    /// a capped pool's new requests the router should send to a pool of the same role with
    /// headroom, until the next decision.
    pub diversions: Vec<global::Diversion>,
}

/// The hierarchical planner: one [`LocalPlanner`] per pool and the global budget split.
#[derive(Debug, Clone)]
pub struct Planner {
    cfg: PlannerConfig,
    locals: Vec<LocalPlanner>,
}

impl Planner {
    /// A planner for a configuration.
    ///
    /// Errors: [`PlannerError::Config`] from [`PlannerConfig::validate`].
    pub fn new(mut cfg: PlannerConfig) -> Result<Self, PlannerError> {
        cfg.validate()?;
        let locals = cfg
            .pools
            .iter()
            .map(|p| LocalPlanner::new(p.clone(), cfg.predictor))
            .collect();
        Ok(Self { cfg, locals })
    }

    /// The configuration.
    pub fn config(&self) -> &PlannerConfig {
        &self.cfg
    }

    /// Feeds one interval (`observed[i]` is pool `i` of the configuration) and decides the next
    /// interval's replicas.
    pub fn step(&mut self, at_s: f64, observed: &[Observation]) -> Decision {
        let empty = Observation::default();
        let requests: Vec<ReplicaRequest> = self
            .locals
            .iter_mut()
            .enumerate()
            .map(|(i, l)| l.step(observed.get(i).unwrap_or(&empty)))
            .collect();
        // Each pool's share of its role's predicted traffic.
        let roles: Vec<PoolRole> = self.cfg.pools.iter().map(|p| p.role).collect();
        let share: Vec<f64> = (0..requests.len())
            .map(|i| {
                let same: Vec<usize> = (0..requests.len())
                    .filter(|&j| roles[j] == roles[i])
                    .collect();
                let total: f64 = same.iter().map(|&j| requests[j].rate).sum();
                if total > 0.0 {
                    requests[i].rate / total
                } else {
                    1.0 / same.len() as f64
                }
            })
            .collect();
        let targets = global::split(self.cfg.budget_gpus, &requests, &share);
        let diversions = global::diversions(&roles, &requests, &targets);
        let gpus = targets
            .iter()
            .zip(&requests)
            .map(|(&n, r)| u64::from(n) * u64::from(r.gpus_per_replica))
            .sum();
        Decision {
            at_s,
            observed: observed.to_vec(),
            requests,
            targets,
            gpus,
            diversions,
        }
    }

    /// Applies a decision through a connector (replica targets, then the diversions); errors are
    /// collected, not fatal.
    pub fn apply(&self, d: &Decision, conn: &mut dyn Connector) -> Vec<PlannerError> {
        let mut errs = Vec::new();
        for (p, &t) in self.cfg.pools.iter().zip(&d.targets) {
            if let Err(e) = conn.scale(&p.name, t) {
                tracing::warn!(pool = %p.name, target = t, error = %e, "scaling failed");
                errs.push(e);
            }
        }
        if let Err(e) = conn.divert(&d.diversions) {
            tracing::warn!(error = %e, "sending the diversions failed");
            errs.push(e);
        }
        errs
    }
}
