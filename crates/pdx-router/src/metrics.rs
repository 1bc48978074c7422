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
//! * what the router believes about each worker (engine telemetry, [`crate::telemetry`]), refreshed by the
//!   scraper: `pdx_worker_waiting{worker}`, `pdx_worker_running{worker}`, `pdx_worker_kv_usage{worker}` (0–1)
//!   while its last good scrape is within the staleness bound (absent once unknown),
//!   `pdx_worker_telemetry_age_seconds{worker}` (since that scrape), and the latencies it observed:
//!   `pdx_worker_ewma_ttft_seconds{worker}`, `pdx_worker_ewma_tpot_seconds{worker}`,
//!   `pdx_worker_prefill_tokens_per_second{worker}`; `pdx_telemetry_scrapes_total{outcome}` (`ok`, `failed`);
//! * admission shaping ([`crate::admission`]): `pdx_admission_total{model,pool,outcome}` (`admitted`,
//!   `queued`, `rejected`: 429, `timed_out`: 503), `pdx_admission_limit{model,pool}`,
//!   `pdx_admission_in_flight{model,pool}`, `pdx_admission_queue{model,pool}` and
//!   `pdx_admission_ewma_ttft_seconds{model,pool}` (prefill and aggregated pools) or
//!   `pdx_admission_ewma_tpot_seconds{model,pool}` (decode pools shaped by ITL).
//!
//! The series of a removed worker (and of a pool registration created, once empty) are deleted.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// A label value shared by reference count (a model, pool or worker name): the label sets counted per
/// request clone it instead of allocating a `String` for each series lookup.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Label(std::sync::Arc<str>);

