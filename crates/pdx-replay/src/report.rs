//! Aggregation of the per-request records into the replay report.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

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

/// One request of the replay: what was asked and what came back (also one line of `--export`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RequestRecord {
    /// Position in the replayed trace (0-based, in order of arrival).
    pub index: usize,
    /// When it was sent, s from the start of the replay.
    pub sent_s: f64,
    /// Time to first token, ms (`None` when no token came).
    pub ttft_ms: Option<f64>,
    /// Every gap between consecutive token events, ms.
    pub itl_ms: Vec<f64>,
    /// Time per output token after the first, ms (vLLM's TPOT; `None` below 2 tokens).
    pub tpot_ms: Option<f64>,
    /// End-to-end latency, ms.
    pub e2e_ms: f64,
    /// Prompt length sent, tokens (the trace's, after `--scale-tokens`).
    pub input_tokens: u32,
    /// Prompt length as the server counted it (`usage.prompt_tokens`), if it said.
    pub prompt_tokens: Option<u32>,
    /// Output length asked for (`max_tokens`), tokens.
    pub output_tokens_requested: u32,
    /// Output tokens received.
    pub output_tokens: u32,
    /// HTTP status, when a response came.
    pub status: Option<u16>,
    /// Failure kind (`connect`, `http_503`, `timeout`, `stream_error`, `incomplete`, …); `None` on success.
    pub error: Option<String>,
    /// What the server or the connection said about the failure.
    pub message: Option<String>,
    /// The worker that served it, when a response header named it.
    pub worker: Option<String>,
}

impl RequestRecord {
    /// The record of request `index`, sent at `sent_s` (s from the start) with `input_tokens` of prompt and
    /// `output_tokens_requested` of `max_tokens`, from what the client saw of it.
    pub fn from_outcome(
        index: usize,
        sent_s: f64,
        o: crate::client::Outcome,
        input_tokens: u32,
        output_tokens_requested: u32,
    ) -> Self {
        let ms = |us: u64| us as f64 / 1e3;
        Self {
            index,
            sent_s,
            ttft_ms: o.ttft_us.map(ms),
            itl_ms: o.itl_us.iter().map(|&g| ms(g)).collect(),
            tpot_ms: o.tpot_us().map(|t| t / 1e3),
            e2e_ms: ms(o.e2e_us),
            input_tokens,
            prompt_tokens: o.prompt_tokens,
            output_tokens_requested,
            output_tokens: o.tokens,
            status: o.status,
            error: o.error,
            message: o.message,
            worker: o.worker,
        }
    }

    /// True when the request completed with a full stream.
    pub fn succeeded(&self) -> bool {
        self.error.is_none()
    }
}

/// Failed requests of one kind, status and message.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FailureGroup {
    /// Failure kind (`connect`, `http_404`, `timeout`, …).
    pub kind: String,
    /// HTTP status, when a response came.
    pub status: Option<u16>,
    /// The message, when there was one.
    pub message: Option<String>,
    /// Requests that failed so.
    pub count: u64,
}

impl std::fmt::Display for FailureGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) if self.kind == format!("http_{s}") => write!(f, "HTTP {s}")?,
            Some(s) => write!(f, "{} (HTTP {s})", self.kind)?,
            None => write!(f, "{}", self.kind)?,
        }
        if let Some(m) = &self.message {
            write!(f, ": {m}")?;
        }
        Ok(())
    }
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
    /// Requests that failed, by kind, status and message, most frequent first.
    pub failures: Vec<FailureGroup>,
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
    /// Time to first token, of the succeeded requests.
    pub ttft_ms: Percentiles,
    /// Gaps between consecutive tokens, of the succeeded requests.
    pub itl_ms: Percentiles,
    /// Time per output token after the first, per succeeded request.
    pub tpot_ms: Percentiles,
    /// End-to-end latency, of the succeeded requests.
    pub e2e_ms: Percentiles,
    /// SLO targets given.
    pub slo: Slo,
    /// Fraction of sent requests that succeeded within the SLO (when a target was given).
    pub slo_attainment: Option<f64>,
    /// SLO-attaining requests per second (when a target was given).
    pub goodput_rps: Option<f64>,
}

/// True when `r` succeeded within `slo`.
pub fn attains(r: &RequestRecord, slo: &Slo) -> bool {
    r.succeeded()
        && slo
            .ttft_ms
            .is_none_or(|s| r.ttft_ms.is_some_and(|t| t <= s))
        && slo.itl_ms.is_none_or(|s| r.tpot_ms.is_none_or(|t| t <= s))
}

/// Builds the report from every request's record.
pub fn build(records: &[RequestRecord], duration_s: f64, slo: Slo) -> Report {
    let mut acc = Accumulator::new(slo);
    for o in records {
        acc.add(o);
    }
    acc.finish(duration_s)
}

/// The report built one request at a time (what [`build`] does over a slice), for sources that do not keep
/// every record whole, such as `pdx sim`: its inter-token gaps can go straight to
/// [`Accumulator::record_itl_us`] instead of each record's `itl_ms`.
pub struct Accumulator {
    ttft: Histogram<u64>,
    itl: Histogram<u64>,
    tpot: Histogram<u64>,
    e2e: Histogram<u64>,
    r: Report,
    groups: BTreeMap<(String, Option<u16>, Option<String>), u64>,
    attained: u64,
}

