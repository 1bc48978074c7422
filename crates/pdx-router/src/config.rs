//! `pdx serve` flags and the `pdx.toml` file. Flags override the file.
//!
//! File shape (every field optional; see `docs/router.md`):
//! ```toml
//! host = "0.0.0.0"
//! port = 8000
//! threads = 0                  # 0: one per core
//! orchestration = "vllm-nixl"  # or "sglang-bootstrap", "ksana", "aggregated"
//! api_key = ["sk-a", "sk-b"]   # clients' `Authorization: Bearer` keys (or one string; none: open)
//! [[models]]
//! name = "Qwen/Qwen3-0.6B"
//! global_router_config = "global_router_config.json"   # Dynamo grid (optional)
//! [[models.pools]]
//! name = "prefill_pool_0"
//! role = "prefill"
//! policy = "kv_aware"
//! workers = ["http://10.0.0.1:8100", { url = "http://10.0.0.2:8100", bootstrap_port = 9000 }]
//! bootstrap_port = 8998        # sglang-bootstrap: the pool's default bootstrap port
//! api_key = "sk-upstream"      # sent upstream instead of the client's key (a worker table may name its own)
//! ```

use crate::RouterError;
use pdx_router_core::{FallbackMode, GlobalRouterConfig, Policy};
use serde::Deserialize;
use std::path::PathBuf;

/// `pdx serve` flags. Every flag overrides the same setting of the file; the `[default: …]` in each help line
/// is what applies when neither sets it (the flags stay `Option`s so that the file can set them).
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(name = "pdx-serve", about = "disaggregated prefill/decode router")]
pub struct ServeArgs {
    /// TOML config file (`pdx.toml`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Listen address [default: 0.0.0.0]
    #[arg(long)]
    pub host: Option<String>,
    /// Listen port (0: ephemeral) [default: 8000]
    #[arg(long)]
    pub port: Option<u16>,
    /// Server threads, one runtime each (0: one per core) [default: 0]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Prefill worker URL, optionally followed by its SGLang bootstrap port (repeatable; default port 8998,
    /// used by `--orchestration sglang-bootstrap` only), as sglang-router's `--prefill URL [PORT]`: quick start,
    /// one prefill pool `prefill`.
    #[arg(long = "prefill", num_args = 1..=2, value_names = ["URL", "BOOTSTRAP_PORT"])]
    pub prefill: Vec<String>,
    /// Decode worker URL (repeatable): quick start, one decode pool `decode`.
    #[arg(long = "decode")]
    pub decode: Vec<String>,
    /// Aggregated worker URL (repeatable): quick start without PD.
    #[arg(long = "worker")]
    pub worker: Vec<String>,
    /// How a request is spread over workers: `vllm-nixl` (vLLM NixlConnector prefill, then decode),
    /// `sglang-bootstrap` (aliases `sglang`, `bootstrap`: SGLang PD, prefill and decode at once with
    /// `bootstrap_host/port/room`), `ksana` (KsanaLLM nodes register themselves with `POST /RegisterNode`; prefill
    /// and decode at once with `kv-comm-*` headers), or `aggregated` (aggregated pools only) [default: vllm-nixl]
    #[arg(long)]
    pub orchestration: Option<String>,
    /// Model name of quick-start workers [default: any model name is accepted]
    #[arg(long)]
    pub model: Option<String>,
    /// Local routing policy of quick-start pools (with --discovery, also of the pools discovered workers
    /// create, unless the file sets `default_policy`): round_robin, least_loaded, power_of_two, kv_aware, score
    /// [default: round_robin]
    #[arg(long)]
    pub policy: Option<String>,
    /// Bearer token of the admin API: `GET`, `POST` and `DELETE /v1/workers` need `Authorization: Bearer
    /// TOKEN` when it is set (alias `--auth-token`). Without it, anyone who reaches the router can register
    /// workers; `pdx serve` warns when it listens beyond loopback without one [default: none]
    #[arg(long = "admin-token", alias = "auth-token")]
    pub admin_token: Option<String>,
    /// Registered worker URLs must name an IP address inside one of these networks (`10.0.0.0/8`,
    /// `fd00::/8`, or one address; repeatable) [default: any address]
    #[arg(long = "worker-allow-cidr")]
    pub worker_allow_cidr: Vec<String>,
    /// Most registered workers at once; registrations beyond it are refused with 429 [default: 1024]
    #[arg(long)]
    pub max_workers: Option<usize>,
    /// Most requests whose prefill finished on one prefill worker and whose decode has not taken the KV
    /// yet; at the limit the worker takes no new prefill (0: no limit) [default: 1024]
    #[arg(long)]
    pub max_pending_kv_requests: Option<u64>,
    /// Most prompt tokens of such requests per prefill worker (0: no limit) [default: 0]
    #[arg(long)]
    pub max_pending_kv_tokens: Option<u64>,
    /// Seconds between active `GET /health` checks of each worker (0: off). A worker that is down, or whose
    /// breaker is open, is checked every 0.5 s (at most every interval) [default: 5]
    #[arg(long)]
    pub health_check_interval_secs: Option<f64>,
    /// Seconds without a heartbeat after which a registered worker is removed [default: 15]
    #[arg(long)]
    pub heartbeat_ttl_secs: Option<f64>,
    /// Seconds until an upstream answers with headers before 504 [default: 300]
    #[arg(long)]
    pub upstream_timeout_secs: Option<f64>,
    /// Seconds a response body may go without a byte from the upstream before the router ends it (an SSE error
    /// event on streams) and drops the upstream request [default: 300]
    #[arg(long)]
    pub stream_idle_timeout_secs: Option<f64>,
    /// Seconds a client gets to send a request head (idle keep-alive connections included), and the longest
    /// gap between bytes of a request body; then 408 and the connection closes [default: 30]
    #[arg(long)]
    pub client_timeout_secs: Option<f64>,
    /// On SIGTERM or SIGINT, seconds to let in-flight requests finish (no new connections are accepted, `/ready`
    /// answers 503) before the router exits anyway (30 is Kubernetes' default grace period) [default: 30]
    #[arg(long)]
    pub shutdown_timeout_secs: Option<f64>,
    /// Prefill attempts in all (first + retries); under `sglang-bootstrap`, attempts of the prefill/decode pair
    /// [default: 3]
    #[arg(long)]
    pub prefill_attempts: Option<u32>,
    /// After failed prefill attempts: decode_only or fail (`vllm-nixl`; `sglang-bootstrap` always fails:
    /// 503, or 504 after a timeout) [default: decode_only]
    #[arg(long)]
    pub prefill_fallback: Option<String>,
    /// `--orchestration ksana`: the KsanaLLM node registry's database, a SQLite file (created with its
    /// directory) or a `mysql://user:password@host:port/database` URL [default: pdx-ksana.db]
    #[arg(long, value_name = "PATH|URL")]
    pub ksana_db: Option<String>,
    /// `--orchestration ksana`: the cluster nodes must register in (the peer's `cluster_name`)
    /// [default: default_cluster]
    #[arg(long, value_name = "NAME")]
    pub ksana_cluster: Option<String>,
    /// `--orchestration ksana`: seconds without a heartbeat after which a node is offline and its pairs take no
    /// requests (the peer's `heartbeat_timeout_seconds`) [default: 60]
    #[arg(long)]
    pub ksana_heartbeat_timeout_secs: Option<f64>,
    /// `--orchestration ksana`: do not create the registry's tables; they must exist [default: missing tables
    /// are created at start]
    #[arg(long)]
    pub ksana_no_create_schema: bool,
    /// Key clients must send as `Authorization: Bearer KEY` on `/v1/chat/completions`, `/v1/completions` and
    /// `/v1/models*` (repeatable: any of the keys; 401 otherwise), as vLLM's `--api-key`. Adds to the file's
    /// `api_key`.
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_key: Vec<crate::front_auth::ApiKey>,
    /// Stream migration on a decode worker's failure mid-stream (connection lost, a 5xx error event, silent for
    /// the stream idle timeout): moves per stream at most; the stream continues on another worker with the text
    /// already sent (0: off, the client gets an error event) [default: 3]
    #[arg(long)]
    pub migration_max_moves: Option<u32>,
    /// Voluntary stream migration: a stream moves when its worker's load exceeds the pool's least loaded
    /// worker's (with the stream counted there) by this fraction of its own, 0..1 (0: off) [default: off]
    #[arg(long)]
    pub migration_gap_threshold: Option<f64>,
    /// Voluntary moves per pool per `--migration-window-secs` at most [default: 4]
    #[arg(long)]
    pub migration_budget: Option<u32>,
    /// Window of the voluntary-move budget, seconds [default: 10]
    #[arg(long)]
    pub migration_window_secs: Option<f64>,
    /// Telemetry, `score` and `kv_aware` settings, admission shaping ([`crate::tuning`]).
    #[command(flatten)]
    pub tuning: crate::tuning::TuningArgs,
    /// Worker discovery (`--discovery etcd://…|k8s` and the Kubernetes selectors; see `docs/deploy.md`).
    #[command(flatten)]
    pub discovery: pdx_discovery::DiscoveryArgs,
}

