//! Workers, pools and models; the snapshot the request path reads.
//!
//! The request path loads one [`Snapshot`] (an `arc-swap` load: no lock) and reads the pools'
//! worker lists (also `ArcSwap`). Per-worker load is a pair of atomics. Changes
//! (registration, drain, heartbeat expiry) take the registry's edit lock, build new lists
//! and swap them in; pools (and their selection state, e.g. the KV index) survive changes.

use crate::config::{authority_of, Config, ModelSpec, PoolSpec, DEFAULT_BOOTSTRAP_PORT};
use crate::RouterError;
use arc_swap::ArcSwap;
use pdx_protocol::Role;
use pdx_router_core::{
    BreakerConfig, BreakerState, Candidate, CircuitBreaker, GlobalRouterConfig, Liveness, Policy,
    Selector,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One upstream engine.
#[derive(Debug)]
pub struct Worker {
    /// Stable id (KV index key).
    pub id: u64,
    /// Base URL, `http://host:port`.
    pub url: String,
    /// `host:port`.
    pub authority: String,
    /// Role.
    pub role: Role,
    /// Pool name.
    pub pool: String,
    /// Model name.
    pub model: String,
    /// SGLang bootstrap server port (`bootstrap_port` of the `sglang-bootstrap` orchestration when this is
    /// the prefill worker; the server's `--disaggregation-bootstrap-port`).
    pub bootstrap_port: u16,
    /// Requests in flight through this router.
    pub in_flight: AtomicU64,
    /// Tokens in flight (prompt estimate + output limit).
    pub in_flight_tokens: AtomicU64,
    /// Last active health check passed (true until one fails).
    pub healthy: AtomicBool,
    /// `DELETE` received: no new requests; removed once idle.
    pub draining: AtomicBool,
    /// Came from the registration API (heartbeat TTL applies).
    pub registered: bool,
    /// Circuit breaker.
    pub breaker: Mutex<CircuitBreaker>,
    /// Heartbeat state.
    pub liveness: Mutex<Liveness>,
    /// `Bearer KEY` sent upstream instead of the client's `Authorization` (the worker's `--api-key`; see
    /// [`crate::front_auth`]).
    pub upstream_auth: Option<hyper::header::HeaderValue>,
}

impl Worker {
    /// Whether new requests may go to it at `now_us`.
    pub fn eligible(&self, now_us: u64) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
            && self
                .breaker
                .lock()
                .map(|b| b.can_send(now_us))
                .unwrap_or(false)
    }

    /// Records the outcome of a request for the breaker.
    pub fn report(&self, ok: bool, now_us: u64) {
        if let Ok(mut b) = self.breaker.lock() {
            if ok {
                b.on_success()
            } else {
                b.on_failure(now_us)
            }
        }
    }

    /// `healthy`, `unhealthy`, `open` (breaker), `draining`.
    pub fn state(&self, now_us: u64) -> &'static str {
        if self.draining.load(Ordering::Relaxed) {
            "draining"
        } else if !self.healthy.load(Ordering::Relaxed) {
            "unhealthy"
        } else {
            match self.breaker.lock().map(|b| b.state()) {
                Ok(BreakerState::Closed { .. }) => "healthy",
                Ok(BreakerState::Open { until_us }) if now_us < until_us => "open",
                _ => "half_open",
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
}

impl LoadGuard {
    /// Counts a request of `tokens` tokens on `worker`.
    pub fn new(worker: Arc<Worker>, tokens: u64) -> Self {
        worker.in_flight.fetch_add(1, Ordering::Relaxed);
        worker.in_flight_tokens.fetch_add(tokens, Ordering::Relaxed);
        Self { worker, tokens }
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

/// A pool: workers of one role plus a local routing policy.
#[derive(Debug)]
pub struct Pool {
    /// Name.
    pub name: String,
    /// Role of its workers.
    pub role: Role,
    /// Selection state.
    pub selector: Mutex<Selector>,
    /// Workers.
    pub workers: ArcSwap<Vec<Arc<Worker>>>,
    /// Bootstrap port of workers registered into this pool without one.
    pub bootstrap_port: u16,
    /// Upstream key of workers registered into this pool without one.
    pub api_key: Option<crate::front_auth::ApiKey>,
}

impl Pool {
    fn new(
        name: &str,
        role: Role,
        policy: Policy,
        overlap_weight: f64,
        block_size: usize,
        seed: u64,
        bootstrap_port: u16,
    ) -> Self {
        let mut s = Selector::new(policy, seed);
        s.overlap_weight = overlap_weight;
        s.block_size = block_size as u64;
        Self {
            name: name.into(),
            role,
            selector: Mutex::new(s),
            workers: ArcSwap::from_pointee(Vec::new()),
            bootstrap_port,
            api_key: None,
        }
    }

    /// The pool's policy.
    pub fn policy(&self) -> Policy {
        self.selector
            .lock()
            .map(|s| s.policy)
            .unwrap_or(Policy::RoundRobin)
    }

    /// Picks a worker (skipping `exclude` ids), takes its breaker permission.
    pub fn pick(&self, block_hashes: &[u64], exclude: &[u64], now_us: u64) -> Option<Arc<Worker>> {
        let workers = self.workers.load();
        let cands: Vec<Candidate> = workers
            .iter()
            .map(|w| Candidate {
                id: w.id,
                in_flight_requests: w.in_flight.load(Ordering::Relaxed),
                in_flight_tokens: w.in_flight_tokens.load(Ordering::Relaxed),
                eligible: !exclude.contains(&w.id) && w.eligible(now_us),
            })
            .collect();
        let i = self
            .selector
            .lock()
            .ok()?
            .choose(&cands, block_hashes, now_us)?;
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

/// A model's pools.
#[derive(Debug)]
pub struct ModelTopo {
    /// Name (`*`: any).
    pub name: String,
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
}

impl ModelTopo {
    /// Whether any pool uses `kv_aware` (then prompts are tokenized and hashed).
    pub fn needs_hashes(&self) -> bool {
        self.prefill
            .iter()
            .chain(&self.decode)
            .chain(&self.aggregated)
            .any(|p| p.policy() == Policy::KvAware)
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

/// A registration (`POST /v1/workers`), the body `pdx mock --register` sends.
pub type Registration = pdx_protocol::Registration;

/// Workers, pools and models.
#[derive(Debug)]
pub struct Registry {
    /// Current snapshot.
    pub snap: ArcSwap<Snapshot>,
    edit: Mutex<()>,
    epoch: Instant,
    next_id: AtomicU64,
    breaker: BreakerConfig,
    ttl_us: u64,
    default_policy: Policy,
}

impl Registry {
    /// Builds the static topology of `cfg`.
    ///
    /// Errors: [`RouterError::Config`] for a bad worker URL.
    pub fn new(cfg: &Config) -> Result<Arc<Self>, RouterError> {
        let r = Arc::new(Self {
            snap: ArcSwap::from_pointee(Snapshot::default()),
            edit: Mutex::new(()),
            epoch: Instant::now(),
            next_id: AtomicU64::new(1),
            breaker: cfg.breaker,
            ttl_us: cfg.heartbeat_ttl_us,
            default_policy: cfg.default_policy,
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
    ) -> Result<Arc<Worker>, RouterError> {
        let now = self.now_us();
        let upstream_auth = crate::front_auth::bearer(api_key, &format!("worker {url}"))?;
        Ok(Arc::new(Worker {
            id,
            url: url.trim_end_matches('/').to_string(),
            authority: authority_of(url)?,
            role,
            pool: pool.into(),
            model: model.into(),
            bootstrap_port,
            in_flight: AtomicU64::new(0),
            in_flight_tokens: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            registered,
            breaker: Mutex::new(CircuitBreaker::new(self.breaker)),
            liveness: Mutex::new(if registered {
                Liveness::registered(now, self.ttl_us)
            } else {
                Liveness::fixed()
            }),
            upstream_auth,
        }))
    }

    fn build_model(&self, m: &ModelSpec) -> Result<ModelTopo, RouterError> {
        let mut t = ModelTopo {
            name: m.name.clone(),
            prefill: vec![],
            decode: vec![],
            aggregated: vec![],
            grid: m.grid.clone(),
            block_size: m.block_size,
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
        let mut pool = Pool::new(
            &p.name,
            p.role,
            p.policy,
            p.overlap_weight,
            block_size,
            0x9e37 + seed,
            p.bootstrap_port,
        );
        if let Some(k) = &p.api_key {
            crate::front_auth::check_key(k.expose(), &format!("pool {}", p.name))?;
        }
        pool.api_key = p.api_key.clone();
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
    /// Errors: [`RouterError::Config`] for a bad role or URL, or port 0.
    pub fn register_with_bootstrap_port(
        &self,
        reg: &Registration,
        bootstrap_port: Option<u16>,
    ) -> Result<(u64, bool), RouterError> {
        if bootstrap_port == Some(0) {
            return Err(RouterError::Config("bootstrap_port must be 1-65535".into()));
        }
        let role = match reg.role.as_str() {
            "prefill" => Role::Prefill,
            "decode" => Role::Decode,
            "aggregated" => Role::Aggregated,
            o => return Err(RouterError::Config(format!("unknown role `{o}`"))),
        };
        authority_of(&reg.url)?;
        let url = reg.url.trim_end_matches('/');
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
                            l.beat(now);
                        }
                        return Ok((w.id, false));
                    }
                }
            }
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
            },
            None => ModelTopo {
                name: reg.model.clone(),
                prefill: vec![],
                decode: vec![],
                aggregated: vec![],
                grid: None,
                block_size: 16,
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
                let p = Arc::new(Pool::new(
                    &reg.pool,
                    role,
                    self.default_policy,
                    1.0,
                    topo.block_size,
                    id,
                    DEFAULT_BOOTSTRAP_PORT,
                ));
                list.push(p.clone());
                p
            }
        };
        let port = bootstrap_port.unwrap_or(pool.bootstrap_port);
        let key = reg
            .api_key
            .as_deref()
            .or(pool.api_key.as_ref().map(crate::front_auth::ApiKey::expose));
        let worker = self.new_worker(id, url, role, &reg.pool, &reg.model, true, port, key)?;
        let mut ws: Vec<Arc<Worker>> = pool.workers.load().as_ref().clone();
        ws.push(worker);
        pool.workers.store(Arc::new(ws));
        models.insert(reg.model.clone(), Arc::new(topo));
        self.snap.store(Arc::new(Snapshot { models }));
        tracing::info!(
            url,
            role = reg.role,
            pool = reg.pool,
            model = reg.model,
            "worker registered"
        );
        Ok((id, true))
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

    /// Removes workers whose heartbeat expired and drained workers with nothing in flight.
    /// Returns the URLs removed.
    pub fn sweep(&self) -> Vec<String> {
        let now = self.now_us();
        let Ok(_g) = self.edit.lock() else {
            return vec![];
        };
        let snap = self.snap.load();
        let mut removed = Vec::new();
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
                        removed.push(w.url.clone());
                        if let Ok(mut s) = p.selector.lock() {
                            s.index.remove_worker(w.id);
                        }
                        tracing::info!(url = %w.url, pool = %p.name, "worker removed");
                    }
                    p.workers.store(Arc::new(keep));
                }
            }
        }
        removed
    }
}
