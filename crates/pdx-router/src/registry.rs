//! Workers, pools and models; the snapshot the request path reads.
//!
//! The request path loads one [`Snapshot`] (an `arc-swap` load: no lock) and reads the pools'
//! worker lists (also `ArcSwap`). Per-worker load is a pair of atomics. Changes
//! (registration, drain, heartbeat expiry) take the registry's edit lock, build new lists
//! and swap them in; pools (and their selection state, e.g. the KV index) survive changes.
//!
//! Registration is bounded: at most `max_workers` registered workers, URLs checked
//! ([`crate::config::parse_worker_url`]) and, with an allow-list, inside it; pools and models created by
//! registration are removed once their last worker is.

use crate::config::{
    parse_worker_url, Cidr, Config, KvEventsEndpoints, ModelSpec, PoolSpec, DEFAULT_BOOTSTRAP_PORT,
};
use crate::RouterError;
use arc_swap::ArcSwap;
use pdx_protocol::Role;
use pdx_router_core::{
    BreakerConfig, BreakerState, Candidate, CircuitBreaker, ExactIndex, ExactOverlap,
    GlobalRouterConfig, Health, HealthCheck, Liveness, Policy, PoolKind, Request, Selector,
    TelemetryConfig, TelemetrySnapshot, UpstreamFailure, WorkerTelemetry,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// One upstream engine.
#[derive(Debug)]
pub struct Worker {
    /// Stable id (KV index key).
    pub id: u64,
    /// Base URL, `http://host:port` (also the `worker` label of its metric series).
    pub url: crate::metrics::Label,
    /// `url` as the value of the `x-pdx-worker` response header (made once here, so naming the worker in a
    /// response costs a reference count, not an allocation).
    pub url_header: hyper::header::HeaderValue,
    /// `host:port`.
    pub authority: String,
    /// Role.
    pub role: Role,
    /// Pool name (also the `pool` label of its metric series).
    pub pool: crate::metrics::Label,
    /// Model name.
    pub model: String,
    /// SGLang bootstrap server port (`bootstrap_port` of the `sglang-bootstrap` orchestration when this is
    /// the prefill worker; the server's `--disaggregation-bootstrap-port`).
    pub bootstrap_port: u16,
    /// Requests in flight through this router.
    pub in_flight: AtomicU64,
    /// Tokens in flight (prompt estimate + output limit).
    pub in_flight_tokens: AtomicU64,
    /// Active health-check state (unknown until the first check; down after a failed check or connect).
    pub health: Mutex<HealthCheck>,
    /// `health` is not down (read on the request path without the lock).
    usable: AtomicBool,
    /// Prefill worker: requests whose prefill finished here and whose KV no decode has taken yet (the
    /// blocks the engine holds for them).
    pub kv_pending: AtomicU64,
    /// Prompt tokens of those requests.
    pub kv_pending_tokens: AtomicU64,
    /// Limits of `kv_pending` and `kv_pending_tokens` (0: none); at either the worker takes no prefill.
    kv_limits: (u64, u64),
    /// Model label and HTTP status of each of this worker's `pdx_requests_total` series (deleted with the
    /// worker).
    pub series: Mutex<Vec<(crate::metrics::Label, u16)>>,
    /// `DELETE` received: no new requests; removed once idle.
    pub draining: AtomicBool,
    /// Came from the registration API (heartbeat TTL applies until a discovery source confirms it).
    pub registered: bool,
    /// A discovery source (etcd, Kubernetes) holds it: it leaves when the source drops it (lease expiry,
    /// pod gone or not ready), not on a heartbeat TTL here ([`Registry::upsert_discovered`]).
    pub discovered: AtomicBool,
    /// Circuit breaker.
    pub breaker: Mutex<CircuitBreaker>,
    /// Heartbeat state.
    pub liveness: Mutex<Liveness>,
    /// `Bearer KEY` sent upstream instead of the client's `Authorization` (the worker's `--api-key`; see
    /// [`crate::front_auth`]).
    pub upstream_auth: Option<hyper::header::HeaderValue>,
    /// Where it publishes KV events (the router subscribes: [`crate::kv_events`]).
    pub kv_events: Option<KvEventsEndpoints>,
    /// What the router believes about the engine: scraped gauges and the latencies it observed
    /// ([`crate::telemetry`]). Locked by the scraper, at a request's end, and by `kv_aware`/`score` picks.
    pub telemetry: Mutex<WorkerTelemetry>,
    /// A scrape of this worker is in flight (at most one at a time).
    pub scraping: AtomicBool,
}

impl Worker {
    /// Whether new requests may go to it at `now_us`: not down, not draining, its breaker lets a request
    /// through, and (a prefill worker) under its limits of prefilled KV not yet taken by a decode.
    pub fn eligible(&self, now_us: u64) -> bool {
        self.usable.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
            && !self.kv_full()
            && self
                .breaker
                .lock()
                .map(|b| b.can_send(now_us))
                .unwrap_or(false)
    }

    /// True when the prefilled KV it holds for decodes is at one of its limits.
    pub fn kv_full(&self) -> bool {
        let (reqs, toks) = self.kv_limits;
        (reqs > 0 && self.kv_pending.load(Ordering::Relaxed) >= reqs)
            || (toks > 0 && self.kv_pending_tokens.load(Ordering::Relaxed) >= toks)
    }

    /// True unless an active health check (or a failed connect) found it down.
    pub fn usable(&self) -> bool {
        self.usable.load(Ordering::Relaxed)
    }

    /// Records the outcome of a request for the breaker (a failure as a service failure).
    pub fn report(&self, ok: bool, now_us: u64) {
        if let Ok(mut b) = self.breaker.lock() {
            if ok {
                b.on_success()
            } else {
                b.on_failure(now_us)
            }
        }
    }

    /// Records a failed request for the breaker, with its cause (connect failures and timeouts are
    /// reachability failures, which a passing health check clears).
    pub fn report_failure(&self, f: UpstreamFailure, now_us: u64) {
        if let Ok(mut b) = self.breaker.lock() {
            b.on_failure_cause(now_us, f.cause());
        }
    }

    /// The worker answered a request with a good response head: an unknown worker is up, and a half-open
    /// breaker whose probe this was closes now.
    pub fn on_answered(&self) {
        if let Ok(mut h) = self.health.lock() {
            h.on_answered();
        }
        if let Ok(mut b) = self.breaker.lock() {
            if b.on_probe_answered() {
                tracing::info!(url = %self.url, "worker answers again: breaker closed");
            }
        }
    }

    /// A connect to it failed on the request path: with health checks on, it is down (no requests) until a
    /// check passes (within the recheck period), so requests stop going to a worker that is not there.
    pub fn on_connect_failed(&self, health_checks: bool) {
        if !health_checks {
            return;
        }
        if let Ok(mut h) = self.health.lock() {
            if h.on_unreachable() != Health::Down {
                tracing::warn!(url = %self.url, "worker unreachable: down until a health check passes");
            }
            self.usable.store(false, Ordering::Relaxed);
        }
    }

    /// Whether an active check is due at `now_us` (see [`HealthCheck::due`]; urgent while the breaker is
    /// not closed); if so, marks it started.
    pub fn start_check(&self, now_us: u64, interval_us: u64, recheck_us: u64) -> bool {
        let urgent = self
            .breaker
            .lock()
            .map(|b| !matches!(b.state(), BreakerState::Closed { .. }))
            .unwrap_or(false);
        let Ok(mut h) = self.health.lock() else {
            return false;
        };
        if !h.due(now_us, interval_us, recheck_us, urgent) {
            return false;
        }
        h.start(now_us);
        true
    }

    /// The result of an active check. A worker that passes after being down starts afresh: its breaker
    /// closes (the failures it counted belong to the process or network that went away); one that passes
    /// while up closes a breaker that only reachability failures opened
    /// ([`CircuitBreaker::on_reachable`]). Returns the previous health.
    pub fn on_check(&self, ok: bool) -> Health {
        let old = match self.health.lock() {
            Ok(mut h) => {
                let old = h.finish(ok);
                self.usable.store(h.usable(), Ordering::Relaxed);
                old
            }
            Err(_) => return Health::Unknown,
        };
        if ok {
            if let Ok(mut b) = self.breaker.lock() {
                let closed = if old == Health::Down {
                    let was_closed = matches!(b.state(), BreakerState::Closed { .. });
                    b.on_success();
                    !was_closed
                } else {
                    b.on_reachable()
                };
                if closed {
                    tracing::info!(url = %self.url, "worker reachable again: breaker closed");
                }
            }
        }
        let new = if ok { Health::Up } else { Health::Down };
        if old != new && !(old == Health::Unknown && ok) {
            tracing::info!(url = %self.url, up = ok, "worker health changed");
        }
        old
    }

    /// `healthy`, `unknown` (not checked yet), `unhealthy` (down), `open` / `half_open` (breaker),
    /// `draining`.
    pub fn state(&self, now_us: u64) -> &'static str {
        if self.draining.load(Ordering::Relaxed) {
            return "draining";
        }
        let health = self
            .health
            .lock()
            .map(|h| h.state())
            .unwrap_or(Health::Unknown);
        if health == Health::Down {
            return "unhealthy";
        }
        match self.breaker.lock().map(|b| b.state()) {
            Ok(BreakerState::Closed { .. }) if health == Health::Unknown => "unknown",
            Ok(BreakerState::Closed { .. }) => "healthy",
            Ok(BreakerState::Open { until_us }) if now_us < until_us => "open",
            _ => "half_open",
        }
    }

    /// The worker's telemetry at `now_us` (unknown if the lock is poisoned).
    pub fn telemetry_snapshot(&self, now_us: u64) -> TelemetrySnapshot {
        self.telemetry
            .lock()
            .map_or(TelemetrySnapshot::UNKNOWN, |t| t.snapshot(now_us))
    }

    /// Feeds the worker's telemetry (a no-op if the lock is poisoned).
    pub fn with_telemetry(&self, f: impl FnOnce(&mut WorkerTelemetry)) {
        if let Ok(mut t) = self.telemetry.lock() {
            f(&mut t);
        }
    }

    /// Notes that a `pdx_requests_total` series with `model` and `status` exists for this worker.
    pub fn note_series(&self, model: &crate::metrics::Label, status: u16) {
        if let Ok(mut v) = self.series.lock() {
            if !v.iter().any(|(m, s)| *s == status && m == model) {
                v.push((model.clone(), status));
            }
        }
    }
}