fn default_true() -> bool {
    true
}

/// One pool of the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Pool name (metrics label; the pool registered workers name).
    pub name: String,
    /// `prefill`, `decode` or `aggregated`.
    pub role: String,
    /// Local routing policy (default `round_robin`): `round_robin`, `least_loaded`, `power_of_two`, `kv_aware`,
    /// `score`.
    #[serde(default)]
    pub policy: Option<String>,
    /// Static workers: base URLs (`http://host:port`), or tables `{ url, bootstrap_port }`.
    #[serde(default)]
    pub workers: Vec<WorkerEntry>,
    /// Weight of blocks to prefill in the `kv_aware` cost (default 1).
    #[serde(default)]
    pub overlap_weight: Option<f64>,
    /// SGLang bootstrap server port of the pool's workers, unless a worker names its own (default
    /// [`DEFAULT_BOOTSTRAP_PORT`]; read for prefill pools under `orchestration = "sglang-bootstrap"` only).
    #[serde(default)]
    pub bootstrap_port: Option<u16>,
    /// Key sent upstream as `Authorization: Bearer KEY` to the pool's workers (started with `--api-key`)
    /// instead of the client's `Authorization`, unless a worker names its own.
    #[serde(default)]
    pub api_key: Option<crate::front_auth::ApiKey>,
    /// `score` weights of this pool (over `[score]`).
    #[serde(default)]
    pub score: Option<crate::tuning::ScoreFile>,
    /// `kv_aware` softmax temperature of this pool (over `router_temperature`).
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Admission shaping of this pool (over `[admission]`): `ttft_target_ms` for prefill and aggregated pools,
    /// `itl_target_ms` for decode pools.
    #[serde(default)]
    pub admission: Option<crate::tuning::AdmissionFile>,
}

/// One entry of a pool's `workers`: a URL, or a table with the worker's own bootstrap port.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum WorkerEntry {
    /// `"http://host:port"`.
    Url(String),
    /// `{ url = "http://host:port", bootstrap_port = 9000 }`.
    Table(WorkerTable),
}

/// The table form of [`WorkerEntry`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerTable {
    /// Base URL.
    pub url: String,
    /// SGLang bootstrap server port (the prefill server's `--disaggregation-bootstrap-port`).
    #[serde(default)]
    pub bootstrap_port: Option<u16>,
    /// Key sent upstream as `Authorization: Bearer KEY` (the worker's `--api-key`).
    #[serde(default)]
    pub api_key: Option<crate::front_auth::ApiKey>,
    /// The worker's KV event publisher, `tcp://HOST:PORT` (vLLM `--kv-events-config` `endpoint`, as the
    /// router reaches it): the router subscribes and keeps an exact prefix index of the worker.
    #[serde(default)]
    pub kv_events_endpoint: Option<String>,
    /// Its replay socket (`replay_endpoint`), `tcp://HOST:PORT`.
    #[serde(default)]
    pub kv_events_replay_endpoint: Option<String>,
}