impl Label {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Label {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// Looked up by text in maps keyed by labels (the hash and order are the text's).
impl std::borrow::Borrow<str> for Label {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Label {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Label {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for Label {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Label> for String {
    fn eq(&self, other: &Label) -> bool {
        **self == *other.0
    }
}

impl serde::Serialize for Label {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl From<&str> for Label {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<String> for Label {
    fn from(s: String) -> Self {
        Self(s.into())
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// A gauge of `f64` values.
pub type FloatGauge = Gauge<f64, AtomicU64>;

/// Labels of `pdx_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Model.
    pub model: Label,
    /// Pool.
    pub pool: Label,
    /// Worker URL.
    pub worker: Label,
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
    pub worker: Label,
    /// Role.
    pub role: &'static str,
    /// Pool.
    pub pool: Label,
    /// State name.
    pub state: &'static str,
}

/// Labels of `pdx_worker_in_flight`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    /// Worker URL.
    pub worker: Label,
}

/// Labels of `pdx_pool_choices_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// Model.
    pub model: Label,
    /// Role.
    pub role: &'static str,
    /// Pool.
    pub pool: Label,
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

/// Label of a stream migration: why it moved (`connection_lost`, `server_error`, `stalled`, `score_gap`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// [`pdx_router_core::MoveReason::as_str`].
    pub reason: &'static str,
}

/// Labels of a pool's admission gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolNameLabels {
    /// Model.
    pub model: String,
    /// Pool.
    pub pool: String,
}

/// Labels of `pdx_admission_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// Model.
    pub model: String,
    /// Pool.
    pub pool: String,
    /// `admitted`, `queued`, `rejected`, `timed_out`.
    pub outcome: &'static str,
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
    /// Streams moved to another worker mid-stream, by reason.
    pub migrations: Family<ReasonLabel, Counter>,
    /// Moves that found no worker to continue on (the client got an error event), by reason.
    pub migrations_failed: Family<ReasonLabel, Counter>,
    /// Engine's requests waiting (smoothed), per worker.
    pub worker_waiting: Family<WorkerLabel, FloatGauge>,
    /// Engine's requests running (smoothed), per worker.
    pub worker_running: Family<WorkerLabel, FloatGauge>,
    /// Engine's KV-cache usage (smoothed, 0–1), per worker.
    pub worker_kv_usage: Family<WorkerLabel, FloatGauge>,
    /// Seconds since the worker's last good scrape.
    pub worker_telemetry_age: Family<WorkerLabel, FloatGauge>,
    /// Smoothed TTFT the router observed, seconds.
    pub worker_ewma_ttft: Family<WorkerLabel, FloatGauge>,
    /// Smoothed TPOT the router observed, seconds.
    pub worker_ewma_tpot: Family<WorkerLabel, FloatGauge>,
    /// Observed prefill speed, tokens per second.
    pub worker_prefill_speed: Family<WorkerLabel, FloatGauge>,
    /// Scrapes by outcome.
    pub telemetry_scrapes: Family<OutcomeLabel, Counter>,
    /// Admission decisions.
    pub admission: Family<AdmissionLabels, Counter>,
    /// Admission limit per pool.
    pub admission_limit: Family<PoolNameLabels, Gauge>,
    /// Admitted requests in flight per pool.
    pub admission_in_flight: Family<PoolNameLabels, Gauge>,
    /// Requests waiting for admission per pool.
    pub admission_queue: Family<PoolNameLabels, Gauge>,
    /// The pool's smoothed TTFT that drives its limit, seconds.
    pub admission_ewma_ttft: Family<PoolNameLabels, FloatGauge>,
    /// A decode pool's smoothed TPOT (mean ITL of its streams' windows) that drives its limit, seconds.
    pub admission_ewma_tpot: Family<PoolNameLabels, FloatGauge>,
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
        let migrations = Family::<ReasonLabel, Counter>::default();
        let migrations_failed = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "pdx_migrations",
            "Decode streams moved to another worker mid-stream, by reason (connection_lost, server_error, stalled, score_gap)",
            migrations.clone(),
        );
        registry.register(
            "pdx_migrations_failed",
            "Stream moves that found no worker to continue on (the client got an error event), by reason",
            migrations_failed.clone(),
        );
        let worker_waiting = Family::<WorkerLabel, FloatGauge>::default();
        let worker_running = Family::<WorkerLabel, FloatGauge>::default();
        let worker_kv_usage = Family::<WorkerLabel, FloatGauge>::default();
        let worker_telemetry_age = Family::<WorkerLabel, FloatGauge>::default();
        let worker_ewma_ttft = Family::<WorkerLabel, FloatGauge>::default();
        let worker_ewma_tpot = Family::<WorkerLabel, FloatGauge>::default();
        let worker_prefill_speed = Family::<WorkerLabel, FloatGauge>::default();
        let telemetry_scrapes = Family::<OutcomeLabel, Counter>::default();
        let admission = Family::<AdmissionLabels, Counter>::default();
        let admission_limit = Family::<PoolNameLabels, Gauge>::default();
        let admission_in_flight = Family::<PoolNameLabels, Gauge>::default();
        let admission_queue = Family::<PoolNameLabels, Gauge>::default();
        let admission_ewma_ttft = Family::<PoolNameLabels, FloatGauge>::default();
        let admission_ewma_tpot = Family::<PoolNameLabels, FloatGauge>::default();
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
        let float_gauges = [
            (
                "pdx_worker_waiting",
                "Requests waiting in the worker's engine (smoothed scrape; absent while unknown)",
                &worker_waiting,
            ),
            (
                "pdx_worker_running",
                "Requests running in the worker's engine (smoothed scrape; absent while unknown)",
                &worker_running,
            ),
            (
                "pdx_worker_kv_usage",
                "KV-cache usage of the worker's engine, 0-1 (smoothed scrape; absent while unknown)",
                &worker_kv_usage,
            ),
            (
                "pdx_worker_telemetry_age_seconds",
                "Seconds since the worker's last good /metrics scrape",
                &worker_telemetry_age,
            ),
            (
                "pdx_worker_ewma_ttft_seconds",
                "Smoothed time to first token the router observed on the worker",
                &worker_ewma_ttft,
            ),
            (
                "pdx_worker_ewma_tpot_seconds",
                "Smoothed time per output token the router observed on the worker",
                &worker_ewma_tpot,
            ),
            (
                "pdx_worker_prefill_tokens_per_second",
                "Prefill speed the router observed on the worker",
                &worker_prefill_speed,
            ),
        ];
        for (name, help, g) in float_gauges {
            registry.register(name, help, g.clone());
        }
        registry.register(
            "pdx_telemetry_scrapes",
            "Scrapes of the workers' /metrics by outcome (ok, failed)",
            telemetry_scrapes.clone(),
        );
        registry.register(
            "pdx_admission",
            "Admission decisions per pool (admitted, queued, rejected: 429, timed_out: 503)",
            admission.clone(),
        );
        registry.register(
            "pdx_admission_limit",
            "Concurrent prefills the pool's admission allows now",
            admission_limit.clone(),
        );
        registry.register(
            "pdx_admission_in_flight",
            "Admitted requests whose prefill has not ended",
            admission_in_flight.clone(),
        );
        registry.register(
            "pdx_admission_queue",
            "Requests waiting for admission",
            admission_queue.clone(),
        );
        registry.register(
            "pdx_admission_ewma_ttft_seconds",
            "The pool's smoothed TTFT that drives its admission limit",
            admission_ewma_ttft.clone(),
        );
        registry.register(
            "pdx_admission_ewma_tpot_seconds",
            "A decode pool's smoothed TPOT that drives its admission limit",
            admission_ewma_tpot.clone(),
        );
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
            migrations,
            migrations_failed,
            worker_waiting,
            worker_running,
            worker_kv_usage,
            worker_telemetry_age,
            worker_ewma_ttft,
            worker_ewma_tpot,
            worker_prefill_speed,
            telemetry_scrapes,
            admission,
            admission_limit,
            admission_in_flight,
            admission_queue,
            admission_ewma_ttft,
            admission_ewma_tpot,
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
        for g in [
            &self.worker_waiting,
            &self.worker_running,
            &self.worker_kv_usage,
            &self.worker_telemetry_age,
            &self.worker_ewma_ttft,
            &self.worker_ewma_tpot,
            &self.worker_prefill_speed,
        ] {
            g.remove(&label);
        }
    }

    /// Deletes the admission series of a removed pool.
    pub fn remove_pool(&self, model: &str, pool: &str) {
        let labels = PoolNameLabels {
            model: model.into(),
            pool: pool.into(),
        };
        self.admission_limit.remove(&labels);
        self.admission_in_flight.remove(&labels);
        self.admission_queue.remove(&labels);
        self.admission_ewma_ttft.remove(&labels);
        self.admission_ewma_tpot.remove(&labels);
        for outcome in ["admitted", "queued", "rejected", "timed_out"] {
            self.admission.remove(&AdmissionLabels {
                model: model.into(),
                pool: pool.into(),
                outcome,
            });
        }
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
