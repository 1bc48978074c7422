//! Prometheus metrics under vLLM's names (`vllm/v1/metrics/loggers.py`), each labelled
//! `model_name="<served model>"` like vLLM. Served at `GET /metrics` in the OpenMetrics text
//! format.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::borrow::Cow;
use std::sync::atomic::AtomicU64;

/// Latency buckets (s) of vLLM's TTFT histogram.
const TTFT_BUCKETS: [f64; 18] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0,
];
/// Buckets (s) of vLLM's inter-token latency histogram.
const ITL_BUCKETS: [f64; 15] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
];
/// Buckets (s) of vLLM's end-to-end latency histogram.
const E2E_BUCKETS: [f64; 14] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
];

/// The engine's metrics; cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    /// `vllm:num_requests_running`: requests admitted and not finished.
    pub running: Gauge,
    /// `vllm:num_requests_waiting`: requests queued for the scheduler or for KV blocks.
    pub waiting: Gauge,
    /// `vllm:kv_cache_usage_perc`: fraction (0–1) of KV blocks in use.
    pub kv_usage: Gauge<f64, AtomicU64>,
    /// `vllm:prompt_tokens_total`.
    pub prompt_tokens: Counter,
    /// `vllm:generation_tokens_total`.
    pub generation_tokens: Counter,
    /// `vllm:prefix_cache_queries_total` (prompt tokens looked up).
    pub prefix_queries: Counter,
    /// `vllm:prefix_cache_hits_total` (prompt tokens found).
    pub prefix_hits: Counter,
    /// `vllm:request_success_total{finished_reason}`.
    pub request_success: Family<Vec<(String, String)>, Counter>,
    /// `vllm:time_to_first_token_seconds`.
    pub ttft: Histogram,
    /// `vllm:inter_token_latency_seconds`.
    pub itl: Histogram,
    /// `vllm:e2e_request_latency_seconds`.
    pub e2e: Histogram,
    /// `pdx:kv_blocks_held`: blocks a prefill engine keeps for remote decodes.
    pub held_blocks: Gauge,
    /// `pdx:kv_transfer_errors_total`: remote KV reads that failed or did not verify.
    pub kv_transfer_errors: Counter,
    /// KV blocks read from a prefill worker and verified (decode role).
    pub kv_blocks_received: Counter,
    /// Bytes of those blocks.
    pub kv_bytes_received: Counter,
    /// `pdx:ksana_registered`: 1 while registered with a KsanaLLM router (`--ksana-router`).
    pub ksana_registered: Gauge,
    /// `pdx:ksana_registrations_total`: successful `/RegisterNode` calls (a router that forgot the node makes
    /// it register again).
    pub ksana_registrations: Counter,
    /// `pdx:ksana_comm_groups_ready`: KsanaLLM comm groups this node can serve requests of now.
    pub ksana_groups_ready: Gauge,
    /// `pdx:ksana_kv_handoffs_total`: KsanaLLM requests whose KV a prefill kept and announced to the decode.
    pub ksana_handoffs: Counter,
}

impl Metrics {
    /// Metrics labelled with `model_name`.
    pub fn new(model_name: &str) -> Self {
        let mut root = Registry::default();
        let r = root.sub_registry_with_labels(
            [(
                Cow::Borrowed("model_name"),
                Cow::Owned(model_name.to_string()),
            )]
            .into_iter(),
        );
        let m = Self {
            registry: Registry::default(),
            running: Gauge::default(),
            waiting: Gauge::default(),
            kv_usage: Gauge::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            prefix_queries: Counter::default(),
            prefix_hits: Counter::default(),
            request_success: Family::default(),
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
            held_blocks: Gauge::default(),
            kv_transfer_errors: Counter::default(),
            kv_blocks_received: Counter::default(),
            kv_bytes_received: Counter::default(),
            ksana_registered: Gauge::default(),
            ksana_registrations: Counter::default(),
            ksana_groups_ready: Gauge::default(),
            ksana_handoffs: Counter::default(),
        };
        r.register(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            m.running.clone(),
        );
        r.register(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            m.waiting.clone(),
        );
        r.register(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            m.kv_usage.clone(),
        );
        r.register(
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            m.prompt_tokens.clone(),
        );
        r.register(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            m.generation_tokens.clone(),
        );
        r.register(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            m.prefix_queries.clone(),
        );
        r.register(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            m.prefix_hits.clone(),
        );
        r.register(
            "vllm:request_success",
            "Count of successfully processed requests.",
            m.request_success.clone(),
        );
        r.register(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            m.ttft.clone(),
        );
        r.register(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            m.itl.clone(),
        );
        r.register(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            m.e2e.clone(),
        );
        r.register(
            "pdx:kv_blocks_held",
            "KV blocks held for remote decode (prefill role).",
            m.held_blocks.clone(),
        );
        r.register(
            "pdx:kv_transfer_errors",
            "Remote KV reads that failed or did not verify.",
            m.kv_transfer_errors.clone(),
        );
        r.register(
            "pdx:kv_blocks_received",
            "KV blocks read from a prefill worker and verified byte for byte (decode role).",
            m.kv_blocks_received.clone(),
        );
        r.register(
            "pdx:kv_bytes_received",
            "Bytes of KV blocks read from a prefill worker and verified (decode role).",
            m.kv_bytes_received.clone(),
        );
        r.register(
            "pdx:ksana_registered",
            "1 while registered with a KsanaLLM router",
            m.ksana_registered.clone(),
        );
        r.register(
            "pdx:ksana_registrations",
            "Successful registrations with a KsanaLLM router",
            m.ksana_registrations.clone(),
        );
        r.register(
            "pdx:ksana_comm_groups_ready",
            "KsanaLLM comm groups (prefill__decode pairs) this node can serve requests of",
            m.ksana_groups_ready.clone(),
        );
        r.register(
            "pdx:ksana_kv_handoffs",
            "KsanaLLM requests whose prompt KV this prefill kept and announced to the decode",
            m.ksana_handoffs.clone(),
        );
        Self {
            registry: root,
            ..m
        }
    }

    /// Counts a finished request.
    pub fn finished(&self, reason: &str) {
        self.request_success
            .get_or_create(&vec![("finished_reason".to_string(), reason.to_string())])
            .inc();
    }

    /// OpenMetrics text of all metrics.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(8192);
        encode(&mut s, &self.registry).expect("writing to a String cannot fail");
        s
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_vllm_names_with_model_label() {
        let m = Metrics::new("mock");
        m.running.set(3);
        m.kv_usage.set(0.25);
        m.ttft.observe(0.002);
        m.finished("length");
        let s = m.render();
        assert!(
            s.contains("vllm:num_requests_running{model_name=\"mock\"} 3"),
            "{s}"
        );
        assert!(
            s.contains("vllm:kv_cache_usage_perc{model_name=\"mock\"} 0.25"),
            "{s}"
        );
        assert!(
            s.contains("vllm:time_to_first_token_seconds_count{model_name=\"mock\"} 1"),
            "{s}"
        );
        assert!(
            s.contains(
                "vllm:request_success_total{model_name=\"mock\",finished_reason=\"length\"} 1"
            ),
            "{s}"
        );
        assert!(s.contains("vllm:num_requests_waiting"));
        assert!(s.contains("vllm:inter_token_latency_seconds"));
    }
}
