//! Engine telemetry: one thread for the whole router (`pdx-router-telemetry`, off the request path and
//! shared by every server thread) GETs each worker's Prometheus `/metrics` every interval (default
//! 250 ms), reads the engine's gauges and feeds the worker's [`pdx_router_core::WorkerTelemetry`]
//! (EWMA, bounded staleness). The latencies the router observes itself (TTFT, TPOT, prefill speed)
//! are fed on the request path at a request's end ([`crate::body`], [`crate::orchestrate`]). After each
//! round the thread exports what the router believes per worker as pdx metrics (see [`crate::metrics`]).
//!
//! Gauges read (summed over the series of one name, e.g. vLLM's per-engine series under data
//! parallelism; KV usage averaged):
//! * waiting: `vllm:num_requests_waiting`, SGLang's `sglang:num_queue_reqs`;
//! * running: `vllm:num_requests_running`, `sglang:num_running_reqs`;
//! * KV-cache usage (0–1): `vllm:kv_cache_usage_perc` (vLLM V1), the older `vllm:gpu_cache_usage_perc`,
//!   `sglang:token_usage`.
//!
//! The body is untrusted: at most [`MAX_METRICS_BYTES`], UTF-8, and parsed by the strict parser of
//! [`pdx_protocol::prom`]; a body that breaks any rule is a failed scrape, and so is one without any of
//! the gauges (the worker stays unknown rather than idle). Each worker has at most one scrape in flight,
//! bounded by [`scrape_timeout`], so a worker that does not answer delays no other.

use crate::api::Shared;
use crate::metrics::{Metrics, OutcomeLabel, WorkerLabel};
use crate::registry::Worker;
use crate::upstream;
use http_body_util::BodyExt;
use pdx_protocol::prom::{self, Limits, PromError};
use pdx_router_core::{EngineGauges, TelemetrySnapshot};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Largest `/metrics` body read, bytes.
pub const MAX_METRICS_BYTES: usize = 4 << 20;

/// The longest a scrape may take: four intervals, between 0.5 s and 2 s.
pub fn scrape_timeout(interval: Duration) -> Duration {
    (interval * 4).clamp(Duration::from_millis(500), Duration::from_secs(2))
}

/// What is wrong with a scrape.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// No connection, no answer in time, or a broken response.
    #[error("no answer")]
    Unreachable,
    /// A status other than 200.
    #[error("status {0}")]
    Status(u16),
    /// A body over [`MAX_METRICS_BYTES`].
    #[error("body over {MAX_METRICS_BYTES} bytes")]
    TooLarge,
    /// A body that is not UTF-8.
    #[error("body is not UTF-8")]
    NotUtf8,
    /// A body that does not parse.
    #[error("{0}")]
    Parse(#[from] PromError),
}

/// The engine gauges of a `/metrics` text (see the module docs for the names).
///
/// Errors: [`PromError`] when the text breaks the format or its bounds.
pub fn gauges(text: &str) -> Result<EngineGauges, PromError> {
    let limits = Limits {
        max_bytes: MAX_METRICS_BYTES,
        ..Limits::default()
    };
    let (mut waiting, mut running) = (None::<f64>, None::<f64>);
    let (mut kv_sum, mut kv_n) = (0.0, 0u32);
    let add = |slot: &mut Option<f64>, v: f64| *slot = Some(slot.unwrap_or(0.0) + v);
    prom::for_each_sample(text, &limits, |s| {
        if !s.value.is_finite() {
            return;
        }
        match s.name {
            "vllm:num_requests_waiting" | "sglang:num_queue_reqs" => add(&mut waiting, s.value),
            "vllm:num_requests_running" | "sglang:num_running_reqs" => add(&mut running, s.value),
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" | "sglang:token_usage" => {
                kv_sum += s.value;
                kv_n += 1;
            }
            _ => {}
        }
    })?;
    Ok(EngineGauges {
        waiting,
        running,
        kv_usage: (kv_n > 0).then(|| kv_sum / f64::from(kv_n)),
    })
}

/// One scrape of the worker at `authority` (keep-alive connections of the telemetry thread's own pool).
///
/// Errors: [`ScrapeError`].
pub async fn scrape(authority: &str, timeout: Duration) -> Result<EngineGauges, ScrapeError> {
    let fut = async {
        let conn = upstream::get(authority, timeout)
            .await
            .map_err(|_| ScrapeError::Unreachable)?;
        let headers: [(&str, &[u8]); 2] =
            [("host", authority.as_bytes()), ("accept", b"text/plain")];
        let r = upstream::send(conn, "GET", "/metrics", &headers, &[])
            .await
            .map_err(|_| ScrapeError::Unreachable)?;
        let status = r.status().as_u16();
        let body = http_body_util::Limited::new(r.into_body(), MAX_METRICS_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ScrapeError::TooLarge
                } else {
                    ScrapeError::Unreachable
                }
            })?
            .to_bytes();
        if status != 200 {
            return Err(ScrapeError::Status(status));
        }
        let text = std::str::from_utf8(&body).map_err(|_| ScrapeError::NotUtf8)?;
        Ok(gauges(text)?)
    };
    monoio::time::timeout(timeout, fut)
        .await
        .unwrap_or(Err(ScrapeError::Unreachable))
}

/// Starts the telemetry thread (when an interval is set); it ends when `stop` is set.
///
/// Errors: the thread cannot be spawned.
pub(crate) fn spawn(sh: Arc<Shared>, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    let Some(every) = sh.cfg.tuning.scrape_interval else {
        return Ok(());
    };
    std::thread::Builder::new()
        .name("pdx-router-telemetry".into())
        .spawn(move || match crate::runtime() {
            Ok(mut rt) => rt.block_on(run(sh, stop, every)),
            Err(e) => tracing::error!(error = %e, "cannot start the telemetry runtime"),
        })?;
    Ok(())
}

