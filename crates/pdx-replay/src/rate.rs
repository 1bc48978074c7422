//! Rate curves: re-times a trace's arrivals so that its request rate follows a shape over time
//! (`pdx sim --rate-curve`), to test autoscaling on load that changes.
//!
//! The trace's requests and their order are kept; only arrival times move. Arrival `i` at
//! `t_i` in the original trace has "expected count" `u_i = t_i · N / T` under the trace's mean
//! rate (`N` requests over `T` s). With the target rate `r(t) = R · shape(t) / mean(shape)`
//! (`R`: the trace's own mean rate, or `--mean-rate`) and its cumulative count
//! `Λ(t) = ∫₀ᵗ r`, the new arrival time is `Λ⁻¹(u_i · R_target/R_trace · …)`, i.e. the time at
//! which the target curve has produced as many requests. Bursts and gaps of the original trace
//! stay (a time warp, not a resampling); the mean rate over the span becomes `R`.
//!
//! Shapes (the `SPEC` of `--rate-curve`):
//! * `diurnal:period=S,ratio=K[,phase=F]`: a day compressed to `S` seconds,
//!   `shape(t) = 1 + (K − 1)·(1 − cos(2π(t/S + F)))/2`: the trough at `t = 0` (with `phase`
//!   0), the peak `K` times the trough at `S/2`. `ratio=4` is a load varying 4×.
//! * `steps:T0=M0,T1=M1,...`: piecewise-constant multipliers from each time `Ti` (s) on, e.g.
//!   `steps:0=1,300=4,600=1` (a 4× step between 300 s and 600 s).

use crate::trace::TraceRequest;
use crate::ReplayError;

/// A rate shape over time.
#[derive(Debug, Clone, PartialEq)]
pub enum RateCurve {
    /// Raised cosine, trough at `t = 0` unless shifted by `phase` (fraction of a period).
    Diurnal {
        /// Period, s.
        period_s: f64,
        /// Peak over trough (≥ 1).
        ratio: f64,
        /// Phase shift, fraction of a period.
        phase: f64,
    },
    /// `(from s, multiplier)` pairs, by time.
    Steps(Vec<(f64, f64)>),
}

fn bad(spec: &str, why: &str) -> ReplayError {
    ReplayError::Invalid(format!("rate curve `{spec}`: {why}"))
}

impl std::str::FromStr for RateCurve {
    type Err = ReplayError;
    fn from_str(spec: &str) -> Result<Self, ReplayError> {
        let (kind, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let pairs: Vec<(&str, f64)> = rest
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                let (k, v) = p
                    .split_once('=')
                    .ok_or_else(|| bad(spec, "want KEY=VALUE"))?;
                let v: f64 = v
                    .trim()
                    .parse()
                    .map_err(|_| bad(spec, "a value is no number"))?;
                if !v.is_finite() {
                    return Err(bad(spec, "values must be finite"));
                }
                Ok((k.trim(), v))
            })
            .collect::<Result<_, _>>()?;
        match kind {
            "diurnal" => {
                let get = |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1);
                if let Some((k, _)) = pairs
                    .iter()
                    .find(|p| !["period", "ratio", "phase"].contains(&p.0))
                {
                    return Err(bad(spec, &format!("unknown key {k}")));
                }
                let period_s = get("period").ok_or_else(|| bad(spec, "needs period"))?;
                let ratio = get("ratio").ok_or_else(|| bad(spec, "needs ratio"))?;
                if period_s <= 0.0 || ratio < 1.0 {
                    return Err(bad(spec, "needs period > 0 and ratio >= 1"));
                }
                Ok(RateCurve::Diurnal {
                    period_s,
                    ratio,
                    phase: get("phase").unwrap_or(0.0),
                })
            }
            "steps" => {
                let mut steps: Vec<(f64, f64)> = pairs
                    .iter()
                    .map(|&(k, m)| {
                        let t: f64 = k
                            .parse()
                            .map_err(|_| bad(spec, "a step time is no number"))?;
                        if !(t >= 0.0 && m > 0.0) {
                            return Err(bad(spec, "step times must be >= 0, multipliers > 0"));
                        }
                        Ok((t, m))
                    })
                    .collect::<Result<_, _>>()?;
                if steps.is_empty() {
                    return Err(bad(spec, "needs at least one step"));
                }
                steps.sort_by(|a, b| a.0.total_cmp(&b.0));
                Ok(RateCurve::Steps(steps))
            }
            _ => Err(bad(spec, "kind must be diurnal or steps")),
        }
    }
}

impl RateCurve {
    /// The shape at `t` s (relative units).
    pub fn shape(&self, t: f64) -> f64 {
        match self {
            RateCurve::Diurnal {
                period_s,
                ratio,
                phase,
            } => {
                let x = std::f64::consts::TAU * (t / period_s + phase);
                1.0 + (ratio - 1.0) * (1.0 - x.cos()) / 2.0
            }
            RateCurve::Steps(s) => {
                let i = s.partition_point(|p| p.0 <= t);
                if i == 0 {
                    s[0].1
                } else {
                    s[i - 1].1
                }
            }
        }
    }
}