/// In-flight accounting of one request on one worker; undone on drop.
#[derive(Debug)]
pub struct LoadGuard {
    /// The worker.
    pub worker: Arc<Worker>,
    tokens: u64,
    /// Output tokens still expected, taken off the worker's tokens in flight as they stream
    /// ([`LoadGuard::progress`]; 0: not tracked).
    output_left: u64,
}

impl LoadGuard {
    /// Counts a request of `tokens` tokens on `worker`.
    pub fn new(worker: Arc<Worker>, tokens: u64) -> Self {
        worker.in_flight.fetch_add(1, Ordering::Relaxed);
        worker.in_flight_tokens.fetch_add(tokens, Ordering::Relaxed);
        Self {
            worker,
            tokens,
            output_left: 0,
        }
    }

    /// Tracks the request's `output` tokens (part of its `tokens`): each streamed token is taken off the worker's
    /// tokens in flight, so they count what the worker still has to do (the `score` policy balances decode
    /// pools on it).
    pub fn track_output(&mut self, output: u64) {
        self.output_left = output.min(self.tokens);
    }

    /// `tokens` more output tokens were streamed (no-op unless tracked; one relaxed atomic subtraction).
    #[inline]
    pub fn progress(&mut self, tokens: u64) {
        if self.output_left == 0 {
            return;
        }
        let d = tokens.min(self.output_left);
        self.output_left -= d;
        self.tokens -= d;
        self.worker.in_flight_tokens.fetch_sub(d, Ordering::Relaxed);
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.worker.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.worker
            .in_flight_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

/// The one place the router computes how many leading blocks of a prompt a worker holds (`kv_aware`,
/// `score`): the exact index fed by the engines' KV events where it knows the worker exactly, else the
/// pool's approximate index of the router's own decisions (Dynamo's `--no-kv-events` mode)
/// ([`pdx_router_core::kv_index::kv_overlap`]).
pub fn prefix_overlap(
    sel: &Selector,
    exact: Option<&ExactIndex>,
    worker: &Worker,
    hashes: &[u64],
    now_us: u64,
) -> u64 {
    pdx_router_core::kv_index::kv_overlap(
        exact.map(|x| x as &dyn ExactOverlap),
        &sel.index,
        worker.id,
        hashes,
        sel.block_size.max(1),
        now_us,
    ) as u64
}

/// A pool's closed-loop settings.
#[derive(Debug, Clone)]
pub struct PoolTuning {
    /// `kv_aware` weight of overlap.
    pub overlap_weight: f64,
    /// `kv_aware` temperature.
    pub temperature: f64,
    /// `score` weights.
    pub score: pdx_router_core::ScoreWeights,
    /// Admission shaping (`None`: off).
    pub admission: Option<pdx_router_core::AdmissionConfig>,
}

/// A pool: workers of one role plus a local routing policy.
#[derive(Debug)]
pub struct Pool {
    /// Name (also the `pool` label of metric series: cloned per request without allocating).
    pub name: crate::metrics::Label,
    /// Role of its workers.
    pub role: Role,
    /// The policy (also in the selector; here to be read without its lock).
    pub policy: Policy,
    /// Selection state.
    pub selector: Mutex<Selector>,
    /// Admission shaping (`None`: off).
    pub admission: Option<Arc<crate::admission::PoolAdmission>>,
    /// Workers.
    pub workers: ArcSwap<Vec<Arc<Worker>>>,
    /// Bootstrap port of workers registered into this pool without one.
    pub bootstrap_port: u16,
    /// Created by a registration (removed a heartbeat TTL after its last worker).
    pub dynamic: bool,
    /// When it lost its last worker, µs (`u64::MAX`: it has workers).
    empty_since_us: AtomicU64,
    /// Upstream key of workers registered into this pool without one.
    pub api_key: Option<crate::front_auth::ApiKey>,
    /// The exact prefix index fed by the workers' KV events (`kv_aware` reads it where it is exact).
    exact: Option<Arc<RwLock<ExactIndex>>>,
}

impl Pool {
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: &str,
        name: &str,
        role: Role,
        policy: Policy,
        tuning: &PoolTuning,
        block_size: usize,
        seed: u64,
        bootstrap_port: u16,
    ) -> Self {
        let mut s = Selector::new(policy, seed);
        s.overlap_weight = tuning.overlap_weight;
        s.temperature = tuning.temperature;
        s.weights = tuning.score;
        s.block_size = block_size as u64;
        s.kind = match role {
            Role::Prefill => PoolKind::Prefill,
            Role::Decode => PoolKind::Decode,
            Role::Aggregated => PoolKind::Aggregated,
        };
        Self {
            name: name.into(),
            role,
            policy,
            selector: Mutex::new(s),
            admission: tuning
                .admission
                .map(|c| Arc::new(crate::admission::PoolAdmission::new(model, name, c))),
            workers: ArcSwap::from_pointee(Vec::new()),
            bootstrap_port,
            dynamic: false,
            empty_since_us: AtomicU64::new(u64::MAX),
            api_key: None,
            exact: None,
        }
    }

    /// The pool's policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Picks a worker for a prompt of `prompt_tokens` tokens with chained block hashes `block_hashes`
    /// (skipping `exclude` ids), takes its breaker permission.
    pub fn pick(
        &self,
        block_hashes: &[u64],
        prompt_tokens: u64,
        exclude: &[u64],
        now_us: u64,
    ) -> Option<Arc<Worker>> {
        let workers = self.workers.load();
        let telemetry = self.policy.uses_telemetry();
        let i = CANDIDATES.with_borrow_mut(|cands| {
            // The thread's candidate buffer, reused: no allocation per pick.
            cands.clear();
            cands.extend(workers.iter().map(|w| {
                let mut c = Candidate::new(
                    w.id,
                    w.in_flight.load(Ordering::Relaxed),
                    w.in_flight_tokens.load(Ordering::Relaxed),
                    !exclude.contains(&w.id) && w.eligible(now_us),
                );
                if telemetry {
                    c.telemetry = w.telemetry_snapshot(now_us);
                }
                c
            }));
            let mut sel = self.selector.lock().ok()?;
            if self.policy.uses_overlap() && !block_hashes.is_empty() {
                let exact = self.exact.as_ref().and_then(|x| x.read().ok());
                for (c, w) in cands.iter_mut().zip(workers.iter()) {
                    c.overlap_blocks =
                        prefix_overlap(&sel, exact.as_deref(), w, block_hashes, now_us);
                }
            }
            let req = Request {
                block_hashes,
                prompt_tokens,
            };
            sel.choose_request(cands, &req, now_us)
        })?;
        let w = workers[i].clone();
        let ok = w
            .breaker
            .lock()
            .map(|mut b| b.acquire(now_us))
            .unwrap_or(false);
        ok.then_some(w)
    }

    /// Eligible workers not in `exclude`.
    pub fn eligible_count(&self, exclude: &[u64], now_us: u64) -> usize {
        self.workers
            .load()
            .iter()
            .filter(|w| !exclude.contains(&w.id) && w.eligible(now_us))
            .count()
    }
}

thread_local! {
    /// [`Pool::pick`]'s candidates, reused per thread.
    static CANDIDATES: std::cell::RefCell<Vec<Candidate>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A model's pools.
#[derive(Debug)]
pub struct ModelTopo {
    /// Name (`*`: any; also the `model` label of pool choices: cloned per request without allocating).
    pub name: crate::metrics::Label,
    /// Prefill pools (grid order).
    pub prefill: Vec<Arc<Pool>>,
    /// Decode pools (grid order).
    pub decode: Vec<Arc<Pool>>,
    /// Aggregated pools.
    pub aggregated: Vec<Arc<Pool>>,
    /// Dynamo grid.
    pub grid: Option<GlobalRouterConfig>,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Created by a registration (removed with its last pool).
    pub dynamic: bool,
}

impl ModelTopo {
    /// Whether any pool reads prefix overlap (`kv_aware`, `score`: then prompts are tokenized and hashed).
    pub fn needs_hashes(&self) -> bool {
        self.prefill
            .iter()
            .chain(&self.decode)
            .chain(&self.aggregated)
            .any(|p| p.policy.uses_overlap())
    }
}

/// What the request path reads.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Models by name (`*` = fallback for any name).
    pub models: HashMap<String, Arc<ModelTopo>>,
}

impl Snapshot {
    /// The model serving `name` (a missing name: the only model, or `*`).
    pub fn model(&self, name: Option<&str>) -> Option<&Arc<ModelTopo>> {
        match name {
            Some(n) => self.models.get(n).or_else(|| self.models.get("*")),
            None if self.models.len() == 1 => self.models.values().next(),
            None => self.models.get("*"),
        }
    }
}

/// The pool of KsanaLLM prefill nodes (model `*`, `orchestration = "ksana"`).
pub const KSANA_PREFILL_POOL: &str = "ksana-prefill";
/// The pool of KsanaLLM decode nodes.
pub const KSANA_DECODE_POOL: &str = "ksana-decode";

/// A registration (`POST /v1/workers`), the body `pdx mock --register` sends.
pub type Registration = pdx_protocol::Registration;

/// Workers, pools and models.
#[derive(Debug)]
pub struct Registry {
    /// Current snapshot.
    pub snap: ArcSwap<Snapshot>,
    /// The global planner's diversions in force ([`crate::divert`]), read on the request path.
    pub diversions: ArcSwap<crate::divert::Rules>,
    /// Serializes `PUT /v1/planner/diversions` (never taken on the request path).
    pub(crate) diversions_edit: Mutex<()>,
    edit: Mutex<()>,
    epoch: Instant,
    next_id: AtomicU64,
    breaker: BreakerConfig,
    ttl_us: u64,
    default_policy: Policy,
    kv_limits: (u64, u64),
    max_workers: usize,
    allow: Vec<Cidr>,
    /// The exact prefix index of the workers that publish KV events (fed by [`crate::kv_events`]).
    pub exact: Arc<RwLock<ExactIndex>>,
    telemetry: TelemetryConfig,
    tuning: crate::tuning::Tuning,
}

/// What a [`Registry::sweep`] removed.
#[derive(Debug, Default)]
pub struct Swept {
    /// Workers removed (heartbeat expired, or drained and idle).
    pub workers: Vec<Arc<Worker>>,
    /// Pools created by registration that lost their last worker: `(model, role, pool)`.
    pub pools: Vec<(String, Role, String)>,
}

impl Registry {
    /// Builds the static topology of `cfg`.
    ///
    /// Errors: [`RouterError::Config`] for a bad worker URL.
    pub fn new(cfg: &Config) -> Result<Arc<Self>, RouterError> {
        let r = Arc::new(Self {
            snap: ArcSwap::from_pointee(Snapshot::default()),
            diversions: ArcSwap::from_pointee(Vec::new()),
            diversions_edit: Mutex::new(()),
            edit: Mutex::new(()),
            epoch: Instant::now(),
            next_id: AtomicU64::new(1),
            breaker: cfg.breaker,
            ttl_us: cfg.heartbeat_ttl_us,
            default_policy: cfg.default_policy,
            kv_limits: (cfg.max_pending_kv_requests, cfg.max_pending_kv_tokens),
            max_workers: cfg.max_workers,
            allow: cfg.worker_allow.clone(),
            exact: Arc::default(),
            telemetry: cfg.tuning.telemetry,
            tuning: cfg.tuning.clone(),
        });
        let mut models = HashMap::new();
        for m in &cfg.models {
            models.insert(m.name.clone(), Arc::new(r.build_model(m)?));
        }
        r.snap.store(Arc::new(Snapshot { models }));
        Ok(r)
    }

