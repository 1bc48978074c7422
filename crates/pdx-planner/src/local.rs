//! The local planner of one pool: every adjustment interval it observes the pool's load and
//! latencies, predicts the next interval's load and turns it into the replicas the pool needs
//! at its SLO, after Dynamo's SLA planner (`components/planner`, "Scaling Algorithm").
//!
//! Per interval, for a pool with predicted request rate `λ` (req/s), ISL and OSL (tokens):
//!
//! * **Prefill**: the service time of one prompt is `S = ttft(ISL) · c_p` (profile times the
//!   prefill correction factor; the correction scales latency only, not throughput). Queueing in front of a replica at utilisation `ρ` adds about
//!   `k·ρ/(2(1 − ρ))·S` (the M/D/1 mean wait, Pollaczek–Khinchine, times a tail factor
//!   `k = 2`), so the TTFT target `T` allows `ρ ≤ r/(1 + r)` with `r = 2(T/S − 1)/k`, capped at
//!   `max_utilization`. Replicas = `⌈λ·ISL / (tokens_per_s(ISL) · ρ)⌉`.
//! * **Decode**: the ITL target corrected as Dynamo does, `T' = T_itl / c_d`, gives the largest
//!   batch `B` a replica sustains at the mean context `ISL + OSL/2` (profile; the KV capacity
//!   caps it), decoding at `itl(B) ≤ T'`. Little's law gives the sequences decoding at once,
//!   `λ · OSL · itl(B)`, and replicas = `⌈λ·OSL·itl(B) / (B · max_utilization)⌉` (Dynamo's
//!   `λ·OSL / (B / itl(B))`, the throughput of one replica at the target).
//! * **Aggregated**: the sum of both (one engine does both phases).
//!
//! Correction factors (Dynamo: `actual_ttft / expected_ttft`, `actual_itl / expected_itl`)
//! compare the observed mean TTFT/ITL with what the profile expects at the observed load
//! (prefill: `S·(1 + k·ρ/(2(1 − ρ)))` at the observed utilisation; decode: the profile's ITL at
//! the observed batch per replica), are clamped (prefill `[0.5, 1.5]`, decode `[0.5, 2]`) and
//! smoothed (half old, half new), so a model that is off by a constant factor is learnt and
//! noise is damped.
//!
//! Load is predicted `lookahead` intervals ahead (1 + the pool's startup time in intervals):
//! a replica asked for now serves only after it started. The planned rate is never below the
//! rate just observed (scale down one interval late rather than under a falling trend's
//! extrapolation), and requests queued in the pool are added as rate to drain within one
//! interval (Dynamo plans for arrivals only; without this a backlog built during a surge
//! outlives it).
//! The result is clamped to `[min_replicas, max_replicas]`; the global planner then fits all
//! pools into the GPU budget.

use crate::predictor::{Predictor, PredictorKind};
use crate::profile::PoolProfile;
use crate::PlannerError;
use serde::{Deserialize, Serialize};

/// What a pool's workers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolRole {
    /// Prefill only (disaggregated).
    Prefill,
    /// Decode only (disaggregated).
    Decode,
    /// Both phases on one engine.
    Aggregated,
}

/// Tail factor `k` of the prefill queueing allowance.
const TAIL: f64 = 2.0;
/// Bounds of the prefill correction factor. Kept near 1 on the high side: a prefill pool's
/// TTFT also grows when the decode pool is short (prefill workers keep the KV of requests no
/// decode worker has room for, and run out of blocks), which more prefill replicas do not
/// fix. Dynamo applies only `min(1, c_p)` to its prefill demand for the same reason.
const PREFILL_CORRECTION: (f64, f64) = (0.5, 1.5);
/// Bounds of the decode correction factor.
const DECODE_CORRECTION: (f64, f64) = (0.5, 2.0);