/// ms to whole µs, at least 1 (the histograms' unit).
fn us(ms: f64) -> u64 {
    ((ms * 1e3).round() as u64).max(1)
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
            groups: BTreeMap::new(),
            attained: 0,
        }
    }

    /// Records one gap between consecutive tokens of some request, µs.
    pub fn record_itl_us(&mut self, gap_us: u64) {
        let _ = self.itl.record(gap_us.max(1));
    }

    /// Adds one request.
    pub fn add(&mut self, o: &RequestRecord) {
        let r = &mut self.r;
        r.requests += 1;
        r.input_tokens += u64::from(o.input_tokens);
        r.output_tokens_requested += u64::from(o.output_tokens_requested);
        if let Some(kind) = &o.error {
            *r.errors.entry(kind.clone()).or_default() += 1;
            *self
                .groups
                .entry((kind.clone(), o.status, o.message.clone()))
                .or_default() += 1;
            return;
        }
        r.succeeded += 1;
        r.output_tokens_received += u64::from(o.output_tokens);
        if o.output_tokens != o.output_tokens_requested {
            r.length_mismatches += 1;
        }
        let _ = self.e2e.record(us(o.e2e_ms));
        if let Some(t) = o.ttft_ms {
            let _ = self.ttft.record(us(t));
        }
        for &g in &o.itl_ms {
            let _ = self.itl.record(us(g));
        }
        if let Some(t) = o.tpot_ms {
            let _ = self.tpot.record(us(t));
        }
        if attains(o, &r.slo) {
            self.attained += 1;
        }
    }

    /// The report over `duration_s` seconds.
    pub fn finish(self, duration_s: f64) -> Report {
        let mut r = self.r;
        let slo = r.slo;
        r.duration_s = duration_s;
        r.failures = self
            .groups
            .into_iter()
            .map(|((kind, status, message), count)| FailureGroup {
                kind,
                status,
                message,
                count,
            })
            .collect();
        r.failures.sort_by_key(|g| std::cmp::Reverse(g.count));
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
        r
    }
}

impl Report {
    /// Requests that failed.
    pub fn failed(&self) -> u64 {
        self.requests - self.succeeded
    }

    /// The report as a human-readable table. Failures are listed by kind, status and message; latency rows
    /// cover the succeeded requests only, and are left out when none succeeded.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let failed = self.failed();
        s += &format!(
            "requests {}  succeeded {}  failed {}\n",
            self.requests, self.succeeded, failed
        );
        for g in &self.failures {
            s += &format!("  failed {:>6} × {g}\n", g.count);
        }
        if self.succeeded == 0 {
            if self.requests > 0 {
                s += &format!(
                    "all {} requests failed: no latency to report\n",
                    self.requests
                );
            }
            return s;
        }
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
        if failed > 0 {
            s += &format!(
                "latency below: the {} succeeded requests only\n",
                self.succeeded
            );
        }
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

    fn ok(ttft: f64, e2e: f64, tokens: u32) -> RequestRecord {
        let tpot = (e2e - ttft) / f64::from(tokens.max(2) - 1);
        RequestRecord {
            ttft_ms: Some(ttft),
            e2e_ms: e2e,
            output_tokens: tokens,
            output_tokens_requested: tokens,
            input_tokens: 100,
            itl_ms: vec![tpot; tokens.saturating_sub(1) as usize],
            tpot_ms: (tokens > 1).then_some(tpot),
            ..Default::default()
        }
    }

    fn failed(kind: &str, status: Option<u16>, message: &str) -> RequestRecord {
        RequestRecord {
            error: Some(kind.into()),
            status,
            message: Some(message.into()),
            output_tokens_requested: 11,
            input_tokens: 100,
            ..Default::default()
        }
    }

    #[test]
    fn slo_attainment_and_goodput() {
        let recs = vec![
            ok(50.0, 150.0, 11),  // TTFT 50 ms, TPOT 10 ms: attains
            ok(300.0, 400.0, 11), // TTFT too slow
            ok(50.0, 550.0, 11),  // TPOT 50 ms: too slow
            failed("http_503", Some(503), "overloaded"),
        ];
        let slo = Slo {
            ttft_ms: Some(100.0),
            itl_ms: Some(20.0),
        };
        let r = build(&recs, 2.0, slo);
        assert_eq!((r.requests, r.succeeded), (4, 3));
        assert_eq!(r.errors.get("http_503"), Some(&1));
        assert_eq!(r.slo_attainment, Some(0.25));
        assert_eq!(r.goodput_rps, Some(0.5));
        assert_eq!(r.output_tokens_received, 33);
        assert_eq!(r.length_mismatches, 0);
        assert!((r.ttft_ms.p50 - 50.0).abs() < 0.1);
        let no_slo = build(&recs, 2.0, Slo::default());
        assert_eq!(no_slo.slo_attainment, None);
        let table = r.to_table();
        assert!(table.contains("attainment 25.0%"), "{table}");
        assert!(table.contains("the 3 succeeded requests only"), "{table}");
    }

    #[test]
    fn failures_are_grouped_by_status_and_message() {
        let recs = vec![
            failed("http_404", Some(404), "Not Found"),
            failed("connect", None, "Connection refused (os error 111)"),
            failed("http_404", Some(404), "Not Found"),
            failed("http_404", Some(404), "The model `x` does not exist."),
        ];
        let r = build(&recs, 1.0, Slo::default());
        assert_eq!(r.failures.len(), 3);
        assert_eq!(r.failures[0].count, 2, "most frequent first");
        assert_eq!(r.failures[0].to_string(), "HTTP 404: Not Found");
        let table = r.to_table();
        assert!(
            table.contains("failed      2 × HTTP 404: Not Found"),
            "{table}"
        );
        assert!(
            table.contains("connect: Connection refused (os error 111)"),
            "{table}"
        );
        // Before: an all-failed run printed percentile rows of 0.00.
        assert!(
            table.contains("all 4 requests failed") && !table.contains("p50"),
            "{table}"
        );
    }
}