    /// Microseconds since the registry was created (the core's clock).
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    #[allow(clippy::too_many_arguments)]
    fn new_worker(
        &self,
        id: u64,
        url: &str,
        role: Role,
        pool: &str,
        model: &str,
        registered: bool,
        bootstrap_port: u16,
        api_key: Option<&str>,
        kv_events: Option<KvEventsEndpoints>,
    ) -> Result<Arc<Worker>, RouterError> {
        let now = self.now_us();
        let u = parse_worker_url(url)?;
        let upstream_auth = crate::front_auth::bearer(api_key, &format!("worker {url}"))?;
        // A parsed worker URL is printable ASCII, always a valid header value.
        let url_header = hyper::header::HeaderValue::from_str(&u.url)
            .map_err(|_| RouterError::BadWorkerUrl(format!("not a header value: {}", u.url)))?;
        Ok(Arc::new(Worker {
            id,
            url: u.url.into(),
            url_header,
            authority: u.authority,
            role,
            pool: pool.into(),
            model: model.into(),
            bootstrap_port,
            in_flight: AtomicU64::new(0),
            in_flight_tokens: AtomicU64::new(0),
            health: Mutex::new(HealthCheck::new()),
            usable: AtomicBool::new(true),
            kv_pending: AtomicU64::new(0),
            kv_pending_tokens: AtomicU64::new(0),
            kv_limits: if role == Role::Prefill {
                self.kv_limits
            } else {
                (0, 0)
            },
            series: Mutex::new(Vec::new()),
            draining: AtomicBool::new(false),
            registered,
            discovered: AtomicBool::new(false),
            breaker: Mutex::new(CircuitBreaker::new(self.breaker)),
            liveness: Mutex::new(if registered {
                Liveness::registered(now, self.ttl_us)
            } else {
                Liveness::fixed()
            }),
            upstream_auth,
            kv_events,
            telemetry: Mutex::new(WorkerTelemetry::new(self.telemetry)),
            scraping: AtomicBool::new(false),
        }))
    }

