//! The closed-loop settings of `pdx serve`: engine telemetry (`[telemetry]`), the `score` policy's
//! weights (`[score]`), `kv_aware`'s softmax temperature, and admission shaping (`[admission]`).
//! A pool may override `score`, `temperature` and `admission` with a table of its own; its fields
//! win over the flags, which win over the file's top-level tables, which win over the defaults.
//!
//! ```toml
//! router_temperature = 0.0     # kv_aware: Dynamo's --router-temperature (0: the best logit)
//! [telemetry]
//! interval_ms = 250            # scrape of each worker's /metrics (0: off)
//! alpha = 0.3                  # EWMA weight of a new sample
//! stale_ms = 2000              # last values stand this long after scrapes start failing
//! [score]                      # the routing lab's α/TTFT + β·TPOT + γ·free_mem − δ·queue (+ boost)
//! alpha = 1.0
//! beta = -0.5
//! gamma = 0.3
//! delta = 0.5
//! kv_boost = 0.002             # per matched prefix block
//! [admission]                  # prefill pools (and aggregated pools); off without a TTFT target
//! ttft_target_ms = 500
//! itl_target_ms = 30           # decode pools: shaped by TPOT (mean ITL); off without it
//! max_queue = 64
//! max_wait_ms = 125            # default: a quarter of the target
//! setpoint = 0.5               # the pool's smoothed TTFT is held at this fraction of the target
//! initial_limit = 2
//! [[models.pools]]
//! name = "prefill_fast"
//! role = "prefill"
//! policy = "score"
//! score = { delta = 1.0 }
//! admission = { ttft_target_ms = 300 }
//! [[models.pools]]
//! name = "decode"
//! role = "decode"
//! admission = { itl_target_ms = 30, initial_limit = 16 }
//! ```
//!
//! A decode pool's admission ([`pdx_router_core::Signal::Tpot`]) takes `itl_target_ms` from `[admission]` (or
//! the flag) and every other field from its own table only, over [`AdmissionConfig::for_decode`]: the
//! top-level fields tune the TTFT pools.

use crate::RouterError;
use pdx_protocol::Role;
use pdx_router_core::{AdmissionConfig, PoolKind, ScoreWeights, TelemetryConfig};
use serde::Deserialize;
use std::time::Duration;

/// Closed-loop flags of `pdx serve` (each overrides the file's top-level setting of the same name).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TuningArgs {
    /// Milliseconds between scrapes of each worker's Prometheus `/metrics` (requests waiting and running, KV-cache
    /// usage; vLLM's and SGLang's names), by one thread off the request path (0: off) [default: 250]
    #[arg(long)]
    pub telemetry_interval_ms: Option<f64>,
    /// EWMA weight of a new telemetry sample, in (0, 1] [default: 0.3]
    #[arg(long)]
    pub telemetry_alpha: Option<f64>,
    /// Milliseconds a worker's last scraped values stand once its scrapes fail; after that its engine state is
    /// unknown, which the policies treat as loaded, never idle [default: 2000]
    #[arg(long)]
    pub telemetry_stale_ms: Option<f64>,
    /// `score` policy: weight α of 1/TTFT (TTFT relative to the pool's best worker) [default: prefill 1, decode 0, aggregated 1]
    #[arg(long, allow_negative_numbers = true)]
    pub score_alpha: Option<f64>,
    /// `score` policy: weight β of TPOT (relative to the pool's slowest; negative penalizes) [default: prefill and decode 0, aggregated -0.5]
    #[arg(long, allow_negative_numbers = true)]
    pub score_beta: Option<f64>,
    /// `score` policy: weight γ of free KV memory (1 − usage) [default: prefill and decode 0, aggregated 0.3]
    #[arg(long, allow_negative_numbers = true)]
    pub score_gamma: Option<f64>,
    /// `score` policy: weight δ of the queue (relative to the pool's longest), subtracted [default: prefill 0, decode 1, aggregated 0.5]
    #[arg(long, allow_negative_numbers = true)]
    pub score_delta: Option<f64>,
    /// `score` policy: boost per matched prefix block [default: prefill and decode 0, aggregated 0.002]
    #[arg(long, allow_negative_numbers = true)]
    pub score_kv_boost: Option<f64>,
    /// `kv_aware` with telemetry: softmax temperature of the worker draw (Dynamo's `--router-temperature`; 0: the
    /// best logit) [default: 0]
    #[arg(long)]
    pub router_temperature: Option<f64>,
    /// Admission shaping: TTFT target in ms of prefill pools (and of aggregated pools). A pool's limit on
    /// concurrent prefills narrows while its smoothed TTFT is above half the target and reopens while below;
    /// requests beyond the limit wait in a bounded queue (full: 429 with Retry-After; waited too long: 503)
    /// [default: off]
    #[arg(long)]
    pub admission_ttft_target_ms: Option<f64>,
    /// Admission: longest wait queue per pool [default: 64]
    #[arg(long)]
    pub admission_max_queue: Option<usize>,
    /// Admission: longest wait in the queue, ms (a request's own `ttft_target_ms` shortens it) [default: a
    /// quarter of the TTFT target]
    #[arg(long)]
    pub admission_max_wait_ms: Option<f64>,
    /// Admission: concurrent prefills a pool starts with, in slow start (the limit doubles per round of healthy
    /// completions until the TTFT first goes over the set point) [default: 2]
    #[arg(long)]
    pub admission_initial_limit: Option<u32>,
    /// Admission: the fraction of the TTFT target a pool's smoothed TTFT is held at, in (0, 1] [default: 0.5]
    #[arg(long)]
    pub admission_setpoint: Option<f64>,
    /// Admission shaping of decode pools: TPOT (mean ITL) target in ms. A decode pool's limit on concurrent
    /// requests (each holds its slot from before its prefill to the end of its stream) is cut while the
    /// smoothed ITL of its streams is above 0.9 of the target and reopens while below; requests beyond it wait
    /// in a bounded queue (full: 429 with Retry-After; waited 100 ms: 503) [default: off]
    #[arg(long)]
    pub admission_itl_target_ms: Option<f64>,
}

