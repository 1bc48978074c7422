//! Sans-IO core of `pdx serve`, pdx's disaggregated prefill/decode router.
//!
//! Nothing here opens a socket or reads a clock: callers feed events and the current time
//! (`u64` microseconds on a monotonic clock of their choice) and get decisions back.
//!
//! * [`grid`]: the **global router**, pool selection on NVIDIA Dynamo's grid
//!   (`global_router_config.json`: (ISL, TTFT target) → prefill pool, (context length, ITL
//!   target) → decode pool).
//! * [`policy`]: the **local router** of one pool: `round_robin`, `least_loaded`,
//!   `power_of_two`, `kv_aware` (Dynamo's KV router: its load-aware logit over prefix overlap and
//!   engine telemetry, or its block cost without telemetry) and `score` (the routing lab's
//!   `α/TTFT + β·TPOT + γ·free_mem − δ·queue` with a KV-locality boost).
//! * [`telemetry`]: per-worker EWMA of engine gauges (scraped) and observed TTFT/TPOT/prefill speed,
//!   with bounded staleness (then unknown, never idle).
//! * [`admission`]: per-pool admission shaping, an AIMD limit on concurrent prefills driven by the
//!   pool's smoothed TTFT against its target, with a bounded wait queue.
//! * [`kv_events`], [`kv_index`]: vLLM's KV events (strict msgpack decoder) and the **exact** per-worker
//!   prefix index they feed, with sequence-gap detection, replay and reset; `kv_aware` and `score` read it
//!   for workers that publish events ([`kv_index::kv_overlap`]).
//! * [`divert`]: deterministic diversion of a fraction of a pool's requests to another pool
//!   (the global planner's decision, applied as `pdx sim` does).
//! * [`retry`]: prefill retry with exponential backoff, then decode-only fallback or 503.
//! * [`breaker`]: per-worker circuit breaker (closed → open → half-open).
//! * [`liveness`]: heartbeat TTL bookkeeping for registered workers, active health-check state.
//! * [`sse`]: allocation-free SSE event-boundary scanner used to count streamed tokens.
//! * [`migration`]: moving a decode stream to another worker mid-stream: the stream transcript, the
//!   continuation splice, the per-pool budget of voluntary moves and the load gap that triggers them.
#![forbid(unsafe_code)]

pub mod admission;
pub mod breaker;
pub mod divert;
pub mod error;
pub mod grid;
pub mod kv_events;
pub mod kv_index;
pub mod liveness;
pub mod migration;
pub mod policy;
pub mod retry;
pub mod sse;
pub mod telemetry;

pub use admission::{Admission, AdmissionConfig, Cancelled, Decision, Signal, Ticket};
pub use breaker::{BreakerConfig, BreakerState, CircuitBreaker, FailureCause};
pub use divert::Divert;
pub use error::CoreError;
pub use grid::{DecodePoolSelectionStrategy, GlobalRouterConfig, PrefillPoolSelectionStrategy};
pub use kv_index::{ExactIndex, ExactOverlap, IndexLimits, ReplayRequest, WorkerStats};
pub use liveness::{Health, HealthCheck, Liveness};
pub use migration::{MigrationBudget, MoveReason, Splice, Transcript};
pub use policy::{Candidate, KvIndex, Policy, PoolKind, Request, ScoreWeights, Selector};
pub use retry::{FallbackMode, PrefillDecision, RetryPolicy, UpstreamFailure};
pub use sse::SseScanner;
pub use telemetry::{EngineGauges, TelemetryConfig, TelemetrySnapshot, WorkerTelemetry};