/// SGLang's default bootstrap server port (`--disaggregation-bootstrap-port`, 8998), sent as `bootstrap_port`
/// for prefill workers that name no other.
pub const DEFAULT_BOOTSTRAP_PORT: u16 = 8998;

/// One model of the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Served model name; `*` accepts any name.
    pub name: String,
    /// Path of a Dynamo `global_router_config.json`; its pool indices are the model's prefill
    /// (decode) pools in file order.
    #[serde(default)]
    pub global_router_config: Option<PathBuf>,
    /// Tokens per KV block (for `kv_aware` hashing; default 16, vLLM's default).
    #[serde(default)]
    pub block_size: Option<usize>,
    /// Pools.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
}

/// `[retry]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Prefill attempts in all (default 3).
    pub max_attempts: Option<u32>,
    /// First backoff, ms (default 10).
    pub backoff_base_ms: Option<f64>,
    /// Largest backoff, ms (default 200).
    pub backoff_max_ms: Option<f64>,
    /// `decode_only` (default) or `fail`.
    pub fallback: Option<FallbackMode>,
}

/// `[breaker]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerFileConfig {
    /// Consecutive failures that open it (default 5; 0 disables).
    pub failure_threshold: Option<u32>,
    /// Seconds it stays open (default 10).
    pub open_secs: Option<f64>,
}

/// `[migration]`: moving a decode stream to another worker mid-stream (see [`MigrationConfig`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationFileConfig {
    /// Moves per stream on worker failures (default 3; 0: off).
    pub max_moves: Option<u32>,
    /// Load-gap fraction that triggers a voluntary move (default 0: off).
    pub gap_threshold: Option<f64>,
    /// Voluntary moves per pool per window (default 4).
    pub budget: Option<u32>,
    /// Window of the budget, seconds (default 10).
    pub window_secs: Option<f64>,
    /// Seconds between a stream's checks of the gap (default 1).
    pub check_secs: Option<f64>,
    /// A stream with fewer tokens left than this never moves voluntarily (default 32).
    pub min_remaining_tokens: Option<u32>,
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Listen address.
    pub host: Option<String>,
    /// Listen port.
    pub port: Option<u16>,
    /// Threads (0: one per core).
    pub threads: Option<usize>,
    /// `vllm-nixl` (default), `sglang-bootstrap` (aliases `sglang`, `bootstrap`) or `aggregated` (only
    /// aggregated pools are used).
    pub orchestration: Option<String>,
    /// Largest request body, bytes (default 32 MiB).
    pub max_body_bytes: Option<usize>,
    /// Seconds until upstream response headers (default 300).
    pub upstream_timeout_secs: Option<f64>,
    /// Seconds a response body may go without upstream bytes before it is ended (default 300).
    pub stream_idle_timeout_secs: Option<f64>,
    /// Seconds of graceful shutdown (drain) after SIGTERM/SIGINT (default 30).
    pub shutdown_timeout_secs: Option<f64>,
    /// Seconds for a client's request head, and between its body bytes (default 30).
    pub client_timeout_secs: Option<f64>,
    /// Bearer token of the admin API (`GET`/`POST`/`DELETE /v1/workers`); `auth_token` is an alias.
    #[serde(alias = "auth_token")]
    pub admin_token: Option<String>,
    /// Networks registered worker URLs must point into (CIDR strings); empty: any.
    #[serde(default)]
    pub worker_allow_cidrs: Vec<String>,
    /// Most registered workers at once (default 1024).
    pub max_workers: Option<usize>,
    /// Most prefilled requests not yet taken by a decode, per prefill worker (default 1024; 0: no limit).
    pub max_pending_kv_requests: Option<u64>,
    /// Most prompt tokens of such requests per prefill worker (default 0: no limit).
    pub max_pending_kv_tokens: Option<u64>,
    /// Client API key(s) of the OpenAI routes: a string or a list of strings (see `--api-key`).
    #[serde(default, deserialize_with = "crate::front_auth::one_or_many")]
    pub api_key: Vec<crate::front_auth::ApiKey>,
    /// Heartbeat TTL of registered workers, seconds (default 15).
    pub heartbeat_ttl_secs: Option<f64>,
    /// Interval of active `GET /health` checks, seconds (default 5; 0 disables).
    pub health_check_interval_secs: Option<f64>,
    /// Policy of pools created by registration (default `round_robin`).
    pub default_policy: Option<String>,
    /// Accept registrations (default true).
    #[serde(default = "default_true")]
    pub registration: bool,
    /// Prefill retry rules.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Circuit breaker.
    #[serde(default)]
    pub breaker: BreakerFileConfig,
    /// Stream migration.
    #[serde(default)]
    pub migration: MigrationFileConfig,
    /// Engine telemetry (scrapes of the workers' `/metrics`).
    #[serde(default)]
    pub telemetry: crate::tuning::TelemetryFile,
    /// `score` policy weights.
    #[serde(default)]
    pub score: crate::tuning::ScoreFile,
    /// `kv_aware` softmax temperature (Dynamo's `--router-temperature`).
    pub router_temperature: Option<f64>,
    /// Admission shaping of prefill and aggregated pools.
    #[serde(default)]
    pub admission: crate::tuning::AdmissionFile,
    /// Models and their pools.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// `orchestration = "ksana"`: the KsanaLLM node registry.
    #[serde(default)]
    pub ksana: KsanaFileConfig,
}

/// The `[ksana]` table of the file (`orchestration = "ksana"`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KsanaFileConfig {
    /// A SQLite file (relative to the file's directory) or a `mysql://` URL (default `pdx-ksana.db`).
    pub db: Option<String>,
    /// The cluster nodes must register in (default `default_cluster`).
    pub cluster_name: Option<String>,
    /// Seconds without a heartbeat after which a node is offline (default 60).
    pub heartbeat_timeout_secs: Option<f64>,
    /// Create missing tables at start (default true).
    pub create_schema: Option<bool>,
    /// Most nodes in the cluster (default 1024).
    pub max_nodes: Option<usize>,
}

