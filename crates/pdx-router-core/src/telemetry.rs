//! What the router believes about one worker's engine: smoothed engine gauges from its Prometheus
//! `/metrics` (requests waiting and running, KV-cache usage) and smoothed latencies the router
//! observes itself (TTFT, TPOT, prefill speed). Sans-IO: the scraper and the request path feed
//! values with the current time (µs on the caller's monotonic clock); policies read a
//! [`TelemetrySnapshot`].
//!
//! Smoothing is an exponentially weighted moving average per sample, `ewma ← α·x + (1 − α)·ewma`
//! (the routing lab's EWMA-smoothed TTFT/TPOT; α is configurable). A worker whose scrapes fail
//! keeps its last engine values for [`TelemetryConfig::stale_after_us`] after its last good scrape;
//! after that its engine state is *unknown*, which policies treat as loaded, never as idle. The
//! first good scrape after a stale period starts the averages afresh, so values from before an
//! outage do not linger.

/// Telemetry settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TelemetryConfig {
    /// EWMA weight of a new sample, `0 < α ≤ 1` (1: the last sample only).
    pub alpha: f64,
    /// How long (µs) the values of a worker's last good scrape stand; after that its engine state is
    /// unknown.
    pub stale_after_us: u64,
}

impl Default for TelemetryConfig {
    /// α = 0.3 (a sample's weight halves in about two samples: at the 250 ms scrape interval the
    /// gauges follow a change within about a second); values stand 2 s (8 scrapes) after the last
    /// good scrape.
    fn default() -> Self {
        Self {
            alpha: 0.3,
            stale_after_us: 2_000_000,
        }
    }
}

impl TelemetryConfig {
    /// Checks the settings.
    ///
    /// Errors: [`crate::CoreError::InvalidSetting`] for α outside `(0, 1]`.
    pub fn validate(&self) -> Result<(), crate::CoreError> {
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return Err(crate::CoreError::InvalidSetting(format!(
                "telemetry alpha must be in (0, 1], got {}",
                self.alpha
            )));
        }
        Ok(())
    }
}

/// An exponentially weighted moving average; empty until its first sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Ewma {
    value: Option<f64>,
}

impl Ewma {
    /// Feeds one sample with weight `alpha`. Non-finite samples are ignored.
    pub fn feed(&mut self, x: f64, alpha: f64) {
        if !x.is_finite() {
            return;
        }
        self.value = Some(match self.value {
            None => x,
            Some(v) => alpha * x + (1.0 - alpha) * v,
        });
    }

    /// The average, `None` before the first sample.
    pub fn get(&self) -> Option<f64> {
        self.value
    }

    /// Forgets every sample.
    pub fn reset(&mut self) {
        self.value = None;
    }
}

/// Engine gauges read from one scrape of a worker's `/metrics`; `None` where the engine does not export
/// the gauge.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineGauges {
    /// Requests queued in the engine (`vllm:num_requests_waiting`, `sglang:num_queue_reqs`).
    pub waiting: Option<f64>,
    /// Requests the engine is running (`vllm:num_requests_running`, `sglang:num_running_reqs`).
    pub running: Option<f64>,
    /// Fraction (0–1) of the KV cache in use (`vllm:kv_cache_usage_perc`, the older
    /// `vllm:gpu_cache_usage_perc`, `sglang:token_usage`).
    pub kv_usage: Option<f64>,
}

impl EngineGauges {
    /// True when the scrape carried at least one of the gauges.
    pub fn any(&self) -> bool {
        self.waiting.is_some() || self.running.is_some() || self.kv_usage.is_some()
    }
}

/// Largest queue or running count taken from an engine (bounds what a worker can make the router believe).
pub const MAX_ENGINE_COUNT: f64 = 1e9;

/// Largest latency sample taken, seconds (one hour).
pub const MAX_LATENCY_S: f64 = 3600.0;

/// One worker's telemetry state.
#[derive(Debug, Clone)]
pub struct WorkerTelemetry {
    cfg: TelemetryConfig,
    waiting: Ewma,
    running: Ewma,
    kv_usage: Ewma,
    last_ok_us: Option<u64>,
    failed_in_a_row: u32,
    ttft: Ewma,
    tpot: Ewma,
    prefill_s_per_token: Ewma,
}

impl WorkerTelemetry {
    /// No values yet: unknown.
    pub fn new(cfg: TelemetryConfig) -> Self {
        Self {
            cfg,
            waiting: Ewma::default(),
            running: Ewma::default(),
            kv_usage: Ewma::default(),
            last_ok_us: None,
            failed_in_a_row: 0,
            ttft: Ewma::default(),
            tpot: Ewma::default(),
            prefill_s_per_token: Ewma::default(),
        }
    }

    fn stale(&self, now_us: u64) -> bool {
        self.last_ok_us
            .is_none_or(|t| now_us.saturating_sub(t) > self.cfg.stale_after_us)
    }

