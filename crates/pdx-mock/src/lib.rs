//! `pdx mock`: a vLLM-compatible mock prefill/decode engine with real KV bytes.
//!
//! It serves vLLM's OpenAI-compatible subset (`/v1/chat/completions`, `/v1/completions`,
//! streaming or not, `/v1/models`, `/health`, `/metrics` under vLLM's metric names) plus the
//! probes of sglang-router and vllm-router (`/server_info`, `/get_server_info`, `/model_info`,
//! `/get_model_info`), in one of three roles:
//! * **aggregated**: prefill and decode locally;
//! * **prefill**: a request with `kv_transfer_params.do_remote_decode` computes the prompt's KV
//!   into blocks (real bytes, a deterministic function of the token ids, position and layer),
//!   keeps them, and answers with the `kv_transfer_params` a decode engine needs (vLLM
//!   NixlConnector `request_finished`); the blocks are freed on the decode side's read
//!   notification or after `--kv-hold-timeout-secs`;
//! * **decode**: a request with `do_remote_prefill` reads those blocks through pdx's transfer
//!   engine, checks every byte, then generates.
//!
//! With `--ksana-router URL` a prefill or decode engine is a KsanaLLM node instead: it registers with a
//! KsanaLLM router and takes the router's `kv-comm-*` requests, and serves KsanaLLM's `/generate`
//! ([`ksana`], [`ksana_generate`]; `/generate` is served in every role).
//!
//! Timing comes from a continuous-batching scheduler with a step-time model
//! ([`scheduler`], [`profile`]) unless `--instant`. Faults can be injected ([`profile::FaultProfile`]).
//! See `docs/mock.md`.
#![forbid(unsafe_code)]

pub mod bootstrap;
pub mod engine;
pub mod error;
pub mod generation;
pub mod ksana;
pub mod ksana_generate;
pub mod kv_cache;
pub mod kv_events;
pub mod metrics;
#[cfg(feature = "pdx-transfer")]
pub mod pdx_transport;
pub mod profile;
pub mod register;
pub mod scheduler;
pub mod server;
/// The tokenizers (crate `pdx-tokens`).
pub use pdx_tokens as tokenizer;
pub mod transport;

pub use engine::{Engine, EngineConfig, Role};
pub use error::MockError;
pub use profile::Profile;
pub use tokenizer::{
    builtin_tokens, count_builtin_tokens, synthetic_prompt, Tokenizer, CHAT_OVERHEAD_TOKENS,
};

use clap::Parser;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Which KV transport a prefill/decode worker uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvTransportKind {
    /// pdx's transfer engine (`pdx-transfer`): works across processes and hosts.
    Pdx,
    /// In-process registry (tests, single-process demos).
    Inproc,
}