/// Orchestration of one request across workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrchestrationKind {
    /// vLLM NixlConnector: prefill (`max_tokens=1`, `do_remote_decode`), then decode with the
    /// returned `kv_transfer_params`. Models without PD pools use their aggregated pools.
    VllmNixl,
    /// SGLang PD (`sgl-router` / `sglang_router` PD mode): the same body, with `bootstrap_host`,
    /// `bootstrap_port` and a random `bootstrap_room` added, goes to a prefill and a decode worker at
    /// once; the decode's response goes to the client (see [`crate::orchestrate::sglang`]). Models without decode
    /// pools use their aggregated pools.
    SglangBootstrap,
    /// KsanaLLM `simple_router`: nodes register with `POST /RegisterNode`, `/Heartbeat`, `/RegisterCommId`
    /// ([`crate::ksana`]); the client's body goes to a ready prefill/decode pair at once with
    /// `kv-comm-group-key` and `kv-comm-request-id` ([`crate::orchestrate::ksana`]).
    Ksana,
    /// Aggregated pools only.
    Aggregated,
}

impl std::str::FromStr for OrchestrationKind {
    type Err = RouterError;
    fn from_str(s: &str) -> Result<Self, RouterError> {
        Ok(match s {
            "vllm-nixl" | "vllm_nixl" | "nixl" => OrchestrationKind::VllmNixl,
            "sglang-bootstrap" | "sglang_bootstrap" | "sglang" | "bootstrap" => {
                OrchestrationKind::SglangBootstrap
            }
            "ksana" | "ksana-llm" | "ksana_llm" | "ksanallm" => OrchestrationKind::Ksana,
            "aggregated" | "none" => OrchestrationKind::Aggregated,
            o => return Err(RouterError::Config(format!("unknown orchestration `{o}`"))),
        })
    }
}

/// A static worker, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSpec {
    /// Base URL.
    pub url: String,
    /// SGLang bootstrap server port (sent as `bootstrap_port` when it is a prefill worker).
    pub bootstrap_port: u16,
    /// Key sent upstream as `Authorization: Bearer KEY` (the worker's, else its pool's `api_key`).
    pub api_key: Option<crate::front_auth::ApiKey>,
    /// KV event publisher and replay socket, checked ([`parse_kv_events_endpoint`]).
    pub kv_events: Option<KvEventsEndpoints>,
}

/// Where a worker publishes its KV events: `host:port` of its PUB socket and of its replay socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEventsEndpoints {
    /// `host:port` of the PUB socket.
    pub endpoint: String,
    /// `host:port` of the replay (ROUTER) socket.
    pub replay: Option<String>,
    /// The IP addresses of both hosts, where they are addresses (for the allow-list).
    pub ips: Vec<std::net::IpAddr>,
}

impl KvEventsEndpoints {
    /// Checks a publisher and an optional replay endpoint ([`parse_kv_events_endpoint`]).
    ///
    /// Errors: [`RouterError::BadWorkerUrl`] naming the field.
    pub fn parse(endpoint: &str, replay: Option<&str>) -> Result<Self, RouterError> {
        let e = parse_kv_events_endpoint(endpoint, "kv_events_endpoint")?;
        let r = replay
            .map(|r| parse_kv_events_endpoint(r, "kv_events_replay_endpoint"))
            .transpose()?;
        Ok(Self {
            ips: e
                .ip
                .into_iter()
                .chain(r.as_ref().and_then(|r| r.ip))
                .collect(),
            endpoint: e.authority,
            replay: r.map(|r| r.authority),
        })
    }

    /// Both from optional fields: `None` without a publisher endpoint.
    ///
    /// Errors: as [`KvEventsEndpoints::parse`]; a replay endpoint without a publisher endpoint.
    pub fn from_fields(
        endpoint: Option<&str>,
        replay: Option<&str>,
    ) -> Result<Option<Self>, RouterError> {
        match (endpoint, replay) {
            (Some(e), r) => Self::parse(e, r).map(Some),
            (None, None) => Ok(None),
            (None, Some(_)) => Err(RouterError::BadWorkerUrl(
                "kv_events_replay_endpoint needs kv_events_endpoint".into(),
            )),
        }
    }
}

/// Checks a ZMQ endpoint a worker publishes KV events on: `tcp://HOST:PORT` with the host rules of
/// [`parse_worker_url`] and an explicit port (vLLM binds `tcp://*:5557`; the router needs the address it
/// can reach). Other transports (`ipc://`, `inproc://`) are refused: the router connects over TCP only.
///
/// Errors: [`RouterError::BadWorkerUrl`] naming `field`.
pub fn parse_kv_events_endpoint(s: &str, field: &str) -> Result<WorkerUrl, RouterError> {
    let bad = |why: &str| RouterError::BadWorkerUrl(format!("{field} {why}: {}", s.escape_debug()));
    let rest = s
        .strip_prefix("tcp://")
        .ok_or_else(|| bad("must be tcp://HOST:PORT"))?;
    let has_port = match rest.rsplit_once(':') {
        Some((h, p)) => !p.is_empty() && (!h.starts_with('[') || h.ends_with(']')),
        None => false,
    };
    if !has_port || rest.contains('/') || rest.starts_with('*') {
        return Err(bad(
            "must be tcp://HOST:PORT with an explicit host and port",
        ));
    }
    parse_worker_url(&format!("http://{rest}"))
        .map_err(|e| bad(&format!("is not a valid address ({e})")))
}

/// A pool, resolved.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// Name.
    pub name: String,
    /// Role.
    pub role: pdx_protocol::Role,
    /// Policy.
    pub policy: Policy,
    /// Static workers.
    pub workers: Vec<WorkerSpec>,
    /// `kv_aware` weight.
    pub overlap_weight: f64,
    /// Bootstrap port of workers that join the pool by registration without naming one.
    pub bootstrap_port: u16,
    /// Upstream key of workers that join the pool by registration without naming one.
    pub api_key: Option<crate::front_auth::ApiKey>,
    /// `score` weights.
    pub score: pdx_router_core::ScoreWeights,
    /// `kv_aware` softmax temperature.
    pub temperature: f64,
    /// Admission shaping (`None`: off).
    pub admission: Option<pdx_router_core::AdmissionConfig>,
}