/// Re-times `trace` (sorted by arrival) to follow `curve` at mean rate `mean_rate` req/s
/// (default: the trace's own). Returns the new span, s.
///
/// Errors: [`ReplayError::Invalid`] for a non-positive rate or a trace of fewer than 2 requests
/// (no rate to keep).
pub fn reshape(
    trace: &mut [TraceRequest],
    curve: &RateCurve,
    mean_rate: Option<f64>,
) -> Result<f64, ReplayError> {
    let n = trace.len();
    if n < 2 {
        return Err(ReplayError::Invalid(
            "a rate curve needs a trace of at least 2 requests".into(),
        ));
    }
    let t0 = trace[0].arrival_ms / 1e3;
    let span = (trace[n - 1].arrival_ms / 1e3 - t0).max(1e-3);
    let own = (n - 1) as f64 / span;
    let rate = mean_rate.unwrap_or(own);
    if !(rate.is_finite() && rate > 0.0) {
        return Err(ReplayError::Invalid("--mean-rate must be positive".into()));
    }
    // The new span holds the same count at the target mean rate; the shape's mean over it is
    // computed on the grid below (the cumulative count is integrated with the trapezoid rule).
    let new_span = (n - 1) as f64 / rate;
    let steps = 20_000usize;
    let dt = new_span / steps as f64;
    let mut cum = Vec::with_capacity(steps + 1);
    cum.push(0.0f64);
    for k in 0..steps {
        let (a, b) = (curve.shape(k as f64 * dt), curve.shape((k + 1) as f64 * dt));
        cum.push(cum[k] + (a + b) / 2.0 * dt);
    }
    let total = cum[steps];
    for r in trace.iter_mut() {
        // Fraction of the count reached at this arrival in the original trace.
        let f = ((r.arrival_ms / 1e3 - t0) / span).clamp(0.0, 1.0) * total;
        let k = cum.partition_point(|&c| c < f).clamp(1, steps);
        let (c0, c1) = (cum[k - 1], cum[k]);
        let frac = if c1 > c0 { (f - c0) / (c1 - c0) } else { 0.0 };
        r.arrival_ms = ((k - 1) as f64 + frac) * dt * 1e3;
    }
    Ok(new_span)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(n: usize, gap_ms: f64) -> Vec<TraceRequest> {
        (0..n)
            .map(|i| TraceRequest {
                arrival_ms: i as f64 * gap_ms,
                input_tokens: 10,
                output_tokens: 1,
                hash_ids: vec![],
            })
            .collect()
    }

    fn count_in(t: &[TraceRequest], a: f64, b: f64) -> usize {
        t.iter()
            .filter(|r| r.arrival_ms >= a * 1e3 && r.arrival_ms < b * 1e3)
            .count()
    }

    #[test]
    fn diurnal_peak_is_ratio_times_trough_and_mean_rate_is_kept_or_set() {
        let mut t = uniform(40_001, 25.0); // 40 req/s for 1000 s
        let c: RateCurve = "diurnal:period=1000,ratio=4".parse().unwrap();
        let span = reshape(&mut t, &c, None).unwrap();
        assert!((span - 1000.0).abs() < 1e-6);
        // Around the trough (t = 0) and the peak (t = 500): 10 s windows.
        let trough = count_in(&t, 0.0, 10.0) as f64;
        let peak = count_in(&t, 495.0, 505.0) as f64;
        assert!((peak / trough - 4.0).abs() < 0.2, "{peak} / {trough}");
        // Mean rate 40 req/s: the shape's mean is 2.5 (trough 1), so the trough is 16 req/s.
        assert!((trough / 10.0 - 16.0).abs() < 1.0, "{trough}");
        // Order is kept.
        assert!(t.windows(2).all(|w| w[0].arrival_ms <= w[1].arrival_ms));
        let mut u = uniform(1001, 100.0);
        let span = reshape(&mut u, &c, Some(100.0)).unwrap();
        assert!((span - 10.0).abs() < 1e-6);
    }

    #[test]
    fn steps_multiply_the_rate() {
        let mut t = uniform(30_001, 10.0); // 100 req/s over 300 s
        let c: RateCurve = "steps:0=1,100=4,200=1".parse().unwrap();
        reshape(&mut t, &c, None).unwrap();
        let low = count_in(&t, 10.0, 90.0) as f64;
        let high = count_in(&t, 110.0, 190.0) as f64;
        assert!((high / low - 4.0).abs() < 0.05, "{high} / {low}");
    }

    #[test]
    fn bad_specs_are_errors() {
        for s in [
            "diurnal:period=0,ratio=4",
            "diurnal:ratio=4",
            "diurnal:period=10,ratio=0.5",
            "diurnal:period=10,ratio=2,color=3",
            "steps:",
            "steps:x=1",
            "steps:0=-1",
            "sine:period=3",
            "diurnal:period=NaN,ratio=2",
        ] {
            assert!(s.parse::<RateCurve>().is_err(), "{s}");
        }
        let mut one = uniform(1, 1.0);
        assert!(reshape(&mut one, &RateCurve::Steps(vec![(0.0, 1.0)]), None).is_err());
        let mut two = uniform(2, 1.0);
        assert!(reshape(&mut two, &RateCurve::Steps(vec![(0.0, 1.0)]), Some(0.0)).is_err());
    }
}
