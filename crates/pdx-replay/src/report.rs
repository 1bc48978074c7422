//! Aggregation of outcomes into the replay report.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::Outcome;

/// Percentiles of a latency, in ms.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Percentiles {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    let ms = |us: u64| us as f64 / 1e3;
    Percentiles {
        mean: h.mean() / 1e3,
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
    }
}

/// SLO targets: a request attains its SLO when TTFT ≤ `ttft_ms` and TPOT (mean ITL) ≤ `itl_ms`
/// (DistServe's definition of goodput counts such requests per second).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Slo {
    /// TTFT target, ms.
    pub ttft_ms: Option<f64>,
    /// ITL (TPOT) target, ms.
    pub itl_ms: Option<f64>,
}

/// The replay's results (also the `--json` schema).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Requests sent.
    pub requests: u64,
    /// Requests that completed with a full stream.
    pub succeeded: u64,
    /// Requests that failed, by kind.
    pub errors: BTreeMap<String, u64>,
    /// Wall time from the first send to the last completion, s.
    pub duration_s: f64,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Output tokens per second.
    pub output_token_throughput: f64,
    /// Prompt tokens sent, as requested by the trace (after scaling).
    pub input_tokens: u64,
    /// Output tokens requested (`max_tokens` summed).
    pub output_tokens_requested: u64,
    /// Output tokens received.
    pub output_tokens_received: u64,
    /// Requests whose received output length differs from the requested one.
    pub length_mismatches: u64,
    /// Time to first token.
    pub ttft_ms: Percentiles,
    /// Gaps between consecutive tokens.
    pub itl_ms: Percentiles,
    /// Time per output token after the first, per request.
    pub tpot_ms: Percentiles,
    /// End-to-end latency.
    pub e2e_ms: Percentiles,
    /// SLO targets given.
    pub slo: Slo,
    /// Fraction of sent requests that succeeded within the SLO (when a target was given).
    pub slo_attainment: Option<f64>,
    /// SLO-attaining requests per second (when a target was given).
    pub goodput_rps: Option<f64>,
}

/// Per-request points for plots: (send time from start s, TTFT ms, TPOT ms).
pub type Points = Vec<(f64, f64, Option<f64>)>;

/// Builds the report. `sent_at_s[i]` is when request `i` was sent; `requested[i]` its `max_tokens` and prompt
/// tokens.
pub fn build(
    outcomes: &[Outcome],
    sent_at_s: &[f64],
    requested: &[(u32, u32)],
    duration_s: f64,
    slo: Slo,
) -> (Report, Points) {
    let mut acc = Accumulator::new(slo);
    for (i, o) in outcomes.iter().enumerate() {
        let (osl, isl) = requested.get(i).copied().unwrap_or_default();
        acc.add(o, sent_at_s.get(i).copied().unwrap_or_default(), osl, isl);
    }
    acc.finish(duration_s)
}

/// The report built one request at a time (what [`build`] does over a slice), for sources that
/// do not keep every outcome, such as `pdx sim`: its inter-token gaps can go straight to
/// [`Accumulator::record_itl_us`] instead of each outcome's `itl_us`.
pub struct Accumulator {
    ttft: Histogram<u64>,
    itl: Histogram<u64>,
    tpot: Histogram<u64>,
    e2e: Histogram<u64>,
    r: Report,
    points: Points,
    attained: u64,
}

impl Accumulator {
    /// An empty report for SLO `slo`.
    pub fn new(slo: Slo) -> Self {
        let hist = || Histogram::<u64>::new(3).expect("3 significant figures is a valid precision");
        Self {
            ttft: hist(),
            itl: hist(),
            tpot: hist(),
            e2e: hist(),
            r: Report {
                slo,
                ..Default::default()
            },
            points: Vec::new(),
            attained: 0,
        }
    }

    /// Records one gap between consecutive tokens of some request, µs.
    pub fn record_itl_us(&mut self, gap_us: u64) {
        let _ = self.itl.record(gap_us.max(1));
    }

    /// Adds one request: its outcome, when it was sent (s from the start), its requested output
    /// (`max_tokens`) and prompt tokens.
    pub fn add(&mut self, o: &Outcome, sent_at_s: f64, osl: u32, isl: u32) {
        let slo = self.r.slo;
        let r = &mut self.r;
        r.requests += 1;
        r.input_tokens += u64::from(isl);
        r.output_tokens_requested += u64::from(osl);
        if let Some(kind) = &o.error {
            *r.errors.entry(kind.clone()).or_default() += 1;
            return;
        }
        r.succeeded += 1;
        r.output_tokens_received += u64::from(o.tokens);
        if o.tokens != osl {
            r.length_mismatches += 1;
        }
        let _ = self.e2e.record(o.e2e_us.max(1));
        if let Some(t) = o.ttft_us {
            let _ = self.ttft.record(t.max(1));
        }
        for &g in &o.itl_us {
            let _ = self.itl.record(g.max(1));
        }
        let tp = o.tpot_us();
        if let Some(t) = tp {
            let _ = self.tpot.record((t as u64).max(1));
        }
        let ok_ttft = slo
            .ttft_ms
            .is_none_or(|s| o.ttft_us.is_some_and(|t| t as f64 / 1e3 <= s));
        let ok_itl = slo.itl_ms.is_none_or(|s| tp.is_none_or(|t| t / 1e3 <= s));
        if ok_ttft && ok_itl {
            self.attained += 1;
        }
        self.points.push((
            sent_at_s,
            o.ttft_us.unwrap_or_default() as f64 / 1e3,
            tp.map(|t| t / 1e3),
        ));
    }