/// `pdx mock` flags. With no flags: an aggregated worker on `0.0.0.0:8000` serving model `mock`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "pdx-mock",
    about = "vLLM-compatible mock prefill/decode engine"
)]
pub struct MockArgs {
    /// Worker role.
    #[arg(long, value_enum, default_value_t = Role::Aggregated)]
    pub role: Role,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// HTTP port (0: ephemeral).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Served model name.
    #[arg(long, default_value = "mock")]
    pub model: String,
    /// Profile file (TOML or JSON): model shape, timing, scheduler limits, faults [default: built-in, Qwen3-0.6B on
    /// one H100]
    #[arg(long)]
    pub profile: Option<std::path::PathBuf>,
    /// Hugging Face `tokenizer.json` [default: the built-in tokenizer]
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// No modelled delay: answer as fast as possible (router overhead benchmarks).
    #[arg(long)]
    pub instant: bool,
    /// Time factor of the timing model: 2 runs every modelled step twice as fast (the same word as
    /// `pdx replay --speed`).
    #[arg(long, alias = "speedup", default_value_t = 1.0)]
    pub speed: f64,
    /// Server threads, each a current-thread runtime on its own SO_REUSEPORT listener.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV cache capacity in blocks.
    #[arg(long, default_value_t = 2048)]
    pub num_blocks: u32,
    /// Divide the model's KV bytes per token by this (so demos fit in memory).
    #[arg(long, default_value_t = 16)]
    pub kv_scale_down: u32,
    /// Seconds a prefill worker keeps KV blocks for a remote decode that never reads them
    /// (vLLM `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`).
    #[arg(long, default_value_t = 480.0)]
    pub kv_hold_timeout_secs: f64,
    /// KV transport of prefill/decode workers.
    #[arg(long, value_enum, default_value_t = KvTransportKind::Pdx)]
    pub kv_transport: KvTransportKind,
    /// Listen address of the KV agent (side channel + transfers) of prefill/decode workers.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub kv_listen: String,
    /// Host advertised as `remote_host` and in registration [default: the KV listen IP]
    #[arg(long)]
    pub advertise_host: Option<String>,
    /// File holding the KV agents' shared secret (16..=1024 bytes; a trailing newline is
    /// ignored). Without it the secret comes from `PDX_AGENT_SECRET`, if set. With a secret,
    /// only agents holding the same one can fetch this engine's metadata or read and write its
    /// KV (mutual HMAC-SHA256 challenge–response per connection). Not a plain flag value, so it
    /// never shows in the process list.
    #[arg(long)]
    pub agent_secret_file: Option<std::path::PathBuf>,
    /// KV engine id, the `remote_engine_id` [default: pdx-mock-<role>-<pid>-<port>]
    #[arg(long)]
    pub engine_id: Option<String>,
    /// Output tokens when a request sets no `max_tokens`.
    #[arg(long, default_value_t = 16)]
    pub default_max_tokens: u32,
    /// The model emits EOS after this many tokens (unless `ignore_eos`) [default: never]
    #[arg(long)]
    pub eos_after: Option<u32>,
    /// Context length, tokens [default: the profile's, 40960]
    #[arg(long)]
    pub max_model_len: Option<u32>,
    /// Scheduler token budget per step [default: the profile's, 8192]
    #[arg(long)]
    pub max_num_batched_tokens: Option<u32>,
    /// Running sequences at most [default: the profile's, 256]
    #[arg(long)]
    pub max_num_seqs: Option<u32>,
    /// Fault: fraction of completion requests answered 500.
    #[arg(long)]
    pub fault_error_rate: Option<f64>,
    /// Fault: fraction of completion requests never answered.
    #[arg(long)]
    pub fault_hang_rate: Option<f64>,
    /// Fault: serve this many completion requests, then drop every connection and exit.
    #[arg(long)]
    pub fault_crash_after: Option<u64>,
    /// Fault: answer 503 on `/health` and completions for this many seconds after start.
    #[arg(long)]
    pub fault_slow_start_secs: Option<f64>,
    /// Fault: streams stall after this many tokens.
    #[arg(long)]
    pub fault_stall_after_tokens: Option<u32>,
    /// Fault: stalls last this many seconds [default: forever]
    #[arg(long)]
    pub fault_stall_secs: Option<f64>,
    /// Router URL to self-register with (`POST URL/v1/workers`, repeated as a heartbeat).
    #[arg(long)]
    pub register: Option<String>,
    /// etcd to register in (`etcd://host:port[,host:port…][/prefix]`, as `pdx serve --discovery`): the
    /// registration body under `<prefix>/<model>/<id>` with a lease of `--etcd-ttl-secs`, kept alive every
    /// third of it; every router watching the prefix routes to this worker, and drops it when the lease
    /// expires (the process died) [default: none]
    #[arg(long, value_name = "etcd://…")]
    pub register_etcd: Option<String>,
    /// TTL of the etcd lease, seconds (at least 2).
    #[arg(long, default_value_t = 10)]
    pub etcd_ttl_secs: u64,
    /// Pool name sent when registering [default: the role]
    #[arg(long)]
    pub pool: Option<String>,
    /// URL of this worker sent when registering [default: http://<advertise host>:<port>]
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// Seconds between registration heartbeats.
    #[arg(long, default_value_t = 5.0)]
    pub heartbeat_secs: f64,
    /// Admin token of the router (its `--admin-token`): registration and heartbeat POSTs carry
    /// `Authorization: Bearer TOKEN`. Without it the token comes from `PDX_ADMIN_TOKEN`, if set,
    /// which keeps it out of the process list [default: none]
    #[arg(long)]
    pub admin_token: Option<String>,
    /// Benchmark mode for router comparisons: a prefill answers `kv_transfer_params` without
    /// holding its blocks, and a decode takes `do_remote_prefill` params without reading remote
    /// KV (the prompt counts as computed, as on SGLang's bootstrap path). Routers that pass
    /// `kv_transfer_params` (pdx, vllm-router) then cost the workers what bootstrap routers do.
    #[arg(long)]
    pub kv_noop: bool,
    /// SGLang's `--disaggregation-bootstrap-port`: a prefill worker also listens here, so decode workers can
    /// ask it about the KV of a bootstrap room (the route is served on `--port` as well; a router may name
    /// either as the prefill's bootstrap port) [default: `--port` only]
    #[arg(long)]
    pub bootstrap_port: Option<u16>,
    /// Seconds a decode worker on SGLang's bootstrap path waits for its prefill's KV before it answers 502.
    #[arg(long, default_value_t = 300.0)]
    pub bootstrap_timeout_secs: f64,
    /// Token events per HTTP chunk of an `--instant` stream (1: one SSE event per chunk).
    #[arg(long, default_value_t = 64)]
    pub instant_tokens_per_chunk: u32,
    /// Publish KV cache events as vLLM does, given vLLM's `KVEventsConfig` JSON, e.g.
    /// `{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557",
    /// "replay_endpoint":"tcp://*:5558","topic":"kv-events","buffer_steps":10000}` (ZMQ PUB of msgpack
    /// `KVEventBatch`es plus a replay socket; port 0 binds any free port). Registration then sends the
    /// endpoints, so a router subscribes [default: off]
    #[arg(long)]
    pub kv_events_config: Option<String>,
    /// KsanaLLM router to register with as a node (`POST URL/RegisterNode`, `/Heartbeat`, and as rank-0
    /// prefill `/RegisterCommId`): `http://host:port`. Needs `--role prefill` or `--role decode`.
    #[arg(long)]
    pub ksana_router: Option<String>,
    /// `cluster_name` sent at registration [default: none, the router's own]
    #[arg(long)]
    pub ksana_cluster_name: Option<String>,
    /// Rank of this node in its KsanaLLM group (only rank 0 serves requests and registers comm ids).
    #[arg(long, default_value_t = 0)]
    pub node_rank: u32,
    /// Devices of the whole KsanaLLM group (`world_size`) [default: --ksana-devices, a one-node group]
    #[arg(long)]
    pub world_size: Option<u32>,
    /// Devices this node reports at registration (`devices`, made up: `pdx-mock` devices on the KV agent's IP).
    #[arg(long, default_value_t = 1)]
    pub ksana_devices: u32,
    /// Milliseconds between heartbeats to the KsanaLLM router (KsanaLLM's `heartbeat_interval_ms`).
    #[arg(long, default_value_t = 5000)]
    pub ksana_heartbeat_ms: u64,
    /// Seconds a KsanaLLM request waits for its comm group to be ready and, on a decode, for the prefill's KV.
    #[arg(long, default_value_t = 30.0)]
    pub ksana_kv_wait_secs: f64,
    /// The group's address at the KsanaLLM router (`inference_addr`) [default: this worker's host:port; a
    /// rank > 0 node names its rank 0's]
    #[arg(long)]
    pub ksana_inference_addr: Option<String>,
    /// Require `Authorization: Bearer KEY` on `/v1/*` (repeatable: any of the keys), as vLLM's `--api-key`:
    /// 401 `{"error":"Unauthorized"}` otherwise. The first key is also sent in the registration body, so a
    /// router sends it upstream.
    #[arg(long = "api-key")]
    pub api_key: Vec<String>,
}

