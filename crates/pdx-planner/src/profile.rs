//! A pool's performance profile: what one replica does at a given prompt or context length,
//! the input of the replica computation (Dynamo's "pre-deployment profiling" results,
//! `profile_sla` → `selected_prefill_interpolation` / `selected_decode_interpolation`).
//!
//! * **Prefill**: for a prompt of `isl` tokens, the TTFT of the prompt alone on an idle
//!   replica (`ttft_ms`, its service time) and the replica's prefill throughput when it is
//!   kept busy with such prompts (`tokens_per_s`, prompt tokens per second, batching included).
//! * **Decode**: for sequences at a context of `context` tokens decoded `batch` at a time, the
//!   inter-token latency (`itl_ms`); a replica's decode throughput there is
//!   `batch / itl` tokens per second. The largest `batch` listed for a context is what the
//!   replica can hold (`max_num_seqs`, KV cache capacity).
//!
//! Values are per **replica** (one engine of `gpus_per_replica` GPUs), not per GPU.
//! Between listed lengths values are interpolated linearly; beyond the ends the prefill
//! service time grows in proportion to the length and the throughput stays at the end value.
//! Profiles are given in TOML, or derived from a `pdx mock` timing model by `pdx_sim::profile`
//! (which runs the mock's own scheduler in virtual time).

use crate::PlannerError;
use serde::{Deserialize, Serialize};

/// One prefill measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefillPoint {
    /// Prompt length, tokens.
    pub isl: f64,
    /// TTFT of one such prompt on an idle replica, ms.
    pub ttft_ms: f64,
    /// Prompt tokens per second a busy replica computes at this length.
    pub tokens_per_s: f64,
}

/// One decode measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodePoint {
    /// Context length of the decoding sequences, tokens.
    pub context: f64,
    /// Sequences decoded together.
    pub batch: f64,
    /// Inter-token latency at that batch, ms.
    pub itl_ms: f64,
}

/// A pool's profile (TOML tables `prefill = [...]`, `decode = [...]`; a prefill pool needs
/// only `prefill`, a decode pool only `decode`, an aggregated pool both).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolProfile {
    /// Prefill measurements, any order.
    pub prefill: Vec<PrefillPoint>,
    /// Decode measurements, any order.
    pub decode: Vec<DecodePoint>,
}

fn lerp(x: f64, x0: f64, x1: f64, y0: f64, y1: f64) -> f64 {
    if x1 <= x0 {
        return y0;
    }
    y0 + (y1 - y0) * ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
}

/// Linear interpolation over points sorted by x; clamped at the ends.
fn interp(points: &[(f64, f64)], x: f64) -> f64 {
    match points {
        [] => 0.0,
        [p] => p.1,
        _ => {
            let i = points.partition_point(|p| p.0 < x);
            if i == 0 {
                points[0].1
            } else if i >= points.len() {
                points[points.len() - 1].1
            } else {
                lerp(
                    x,
                    points[i - 1].0,
                    points[i].0,
                    points[i - 1].1,
                    points[i].1,
                )
            }
        }
    }
}

impl PoolProfile {
    /// Sorts the tables and checks every value is positive and finite.
    ///
    /// Errors: [`PlannerError::Config`] naming the bad point.
    pub fn validated(mut self) -> Result<Self, PlannerError> {
        let ok = |v: f64| v.is_finite() && v > 0.0;
        if let Some(p) = self
            .prefill
            .iter()
            .find(|p| !ok(p.isl) || !ok(p.ttft_ms) || !ok(p.tokens_per_s))
        {
            return Err(PlannerError::Config(format!(
                "prefill profile point {p:?}: values must be positive"
            )));
        }
        if let Some(p) = self
            .decode
            .iter()
            .find(|p| !ok(p.context) || !ok(p.batch) || !ok(p.itl_ms))
        {
            return Err(PlannerError::Config(format!(
                "decode profile point {p:?}: values must be positive"
            )));
        }
        self.prefill.sort_by(|a, b| a.isl.total_cmp(&b.isl));
        self.decode.sort_by(|a, b| {
            a.context
                .total_cmp(&b.context)
                .then(a.batch.total_cmp(&b.batch))
        });
        Ok(self)
    }

    /// TTFT of one prompt of `isl` tokens on an idle replica, ms (grows in proportion beyond
    /// the longest profiled prompt).
    pub fn prefill_service_ms(&self, isl: f64) -> f64 {
        let pts: Vec<(f64, f64)> = self.prefill.iter().map(|p| (p.isl, p.ttft_ms)).collect();
        match pts.last() {
            Some(&(x, y)) if isl > x => y * isl / x,
            _ => interp(&pts, isl),
        }
    }

    /// Prompt tokens per second one busy replica computes at `isl`.
    pub fn prefill_tokens_per_s(&self, isl: f64) -> f64 {
        let pts: Vec<(f64, f64)> = self
            .prefill
            .iter()
            .map(|p| (p.isl, p.tokens_per_s))
            .collect();
        interp(&pts, isl)
    }