async fn run(sh: Arc<Shared>, stop: Arc<AtomicBool>, every: Duration) {
    let timeout = scrape_timeout(every);
    let mut exported: HashSet<crate::metrics::Label> = HashSet::new();
    let mut rounds = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let workers = sh.registry.workers();
        for w in &workers {
            if w.scraping.swap(true, Ordering::AcqRel) {
                continue;
            }
            let (w, sh) = (w.clone(), sh.clone());
            monoio::spawn(async move {
                let r = scrape(&w.authority, timeout).await;
                let now = sh.registry.now_us();
                let outcome = match r {
                    Ok(g) if g.any() => {
                        w.with_telemetry(|t| t.on_scrape(g, now));
                        "ok"
                    }
                    other => {
                        if let Err(e) = &other {
                            tracing::debug!(worker = %w.url, error = %e, "scrape failed");
                        }
                        w.with_telemetry(|t| t.on_scrape_failed(now));
                        "failed"
                    }
                };
                sh.metrics
                    .telemetry_scrapes
                    .get_or_create(&OutcomeLabel { outcome })
                    .inc();
                w.scraping.store(false, Ordering::Release);
            });
        }
        // What the router believes, per worker (this thread is the only writer of these series, so a removed
        // worker's are deleted here).
        let now = sh.registry.now_us();
        let mut seen = HashSet::with_capacity(workers.len());
        for w in &workers {
            export(&sh.metrics, w, &w.telemetry_snapshot(now));
            seen.insert(w.url.clone());
        }
        for gone in exported.difference(&seen) {
            unexport(&sh.metrics, gone);
        }
        exported = seen;
        rounds += 1;
        if rounds % 4 == 0 {
            upstream::prune();
        }
        monoio::time::sleep(every).await;
    }
}

fn set(
    family: &prometheus_client::metrics::family::Family<WorkerLabel, crate::metrics::FloatGauge>,
    label: &WorkerLabel,
    v: Option<f64>,
) {
    match v {
        Some(v) => {
            family.get_or_create(label).set(v);
        }
        None => {
            family.remove(label);
        }
    }
}

/// Exports a worker's snapshot: engine gauges while known (absent when unknown), the age of its last good
/// scrape, the latencies the router observed.
pub fn export(m: &Metrics, w: &Worker, s: &TelemetrySnapshot) {
    let l = WorkerLabel {
        worker: w.url.clone(),
    };
    set(&m.worker_waiting, &l, s.waiting);
    set(&m.worker_running, &l, s.running);
    set(&m.worker_kv_usage, &l, s.kv_usage);
    set(
        &m.worker_telemetry_age,
        &l,
        s.age_us.map(|a| a as f64 / 1e6),
    );
    set(&m.worker_ewma_ttft, &l, s.ttft_s);
    set(&m.worker_ewma_tpot, &l, s.tpot_s);
    set(&m.worker_prefill_speed, &l, s.prefill_tokens_per_s);
}

fn unexport(m: &Metrics, url: &crate::metrics::Label) {
    let l = WorkerLabel {
        worker: url.clone(),
    };
    for f in [
        &m.worker_waiting,
        &m.worker_running,
        &m.worker_kv_usage,
        &m.worker_telemetry_age,
        &m.worker_ewma_ttft,
        &m.worker_ewma_tpot,
        &m.worker_prefill_speed,
    ] {
        f.remove(&l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vllm_and_sglang_gauges() {
        let vllm = "# TYPE vllm:num_requests_waiting gauge\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 2\n\
            vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 3\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 7\n\
            vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.2\n\
            vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"m\"} 0.4\n\
            vllm:prompt_tokens_total{model_name=\"m\"} 123\n";
        let g = gauges(vllm).unwrap();
        assert_eq!(g.waiting, Some(5.0));
        assert_eq!(g.running, Some(7.0));
        assert!((g.kv_usage.unwrap() - 0.3).abs() < 1e-12);
        let old = "vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\n";
        assert_eq!(gauges(old).unwrap().kv_usage, Some(0.5));
        let sglang = "sglang:num_queue_reqs{model_name=\"m\"} 4.0\n\
            sglang:num_running_reqs{model_name=\"m\"} 9.0\n\
            sglang:token_usage{model_name=\"m\"} 0.28\n";
        let g = gauges(sglang).unwrap();
        assert_eq!(
            (g.waiting, g.running, g.kv_usage),
            (Some(4.0), Some(9.0), Some(0.28))
        );
        // Another engine's metrics: nothing known (the scrape counts as failed), not zeros.
        assert!(!gauges("process_cpu_seconds_total 1\n").unwrap().any());
        // NaN gauges are skipped; a malformed body is an error.
        assert_eq!(
            gauges("vllm:num_requests_waiting NaN\n").unwrap().waiting,
            None
        );
        assert!(gauges("vllm:num_requests_waiting{model_name=\"m} 1\n").is_err());
    }

    #[test]
    fn scrape_timeout_is_bounded() {
        assert_eq!(
            scrape_timeout(Duration::from_millis(250)),
            Duration::from_secs(1)
        );
        assert_eq!(
            scrape_timeout(Duration::from_millis(10)),
            Duration::from_millis(500)
        );
        assert_eq!(
            scrape_timeout(Duration::from_secs(5)),
            Duration::from_secs(2)
        );
    }
}