/// `[telemetry]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryFile {
    /// Scrape interval, ms (0: off; default 250).
    pub interval_ms: Option<f64>,
    /// EWMA weight (default 0.3).
    pub alpha: Option<f64>,
    /// How long last values stand, ms (default 2000).
    pub stale_ms: Option<f64>,
}

/// `[score]`, or a pool's `score` table: the `score` policy's weights (see [`ScoreWeights`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreFile {
    /// α, of 1/TTFT.
    pub alpha: Option<f64>,
    /// β, of TPOT.
    pub beta: Option<f64>,
    /// γ, of free KV memory.
    pub gamma: Option<f64>,
    /// δ, of the queue.
    pub delta: Option<f64>,
    /// Per matched prefix block.
    pub kv_boost: Option<f64>,
}

impl ScoreFile {
    /// These settings over `file`'s, field by field.
    fn over_file(&self, file: &ScoreFile) -> ScoreFile {
        ScoreFile {
            alpha: self.alpha.or(file.alpha),
            beta: self.beta.or(file.beta),
            gamma: self.gamma.or(file.gamma),
            delta: self.delta.or(file.delta),
            kv_boost: self.kv_boost.or(file.kv_boost),
        }
    }

    fn over(&self, base: ScoreWeights) -> ScoreWeights {
        ScoreWeights {
            alpha: self.alpha.unwrap_or(base.alpha),
            beta: self.beta.unwrap_or(base.beta),
            gamma: self.gamma.unwrap_or(base.gamma),
            delta: self.delta.unwrap_or(base.delta),
            kv_boost: self.kv_boost.unwrap_or(base.kv_boost),
        }
    }
}

/// `[admission]`, or a pool's `admission` table (see [`AdmissionConfig`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionFile {
    /// TTFT target of prefill and aggregated pools, ms (0 or absent: admission off).
    pub ttft_target_ms: Option<f64>,
    /// TPOT (mean ITL) target of decode pools, ms (0 or absent: admission off).
    pub itl_target_ms: Option<f64>,
    /// Fraction of the target the pool's smoothed TTFT is held at (default 0.5).
    pub setpoint: Option<f64>,
    /// Limit at start, in slow start (default 2).
    pub initial_limit: Option<u32>,
    /// Smallest limit (default 1).
    pub min_limit: Option<u32>,
    /// Largest limit (default 4096).
    pub max_limit: Option<u32>,
    /// Multiplicative decrease (default 0.7).
    pub decrease_factor: Option<f64>,
    /// Additive increase per round (default 1).
    pub increase: Option<f64>,
    /// Longest queue (default 64).
    pub max_queue: Option<usize>,
    /// Longest wait, ms (default a quarter of the target).
    pub max_wait_ms: Option<f64>,
    /// EWMA weight of a TTFT sample (default 0.3).
    pub alpha: Option<f64>,
    /// `Retry-After` of a 429, seconds (default 1).
    pub retry_after_secs: Option<u32>,
}