    /// A good scrape at `now_us`. Gauges out of range are clamped (counts to `0..=`[`MAX_ENGINE_COUNT`], KV
    /// usage to `0..=1`); a scrape with none of the gauges counts as failed.
    pub fn on_scrape(&mut self, g: EngineGauges, now_us: u64) {
        if !g.any() {
            self.on_scrape_failed(now_us);
            return;
        }
        if self.stale(now_us) {
            self.waiting.reset();
            self.running.reset();
            self.kv_usage.reset();
        }
        let a = self.cfg.alpha;
        let count = |x: f64| x.clamp(0.0, MAX_ENGINE_COUNT);
        if let Some(x) = g.waiting.filter(|x| x.is_finite()) {
            self.waiting.feed(count(x), a);
        }
        if let Some(x) = g.running.filter(|x| x.is_finite()) {
            self.running.feed(count(x), a);
        }
        if let Some(x) = g.kv_usage.filter(|x| x.is_finite()) {
            self.kv_usage.feed(x.clamp(0.0, 1.0), a);
        }
        self.last_ok_us = Some(now_us);
        self.failed_in_a_row = 0;
    }

    /// A scrape that failed (no answer, an error status, a body that does not parse).
    pub fn on_scrape_failed(&mut self, _now_us: u64) {
        self.failed_in_a_row = self.failed_in_a_row.saturating_add(1);
    }

    /// Scrapes failed since the last good one.
    pub fn failed_in_a_row(&self) -> u32 {
        self.failed_in_a_row
    }

    /// A time to first token observed on this worker, seconds (the prefill request's duration on a prefill
    /// worker; first token after the response head on a decode worker; first token after the request's
    /// arrival on an aggregated worker).
    pub fn observe_ttft(&mut self, secs: f64) {
        if secs.is_finite() && (0.0..=MAX_LATENCY_S).contains(&secs) {
            self.ttft.feed(secs, self.cfg.alpha);
        }
    }

    /// A time per output token observed on this worker, seconds (mean gap between token events of one
    /// stream after its first).
    pub fn observe_tpot(&mut self, secs: f64) {
        if secs.is_finite() && (0.0..=MAX_LATENCY_S).contains(&secs) {
            self.tpot.feed(secs, self.cfg.alpha);
        }
    }

    /// A prefill of `tokens` tokens of work (the request's prompt plus the prompt tokens the router had in
    /// flight on the worker when it was sent) that took `secs` seconds: a sample of the worker's prefill
    /// speed, kept as seconds per token (averaging times, not rates, so one fast outlier cannot dominate).
    pub fn observe_prefill(&mut self, secs: f64, tokens: u64) {
        if tokens == 0 || !secs.is_finite() || !(0.0..=MAX_LATENCY_S).contains(&secs) {
            return;
        }
        self.prefill_s_per_token
            .feed(secs / tokens as f64, self.cfg.alpha);
    }

    /// What a policy sees at `now_us`.
    pub fn snapshot(&self, now_us: u64) -> TelemetrySnapshot {
        let known = !self.stale(now_us);
        TelemetrySnapshot {
            engine_known: known,
            waiting: if known { self.waiting.get() } else { None },
            running: if known { self.running.get() } else { None },
            kv_usage: if known { self.kv_usage.get() } else { None },
            ttft_s: self.ttft.get(),
            tpot_s: self.tpot.get(),
            prefill_tokens_per_s: self
                .prefill_s_per_token
                .get()
                .filter(|s| *s > 0.0)
                .map(|s| 1.0 / s),
            age_us: self.last_ok_us.map(|t| now_us.saturating_sub(t)),
        }
    }
}

/// A worker's telemetry as a policy sees it at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TelemetrySnapshot {
    /// A good scrape within the staleness bound: the engine gauges below are current.
    pub engine_known: bool,
    /// Smoothed requests waiting in the engine (`None`: unknown).
    pub waiting: Option<f64>,
    /// Smoothed requests running in the engine.
    pub running: Option<f64>,
    /// Smoothed KV-cache usage, 0–1.
    pub kv_usage: Option<f64>,
    /// Smoothed TTFT observed by the router, seconds.
    pub ttft_s: Option<f64>,
    /// Smoothed TPOT observed by the router, seconds.
    pub tpot_s: Option<f64>,
    /// Observed prefill speed, tokens per second.
    pub prefill_tokens_per_s: Option<f64>,
    /// Time since the last good scrape, µs (`None`: never scraped).
    pub age_us: Option<u64>,
}