    /// The decode rows: `(context, [(batch, itl_ms)])`, by context.
    fn decode_rows(&self) -> Vec<(f64, Vec<(f64, f64)>)> {
        let mut rows: Vec<(f64, Vec<(f64, f64)>)> = Vec::new();
        for p in &self.decode {
            match rows.last_mut() {
                Some(r) if r.0 == p.context => r.1.push((p.batch, p.itl_ms)),
                _ => rows.push((p.context, vec![(p.batch, p.itl_ms)])),
            }
        }
        rows
    }

    /// Largest batch one row sustains at `itl_ms` (0 when even its smallest batch is slower).
    fn row_batch_at(row: &[(f64, f64)], itl_ms: f64) -> f64 {
        let mut best: f64 = 0.0;
        for (i, &(b, l)) in row.iter().enumerate() {
            if l <= itl_ms {
                best = best.max(b);
            } else if i > 0 && row[i - 1].1 <= itl_ms {
                let (b0, l0) = row[i - 1];
                best = best.max(lerp(itl_ms, l0, l, b0, b));
            }
        }
        best
    }

    /// Sequences one replica decodes together at a context of `context` tokens while keeping
    /// the ITL at or under `itl_ms` (interpolated between profiled contexts).
    pub fn decode_batch_at(&self, context: f64, itl_ms: f64) -> f64 {
        let pts: Vec<(f64, f64)> = self
            .decode_rows()
            .iter()
            .map(|(c, row)| (*c, Self::row_batch_at(row, itl_ms)))
            .collect();
        interp(&pts, context)
    }

    /// Expected ITL, ms, of a replica decoding `batch` sequences at `context` tokens.
    pub fn decode_itl_ms(&self, context: f64, batch: f64) -> f64 {
        let pts: Vec<(f64, f64)> = self
            .decode_rows()
            .iter()
            .map(|(c, row)| (*c, interp(row, batch)))
            .collect();
        interp(&pts, context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> PoolProfile {
        PoolProfile {
            prefill: vec![
                PrefillPoint {
                    isl: 4096.0,
                    ttft_ms: 400.0,
                    tokens_per_s: 10_000.0,
                },
                PrefillPoint {
                    isl: 1024.0,
                    ttft_ms: 100.0,
                    tokens_per_s: 20_000.0,
                },
            ],
            decode: vec![
                DecodePoint {
                    context: 1000.0,
                    batch: 1.0,
                    itl_ms: 10.0,
                },
                DecodePoint {
                    context: 1000.0,
                    batch: 64.0,
                    itl_ms: 40.0,
                },
                DecodePoint {
                    context: 3000.0,
                    batch: 1.0,
                    itl_ms: 12.0,
                },
                DecodePoint {
                    context: 3000.0,
                    batch: 32.0,
                    itl_ms: 60.0,
                },
            ],
        }
        .validated()
        .unwrap()
    }

    #[test]
    fn prefill_interpolates_and_extrapolates_service_time() {
        let p = profile();
        assert_eq!(p.prefill_service_ms(1024.0), 100.0);
        assert_eq!(p.prefill_service_ms(2560.0), 250.0);
        assert_eq!(p.prefill_service_ms(8192.0), 800.0);
        assert_eq!(p.prefill_service_ms(10.0), 100.0);
        assert_eq!(p.prefill_tokens_per_s(2560.0), 15_000.0);
        assert_eq!(p.prefill_tokens_per_s(100_000.0), 10_000.0);
    }

    #[test]
    fn decode_batch_at_an_itl_target() {
        let p = profile();
        // Row 1000: 1 → 10 ms, 64 → 40 ms; at 25 ms: 1 + 63 / 2 = 32.5.
        assert!((p.decode_batch_at(1000.0, 25.0) - 32.5).abs() < 1e-9);
        assert_eq!(p.decode_batch_at(1000.0, 100.0), 64.0);
        assert_eq!(p.decode_batch_at(1000.0, 5.0), 0.0);
        // Between the rows: 2000 is half way between 32.5 and the 3000 row's 16.8... at 25 ms.
        let b3000 = 1.0 + 31.0 * (13.0 / 48.0);
        assert!((p.decode_batch_at(3000.0, 25.0) - b3000).abs() < 1e-9);
        assert!((p.decode_batch_at(2000.0, 25.0) - (32.5 + b3000) / 2.0).abs() < 1e-9);
        assert!((p.decode_itl_ms(1000.0, 32.5) - 25.0).abs() < 1e-9);
    }

    #[test]
    fn bad_points_are_errors_and_toml_parses() {
        let mut p = profile();
        p.prefill[0].tokens_per_s = 0.0;
        assert!(p.validated().is_err());
        let t: PoolProfile = toml::from_str(
            "prefill = [{ isl = 512, ttft_ms = 30, tokens_per_s = 9000 }]\n\
             decode = [{ context = 600, batch = 8, itl_ms = 12 }]",
        )
        .unwrap();
        assert_eq!(t.prefill.len(), 1);
        assert!(toml::from_str::<PoolProfile>("prefill = [{ isl = 1 }]").is_err());
    }
}