    /// The report over `duration_s` seconds, and the per-request points.
    pub fn finish(self, duration_s: f64) -> (Report, Points) {
        let mut r = self.r;
        let slo = r.slo;
        r.duration_s = duration_s;
        r.ttft_ms = percentiles(&self.ttft);
        r.itl_ms = percentiles(&self.itl);
        r.tpot_ms = percentiles(&self.tpot);
        r.e2e_ms = percentiles(&self.e2e);
        if duration_s > 0.0 {
            r.request_throughput = r.succeeded as f64 / duration_s;
            r.output_token_throughput = r.output_tokens_received as f64 / duration_s;
        }
        if slo.ttft_ms.is_some() || slo.itl_ms.is_some() {
            r.slo_attainment = Some(if r.requests == 0 {
                0.0
            } else {
                self.attained as f64 / r.requests as f64
            });
            r.goodput_rps = Some(if duration_s > 0.0 {
                self.attained as f64 / duration_s
            } else {
                0.0
            });
        }
        (r, self.points)
    }
}

impl Report {
    /// The report as a human-readable table.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let failed: u64 = self.errors.values().sum();
        s += &format!(
            "requests {}  succeeded {}  failed {}{}\n",
            self.requests,
            self.succeeded,
            failed,
            if self.errors.is_empty() {
                String::new()
            } else {
                format!(" {:?}", self.errors)
            }
        );
        s += &format!(
            "duration {:.1} s  throughput {:.2} req/s, {:.0} output tok/s  tokens in {} / out {} of {} requested{}\n",
            self.duration_s,
            self.request_throughput,
            self.output_token_throughput,
            self.input_tokens,
            self.output_tokens_received,
            self.output_tokens_requested,
            if self.length_mismatches > 0 {
                format!(" ({} length mismatches)", self.length_mismatches)
            } else {
                String::new()
            }
        );
        s += "latency (ms)      mean      p50      p90      p99\n";
        for (name, p) in [
            ("TTFT", &self.ttft_ms),
            ("ITL", &self.itl_ms),
            ("TPOT", &self.tpot_ms),
            ("end-to-end", &self.e2e_ms),
        ] {
            s += &format!(
                "{name:<12} {:>9.2} {:>8.2} {:>8.2} {:>8.2}\n",
                p.mean, p.p50, p.p90, p.p99
            );
        }
        if let (Some(a), Some(g)) = (self.slo_attainment, self.goodput_rps) {
            s += &format!(
                "SLO (TTFT ≤ {} ms, ITL ≤ {} ms): attainment {:.1}%, goodput {:.2} req/s\n",
                self.slo.ttft_ms.map_or("-".into(), |v| v.to_string()),
                self.slo.itl_ms.map_or("-".into(), |v| v.to_string()),
                a * 100.0,
                g
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(ttft: u64, e2e: u64, tokens: u32) -> Outcome {
        Outcome {
            ttft_us: Some(ttft),
            e2e_us: e2e,
            tokens,
            itl_us: vec![
                (e2e - ttft) / u64::from(tokens.max(2) - 1);
                tokens.saturating_sub(1) as usize
            ],
            ..Default::default()
        }
    }

    #[test]
    fn slo_attainment_and_goodput() {
        let outs = vec![
            ok(50_000, 150_000, 11),  // TTFT 50 ms, TPOT 10 ms: attains
            ok(300_000, 400_000, 11), // TTFT too slow
            ok(50_000, 550_000, 11),  // TPOT 50 ms: too slow
            Outcome {
                error: Some("http_503".into()),
                ..Default::default()
            },
        ];
        let req = vec![(11, 100); 4];
        let (r, points) = build(
            &outs,
            &[0.0, 1.0, 2.0, 3.0],
            &req,
            2.0,
            Slo {
                ttft_ms: Some(100.0),
                itl_ms: Some(20.0),
            },
        );
        assert_eq!((r.requests, r.succeeded), (4, 3));
        assert_eq!(r.errors.get("http_503"), Some(&1));
        assert_eq!(r.slo_attainment, Some(0.25));
        assert_eq!(r.goodput_rps, Some(0.5));
        assert_eq!(r.output_tokens_received, 33);
        assert_eq!(r.length_mismatches, 0);
        assert_eq!(points.len(), 3);
        assert!((r.ttft_ms.p50 - 50.0).abs() < 0.1);
        let (no_slo, _) = build(&outs, &[0.0; 4], &req, 2.0, Slo::default());
        assert_eq!(no_slo.slo_attainment, None);
        assert!(r.to_table().contains("attainment 25.0%"));
    }
}