impl AdmissionFile {
    /// Fields of `self`, else of `base`.
    fn over(&self, base: &AdmissionFile) -> AdmissionFile {
        AdmissionFile {
            ttft_target_ms: self.ttft_target_ms.or(base.ttft_target_ms),
            itl_target_ms: self.itl_target_ms.or(base.itl_target_ms),
            setpoint: self.setpoint.or(base.setpoint),
            initial_limit: self.initial_limit.or(base.initial_limit),
            min_limit: self.min_limit.or(base.min_limit),
            max_limit: self.max_limit.or(base.max_limit),
            decrease_factor: self.decrease_factor.or(base.decrease_factor),
            increase: self.increase.or(base.increase),
            max_queue: self.max_queue.or(base.max_queue),
            max_wait_ms: self.max_wait_ms.or(base.max_wait_ms),
            alpha: self.alpha.or(base.alpha),
            retry_after_secs: self.retry_after_secs.or(base.retry_after_secs),
        }
    }

    /// The settings of a pool of `role`, or `None` without a (positive) target: `itl_target_ms` for decode
    /// pools, `ttft_target_ms` for the others.
    fn resolve(&self, pool: &str, role: Role) -> Result<Option<AdmissionConfig>, RouterError> {
        let ms = |v: f64, what: &str| -> Result<u64, RouterError> {
            if v.is_finite() && v >= 0.0 {
                Ok((v * 1e3) as u64)
            } else {
                Err(RouterError::Config(format!(
                    "pool {pool}: admission {what} must be a non-negative number of ms"
                )))
            }
        };
        let (target, what) = match role {
            Role::Decode => (self.itl_target_ms, "itl_target_ms"),
            _ => (self.ttft_target_ms, "ttft_target_ms"),
        };
        let target = match target {
            None => return Ok(None),
            Some(t) => ms(t, what)?,
        };
        if target == 0 {
            return Ok(None);
        }
        let d = match role {
            Role::Decode => AdmissionConfig::for_decode(target),
            _ => AdmissionConfig::with_target_us(target),
        };
        let c = AdmissionConfig {
            signal: d.signal,
            target_us: target,
            setpoint: self.setpoint.unwrap_or(d.setpoint),
            initial_limit: self.initial_limit.unwrap_or(d.initial_limit),
            min_limit: self.min_limit.unwrap_or(d.min_limit),
            max_limit: self.max_limit.unwrap_or(d.max_limit),
            decrease_factor: self.decrease_factor.unwrap_or(d.decrease_factor),
            increase: self.increase.unwrap_or(d.increase),
            max_queue: self.max_queue.unwrap_or(d.max_queue),
            max_wait_us: match self.max_wait_ms {
                Some(w) => ms(w, "max_wait_ms")?,
                None => d.max_wait_us,
            },
            alpha: self.alpha.unwrap_or(d.alpha),
            retry_after_secs: self.retry_after_secs.unwrap_or(d.retry_after_secs),
        };
        c.validate()
            .map_err(|e| RouterError::Config(format!("pool {pool}: {e}")))?;
        Ok(Some(c))
    }
}

/// The resolved closed-loop settings.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Scrape interval (`None`: scraping off).
    pub scrape_interval: Option<Duration>,
    /// EWMA and staleness of worker telemetry.
    pub telemetry: TelemetryConfig,
    /// `score` weights set by flags over `[score]`; a pool's own table goes over them, and they go over
    /// [`ScoreWeights::default_for`] the pool's role.
    score: ScoreFile,
    /// `kv_aware` temperature of pools without their own.
    pub temperature: f64,
    /// Admission settings of prefill and aggregated pools without their own (flags over `[admission]`).
    admission: AdmissionFile,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            scrape_interval: Some(Duration::from_millis(250)),
            telemetry: TelemetryConfig::default(),
            score: ScoreFile::default(),
            temperature: 0.0,
            admission: AdmissionFile::default(),
        }
    }
}