/// Planner settings of one pool (TOML `[[pools]]` of the planner file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolPlan {
    /// Pool name, as `pdx serve` and `pdx sim` name it.
    pub name: String,
    /// Role of its workers.
    pub role: PoolRole,
    /// GPUs one replica (worker) uses.
    #[serde(default = "one")]
    pub gpus_per_replica: u32,
    /// Replicas the pool never goes below.
    #[serde(default = "one")]
    pub min_replicas: u32,
    /// Replicas the pool never goes above.
    #[serde(default = "many")]
    pub max_replicas: u32,
    /// Weight of the pool in the global budget split (higher wins GPUs first).
    #[serde(default = "unit")]
    pub priority: f64,
    /// TTFT target of the requests this pool serves, ms (prefill, aggregated).
    #[serde(default)]
    pub ttft_ms: Option<f64>,
    /// ITL target, ms (decode, aggregated).
    #[serde(default)]
    pub itl_ms: Option<f64>,
    /// Highest utilisation planned for, `0 < u ≤ 1` (default 0.85).
    #[serde(default = "utilization")]
    pub max_utilization: f64,
    /// How many intervals ahead the load is predicted for (default 2: the next interval and
    /// the time a new replica takes to start, when that is about one interval).
    #[serde(default = "two")]
    pub lookahead: f64,
    /// The pool's profile (in `pdx sim`, derived from its workers' timing model when absent).
    #[serde(default)]
    pub profile: PoolProfile,
}

fn one() -> u32 {
    1
}
fn many() -> u32 {
    1024
}
fn unit() -> f64 {
    1.0
}
fn two() -> f64 {
    2.0
}
fn utilization() -> f64 {
    0.85
}

impl PoolPlan {
    /// Checks ranges and the profile.
    ///
    /// Errors: [`PlannerError::Config`] naming the pool and the bad setting.
    pub fn validate(&mut self) -> Result<(), PlannerError> {
        let bad = |why: String| PlannerError::Config(format!("pool {}: {why}", self.name));
        if self.gpus_per_replica == 0 || self.min_replicas > self.max_replicas {
            return Err(bad(
                "need gpus_per_replica >= 1 and min_replicas <= max_replicas".into(),
            ));
        }
        if !(self.priority.is_finite() && self.priority > 0.0) {
            return Err(bad("priority must be positive".into()));
        }
        if !(self.lookahead.is_finite() && self.lookahead >= 1.0) {
            return Err(bad("lookahead must be >= 1 interval".into()));
        }
        if !(self.max_utilization > 0.0 && self.max_utilization <= 1.0) {
            return Err(bad("max_utilization must be within (0, 1]".into()));
        }
        let needs_prefill = self.role != PoolRole::Decode;
        let needs_decode = self.role != PoolRole::Prefill;
        if needs_prefill && (self.ttft_ms.is_none_or(|t| t.is_nan() || t <= 0.0)) {
            return Err(bad("needs a positive ttft_ms target".into()));
        }
        if needs_decode && (self.itl_ms.is_none_or(|t| t.is_nan() || t <= 0.0)) {
            return Err(bad("needs a positive itl_ms target".into()));
        }
        self.profile = std::mem::take(&mut self.profile).validated()?;
        if needs_prefill && self.profile.prefill.is_empty() {
            return Err(bad("its profile has no prefill points".into()));
        }
        if needs_decode && self.profile.decode.is_empty() {
            return Err(bad("its profile has no decode points".into()));
        }
        Ok(())
    }
}

/// What a pool did over one adjustment interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Length of the interval, s.
    pub interval_s: f64,
    /// Requests the pool received.
    pub requests: f64,
    /// Mean prompt length of those requests, tokens.
    pub isl: f64,
    /// Mean output length, tokens.
    pub osl: f64,
    /// Mean TTFT of requests whose first token came in the interval, ms (prefill pools).
    pub ttft_ms: Option<f64>,
    /// Mean ITL of tokens produced in the interval, ms (decode pools).
    pub itl_ms: Option<f64>,
    /// Replicas that served during the interval.
    pub replicas: u32,
    /// Requests waiting in the pool at the end of the interval (for KV blocks or a batch
    /// slot; vLLM's `num_requests_waiting` summed over the pool's workers).
    #[serde(default)]
    pub queued: f64,
}