/// A model, resolved.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Name (`*`: any).
    pub name: String,
    /// Dynamo grid.
    pub grid: Option<GlobalRouterConfig>,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Pools in file order.
    pub pools: Vec<PoolSpec>,
}

/// Stream migration, resolved (see `docs/router.md`, "Stream migration").
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationConfig {
    /// Moves per stream on worker failures (0: off).
    pub max_moves: u32,
    /// Voluntary moves: `None` when off.
    pub gap: Option<GapMigration>,
}

/// Voluntary (load-gap) moves.
#[derive(Debug, Clone, PartialEq)]
pub struct GapMigration {
    /// Fraction of the current worker's load the best worker must be lighter by
    /// ([`pdx_router_core::migration::load_gap`]).
    pub threshold: f64,
    /// Moves per pool per window.
    pub budget: u32,
    /// Window, µs.
    pub window_us: u64,
    /// Time between one stream's checks.
    pub check_every: std::time::Duration,
    /// Fewest tokens left for a move to be worth its re-prefill, tokens.
    pub min_remaining_tokens: u32,
}

/// Resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub host: String,
    /// Listen port.
    pub port: u16,
    /// Server threads.
    pub threads: usize,
    /// Orchestration.
    pub orchestration: OrchestrationKind,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Upstream header timeout.
    pub upstream_timeout: std::time::Duration,
    /// Longest gap between upstream body bytes before the response is ended.
    pub stream_idle_timeout: std::time::Duration,
    /// Longest graceful shutdown (drain of in-flight requests) after SIGTERM/SIGINT.
    pub shutdown_timeout: std::time::Duration,
    /// Time a client gets for a request head, and between request body bytes.
    pub client_timeout: std::time::Duration,
    /// Admin API bearer token (`/v1/workers`).
    pub admin_token: Option<String>,
    /// Networks registered workers must be in (empty: any).
    pub worker_allow: Vec<Cidr>,
    /// Most registered workers at once.
    pub max_workers: usize,
    /// Per prefill worker: most requests holding prefilled KV not yet taken by a decode (0: no limit).
    pub max_pending_kv_requests: u64,
    /// Per prefill worker: most prompt tokens of such requests (0: no limit).
    pub max_pending_kv_tokens: u64,
    /// Client API keys of the OpenAI routes (`--api-key` and the file's `api_key`; empty: no check).
    pub api_keys: Vec<crate::front_auth::ApiKey>,
    /// Heartbeat TTL, µs.
    pub heartbeat_ttl_us: u64,
    /// Active health-check interval (`None`: off).
    pub health_interval: Option<std::time::Duration>,
    /// Policy of registered pools.
    pub default_policy: Policy,
    /// Registration API on.
    pub registration: bool,
    /// Retry rules.
    pub retry: pdx_router_core::RetryPolicy,
    /// Breaker settings.
    pub breaker: pdx_router_core::BreakerConfig,
    /// Stream migration.
    pub migration: MigrationConfig,
    /// Telemetry, `score`, temperature and admission settings (pools created by registration take these).
    pub tuning: crate::tuning::Tuning,
    /// Models.
    pub models: Vec<ModelSpec>,
    /// The KsanaLLM node registry (`orchestration = "ksana"` only).
    pub ksana: Option<crate::ksana::KsanaConfig>,
    /// Worker discovery (`--discovery`; `None`: none). Kubernetes pods without a model annotation serve
    /// `--model` (else any model name).
    pub discovery: Option<pdx_discovery::DiscoverySpec>,
}

fn parse_role(s: &str) -> Result<pdx_protocol::Role, RouterError> {
    Ok(match s {
        "prefill" => pdx_protocol::Role::Prefill,
        "decode" => pdx_protocol::Role::Decode,
        "aggregated" | "agg" | "both" => pdx_protocol::Role::Aggregated,
        o => return Err(RouterError::Config(format!("unknown pool role `{o}`"))),
    })
}

/// A checked worker URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerUrl {
    /// The URL as given, without a trailing `/`.
    pub url: String,
    /// `host:port` (port 80 when the URL names none; IPv6 in brackets), the upstream pool key.
    pub authority: String,
    /// The host when it is an IP address.
    pub ip: Option<std::net::IpAddr>,
}

/// Parses and checks a worker URL: `http://HOST[:PORT][/]`, nothing else. HOST is a DNS name (letters,
/// digits, `-`, `.`), an IPv4 address or a bracketed IPv6 address; PORT is 1-65535 (80 when absent). No
/// user info, path, query, fragment, whitespace, control or non-ASCII characters: the URL becomes the
/// `Host` header, a metric label and a log field, and the router connects to it.
///
/// Errors: [`RouterError::BadWorkerUrl`] saying what is wrong.
pub fn parse_worker_url(url: &str) -> Result<WorkerUrl, RouterError> {
    let bad = |why: &str| RouterError::BadWorkerUrl(format!("{why}: {}", url.escape_debug()));
    if url.len() > pdx_protocol::worker::MAX_URL_BYTES {
        return Err(bad("worker URL too long"));
    }
    if !url.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(
            "worker URL has whitespace, control or non-ASCII characters",
        ));
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("worker URL must start with http:// (no TLS to workers)"))?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (auth, tail) = rest.split_at(end);
    if !(tail.is_empty() || tail == "/") {
        return Err(bad(
            "worker URL must have no path, query or fragment (only http://host:port)",
        ));
    }
    if auth.contains('@') {
        return Err(bad("worker URL must not carry user info"));
    }
    let (host, port) = if let Some(v6) = auth.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("worker URL has an unclosed IPv6 bracket"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| bad("worker URL has junk after the IPv6 address"))?,
            ),
        };
        let ip: std::net::Ipv6Addr = h
            .parse()
            .map_err(|_| bad("worker URL has a bad IPv6 address"))?;
        (format!("[{ip}]"), port)
    } else {
        match auth.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (auth.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(bad("worker URL has no host"));
    }
    if !host.starts_with('[') {
        let ok = host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !host.starts_with(['-', '.']);
        if !ok {
            return Err(bad("worker URL has a bad host name"));
        }
    }
    let port = match port {
        None => 80,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(bad("worker URL port must be 1-65535")),
            }
        }
        Some(_) => return Err(bad("worker URL port must be 1-65535")),
    };
    let ip = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .ok();
    Ok(WorkerUrl {
        url: url.trim_end_matches('/').to_string(),
        authority: format!("{host}:{port}"),
        ip,
    })
}