fn temperature(t: f64, what: &str) -> Result<f64, RouterError> {
    if t.is_finite() && t >= 0.0 {
        Ok(t)
    } else {
        Err(RouterError::Config(format!(
            "{what} must be a non-negative number, got {t}"
        )))
    }
}

impl Tuning {
    /// Flags over the file's top-level tables.
    ///
    /// Errors: [`RouterError::Config`] for an interval or staleness that is not a non-negative number of ms,
    /// α outside (0, 1], a non-finite weight, a negative temperature.
    pub fn resolve(
        a: &TuningArgs,
        telemetry: &TelemetryFile,
        score: &ScoreFile,
        admission: &AdmissionFile,
        router_temperature: Option<f64>,
    ) -> Result<Self, RouterError> {
        let ms = |v: f64, what: &str| {
            Duration::try_from_secs_f64(v / 1e3).map_err(|_| {
                RouterError::Config(format!("{what} must be a non-negative number of ms"))
            })
        };
        let interval = ms(
            a.telemetry_interval_ms
                .or(telemetry.interval_ms)
                .unwrap_or(250.0),
            "telemetry interval_ms",
        )?;
        let stale = ms(
            a.telemetry_stale_ms
                .or(telemetry.stale_ms)
                .unwrap_or(2000.0),
            "telemetry stale_ms",
        )?;
        let tc = TelemetryConfig {
            alpha: a.telemetry_alpha.or(telemetry.alpha).unwrap_or(0.3),
            stale_after_us: stale.as_micros() as u64,
        };
        tc.validate()?;
        let flags = ScoreFile {
            alpha: a.score_alpha,
            beta: a.score_beta,
            gamma: a.score_gamma,
            delta: a.score_delta,
            kv_boost: a.score_kv_boost,
        };
        let score = flags.over_file(score);
        // Every weight set must be valid whatever pool it ends up in.
        score.over(ScoreWeights::default()).validate()?;
        let flag_admission = AdmissionFile {
            ttft_target_ms: a.admission_ttft_target_ms,
            max_queue: a.admission_max_queue,
            max_wait_ms: a.admission_max_wait_ms,
            initial_limit: a.admission_initial_limit,
            setpoint: a.admission_setpoint,
            itl_target_ms: a.admission_itl_target_ms,
            ..AdmissionFile::default()
        };
        let t = Self {
            scrape_interval: (!interval.is_zero()).then_some(interval),
            telemetry: tc,
            score,
            temperature: temperature(
                a.router_temperature.or(router_temperature).unwrap_or(0.0),
                "router_temperature",
            )?,
            admission: flag_admission.over(admission),
        };
        // The top-level admission settings must be valid on their own.
        t.admission.resolve("(default)", Role::Prefill)?;
        t.pool_admission("(default)", Role::Decode, None)?;
        Ok(t)
    }

    /// The `score` weights of a pool of `role` without a table of its own: the top-level settings over
    /// [`ScoreWeights::default_for`] the role (valid: [`Tuning::resolve`] checked every set weight).
    pub fn role_score(&self, role: Role) -> ScoreWeights {
        let kind = match role {
            Role::Prefill => PoolKind::Prefill,
            Role::Decode => PoolKind::Decode,
            Role::Aggregated => PoolKind::Aggregated,
        };
        self.score.over(ScoreWeights::default_for(kind))
    }

    /// A pool's `score` weights: its table over the top-level ones over the defaults of its role
    /// ([`ScoreWeights::default_for`]).
    ///
    /// Errors: [`RouterError::Config`] for a non-finite weight.
    pub fn pool_score(
        &self,
        own: Option<&ScoreFile>,
        role: Role,
    ) -> Result<ScoreWeights, RouterError> {
        let base = self.role_score(role);
        let w = own.map_or(base, |s| s.over(base));
        w.validate()?;
        Ok(w)
    }