/// A local planner's answer: what the pool wants, for the global planner.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaRequest {
    /// Pool name.
    pub pool: String,
    /// Replicas needed at the SLO for the predicted load (before min/max and budget).
    pub needed: f64,
    /// `needed` rounded up and clamped to `[min, max]`.
    pub desired: u32,
    /// Lower bound.
    pub min: u32,
    /// Upper bound.
    pub max: u32,
    /// GPUs per replica.
    pub gpus_per_replica: u32,
    /// Budget weight.
    pub priority: f64,
    /// Predicted request rate, req/s.
    pub rate: f64,
    /// Predicted ISL, tokens.
    pub isl: f64,
    /// Predicted OSL, tokens.
    pub osl: f64,
    /// Prefill correction factor in use.
    pub prefill_correction: f64,
    /// Decode correction factor in use.
    pub decode_correction: f64,
}

/// The local planner of one pool.
#[derive(Debug, Clone)]
pub struct LocalPlanner {
    plan: PoolPlan,
    rate: Predictor,
    isl: Predictor,
    osl: Predictor,
    c_prefill: f64,
    c_decode: f64,
}

fn smooth(old: f64, observed: f64, bounds: (f64, f64)) -> f64 {
    if !observed.is_finite() || observed <= 0.0 {
        return old;
    }
    0.5 * old + 0.5 * observed.clamp(bounds.0, bounds.1)
}

impl LocalPlanner {
    /// A planner for `plan` (validated) with the given predictor for rate, ISL and OSL.
    pub fn new(plan: PoolPlan, predictor: PredictorKind) -> Self {
        Self {
            plan,
            rate: Predictor::new(predictor),
            isl: Predictor::new(predictor),
            osl: Predictor::new(predictor),
            c_prefill: 1.0,
            c_decode: 1.0,
        }
    }

    /// The pool's settings.
    pub fn plan(&self) -> &PoolPlan {
        &self.plan
    }

    /// Allowed prefill utilisation for service time `s_ms` under TTFT target `t_ms`.
    fn prefill_rho(&self, s_ms: f64, t_ms: f64) -> f64 {
        let cap = self.plan.max_utilization;
        if s_ms >= t_ms {
            // The target cannot be met by adding replicas; plan for a moderate queue.
            return (0.5f64).min(cap);
        }
        let r = 2.0 * (t_ms / s_ms - 1.0) / TAIL;
        (r / (1.0 + r)).clamp(0.05, cap)
    }

    /// Replicas needed for a load (`rate` req/s, `isl`, `osl` tokens) with the current
    /// correction factors.
    pub fn replicas_for(&self, rate: f64, isl: f64, osl: f64) -> f64 {
        if rate <= 0.0 {
            return 0.0;
        }
        let p = &self.plan;
        let prof = &p.profile;
        let mut need = 0.0;
        if p.role != PoolRole::Decode {
            let t = p.ttft_ms.unwrap_or(f64::INFINITY);
            let s = prof.prefill_service_ms(isl) * self.c_prefill;
            let rho = self.prefill_rho(s, t);
            // The correction scales the latency model only: a replica's busy throughput is
            // what the profile measured, and the queueing model, not the engine, is what
            // observed latencies mostly correct.
            let tps = prof.prefill_tokens_per_s(isl);
            need += rate * isl / (tps * rho).max(1e-9);
        }
        if p.role != PoolRole::Prefill {
            let target = p.itl_ms.unwrap_or(f64::INFINITY) / self.c_decode;
            let ctx = isl + osl / 2.0;
            let batch = prof.decode_batch_at(ctx, target).max(1.0);
            // The ITL at that batch: at most the target, less when the KV capacity or
            // `max_num_seqs` caps the batch first.
            let itl = (prof.decode_itl_ms(ctx, batch) * self.c_decode).min(target);
            let concurrent = rate * osl * itl / 1000.0;
            need += concurrent / (batch * p.max_utilization);
        }
        need
    }