impl TelemetrySnapshot {
    /// Nothing known (the worker was never scraped nor observed).
    pub const UNKNOWN: Self = Self {
        engine_known: false,
        waiting: None,
        running: None,
        kv_usage: None,
        ttft_s: None,
        tpot_s: None,
        prefill_tokens_per_s: None,
        age_us: None,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TelemetryConfig {
        TelemetryConfig {
            alpha: 0.5,
            stale_after_us: 1_000,
        }
    }

    fn gauges(w: f64, r: f64, kv: f64) -> EngineGauges {
        EngineGauges {
            waiting: Some(w),
            running: Some(r),
            kv_usage: Some(kv),
        }
    }

    #[test]
    fn ewma_weights_new_samples_by_alpha() {
        let mut e = Ewma::default();
        assert_eq!(e.get(), None);
        e.feed(10.0, 0.5);
        assert_eq!(e.get(), Some(10.0), "the first sample is the average");
        e.feed(20.0, 0.5);
        assert_eq!(e.get(), Some(15.0));
        e.feed(f64::NAN, 0.5);
        assert_eq!(e.get(), Some(15.0), "non-finite samples are ignored");
        e.feed(15.0, 1.0);
        e.feed(3.0, 1.0);
        assert_eq!(e.get(), Some(3.0), "alpha 1 keeps the last sample");
    }

    #[test]
    fn scrapes_are_smoothed_and_clamped() {
        let mut t = WorkerTelemetry::new(cfg());
        assert_eq!(t.snapshot(0), TelemetrySnapshot::UNKNOWN);
        t.on_scrape(gauges(4.0, 2.0, 0.5), 100);
        t.on_scrape(gauges(8.0, 2.0, 0.7), 200);
        let s = t.snapshot(200);
        assert!(s.engine_known);
        assert_eq!(s.waiting, Some(6.0));
        assert_eq!(s.running, Some(2.0));
        assert!((s.kv_usage.unwrap() - 0.6).abs() < 1e-12);
        assert_eq!(s.age_us, Some(0));
        // Out-of-range values cannot make the router believe anything outside the bounds.
        t.on_scrape(gauges(-5.0, 1e30, 7.0), 300);
        let s = t.snapshot(300);
        assert_eq!(s.waiting, Some(3.0));
        assert!(s.running.unwrap() <= MAX_ENGINE_COUNT);
        assert!(s.kv_usage.unwrap() <= 1.0);
    }

    #[test]
    fn a_failing_worker_keeps_its_values_for_a_bounded_time_then_is_unknown_not_idle() {
        let mut t = WorkerTelemetry::new(cfg());
        t.on_scrape(gauges(9.0, 3.0, 0.9), 1_000);
        t.on_scrape_failed(1_250);
        t.on_scrape_failed(1_500);
        assert_eq!(t.failed_in_a_row(), 2);
        let s = t.snapshot(1_900);
        assert!(s.engine_known, "within the bound: last values stand");
        assert_eq!(s.waiting, Some(9.0));
        let s = t.snapshot(2_001);
        assert!(!s.engine_known, "past the bound: unknown");
        assert_eq!(s.waiting, None, "unknown, not zero (idle)");
        assert_eq!(s.kv_usage, None);
        assert_eq!(s.age_us, Some(1_001));
        // Back: the averages start afresh instead of blending with values from before the outage.
        t.on_scrape(gauges(1.0, 1.0, 0.1), 5_000);
        let s = t.snapshot(5_000);
        assert_eq!(s.waiting, Some(1.0));
        assert_eq!(t.failed_in_a_row(), 0);
    }

    #[test]
    fn a_scrape_without_engine_gauges_counts_as_failed() {
        let mut t = WorkerTelemetry::new(cfg());
        t.on_scrape(EngineGauges::default(), 10);
        assert_eq!(t.failed_in_a_row(), 1);
        assert!(!t.snapshot(10).engine_known);
        // One gauge is enough.
        t.on_scrape(
            EngineGauges {
                kv_usage: Some(0.2),
                ..Default::default()
            },
            20,
        );
        let s = t.snapshot(20);
        assert!(s.engine_known);
        assert_eq!(s.waiting, None);
        assert_eq!(s.kv_usage, Some(0.2));
    }

    #[test]
    fn observed_latencies_and_prefill_speed() {
        let mut t = WorkerTelemetry::new(cfg());
        t.observe_ttft(0.2);
        t.observe_ttft(0.4);
        t.observe_ttft(-1.0);
        t.observe_ttft(1e9);
        t.observe_tpot(0.01);
        // 1000 tokens in 0.5 s, then 1000 in 1.5 s: mean 1 ms per token, 1000 tokens/s.
        t.observe_prefill(0.5, 1000);
        t.observe_prefill(1.5, 1000);
        t.observe_prefill(1.0, 0);
        let s = t.snapshot(0);
        assert!((s.ttft_s.unwrap() - 0.3).abs() < 1e-12);
        assert_eq!(s.tpot_s, Some(0.01));
        assert!((s.prefill_tokens_per_s.unwrap() - 1000.0).abs() < 1e-6);
        // Observed latencies do not depend on scrapes.
        assert!(!s.engine_known);
    }

    #[test]
    fn alpha_is_checked() {
        for a in [0.0, -0.1, 1.5, f64::NAN] {
            let c = TelemetryConfig {
                alpha: a,
                ..Default::default()
            };
            assert!(c.validate().is_err(), "{a}");
        }
        assert!(TelemetryConfig::default().validate().is_ok());
    }
}