    /// A pool's `kv_aware` temperature.
    ///
    /// Errors: [`RouterError::Config`] for a negative or non-finite temperature.
    pub fn pool_temperature(&self, own: Option<f64>) -> Result<f64, RouterError> {
        temperature(own.unwrap_or(self.temperature), "pool temperature")
    }

    /// A pool's admission settings (`None`: off): for prefill and aggregated pools its table over the
    /// top-level ones (TTFT); for decode pools its table over the top-level `itl_target_ms` alone (TPOT).
    ///
    /// Errors: [`RouterError::Config`] for a pool's own table naming the other role's target
    /// (`ttft_target_ms` on a decode pool, `itl_target_ms` on the others), or bad settings.
    pub fn pool_admission(
        &self,
        pool: &str,
        role: Role,
        own: Option<&AdmissionFile>,
    ) -> Result<Option<AdmissionConfig>, RouterError> {
        let wrong = match role {
            Role::Decode => own.and_then(|a| a.ttft_target_ms.map(|_| "ttft_target_ms")),
            _ => own.and_then(|a| a.itl_target_ms.map(|_| "itl_target_ms")),
        };
        if let Some(field) = wrong {
            return Err(RouterError::Config(format!(
                "pool {pool}: admission {field} does not apply to a {role:?} pool (decode pools take \
                 itl_target_ms, prefill and aggregated pools ttft_target_ms)"
            )));
        }
        let base = match role {
            Role::Decode => AdmissionFile {
                itl_target_ms: self.admission.itl_target_ms,
                ..AdmissionFile::default()
            },
            _ => self.admission.clone(),
        };
        match own {
            Some(a) => a.over(&base),
            None => base,
        }
        .resolve(pool, role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(a: &TuningArgs, toml_text: &str) -> Result<Tuning, RouterError> {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct F {
            telemetry: TelemetryFile,
            score: ScoreFile,
            admission: AdmissionFile,
            router_temperature: Option<f64>,
        }
        let f: F = toml::from_str(toml_text).map_err(|e| RouterError::Config(e.to_string()))?;
        Tuning::resolve(
            a,
            &f.telemetry,
            &f.score,
            &f.admission,
            f.router_temperature,
        )
    }

    #[test]
    fn defaults_and_off() {
        let t = resolve(&TuningArgs::default(), "").unwrap();
        assert_eq!(t.scrape_interval, Some(Duration::from_millis(250)));
        assert_eq!(t.telemetry, TelemetryConfig::default());
        assert_eq!(
            t.pool_score(None, Role::Aggregated).unwrap(),
            ScoreWeights::default()
        );
        assert_eq!(
            t.pool_score(None, Role::Prefill).unwrap(),
            ScoreWeights::default_for(PoolKind::Prefill)
        );
        assert_eq!(
            t.pool_score(None, Role::Decode).unwrap(),
            ScoreWeights::default_for(PoolKind::Decode)
        );
        assert_eq!(t.pool_admission("p", Role::Prefill, None).unwrap(), None);
        let off = TuningArgs {
            telemetry_interval_ms: Some(0.0),
            ..Default::default()
        };
        assert_eq!(resolve(&off, "").unwrap().scrape_interval, None);
    }

    #[test]
    fn flags_over_file_and_pools_over_both() {
        let a = TuningArgs {
            score_delta: Some(2.0),
            admission_ttft_target_ms: Some(400.0),
            ..Default::default()
        };
        let t = resolve(
            &a,
            "router_temperature = 0.5\n[telemetry]\ninterval_ms = 100\nalpha = 0.5\n\
             [score]\ndelta = 9.0\ngamma = 0.1\n[admission]\nttft_target_ms = 900\nmax_queue = 8\n",
        )
        .unwrap();
        assert_eq!(t.scrape_interval, Some(Duration::from_millis(100)));
        assert_eq!(t.telemetry.alpha, 0.5);
        let agg = t.pool_score(None, Role::Aggregated).unwrap();
        assert_eq!(agg.delta, 2.0, "the flag wins over the file");
        assert_eq!(agg.gamma, 0.1);
        let prefill = t.pool_score(None, Role::Prefill).unwrap();
        assert_eq!(
            (prefill.alpha, prefill.gamma, prefill.delta),
            (1.0, 0.1, 2.0),
            "set weights go over the role's defaults"
        );
        assert_eq!(t.temperature, 0.5);
        let p = t.pool_admission("p", Role::Prefill, None).unwrap().unwrap();
        assert_eq!(p.target_us, 400_000);
        assert_eq!(p.max_queue, 8);
        assert_eq!(p.max_wait_us, 100_000, "a quarter of the target");
        assert_eq!(p.setpoint, 0.5);
        // A pool's own table wins field by field; 0 turns it off.
        let own = AdmissionFile {
            ttft_target_ms: Some(300.0),
            ..Default::default()
        };
        let p = t
            .pool_admission("p", Role::Aggregated, Some(&own))
            .unwrap()
            .unwrap();
        assert_eq!((p.target_us, p.max_queue), (300_000, 8));
        let off = AdmissionFile {
            ttft_target_ms: Some(0.0),
            ..Default::default()
        };
        assert_eq!(
            t.pool_admission("p", Role::Prefill, Some(&off)).unwrap(),
            None
        );
        assert_eq!(t.pool_admission("d", Role::Decode, None).unwrap(), None);
        assert!(t.pool_admission("d", Role::Decode, Some(&own)).is_err());
        let itl = AdmissionFile {
            itl_target_ms: Some(30.0),
            ..Default::default()
        };
        assert!(t.pool_admission("p", Role::Prefill, Some(&itl)).is_err());
        let s = t
            .pool_score(
                Some(&ScoreFile {
                    alpha: Some(3.0),
                    ..Default::default()
                }),
                Role::Aggregated,
            )
            .unwrap();
        assert_eq!((s.alpha, s.delta), (3.0, 2.0));
    }

    #[test]
    fn decode_pools_are_shaped_by_itl_with_their_own_settings() {
        let a = TuningArgs {
            admission_itl_target_ms: Some(30.0),
            ..Default::default()
        };
        // Top-level fields other than the ITL target tune the TTFT pools only.
        let t = resolve(
            &a,
            "[admission]\nttft_target_ms = 500\nsetpoint = 0.4\nmax_queue = 8\n",
        )
        .unwrap();
        let d = t.pool_admission("d", Role::Decode, None).unwrap().unwrap();
        assert_eq!(d, AdmissionConfig::for_decode(30_000));
        assert_eq!(d.signal, pdx_router_core::Signal::Tpot);
        let p = t.pool_admission("p", Role::Prefill, None).unwrap().unwrap();
        assert_eq!(
            (p.signal, p.target_us, p.setpoint, p.max_queue),
            (pdx_router_core::Signal::Ttft, 500_000, 0.4, 8)
        );
        // A decode pool's own table goes over the decode defaults.
        let own = AdmissionFile {
            initial_limit: Some(16),
            max_wait_ms: Some(50.0),
            ..Default::default()
        };
        let d = t
            .pool_admission("d", Role::Decode, Some(&own))
            .unwrap()
            .unwrap();
        assert_eq!(
            (d.target_us, d.initial_limit, d.max_wait_us),
            (30_000, 16, 50_000)
        );
        // Off without an ITL target, whatever the TTFT target.
        let t = resolve(
            &TuningArgs::default(),
            "[admission]\nttft_target_ms = 500\n",
        )
        .unwrap();
        assert_eq!(t.pool_admission("d", Role::Decode, None).unwrap(), None);
        assert!(resolve(&TuningArgs::default(), "[admission]\nitl_target_ms = -1\n").is_err());
    }

    #[test]
    fn bad_settings_are_errors() {
        for text in [
            "[telemetry]\nalpha = 0.0",
            "[telemetry]\nalpha = 2.0",
            "[telemetry]\ninterval_ms = -1",
            "[telemetry]\nintervalms = 1",
            "router_temperature = -1.0",
            "[score]\nalpha = nan",
            "[score]\nepsilon = 1.0",
            "[admission]\nttft_target_ms = 100\ndecrease_factor = 1.5",
            "[admission]\nttft_target_ms = 100\ninitial_limit = 0",
            "[admission]\nttft_target_ms = -5",
        ] {
            assert!(
                resolve(&TuningArgs::default(), text).is_err(),
                "accepted {text:?}"
            );
        }
    }
}