    /// Updates the correction factors from an interval's observation.
    fn correct(&mut self, o: &Observation) {
        let p = &self.plan;
        if o.interval_s <= 0.0 || o.replicas == 0 || o.requests <= 0.0 {
            return;
        }
        let rate = o.requests / o.interval_s;
        let n = f64::from(o.replicas);
        if let (Some(ttft), true) = (o.ttft_ms, p.role != PoolRole::Decode) {
            let s = p.profile.prefill_service_ms(o.isl);
            let rho = (rate * o.isl / (n * p.profile.prefill_tokens_per_s(o.isl))).min(0.95);
            let expected = s * (1.0 + TAIL * rho / (2.0 * (1.0 - rho)));
            self.c_prefill = smooth(self.c_prefill, ttft / expected, PREFILL_CORRECTION);
        }
        if let (Some(itl), true) = (o.itl_ms, p.role != PoolRole::Prefill) {
            let ctx = o.isl + o.osl / 2.0;
            let batch = (rate * o.osl * itl / 1000.0 / n).max(1.0);
            let expected = p.profile.decode_itl_ms(ctx, batch);
            self.c_decode = smooth(self.c_decode, itl / expected, DECODE_CORRECTION);
        }
    }

    /// Feeds the interval that just ended and returns the request for the next one.
    /// Before any traffic was seen the pool asks for its minimum.
    pub fn step(&mut self, o: &Observation) -> ReplicaRequest {
        if o.interval_s > 0.0 {
            self.rate.observe(o.requests / o.interval_s);
            if o.requests > 0.0 {
                self.isl.observe(o.isl);
                self.osl.observe(o.osl);
            }
        }
        self.correct(o);
        // Scale up ahead of a rising load, but not down below what was just seen (a falling
        // trend extrapolated to the trough undershoots it), plus what is queued, to be drained
        // within one interval.
        let ahead = self.rate.predict_ahead(self.plan.lookahead).unwrap_or(0.0);
        let seen = if o.interval_s > 0.0 {
            o.requests / o.interval_s
        } else {
            0.0
        };
        let backlog = if o.interval_s > 0.0 {
            o.queued.max(0.0) / o.interval_s
        } else {
            0.0
        };
        let rate = ahead.max(seen) + backlog;
        let isl = self.isl.predict().unwrap_or(0.0).max(1.0);
        let osl = self.osl.predict().unwrap_or(0.0).max(1.0);
        let needed = self.replicas_for(rate, isl, osl);
        let p = &self.plan;
        let desired =
            (needed.ceil().min(f64::from(u32::MAX)) as u32).clamp(p.min_replicas, p.max_replicas);
        ReplicaRequest {
            pool: p.name.clone(),
            needed,
            desired,
            min: p.min_replicas,
            max: p.max_replicas,
            gpus_per_replica: p.gpus_per_replica,
            priority: p.priority,
            rate,
            isl,
            osl,
            prefill_correction: self.c_prefill,
            decode_correction: self.c_decode,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{DecodePoint, PrefillPoint};

    pub(crate) fn prefill_plan() -> PoolPlan {
        let mut p = PoolPlan {
            name: "p".into(),
            role: PoolRole::Prefill,
            gpus_per_replica: 1,
            min_replicas: 1,
            max_replicas: 100,
            priority: 1.0,
            ttft_ms: Some(500.0),
            itl_ms: None,
            max_utilization: 0.9,
            lookahead: 1.0,
            profile: PoolProfile {
                prefill: vec![PrefillPoint {
                    isl: 1000.0,
                    ttft_ms: 100.0,
                    tokens_per_s: 10_000.0,
                }],
                decode: vec![],
            },
        };
        p.validate().unwrap();
        p
    }

    fn decode_plan() -> PoolPlan {
        let mut p = PoolPlan {
            name: "d".into(),
            role: PoolRole::Decode,
            ttft_ms: None,
            itl_ms: Some(20.0),
            max_utilization: 1.0,
            profile: PoolProfile {
                prefill: vec![],
                decode: vec![
                    DecodePoint {
                        context: 1000.0,
                        batch: 1.0,
                        itl_ms: 10.0,
                    },
                    DecodePoint {
                        context: 1000.0,
                        batch: 11.0,
                        itl_ms: 20.0,
                    },
                ],
            },
            ..prefill_plan()
        };
        p.validate().unwrap();
        p
    }

    fn obs(rate: f64, isl: f64, osl: f64) -> Observation {
        Observation {
            interval_s: 10.0,
            requests: rate * 10.0,
            isl,
            osl,
            ttft_ms: None,
            itl_ms: None,
            replicas: 0,
            queued: 0.0,
        }
    }

    #[test]
    fn prefill_replicas_follow_load_and_target() {
        let mut lp = LocalPlanner::new(prefill_plan(), PredictorKind::Constant);
        // 20 req/s × 1000 tokens = 20,000 tok/s; T/S = 5 → r = 4, ρ = 0.8; 20k / 8k = 2.5 → 3.
        let r = lp.step(&obs(20.0, 1000.0, 10.0));
        assert!((r.needed - 2.5).abs() < 1e-9, "{}", r.needed);
        assert_eq!(r.desired, 3);
        // Twice the load: twice the replicas.
        assert_eq!(lp.step(&obs(40.0, 1000.0, 10.0)).desired, 5);
        // No load: the minimum.
        assert_eq!(lp.step(&obs(0.0, 1000.0, 10.0)).desired, 1);
        // No arrivals but 200 requests queued: drained within the interval (20 req/s).
        let mut q = obs(0.0, 1000.0, 10.0);
        q.queued = 200.0;
        assert_eq!(lp.step(&q).desired, 3);
    }

    #[test]
    fn decode_replicas_from_littles_law() {
        let mut lp = LocalPlanner::new(decode_plan(), PredictorKind::Constant);
        // 11 req/s × 100 tokens × 20 ms = 22 sequences at once; 11 per replica → 2.
        let r = lp.step(&obs(11.0, 950.0, 100.0));
        assert!((r.needed - 2.0).abs() < 1e-9, "{}", r.needed);
        assert_eq!(r.desired, 2);
    }

    #[test]
    fn slow_observed_prefill_raises_the_correction_and_the_replicas() {
        let mut lp = LocalPlanner::new(prefill_plan(), PredictorKind::Constant);
        let base = lp.step(&obs(20.0, 1000.0, 10.0)).needed;
        let mut o = obs(20.0, 1000.0, 10.0);
        o.replicas = 3;
        // Expected at ρ = 20k/30k: 100 · (1 + 2 · (2/3) / (2 · 1/3)) = 300 ms; observed 600 → 2,
        // clamped to 1.5: 1.5 times the service time, so a lower utilisation is allowed.
        o.ttft_ms = Some(600.0);
        let mut last = base;
        for _ in 0..8 {
            let r = lp.step(&o);
            assert!(r.needed >= last - 1e-9);
            last = r.needed;
        }
        assert!(last > 1.1 * base, "{last} vs {base}");
        assert!(lp.c_prefill > 1.49 && lp.c_prefill <= 1.5);
        // Faster than expected: the factor falls back, never under 0.5.
        o.ttft_ms = Some(1.0);
        for _ in 0..20 {
            lp.step(&o);
        }
        assert!((lp.c_prefill - 0.5).abs() < 1e-3);
    }

    #[test]
    fn validation_names_the_problem() {
        let mut p = prefill_plan();
        p.ttft_ms = None;
        assert!(p.validate().unwrap_err().to_string().contains("ttft_ms"));
        let mut p = prefill_plan();
        p.profile.prefill.clear();
        assert!(p.validate().is_err());
        let mut p = decode_plan();
        p.min_replicas = 5;
        p.max_replicas = 2;
        assert!(p.validate().is_err());
    }
}