impl Default for MockArgs {
    fn default() -> Self {
        MockArgs::parse_from(["pdx-mock"])
    }
}

/// A running mock server.
#[derive(Debug)]
pub struct MockServer {
    /// Bound HTTP address.
    pub addr: SocketAddr,
    /// The engine (metrics, KV state; used by tests).
    pub engine: Arc<Engine>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl MockServer {
    /// Sum of the samples of metric `name` (as `/metrics` renders it, e.g. `vllm:prompt_tokens_total`)
    /// whose line contains `label_filter` (`""`: every sample); `None` when there is no such sample.
    pub fn metric(&self, name: &str, label_filter: &str) -> Option<f64> {
        let text = self.engine.metrics.render();
        let values: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter(|l| l.contains(label_filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// Stops the server and waits for its threads.
    pub fn stop(mut self) {
        self.engine.shutdown.send_replace(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Blocks until the server stops (crash fault). Returns [`MockError::Crashed`] then.
    pub fn wait(mut self) -> Result<(), MockError> {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if self.engine.cfg.profile.faults.crash_after.is_some() {
            return Err(MockError::Crashed(
                self.engine.completions_seen().saturating_sub(1),
            ));
        }
        Ok(())
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.engine.shutdown.send_replace(true);
    }
}

fn build_profile(a: &MockArgs) -> Result<Profile, MockError> {
    let mut p = match &a.profile {
        Some(f) => Profile::load(f)?,
        None => Profile::default(),
    };
    if let Some(v) = a.max_model_len {
        p.model.max_model_len = v;
    }
    if let Some(v) = a.max_num_batched_tokens {
        p.scheduler.max_num_batched_tokens = v;
    }
    if let Some(v) = a.max_num_seqs {
        p.scheduler.max_num_seqs = v;
    }
    let f = &mut p.faults;
    if let Some(v) = a.fault_error_rate {
        f.error_rate = v;
    }
    if let Some(v) = a.fault_hang_rate {
        f.hang_rate = v;
    }
    if a.fault_crash_after.is_some() {
        f.crash_after = a.fault_crash_after;
    }
    if let Some(v) = a.fault_slow_start_secs {
        f.slow_start_secs = v;
    }
    if a.fault_stall_after_tokens.is_some() {
        f.stall_after_tokens = a.fault_stall_after_tokens;
    }
    if a.fault_stall_secs.is_some() {
        f.stall_secs = a.fault_stall_secs;
    }
    for (name, v) in [("error_rate", f.error_rate), ("hang_rate", f.hang_rate)] {
        if !(0.0..=1.0).contains(&v) {
            return Err(MockError::Config(format!(
                "fault {name} must be within 0..=1, got {v}"
            )));
        }
    }
    Ok(p)
}

/// Starts a mock server in background threads and returns once it listens.
///
/// Errors: [`MockError::Config`] for bad flags/profile/tokenizer, [`MockError::Io`] when the
/// port cannot be bound, transport errors when the KV agent cannot start.
pub fn start(args: MockArgs) -> Result<MockServer, MockError> {
    let profile = build_profile(&args)?;
    if args.block_size == 0 || args.num_blocks == 0 || args.kv_scale_down == 0 || args.threads == 0
    {
        return Err(MockError::Config(
            "block size, blocks, kv scale-down and threads must be > 0".into(),
        ));
    }
    let etcd = match &args.register_etcd {
        Some(u) => Some(
            pdx_discovery::etcd::EtcdTarget::parse(u)
                .map_err(|e| MockError::Config(format!("--register-etcd: {e}")))?,
        ),
        None => None,
    };
    // Checked before anything starts: a token that cannot be a header value is a configuration error.
    let admin = register::admin_authorization(
        args.admin_token.as_deref(),
        std::env::var("PDX_ADMIN_TOKEN").ok().as_deref(),
    )?;
    let tokenizer = match &args.tokenizer {
        Some(p) => Tokenizer::from_file(p)?,
        None => Tokenizer::Builtin,
    };
    let ip: std::net::IpAddr = args
        .host
        .parse()
        .map_err(|e| MockError::Config(format!("bad --host {}: {e}", args.host)))?;
    // One SO_REUSEPORT listener per thread, refusing an address another process holds (a second mock on the
    // same port would otherwise take part of this one's requests; see `pdx-listen`).
    let mut listeners = pdx_listen::bind_set(SocketAddr::new(ip, args.port), args.threads, 1024)?;
    let addr = listeners[0].local_addr()?;
    // SGLang's bootstrap server port: one more listener, served by the first thread.
    let bootstrap_listener = match args.bootstrap_port {
        Some(p) => Some(pdx_listen::bind_set(SocketAddr::new(ip, p), 1, 1024)?.remove(0)),
        None => None,
    };
    let m = &profile.model;
    let per_token_layer =
        (u64::from(m.kv_heads) * u64::from(m.head_dim) * 2 * u64::from(m.dtype_bytes))
            .div_ceil(u64::from(args.kv_scale_down))
            .next_multiple_of(8) as usize;
    let layout = kv_cache::KvLayout {
        block_size: args.block_size,
        layers: m.layers as usize,
        bytes_per_token_layer: per_token_layer,
    };
    let engine_id = args.engine_id.clone().unwrap_or_else(|| {
        format!(
            "pdx-mock-{}-{}-{}",
            args.role.as_str(),
            std::process::id(),
            addr.port()
        )
    });
    let engine_id_for_header = engine_id.clone();
    let transport: Option<Arc<dyn transport::KvTransport>> = match args.role {
        Role::Aggregated => None,
        _ => Some(match args.kv_transport {
            KvTransportKind::Inproc => {
                let host = args
                    .advertise_host
                    .clone()
                    .unwrap_or_else(|| "127.0.0.1".into());
                Arc::new(transport::InProcTransport::new(
                    transport::KvEndpoint {
                        engine_id,
                        host,
                        port: addr.port(),
                    },
                    layout,
                    args.num_blocks,
                )?)
            }
            #[cfg(feature = "pdx-transfer")]
            KvTransportKind::Pdx => Arc::new(pdx_transport::PdxTransport::new(
                &engine_id,
                &args.kv_listen,
                args.advertise_host.clone(),
                agent_secret(&args)?,
                layout,
                args.num_blocks,
            )?),
            #[cfg(not(feature = "pdx-transfer"))]
            KvTransportKind::Pdx => {
                return Err(MockError::Config(
                    "built without the `pdx-transfer` feature; use --kv-transport inproc".into(),
                ))
            }
        }),
    };
    let cfg = EngineConfig {
        role: args.role,
        model: args.model.clone(),
        block_size: args.block_size,
        num_blocks: args.num_blocks,
        instant: args.instant,
        speedup: args.speed,
        kv_hold_timeout: Duration::from_secs_f64(args.kv_hold_timeout_secs.max(0.0)),
        default_max_tokens: args.default_max_tokens.max(1),
        eos_after: args.eos_after,
        profile,
        kv_noop: args.kv_noop,
        instant_tokens_per_chunk: args.instant_tokens_per_chunk.max(1),
        api_keys: args.api_key.clone(),
        worker_id: engine_id_for_header,
        bootstrap_timeout: Duration::from_secs_f64(args.bootstrap_timeout_secs.clamp(0.0, 1e6)),
    };
    let kv_events = match args.kv_events_config.as_deref() {
        Some(json) => kv_events::KvEventsConfig::parse(json)?
            .map(|c| kv_events::KvEventPublisher::start(&c))
            .transpose()?,
        None => None,
    };
    let events_at = kv_events
        .as_ref()
        .map(|p| (p.endpoint.port(), p.replay_endpoint.map(|r| r.port())));
    let engine = Engine::with_kv_events(cfg, tokenizer, transport, kv_events);
    let ksana = match &args.ksana_router {
        Some(router) => {
            let node = Arc::new(ksana_node(&args, router, addr, &engine)?);
            engine
                .ksana
                .set(node.clone())
                .expect("the KsanaLLM node is set once");
            // Notifications (KV notices, read notifications) are handled as they arrive, not at the reaper's tick.
            let e = engine.clone();
            std::thread::Builder::new()
                .name("pdx-mock-kv-notices".into())
                .spawn(move || {
                    while !*e.shutdown.borrow() {
                        e.pump_notices(Duration::from_millis(100));
                    }
                })?;
            Some(node)
        }
        None => None,
    };
    let mut threads = Vec::new();
    let mut bootstrap_listener = bootstrap_listener;
    for (i, l) in listeners.drain(..).enumerate() {
        let engine = engine.clone();
        let args = args.clone();
        let admin = admin.clone();
        let extra = if i == 0 {
            bootstrap_listener.take()
        } else {
            None
        };
        let ksana = ksana.clone();
        let etcd = etcd.clone();
        let t = std::thread::Builder::new()
            .name(format!("pdx-mock-http-{i}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    let l = tokio::net::TcpListener::from_std(l).expect("listener");
                    if i == 0 {
                        tokio::spawn(reaper(engine.clone()));
                        if let Some(node) = ksana {
                            tokio::spawn(node.run(engine.clone()));
                        }
                        if let Some(target) = etcd.clone() {
                            let body =
                                serde_json::to_vec(&register::registration(&args, addr, events_at))
                                    .expect("a registration serializes");
                            tokio::spawn(async move {
                                // The sender lives as long as the task: the registration ends with the process
                                // (its lease then expires).
                                let (_keep, stop) = tokio::sync::watch::channel(false);
                                let opts = pdx_discovery::etcd_driver::EtcdOptions::from_env();
                                if let Err(e) = pdx_discovery::etcd_driver::register(
                                    target,
                                    opts,
                                    body,
                                    args.etcd_ttl_secs,
                                    stop,
                                )
                                .await
                                {
                                    tracing::error!(error = %e, "etcd registration");
                                }
                            });
                        }
                        if let Some(url) = args.register.clone() {
                            tokio::spawn(register::heartbeat(
                                url,
                                register::registration(&args, addr, events_at),
                                admin.clone(),
                                args.heartbeat_secs,
                            ));
                        }
                    }
                    let bootstrap = extra
                        .map(|b| tokio::net::TcpListener::from_std(b).expect("bootstrap listener"));
                    let e2 = engine.clone();
                    tokio::join!(serve(l, engine), async move {
                        if let Some(b) = bootstrap {
                            serve(b, e2).await
                        }
                    });
                });
            })?;
        threads.push(t);
    }
    let kv = engine
        .kv_endpoint()
        .map(|e| format!("{}:{} ({})", e.host, e.port, e.engine_id));
    tracing::info!(
        role = args.role.as_str(),
        model = %args.model,
        instant = args.instant,
        kv_side_channel = kv.as_deref().unwrap_or("none"),
        "pdx mock listening on http://{addr}"
    );
    Ok(MockServer {
        addr,
        engine,
        threads,
    })
}

/// The KsanaLLM node of a worker started with `--ksana-router ROUTER`, bound to `addr`.
fn ksana_node(
    args: &MockArgs,
    router: &str,
    addr: SocketAddr,
    engine: &Engine,
) -> Result<ksana::KsanaNode, MockError> {
    let ep = engine.kv_endpoint().ok_or_else(|| {
        MockError::Config("--ksana-router needs --role prefill or --role decode".into())
    })?;
    let host = args.advertise_host.clone().unwrap_or_else(|| {
        if addr.ip().is_unspecified() {
            "127.0.0.1".into()
        } else {
            addr.ip().to_string()
        }
    });
    let coordinator_addr = format!("{}:{}", ep.host, ep.port).parse().map_err(|_| {
        MockError::Config(format!(
            "the KV agent's address {}:{} must be ip:port for a KsanaLLM coordinator_addr (--advertise-host)",
            ep.host, ep.port
        ))
    })?;
    if !args.ksana_kv_wait_secs.is_finite() || args.ksana_kv_wait_secs <= 0.0 {
        return Err(MockError::Config("--ksana-kv-wait-secs must be > 0".into()));
    }
    let cfg = ksana::KsanaConfig {
        router: router.trim_end_matches('/').to_string(),
        cluster_name: args.ksana_cluster_name.clone(),
        role: args.role,
        node_rank: args.node_rank,
        world_size: args.world_size.unwrap_or(args.ksana_devices),
        devices: args.ksana_devices,
        inference_addr: args
            .ksana_inference_addr
            .clone()
            .unwrap_or_else(|| format!("{host}:{}", addr.port())),
        coordinator_addr,
        engine_id: ep.engine_id,
        heartbeat: Duration::from_millis(args.ksana_heartbeat_ms.max(10)),
        kv_wait: Duration::from_secs_f64(args.ksana_kv_wait_secs),
    };
    ksana::KsanaNode::new(cfg, engine.cfg.num_blocks as usize)
}

/// The KV agents' shared secret: `--agent-secret-file`, else `PDX_AGENT_SECRET`, else none.
#[cfg(feature = "pdx-transfer")]
fn agent_secret(args: &MockArgs) -> Result<Option<pdx_transfer::AgentSecret>, MockError> {
    let bad = |e: pdx_transfer::TransferError| MockError::Config(format!("agent secret: {e}"));
    match &args.agent_secret_file {
        Some(path) => {
            let mut bytes = std::fs::read(path).map_err(|e| {
                MockError::Config(format!("--agent-secret-file {}: {e}", path.display()))
            })?;
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            pdx_transfer::AgentSecret::new(bytes).map(Some).map_err(bad)
        }
        None => pdx_transfer::AgentSecret::from_env().map_err(bad),
    }
}

/// Runs `pdx mock` until it is killed (or crashes by fault injection).
///
/// Errors: as [`start`]; [`MockError::Crashed`] when the crash fault fired.
pub fn run(args: MockArgs) -> Result<(), MockError> {
    start(args)?.wait()
}

async fn reaper(engine: Arc<Engine>) {
    let mut shutdown = engine.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => engine.reap_holds(std::time::Instant::now()),
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

async fn serve(listener: tokio::net::TcpListener, engine: Arc<Engine>) {
    let mut shutdown = engine.shutdown.subscribe();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let _ = stream.set_nodelay(true);
        let engine = engine.clone();
        let mut shutdown = engine.shutdown.subscribe();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| server::handle(engine.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r { tracing::debug!(error = %e, "connection error") },
                _ = shutdown.wait_for(|s| *s) => {}
            }
        });
    }
}