/// Parses a worker URL into `host:port` ([`parse_worker_url`]).
///
/// Errors: as [`parse_worker_url`].
pub fn authority_of(url: &str) -> Result<String, RouterError> {
    Ok(parse_worker_url(url)?.authority)
}

/// A network: an address and a prefix length (`10.0.0.0/8`; an address alone is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: std::net::IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = RouterError;
    fn from_str(s: &str) -> Result<Self, RouterError> {
        let bad = || RouterError::Config(format!("bad network `{s}` (e.g. 10.0.0.0/8, fd00::/8)"));
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: std::net::IpAddr = a.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|&n| n <= max).ok_or_else(bad)?,
        };
        Ok(Self { net, prefix })
    }
}

impl Cidr {
    /// True when `ip` is inside (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let bits = |a: IpAddr| -> (u128, u32) {
            match a.to_canonical() {
                IpAddr::V4(v) => (u128::from(u32::from(v)), 32),
                IpAddr::V6(v) => (u128::from(v), 128),
            }
        };
        let (n, nw) = bits(self.net);
        let (x, xw) = bits(ip);
        if nw != xw {
            return false;
        }
        let shift = nw - u32::from(self.prefix);
        shift >= nw || (n >> shift) == (x >> shift)
    }
}

fn bootstrap_port(p: u16, url: &str) -> Result<u16, RouterError> {
    if p == 0 {
        return Err(RouterError::Config(format!(
            "bootstrap port of {url} must be 1-65535"
        )));
    }
    Ok(p)
}

/// Groups quick-start `--prefill` values, `URL [BOOTSTRAP_PORT]` each (clap hands them over flat), into
/// workers. A value that starts with `http://` begins a worker; a number after a URL is its bootstrap port.
fn prefill_flags(values: &[String]) -> Result<Vec<WorkerSpec>, RouterError> {
    let mut out: Vec<WorkerSpec> = Vec::new();
    let mut has_port = false;
    for v in values {
        if v.starts_with("http://") {
            authority_of(v)?;
            out.push(WorkerSpec {
                url: v.clone(),
                bootstrap_port: DEFAULT_BOOTSTRAP_PORT,
                api_key: None,
                kv_events: None,
            });
            has_port = false;
            continue;
        }
        let port = v.parse::<u16>().ok();
        match (out.last_mut(), port) {
            (Some(w), Some(p)) if !has_port => {
                w.bootstrap_port = bootstrap_port(p, &w.url)?;
                has_port = true;
            }
            _ => {
                return Err(RouterError::Config(format!(
                    "--prefill takes `URL [BOOTSTRAP_PORT]` (URL http://host:port, port 1-65535); got `{v}`"
                )))
            }
        }
    }
    Ok(out)
}

fn secs(v: f64, name: &str) -> Result<std::time::Duration, RouterError> {
    std::time::Duration::try_from_secs_f64(v).map_err(|_| {
        RouterError::Config(format!("{name} must be a non-negative number of seconds"))
    })
}

impl Config {
    /// Resolves flags over the file (if `--config` is given).
    ///
    /// Errors: [`RouterError::Config`] for unreadable/invalid files, bad URLs, unknown
    /// policies or roles; [`RouterError::Core`] for an invalid grid.
    pub fn from_args(a: &ServeArgs) -> Result<Self, RouterError> {
        let file: FileConfig = match &a.config {
            Some(p) => {
                let s = std::fs::read_to_string(p)
                    .map_err(|e| RouterError::Config(format!("{}: {e}", p.display())))?;
                toml::from_str(&s)
                    .map_err(|e| RouterError::Config(format!("{}: {e}", p.display())))?
            }
            None => FileConfig {
                registration: true,
                ..FileConfig::default()
            },
        };
        let base = a
            .config
            .as_ref()
            .and_then(|p| p.parent())
            .map(|p| p.to_path_buf());
        Self::resolve(a, file, base)
    }