    fn build_model(&self, m: &ModelSpec) -> Result<ModelTopo, RouterError> {
        let mut t = ModelTopo {
            name: m.name.as_str().into(),
            prefill: vec![],
            decode: vec![],
            aggregated: vec![],
            grid: m.grid.clone(),
            block_size: m.block_size,
            dynamic: false,
        };
        for (i, p) in m.pools.iter().enumerate() {
            let pool = self.build_pool(p, &m.name, m.block_size, i as u64)?;
            match p.role {
                Role::Prefill => t.prefill.push(pool),
                Role::Decode => t.decode.push(pool),
                Role::Aggregated => t.aggregated.push(pool),
            }
        }
        Ok(t)
    }

    fn build_pool(
        &self,
        p: &PoolSpec,
        model: &str,
        block_size: usize,
        seed: u64,
    ) -> Result<Arc<Pool>, RouterError> {
        let tuning = PoolTuning {
            overlap_weight: p.overlap_weight,
            temperature: p.temperature,
            score: p.score,
            admission: p.admission,
        };
        let mut pool = Pool::new(
            model,
            &p.name,
            p.role,
            p.policy,
            &tuning,
            block_size,
            0x9e37 + seed,
            p.bootstrap_port,
        );
        if let Some(k) = &p.api_key {
            crate::front_auth::check_key(k.expose(), &format!("pool {}", p.name))?;
        }
        pool.api_key = p.api_key.clone();
        pool.exact = Some(self.exact.clone());
        let ws = p
            .workers
            .iter()
            .map(|w| {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                self.new_worker(
                    id,
                    &w.url,
                    p.role,
                    &p.name,
                    model,
                    false,
                    w.bootstrap_port,
                    w.api_key.as_ref().map(crate::front_auth::ApiKey::expose),
                    w.kv_events.clone(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        pool.workers.store(Arc::new(ws));
        Ok(Arc::new(pool))
    }

    /// Every worker of every pool.
    pub fn workers(&self) -> Vec<Arc<Worker>> {
        let s = self.snap.load();
        let mut out = Vec::new();
        for m in s.models.values() {
            for p in m.prefill.iter().chain(&m.decode).chain(&m.aggregated) {
                out.extend(p.workers.load().iter().cloned());
            }
        }
        out
    }

    /// Registers a worker or renews its heartbeat. Returns `(worker id, created)`.
    ///
    /// Errors: [`RouterError::Config`] for a bad role or URL.
    pub fn register(&self, reg: &Registration) -> Result<(u64, bool), RouterError> {
        self.register_with_bootstrap_port(reg, None)
    }

    /// [`Registry::register`] with the worker's SGLang bootstrap port (`None`: its pool's, else
    /// [`DEFAULT_BOOTSTRAP_PORT`]). A heartbeat keeps the port the worker was created with.
    ///
    /// Errors: [`RouterError::Config`] for a bad role or field, or port 0; [`RouterError::BadWorkerUrl`];
    /// [`RouterError::WorkerNotAllowed`] for an address outside the allow-list (or a host name while one
    /// is set: a name could resolve anywhere later); [`RouterError::RegistryFull`] for a new worker when
    /// `max_workers` are registered.
    pub fn register_with_bootstrap_port(
        &self,
        reg: &Registration,
        bootstrap_port: Option<u16>,
    ) -> Result<(u64, bool), RouterError> {
        self.register_from(reg, bootstrap_port, false)
    }

    /// A worker a discovery source holds (`pdx serve --discovery`): added as [`Registry::register`] adds
    /// one (same checks, same `--max-workers` bound), but with no heartbeat TTL: it stays until
    /// [`Registry::retire`]. A worker the registration API added becomes the source's (its TTL ends: the
    /// source's lease now decides); one draining is taken back (the source holds it again); a static worker
    /// (flags, file) stays static.
    ///
    /// Errors: as [`Registry::register_with_bootstrap_port`].
    pub fn upsert_discovered(
        &self,
        reg: &Registration,
        bootstrap_port: Option<u16>,
    ) -> Result<(u64, bool), RouterError> {
        self.register_from(reg, bootstrap_port, true)
    }

    /// The discovery source dropped this worker (model, role, pool, URL): it drains (no new requests at
    /// once; removed when idle). Static workers are never retired. Returns whether a worker was found.
    pub fn retire(&self, model: &str, role: Role, pool: &str, url: &str) -> bool {
        let snap = self.snap.load();
        let Some(m) = snap.models.get(model) else {
            return false;
        };
        let mut found = false;
        for p in m.prefill.iter().chain(&m.decode).chain(&m.aggregated) {
            if p.name != pool || p.role != role {
                continue;
            }
            for w in p.workers.load().iter().filter(|w| w.url == url) {
                if w.discovered.load(Ordering::Relaxed) {
                    w.draining.store(true, Ordering::Relaxed);
                    tracing::info!(
                        url,
                        pool,
                        model,
                        "worker left its discovery source: draining"
                    );
                    found = true;
                }
            }
        }
        found
    }

    fn register_from(
        &self,
        reg: &Registration,
        bootstrap_port: Option<u16>,
        discovered: bool,
    ) -> Result<(u64, bool), RouterError> {
        if bootstrap_port == Some(0) {
            return Err(RouterError::Config("bootstrap_port must be 1-65535".into()));
        }
        let role = reg.validate().map_err(|e| RouterError::Config(e.message))?;
        let checked = parse_worker_url(&reg.url)?;
        if !self.allow.is_empty() {
            let ok = checked
                .ip
                .is_some_and(|ip| self.allow.iter().any(|c| c.contains(ip)));
            if !ok {
                return Err(RouterError::WorkerNotAllowed(format!(
                    "worker URL {} is not an address inside --worker-allow-cidr",
                    checked.url
                )));
            }
        }
        let kv_events = KvEventsEndpoints::from_fields(
            reg.kv_events_endpoint.as_deref(),
            reg.kv_events_replay_endpoint.as_deref(),
        )?;
        if let Some(k) = &kv_events {
            // The router connects to these too: the same rule as for the URL.
            let named = k.replay.iter().count() + 1;
            let inside = k
                .ips
                .iter()
                .filter(|ip| self.allow.iter().any(|c| c.contains(**ip)))
                .count();
            if !self.allow.is_empty() && inside < named {
                return Err(RouterError::WorkerNotAllowed(format!(
                    "KV event endpoints of {} are not addresses inside --worker-allow-cidr",
                    checked.url
                )));
            }
        }
        let url = checked.url.as_str();
        let _g = self
            .edit
            .lock()
            .map_err(|_| RouterError::Config("registry lock poisoned".into()))?;
        let now = self.now_us();
        let snap = self.snap.load_full();
        // Heartbeat of a known worker.
        if let Some(m) = snap.models.get(&reg.model) {
            for p in m.prefill.iter().chain(&m.decode).chain(&m.aggregated) {
                if p.name == reg.pool && p.role == role {
                    if let Some(w) = p.workers.load().iter().find(|w| w.url == url) {
                        if let Ok(mut l) = w.liveness.lock() {
                            if discovered && (w.registered || w.discovered.load(Ordering::Relaxed))
                            {
                                *l = Liveness::fixed();
                                w.discovered.store(true, Ordering::Relaxed);
                                w.draining.store(false, Ordering::Relaxed);
                            } else {
                                l.beat(now);
                            }
                        }
                        return Ok((w.id, false));
                    }
                }
            }
        }
        let registered = snap
            .models
            .values()
            .flat_map(|m| m.prefill.iter().chain(&m.decode).chain(&m.aggregated))
            .map(|p| {
                p.workers
                    .load()
                    .iter()
                    .filter(|w| w.registered || w.discovered.load(Ordering::Relaxed))
                    .count()
            })
            .sum::<usize>();
        if registered >= self.max_workers {
            return Err(RouterError::RegistryFull {
                max: self.max_workers,
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut models = snap.models.clone();
        let old = models.get(&reg.model).cloned();
        let mut topo = match &old {
            Some(m) => ModelTopo {
                name: m.name.clone(),
                prefill: m.prefill.clone(),
                decode: m.decode.clone(),
                aggregated: m.aggregated.clone(),
                grid: m.grid.clone(),
                block_size: m.block_size,
                dynamic: m.dynamic,
            },
            None => ModelTopo {
                name: reg.model.as_str().into(),
                prefill: vec![],
                decode: vec![],
                aggregated: vec![],
                grid: None,
                block_size: 16,
                dynamic: true,
            },
        };
        let list = match role {
            Role::Prefill => &mut topo.prefill,
            Role::Decode => &mut topo.decode,
            Role::Aggregated => &mut topo.aggregated,
        };
        let pool = match list.iter().find(|p| p.name == reg.pool) {
            Some(p) => p.clone(),
            None => {
                // A pool created by registration takes the top-level settings.
                let tuning = PoolTuning {
                    overlap_weight: 1.0,
                    temperature: self.tuning.temperature,
                    score: self.tuning.role_score(role),
                    admission: self
                        .tuning
                        .pool_admission(&reg.pool, role, None)
                        .ok()
                        .flatten(),
                };
                let mut p = Pool::new(
                    &reg.model,
                    &reg.pool,
                    role,
                    self.default_policy,
                    &tuning,
                    topo.block_size,
                    id,
                    DEFAULT_BOOTSTRAP_PORT,
                );
                p.dynamic = true;
                p.exact = Some(self.exact.clone());
                let p = Arc::new(p);
                list.push(p.clone());
                p
            }
        };
        let port = bootstrap_port.unwrap_or(pool.bootstrap_port);
        let key = reg
            .api_key
            .as_deref()
            .or(pool.api_key.as_ref().map(crate::front_auth::ApiKey::expose));
        let worker = self.new_worker(
            id,
            url,
            role,
            &reg.pool,
            &reg.model,
            !discovered,
            port,
            key,
            kv_events,
        )?;
        worker.discovered.store(discovered, Ordering::Relaxed);
        let mut ws: Vec<Arc<Worker>> = pool.workers.load().as_ref().clone();
        ws.push(worker);
        pool.workers.store(Arc::new(ws));
        pool.empty_since_us.store(u64::MAX, Ordering::Relaxed);
        models.insert(reg.model.clone(), Arc::new(topo));
        self.snap.store(Arc::new(Snapshot { models }));
        tracing::info!(
            url,
            role = reg.role,
            pool = reg.pool,
            model = reg.model,
            discovered,
            "worker registered"
        );
        Ok((id, true))
    }

    /// Makes the workers of the KsanaLLM pools (model `*`: [`KSANA_PREFILL_POOL`], [`KSANA_DECODE_POOL`]) exactly
    /// the `prefill` and `decode` URLs, creating the model and its pools (with `policy`) the first time. Workers
    /// already there stay as they are (load, breaker, health, KV index); they are not `registered` (the node
    /// registry's heartbeats, not this registry's TTL, decide who is there). Returns the workers removed (their
    /// metric series are the caller's to delete). A URL that is not a valid worker URL is skipped and logged.
    pub fn set_ksana_workers(
        &self,
        policy: Policy,
        prefill: &[String],
        decode: &[String],
    ) -> Vec<Arc<Worker>> {
        let Ok(_g) = self.edit.lock() else {
            return Vec::new();
        };
        let snap = self.snap.load_full();
        let old = snap.models.get("*").cloned();
        let find = |list: Option<&Vec<Arc<Pool>>>, name: &str| {
            list.and_then(|l| l.iter().find(|p| p.name == name).cloned())
        };
        let existing = (
            find(old.as_ref().map(|m| &m.prefill), KSANA_PREFILL_POOL),
            find(old.as_ref().map(|m| &m.decode), KSANA_DECODE_POOL),
        );
        let mut removed = Vec::new();
        let mut pools = Vec::new();
        for (have, name, role, urls, seed) in [
            (
                existing.0.clone(),
                KSANA_PREFILL_POOL,
                Role::Prefill,
                prefill,
                1u64,
            ),
            (
                existing.1.clone(),
                KSANA_DECODE_POOL,
                Role::Decode,
                decode,
                2u64,
            ),
        ] {
            let pool = have.unwrap_or_else(|| {
                // KsanaLLM pools take the top-level closed-loop settings; no admission shaping (both
                // nodes of a pair start at once).
                let tuning = PoolTuning {
                    overlap_weight: 1.0,
                    temperature: self.tuning.temperature,
                    score: self.tuning.role_score(role),
                    admission: None,
                };
                Arc::new(Pool::new(
                    "*",
                    name,
                    role,
                    policy,
                    &tuning,
                    16,
                    0x6b53 + seed,
                    DEFAULT_BOOTSTRAP_PORT,
                ))
            });
            let mut wanted: Vec<String> = Vec::new();
            for u in urls {
                match parse_worker_url(u) {
                    Ok(w) if !wanted.contains(&w.url) => wanted.push(w.url),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(url = %u, error = %e, "ksana node address is not a worker URL: not routed")
                    }
                }
            }
            let ws = pool.workers.load_full();
            let mut next: Vec<Arc<Worker>> = Vec::new();
            for w in ws.iter() {
                if wanted.iter().any(|u| *u == w.url) {
                    next.push(w.clone());
                } else {
                    if let Ok(mut s) = pool.selector.lock() {
                        s.index.remove_worker(w.id);
                    }
                    tracing::info!(url = %w.url, pool = name, "ksana node left the ready pairs");
                    removed.push(w.clone());
                }
            }
            for u in &wanted {
                if next.iter().any(|w| &w.url == u) {
                    continue;
                }
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                match self.new_worker(
                    id,
                    u,
                    role,
                    name,
                    "*",
                    false,
                    DEFAULT_BOOTSTRAP_PORT,
                    None,
                    None,
                ) {
                    Ok(w) => {
                        tracing::info!(url = %u, pool = name, "ksana node joined the ready pairs");
                        next.push(w);
                    }
                    Err(e) => tracing::warn!(url = %u, error = %e, "ksana node not routed"),
                }
            }
            if next.len() != ws.len() || next.iter().zip(ws.iter()).any(|(a, b)| a.id != b.id) {
                pool.workers.store(Arc::new(next));
            }
            pools.push(pool);
        }
        if existing.0.is_none() || existing.1.is_none() {
            let mut models = snap.models.clone();
            let m = old.as_deref();
            let with = |list: Option<&Vec<Arc<Pool>>>, pool: &Arc<Pool>| -> Vec<Arc<Pool>> {
                let mut v: Vec<Arc<Pool>> = list
                    .map(|l| l.iter().filter(|p| p.name != pool.name).cloned().collect())
                    .unwrap_or_default();
                v.insert(0, pool.clone());
                v
            };
            models.insert(
                "*".into(),
                Arc::new(ModelTopo {
                    name: "*".into(),
                    prefill: with(m.map(|m| &m.prefill), &pools[0]),
                    decode: with(m.map(|m| &m.decode), &pools[1]),
                    aggregated: m.map(|m| m.aggregated.clone()).unwrap_or_default(),
                    grid: None,
                    block_size: m.map_or(16, |m| m.block_size),
                    dynamic: false,
                }),
            );
            self.snap.store(Arc::new(Snapshot { models }));
        }
        removed
    }

    /// Starts draining every worker with this URL; returns how many.
    pub fn drain(&self, url: &str) -> usize {
        let url = url.trim_end_matches('/');
        let mut n = 0;
        for w in self.workers() {
            if w.url == url {
                w.draining.store(true, Ordering::Relaxed);
                n += 1;
            }
        }
        n
    }

    /// Registered workers (heartbeat TTL applies).
    pub fn registered_count(&self) -> usize {
        self.workers().iter().filter(|w| w.registered).count()
    }

    /// Removes workers whose heartbeat expired and drained workers with nothing in flight, and then pools
    /// and models created by registration that have had no worker for a heartbeat TTL (until then requests
    /// for the model get 503, as while its workers restart, not 404). Returns what it removed (its metric
    /// series are the caller's to delete).
    pub fn sweep(&self) -> Swept {
        let now = self.now_us();
        let Ok(_g) = self.edit.lock() else {
            return Swept::default();
        };
        let snap = self.snap.load_full();
        let mut out = Swept::default();
        let mut expired = false;
        for m in snap.models.values() {
            for p in m.prefill.iter().chain(&m.decode).chain(&m.aggregated) {
                let ws = p.workers.load();
                let dead = |w: &Arc<Worker>| {
                    w.liveness.lock().map(|l| l.expired(now)).unwrap_or(false)
                        || (w.draining.load(Ordering::Relaxed)
                            && w.in_flight.load(Ordering::Relaxed) == 0)
                };
                if ws.iter().any(dead) {
                    let keep: Vec<Arc<Worker>> = ws.iter().filter(|w| !dead(w)).cloned().collect();
                    for w in ws.iter().filter(|w| dead(w)) {
                        out.workers.push(w.clone());
                        if let Ok(mut s) = p.selector.lock() {
                            s.index.remove_worker(w.id);
                        }
                        tracing::info!(url = %w.url, pool = %p.name, "worker removed");
                    }
                    p.workers.store(Arc::new(keep));
                }
                if p.dynamic && p.workers.load().is_empty() {
                    let since = match p.empty_since_us.load(Ordering::Relaxed) {
                        u64::MAX => {
                            p.empty_since_us.store(now, Ordering::Relaxed);
                            now
                        }
                        t => t,
                    };
                    expired |= now.saturating_sub(since) > self.ttl_us;
                }
            }
        }
        if expired {
            // Pools (and models) that registration created and that lost their last worker go too: a
            // registration per pool name must not grow the router without bound.
            let mut models = HashMap::new();
            for (name, m) in &snap.models {
                let mut keep = |pools: &[Arc<Pool>]| -> Vec<Arc<Pool>> {
                    pools
                        .iter()
                        .filter(|p| {
                            let since = p.empty_since_us.load(Ordering::Relaxed);
                            let gone = p.dynamic
                                && p.workers.load().is_empty()
                                && since != u64::MAX
                                && now.saturating_sub(since) > self.ttl_us;
                            if gone {
                                out.pools.push((name.clone(), p.role, p.name.to_string()));
                            }
                            !gone
                        })
                        .cloned()
                        .collect()
                };
                let topo = ModelTopo {
                    name: m.name.clone(),
                    prefill: keep(&m.prefill),
                    decode: keep(&m.decode),
                    aggregated: keep(&m.aggregated),
                    grid: m.grid.clone(),
                    block_size: m.block_size,
                    dynamic: m.dynamic,
                };
                let empty =
                    topo.prefill.is_empty() && topo.decode.is_empty() && topo.aggregated.is_empty();
                if !(topo.dynamic && empty) {
                    models.insert(name.clone(), Arc::new(topo));
                }
            }
            self.snap.store(Arc::new(Snapshot { models }));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn registry(flags: &[&str]) -> Arc<Registry> {
        let args = crate::ServeArgs::try_parse_from(
            std::iter::once("pdx-serve").chain(flags.iter().copied()),
        )
        .expect("flags");
        Registry::new(&Config::from_args(&args).expect("config")).expect("registry")
    }

    #[test]
    fn a_prefill_worker_at_its_pending_kv_limit_takes_no_prefill() {
        let r = registry(&[
            "--prefill",
            "http://127.0.0.1:1",
            "--decode",
            "http://127.0.0.1:2",
            "--max-pending-kv-requests",
            "2",
            "--max-pending-kv-tokens",
            "1000",
        ]);
        let ws = r.workers();
        let p = ws.iter().find(|w| w.role == Role::Prefill).unwrap();
        let d = ws.iter().find(|w| w.role == Role::Decode).unwrap();
        assert!(p.eligible(0));
        p.kv_pending.store(2, Ordering::Relaxed);
        assert!(!p.eligible(0), "at the request limit");
        p.kv_pending.store(1, Ordering::Relaxed);
        assert!(p.eligible(0));
        p.kv_pending_tokens.store(1000, Ordering::Relaxed);
        assert!(!p.eligible(0), "at the token limit");
        d.kv_pending.store(100, Ordering::Relaxed);
        assert!(d.eligible(0), "limits apply to prefill workers only");
    }

    #[test]
    fn health_checks_and_connect_failures_decide_usability() {
        let r = registry(&["--decode", "http://127.0.0.1:2"]);
        let w = r.workers()[0].clone();
        assert_eq!(w.state(0), "unknown");
        assert!(w.eligible(0), "unknown workers take requests");
        w.on_connect_failed(true);
        assert!(!w.eligible(0));
        assert_eq!(w.state(0), "unhealthy");
        // Reachability failures open the breaker too; the passing check that brings the worker back
        // closes it.
        for t in 0..5 {
            w.report_failure(UpstreamFailure::Connect, t);
        }
        assert!(w.start_check(10, 5_000_000, 500_000));
        assert_eq!(w.on_check(true), Health::Down);
        assert!(w.eligible(11), "back within one check, breaker closed");
        assert_eq!(w.state(11), "healthy");
        // Without health checks a failed connect does not take the worker out (nothing would bring it back).
        w.on_connect_failed(false);
        assert!(w.eligible(12));
    }
}
