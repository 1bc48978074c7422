//! Prometheus metrics (`GET /metrics`, OpenMetrics text via `prometheus-client`).
//!
//! * `pdx_requests_total{model,pool,worker,status,class}`: every answer of the completion routes, by model
//!   (a name the router lists, else `other`: see [`crate::api::models::Catalog::label`]), the pool and worker
//!   that produced it (decode or aggregated; empty for the router's own answers, 400/401/404/503..., and a
//!   prefill's 4xx passed on), HTTP status and status class (`2xx`, `4xx`, `5xx`);
//! * `pdx_ttft_seconds`, `pdx_itl_seconds`, `pdx_e2e_seconds`: client-side time to the first
//!   streamed token event, mean gap between token events of one upstream chunk (one
//!   observation per chunk), and request duration;
//! * `pdx_pd_phase_seconds{phase}`: `prefill` (prefill request), `kv_handoff` (prefill
//!   response → decode response headers: the decode engine pulls the KV), `decode_first_token`
//!   (decode headers → first token event; under `sglang-bootstrap`, from the hand-over once the
//!   prefill has ended and the decode head arrived, and no `kv_handoff`);
//! * `pdx_retries_total{phase}`, `pdx_fallbacks_total{kind}`;
//! * `pdx_worker_state{worker,role,pool,state}` (1 for the current state) and
//!   `pdx_worker_in_flight{worker}`, refreshed every 100 ms;
//! * `pdx_pool_choices_total{model,role,pool}`;
//! * `pdx_planner_diverted_total{model,role,from,to}` (the global planner's diversions applied);
//! * `pdx_kv_events_*_total{worker}`, `pdx_kv_index_blocks{worker}`, `pdx_kv_index_exact{worker}`: the
//!   engines' KV events and the exact prefix index ([`crate::kv_events`]);
//! * `pdx_kv_releases_total{outcome}`: prefilled KV no decode took, released through a decode worker
//!   (`released`) or not (`refused`, `failed`, `timeout`, `no_decode`), and `pdx_worker_kv_pending{worker}`.
//!
//! The series of a removed worker (and of a pool registration created, once empty) are deleted.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of `pdx_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Model.
    pub model: String,
    /// Pool.
    pub pool: String,
    /// Worker URL.
    pub worker: String,
    /// HTTP status.
    pub status: u16,
    /// Status class: `2xx`, `4xx`, `5xx` (see [`crate::front::status_class`]).
    pub class: &'static str,
}

/// A single `phase`/`kind` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// Phase name.
    pub phase: &'static str,
}

/// A single `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// Outcome name.
    pub outcome: &'static str,
}

/// Labels of `pdx_worker_state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerStateLabels {
    /// Worker URL.
    pub worker: String,
    /// Role.
    pub role: &'static str,
    /// Pool.
    pub pool: String,
    /// State name.
    pub state: &'static str,
}

/// Labels of `pdx_worker_in_flight`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    /// Worker URL.
    pub worker: String,
}

/// Labels of `pdx_pool_choices_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// Model.
    pub model: String,
    /// Role.
    pub role: &'static str,
    /// Pool.
    pub pool: String,
}

/// Labels of `pdx_planner_diverted_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DivertLabels {
    /// Model.
    pub model: String,
    /// Role of both pools.
    pub role: &'static str,
    /// The capped pool the request was meant for.
    pub from: String,
    /// The pool it went to.
    pub to: String,
}

/// All router metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Registry to encode.
    pub registry: Registry,
    /// Requests.
    pub requests: Family<RequestLabels, Counter>,
    /// TTFT, seconds.
    pub ttft: Histogram,
    /// ITL, seconds.
    pub itl: Histogram,
    /// End to end, seconds.
    pub e2e: Histogram,
    /// PD phases, seconds.
    pub phase: Family<PhaseLabel, Histogram>,
    /// Retries.
    pub retries: Family<PhaseLabel, Counter>,
    /// Fallbacks.
    pub fallbacks: Family<PhaseLabel, Counter>,
    /// Worker states.
    pub worker_state: Family<WorkerStateLabels, Gauge>,
    /// In flight per worker.
    pub worker_in_flight: Family<WorkerLabel, Gauge>,
    /// Pool choices.
    pub pool_choices: Family<PoolLabels, Counter>,
    /// Requests the global planner's diversions sent to another pool ([`crate::divert`]).
    pub diverted: Family<DivertLabels, Counter>,
    /// Releases of prefilled KV no decode took, by outcome.
    pub kv_releases: Family<OutcomeLabel, Counter>,
    /// Requests with prefilled KV not yet taken by a decode, per prefill worker.
    pub worker_kv_pending: Family<WorkerLabel, Gauge>,
    /// KV events and the exact prefix index, per worker ([`crate::kv_events`]).
    pub kv_events: crate::kv_events::KvEventMetrics,
}

fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let ttft = latency();
        let itl = latency();
        let e2e = latency();
        let phase =
            Family::<PhaseLabel, Histogram>::new_with_constructor(latency as fn() -> Histogram);
        let retries = Family::<PhaseLabel, Counter>::default();
        let fallbacks = Family::<PhaseLabel, Counter>::default();
        let worker_state = Family::<WorkerStateLabels, Gauge>::default();
        let worker_in_flight = Family::<WorkerLabel, Gauge>::default();
        let pool_choices = Family::<PoolLabels, Counter>::default();
        let diverted = Family::<DivertLabels, Counter>::default();
        let kv_releases = Family::<OutcomeLabel, Counter>::default();
        let worker_kv_pending = Family::<WorkerLabel, Gauge>::default();
        registry.register(
            "pdx_requests",
            "Answers of the completion routes by model, pool, worker, status and status class",
            requests.clone(),
        );
        registry.register("pdx_ttft_seconds", "Time to first token", ttft.clone());
        registry.register("pdx_itl_seconds", "Inter-token latency", itl.clone());
        registry.register("pdx_e2e_seconds", "End-to-end request latency", e2e.clone());
        registry.register("pdx_pd_phase_seconds", "PD phase durations", phase.clone());
        registry.register("pdx_retries", "Upstream retries", retries.clone());
        registry.register("pdx_fallbacks", "Prefill fallbacks", fallbacks.clone());
        registry.register(
            "pdx_worker_state",
            "Worker state (1 = current)",
            worker_state.clone(),
        );
        registry.register(
            "pdx_worker_in_flight",
            "Requests in flight per worker",
            worker_in_flight.clone(),
        );
        registry.register("pdx_pool_choices", "Pool selections", pool_choices.clone());
        registry.register(
            "pdx_planner_diverted",
            "Requests sent to another pool of the same role by the global planner's diversions",
            diverted.clone(),
        );
        registry.register(
            "pdx_kv_releases",
            "Releases of prefilled KV that no decode took, by outcome (released, refused, failed, timeout, no_decode)",
            kv_releases.clone(),
        );
        registry.register(
            "pdx_worker_kv_pending",
            "Requests whose prefill finished on this worker and whose KV no decode has taken yet",
            worker_kv_pending.clone(),
        );
        let kv_events = crate::kv_events::KvEventMetrics::default();
        kv_events.register(&mut registry);
        Self {
            registry,
            kv_events,
            requests,
            ttft,
            itl,
            e2e,
            phase,
            retries,
            fallbacks,
            worker_state,
            worker_in_flight,
            pool_choices,
            diverted,
            kv_releases,
            worker_kv_pending,
        }
    }

    /// Deletes every series of a removed worker (`pdx_requests_total` with each status it produced,
    /// `pdx_worker_in_flight`, `pdx_worker_kv_pending`; `pdx_worker_state` is rebuilt every sweep).
    pub fn remove_worker(&self, w: &crate::registry::Worker) {
        let series = w.series.lock().map(|v| v.clone()).unwrap_or_default();
        for (model, status) in series {
            self.requests.remove(&RequestLabels {
                model,
                pool: w.pool.clone(),
                worker: w.url.clone(),
                status,
                class: crate::front::status_class(status),
            });
        }
        let label = WorkerLabel {
            worker: w.url.clone(),
        };
        self.worker_in_flight.remove(&label);
        self.worker_kv_pending.remove(&label);
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