    /// Resolves flags over a parsed file; `base` is the file's directory (relative grid paths).
    fn resolve(
        a: &ServeArgs,
        file: FileConfig,
        base: Option<PathBuf>,
    ) -> Result<Self, RouterError> {
        // With `--discovery`, `--policy` is also the policy of the pools discovered workers create (they are
        // the deployment's only pools) unless the file names one.
        let default_policy: Policy = file
            .default_policy
            .as_deref()
            .or(a
                .policy
                .as_deref()
                .filter(|_| a.discovery.discovery.is_some()))
            .unwrap_or("round_robin")
            .parse()?;
        let tuning = crate::tuning::Tuning::resolve(
            &a.tuning,
            &file.telemetry,
            &file.score,
            &file.admission,
            file.router_temperature,
        )?;
        let mut models = Vec::new();
        for m in &file.models {
            let grid = match &m.global_router_config {
                Some(p) => {
                    let p = match &base {
                        Some(b) if p.is_relative() => b.join(p),
                        _ => p.clone(),
                    };
                    let s = std::fs::read_to_string(&p)
                        .map_err(|e| RouterError::Config(format!("{}: {e}", p.display())))?;
                    Some(GlobalRouterConfig::from_json(&s)?)
                }
                None => None,
            };
            let mut pools = Vec::new();
            for p in &m.pools {
                let pool_port = bootstrap_port(
                    p.bootstrap_port.unwrap_or(DEFAULT_BOOTSTRAP_PORT),
                    &format!("pool {}", p.name),
                )?;
                let mut workers = Vec::new();
                for w in &p.workers {
                    let (url, port, key, kv_events) = match w {
                        WorkerEntry::Url(u) => (u, None, None, None),
                        WorkerEntry::Table(t) => (
                            &t.url,
                            t.bootstrap_port,
                            t.api_key.as_ref(),
                            KvEventsEndpoints::from_fields(
                                t.kv_events_endpoint.as_deref(),
                                t.kv_events_replay_endpoint.as_deref(),
                            )?,
                        ),
                    };
                    authority_of(url)?;
                    workers.push(WorkerSpec {
                        url: url.clone(),
                        bootstrap_port: bootstrap_port(port.unwrap_or(pool_port), url)?,
                        api_key: key.or(p.api_key.as_ref()).cloned(),
                        kv_events,
                    });
                }
                let role = parse_role(&p.role)?;
                pools.push(PoolSpec {
                    name: p.name.clone(),
                    role,
                    policy: match &p.policy {
                        Some(s) => s.parse()?,
                        None => default_policy,
                    },
                    workers,
                    overlap_weight: p.overlap_weight.unwrap_or(1.0),
                    bootstrap_port: pool_port,
                    api_key: p.api_key.clone(),
                    score: tuning.pool_score(p.score.as_ref(), role)?,
                    temperature: tuning.pool_temperature(p.temperature)?,
                    admission: tuning.pool_admission(&p.name, role, p.admission.as_ref())?,
                });
            }
            if let Some(g) = &grid {
                let np = pools
                    .iter()
                    .filter(|p| p.role == pdx_protocol::Role::Prefill)
                    .count();
                let nd = pools
                    .iter()
                    .filter(|p| p.role == pdx_protocol::Role::Decode)
                    .count();
                if g.num_prefill_pools != np || g.num_decode_pools != nd {
                    return Err(RouterError::Config(format!(
                        "model {}: the grid names {} prefill and {} decode pools, the file has {np} and {nd}",
                        m.name, g.num_prefill_pools, g.num_decode_pools
                    )));
                }
            }
            models.push(ModelSpec {
                name: m.name.clone(),
                grid,
                block_size: m.block_size.unwrap_or(16).max(1),
                pools,
            });
        }
        // Quick-start flags: replace the file's models.
        if !a.prefill.is_empty() || !a.decode.is_empty() || !a.worker.is_empty() {
            let policy: Policy = match &a.policy {
                Some(s) => s.parse()?,
                None => default_policy,
            };
            let mut pools = Vec::new();
            let plain = |urls: &[String]| -> Result<Vec<WorkerSpec>, RouterError> {
                urls.iter()
                    .map(|u| {
                        authority_of(u)?;
                        Ok(WorkerSpec {
                            url: u.clone(),
                            bootstrap_port: DEFAULT_BOOTSTRAP_PORT,
                            api_key: None,
                            kv_events: None,
                        })
                    })
                    .collect()
            };
            for (name, role, workers) in [
                (
                    "prefill",
                    pdx_protocol::Role::Prefill,
                    prefill_flags(&a.prefill)?,
                ),
                ("decode", pdx_protocol::Role::Decode, plain(&a.decode)?),
                (
                    "aggregated",
                    pdx_protocol::Role::Aggregated,
                    plain(&a.worker)?,
                ),
            ] {
                if workers.is_empty() {
                    continue;
                }
                pools.push(PoolSpec {
                    name: name.into(),
                    role,
                    policy,
                    workers,
                    overlap_weight: 1.0,
                    bootstrap_port: DEFAULT_BOOTSTRAP_PORT,
                    api_key: None,
                    score: tuning.role_score(role),
                    temperature: tuning.temperature,
                    admission: tuning.pool_admission(name, role, None)?,
                });
            }
            models = vec![ModelSpec {
                name: a.model.clone().unwrap_or_else(|| "*".into()),
                grid: None,
                block_size: 16,
                pools,
            }];
        }
        let orchestration: OrchestrationKind = a
            .orchestration
            .as_deref()
            .or(file.orchestration.as_deref())
            .unwrap_or("vllm-nixl")
            .parse()?;
        let ksana = if orchestration == OrchestrationKind::Ksana {
            if !models.is_empty() {
                return Err(RouterError::Config(
                    "orchestration `ksana`: KsanaLLM nodes register themselves (POST /RegisterNode); \
                     --prefill/--decode/--worker and [[models]] are not used with it"
                        .into(),
                ));
            }
            let k = &file.ksana;
            let db = match (&a.ksana_db, &k.db) {
                (Some(d), _) => d.clone(),
                // A relative path in the file is relative to the file, as the peer reads its config.ini.
                (None, Some(d)) if !d.starts_with("mysql://") => match &base {
                    Some(b) if std::path::Path::new(d).is_relative() => {
                        b.join(d).to_string_lossy().into_owned()
                    }
                    _ => d.clone(),
                },
                (None, Some(d)) => d.clone(),
                (None, None) => "pdx-ksana.db".into(),
            };
            let timeout = secs(
                a.ksana_heartbeat_timeout_secs
                    .or(k.heartbeat_timeout_secs)
                    .unwrap_or(60.0),
                "ksana heartbeat_timeout_secs",
            )?;
            Some(crate::ksana::KsanaConfig {
                db: pdx_ksana::Database::parse(&db)
                    .map_err(|e| RouterError::Config(e.to_string()))?,
                settings: pdx_ksana::Settings {
                    cluster_name: a
                        .ksana_cluster
                        .clone()
                        .or(k.cluster_name.clone())
                        .unwrap_or_else(|| "default_cluster".into()),
                    heartbeat_timeout_us: timeout.as_micros().min(i64::MAX as u128) as i64,
                    max_nodes: k.max_nodes.unwrap_or(1024),
                },
                create_schema: !a.ksana_no_create_schema && k.create_schema.unwrap_or(true),
                policy: match &a.policy {
                    Some(p) => p.parse()?,
                    None => default_policy,
                },
                allow: a
                    .worker_allow_cidr
                    .iter()
                    .chain(&file.worker_allow_cidrs)
                    .map(|c| c.parse())
                    .collect::<Result<_, _>>()?,
            })
        } else {
            None
        };
        let mut retry = pdx_router_core::RetryPolicy::default();
        if let Some(v) = a.prefill_attempts.or(file.retry.max_attempts) {
            retry.max_attempts = v.max(1);
        }
        if let Some(v) = file.retry.backoff_base_ms {
            retry.backoff_base_us = secs(v / 1e3, "retry.backoff_base_ms")?.as_micros() as u64;
        }
        if let Some(v) = file.retry.backoff_max_ms {
            retry.backoff_max_us = secs(v / 1e3, "retry.backoff_max_ms")?.as_micros() as u64;
        }
        retry.fallback = match a.prefill_fallback.as_deref() {
            Some("decode_only" | "decode-only") => FallbackMode::DecodeOnly,
            Some("fail") => FallbackMode::Fail,
            Some(o) => {
                return Err(RouterError::Config(format!(
                    "unknown --prefill-fallback `{o}`"
                )))
            }
            None => file.retry.fallback.unwrap_or(FallbackMode::DecodeOnly),
        };
        let mut breaker = pdx_router_core::BreakerConfig::default();
        if let Some(v) = file.breaker.failure_threshold {
            breaker.failure_threshold = v;
        }
        if let Some(v) = file.breaker.open_secs {
            breaker.open_us = secs(v, "breaker.open_secs")?.as_micros() as u64;
        }
        let migration = migration_config(a, &file.migration)?;
        let threads = a.threads.or(file.threads).unwrap_or(0);
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let hc = a
            .health_check_interval_secs
            .or(file.health_check_interval_secs)
            .unwrap_or(5.0);
        Ok(Config {
            host: a
                .host
                .clone()
                .or(file.host)
                .unwrap_or_else(|| "0.0.0.0".into()),
            port: a.port.or(file.port).unwrap_or(8000),
            threads,
            orchestration,
            max_body_bytes: file.max_body_bytes.unwrap_or(32 << 20),
            upstream_timeout: secs(
                a.upstream_timeout_secs
                    .or(file.upstream_timeout_secs)
                    .unwrap_or(300.0),
                "upstream_timeout_secs",
            )?,
            stream_idle_timeout: secs(
                a.stream_idle_timeout_secs
                    .or(file.stream_idle_timeout_secs)
                    .unwrap_or(300.0),
                "stream_idle_timeout_secs",
            )?,
            shutdown_timeout: secs(
                a.shutdown_timeout_secs
                    .or(file.shutdown_timeout_secs)
                    .unwrap_or(30.0),
                "shutdown_timeout_secs",
            )?,
            client_timeout: match a.client_timeout_secs.or(file.client_timeout_secs) {
                Some(v) if v <= 0.0 => {
                    return Err(RouterError::Config(
                        "client_timeout_secs must be more than 0 seconds".into(),
                    ))
                }
                v => secs(v.unwrap_or(30.0), "client_timeout_secs")?,
            },
            admin_token: a.admin_token.clone().or(file.admin_token),
            worker_allow: a
                .worker_allow_cidr
                .iter()
                .chain(&file.worker_allow_cidrs)
                .map(|c| c.parse())
                .collect::<Result<_, _>>()?,
            max_workers: a.max_workers.or(file.max_workers).unwrap_or(1024),
            max_pending_kv_requests: a
                .max_pending_kv_requests
                .or(file.max_pending_kv_requests)
                .unwrap_or(1024),
            max_pending_kv_tokens: a
                .max_pending_kv_tokens
                .or(file.max_pending_kv_tokens)
                .unwrap_or(0),
            api_keys: crate::front_auth::client_keys(&a.api_key, &file.api_key)?,
            heartbeat_ttl_us: secs(
                a.heartbeat_ttl_secs
                    .or(file.heartbeat_ttl_secs)
                    .unwrap_or(15.0),
                "heartbeat_ttl_secs",
            )?
            .as_micros() as u64,
            health_interval: if hc > 0.0 {
                Some(secs(hc, "health_check_interval_secs")?)
            } else {
                None
            },
            default_policy,
            registration: file.registration,
            retry,
            breaker,
            migration,
            tuning,
            models,
            ksana,
            discovery: a
                .discovery
                .spec()
                .map_err(|e| RouterError::Config(e.to_string()))?
                .map(|mut d| {
                    if let (pdx_discovery::DiscoverySpec::K8s(k), Some(m)) = (&mut d, &a.model) {
                        k.default_model = m.clone();
                    }
                    d
                }),
        })
    }
}

/// `--migration-*` over `[migration]`.
fn migration_config(
    a: &ServeArgs,
    f: &MigrationFileConfig,
) -> Result<MigrationConfig, RouterError> {
    let threshold = a.migration_gap_threshold.or(f.gap_threshold).unwrap_or(0.0);
    if !(0.0..1.0).contains(&threshold) {
        return Err(RouterError::Config(format!(
            "migration gap threshold must be within 0..1 (0: off), got {threshold}"
        )));
    }
    let gap = if threshold > 0.0 {
        Some(GapMigration {
            threshold,
            budget: a.migration_budget.or(f.budget).unwrap_or(4),
            window_us: secs(
                a.migration_window_secs.or(f.window_secs).unwrap_or(10.0),
                "migration window_secs",
            )?
            .as_micros() as u64,
            check_every: secs(f.check_secs.unwrap_or(1.0), "migration check_secs")?,
            min_remaining_tokens: f.min_remaining_tokens.unwrap_or(32),
        })
    } else {
        None
    };
    Ok(MigrationConfig {
        max_moves: a.migration_max_moves.or(f.max_moves).unwrap_or(3),
        gap,
    })
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
