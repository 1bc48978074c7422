//! The KsanaLLM node registry inside `pdx serve --orchestration ksana`: the node API
//! (`POST /RegisterNode`, `/Heartbeat`, `/RegisterCommId`, answered by [`pdx_ksana`] as KsanaLLM's own
//! `simple_router` answers), its database on a thread of its own, and what the request path reads: the
//! ready prefill/decode pairs as workers of two pools of model `*` (so the local policies, health checks,
//! breakers and load accounting apply to them as to any worker) and the pair list
//! ([`orchestrate::ksana`](crate::orchestrate::ksana) picks from it).
//!
//! The database is blocking I/O (SQLite file, MySQL connection), so one `pdx-ksana-store` thread owns it;
//! a node API request waits for its answer without blocking its server thread: it checks the answer's slot
//! with a short, growing sleep ([`REPLY_POLL_MAX`]), as a monoio task cannot be woken from another thread
//! (monoio's `sync` feature would put a cross-thread queue on every runtime for this low-rate API). Requests
//! wait in a bounded queue (a full one is a 503). The router's control loop sends an expiry tick about
//! every [`tick_interval`]: nodes silent for the heartbeat timeout go offline and their pairs leave the
//! request path, whether or not any other node still heartbeats.

use crate::api::full;
use crate::body::RouterBody;
use crate::registry::Registry;
use crate::RouterError;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::CONTENT_TYPE;
use hyper::{Request, Response};
use pdx_ksana::{Database, ReadyPair, Reply, Route, Service, Settings, Ts};
use pdx_router_core::Policy;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest node API body, bytes (a registration is well under 1 KiB per device).
pub const MAX_NODE_BODY: usize = 1 << 20;
/// Node API requests waiting for the store thread at most (then 503).
pub const QUEUE: usize = 256;
/// Longest sleep between two looks at a node API request's answer (the first is 100 µs, doubling).
pub const REPLY_POLL_MAX: Duration = Duration::from_millis(2);
/// Longest wait for the store thread's answer (a database that hangs): then 503.
pub const REPLY_WAIT: Duration = Duration::from_secs(30);

/// Where the store thread leaves a node API request's answer.
type Slot = Arc<Mutex<Option<Reply>>>;

/// The registry's configuration (`--ksana-*` flags, the file's `[ksana]` table).
#[derive(Clone)]
pub struct KsanaConfig {
    /// Its database.
    pub db: Database,
    /// Cluster, heartbeat timeout, node bound.
    pub settings: Settings,
    /// Create missing tables at start.
    pub create_schema: bool,
    /// Local policy of the prefill and decode pools.
    pub policy: Policy,
    /// Networks a node's `inference_addr` must be in to take requests (`--worker-allow-cidr`; empty: any).
    pub allow: Vec<crate::config::Cidr>,
}

impl std::fmt::Debug for KsanaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A MySQL URL carries a password.
        let db = match &self.db {
            Database::Sqlite(p) => format!("sqlite {}", p.display()),
            Database::Mysql(_) => "mysql (URL not shown)".into(),
        };
        f.debug_struct("KsanaConfig")
            .field("db", &db)
            .field("settings", &self.settings)
            .field("create_schema", &self.create_schema)
            .field("policy", &self.policy)
            .field("allow", &self.allow)
            .finish()
    }
}

/// The pairs requests may go to, keyed by worker authority (`host:port`).
#[derive(Debug, Default)]
pub struct Pairs {
    /// Decode authorities of each prefill authority.
    pub decodes: HashMap<String, HashSet<String>>,
    /// The node's `inference_addr` as registered, by authority (the `kv-comm-group-key` names these).
    pub addr: HashMap<String, String>,
}

impl Pairs {
    /// Whether `prefill` and `decode` (authorities) are a ready pair.
    pub fn paired(&self, prefill: &str, decode: &str) -> bool {
        self.decodes
            .get(prefill)
            .is_some_and(|d| d.contains(decode))
    }

    /// `kv-comm-group-key` of a pair: the registered addresses, `<prefill>__<decode>`.
    pub fn group_key(&self, prefill: &str, decode: &str) -> String {
        let a = |x: &str| self.addr.get(x).map_or(x, String::as_str).to_string();
        format!("{}__{}", a(prefill), a(decode))
    }
}

enum Msg {
    Api {
        route: Route,
        content_type: Option<Vec<u8>>,
        body: Bytes,
        reply: Slot,
    },
    Tick,
}

/// The registry of a running router.
#[derive(Debug)]
pub struct Ksana {
    tx: SyncSender<Msg>,
    /// The ready pairs, swapped after every change.
    pub pairs: ArcSwap<Pairs>,
    tick_queued: AtomicBool,
    /// The configuration.
    pub cfg: KsanaConfig,
}

/// How often the control loop sends an expiry tick: a tenth of the heartbeat timeout, between 100 ms and 1 s.
pub fn tick_interval(cfg: &KsanaConfig) -> Duration {
    Duration::from_micros((cfg.settings.heartbeat_timeout_us / 10).clamp(100_000, 1_000_000) as u64)
}

impl Ksana {
    /// Opens the database (creating the peer's tables unless told not to), reads the registry, publishes its
    /// ready pairs and starts the store thread.
    ///
    /// Errors: [`RouterError::Ksana`] when the database cannot be opened or read; [`RouterError::Io`] when the
    /// thread cannot start.
    pub fn start(
        cfg: KsanaConfig,
        registry: Arc<Registry>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Arc<Ksana>, RouterError> {
        let service = Service::open(cfg.settings.clone(), &cfg.db, cfg.create_schema)?;
        tracing::info!(db = %service.describe(), cluster = %cfg.settings.cluster_name,
            nodes = service.tables().nodes.len(), "ksana node registry opened");
        let (tx, rx) = sync_channel::<Msg>(QUEUE);
        let k = Arc::new(Ksana {
            tx,
            pairs: ArcSwap::from_pointee(Pairs::default()),
            tick_queued: AtomicBool::new(false),
            cfg,
        });
        let mut last: Option<Vec<ReadyPair>> = None;
        k.publish(&service, &registry, &metrics, &mut last);
        let weak = Arc::downgrade(&k);
        std::thread::Builder::new()
            .name("pdx-ksana-store".into())
            .spawn(move || {
                let mut service = service;
                // Ends when the router (every sender) is gone.
                while let Ok(msg) = rx.recv() {
                    let Some(k) = weak.upgrade() else { break };
                    match msg {
                        Msg::Api {
                            route,
                            content_type,
                            body,
                            reply,
                        } => {
                            let r =
                                service.handle(route, content_type.as_deref(), &body, Ts::now());
                            if let Ok(mut slot) = reply.lock() {
                                *slot = Some(r);
                            }
                        }
                        Msg::Tick => {
                            k.tick_queued.store(false, Ordering::Relaxed);
                            if let Err(e) = service.tick(Ts::now()) {
                                tracing::warn!(error = %e, "ksana registry: expiry tick failed");
                            }
                        }
                    }
                    k.publish(&service, &registry, &metrics, &mut last);
                }
            })?;
        Ok(k)
    }

    /// Makes the request path see `service`'s ready pairs (when they changed): the two pools' workers, then
    /// the pair list.
    fn publish(
        &self,
        service: &Service,
        registry: &Registry,
        metrics: &crate::metrics::Metrics,
        last: &mut Option<Vec<ReadyPair>>,
    ) {
        // The node API is open (KsanaLLM nodes send no credentials); with an allow-list, only nodes whose
        // inference address is an IP inside it get user traffic, as registered workers.
        let allowed = |addr: &str| {
            self.cfg.allow.is_empty()
                || crate::config::parse_worker_url(&format!("http://{addr}"))
                    .ok()
                    .and_then(|u| u.ip)
                    .is_some_and(|ip| self.cfg.allow.iter().any(|c| c.contains(ip)))
        };
        let ready: Vec<ReadyPair> = service
            .ready_pairs()
            .iter()
            .filter(|p| {
                let ok = allowed(&p.prefill) && allowed(&p.decode);
                if !ok {
                    tracing::warn!(prefill = %p.prefill, decode = %p.decode,
                        "ksana pair outside --worker-allow-cidr: not routed");
                }
                ok
            })
            .cloned()
            .collect();
        let ready = &ready[..];
        if last.as_deref() == Some(ready) {
            return;
        }
        let url = |a: &str| format!("http://{a}");
        let mut prefill: Vec<String> = ready.iter().map(|p| url(&p.prefill)).collect();
        let mut decode: Vec<String> = ready.iter().map(|p| url(&p.decode)).collect();
        prefill.sort();
        prefill.dedup();
        decode.sort();
        decode.dedup();
        let mut pairs = Pairs::default();
        for p in ready {
            let (Ok(pu), Ok(du)) = (
                crate::config::parse_worker_url(&url(&p.prefill)),
                crate::config::parse_worker_url(&url(&p.decode)),
            ) else {
                continue;
            };
            pairs.addr.insert(pu.authority.clone(), p.prefill.clone());
            pairs.addr.insert(du.authority.clone(), p.decode.clone());
            pairs
                .decodes
                .entry(pu.authority)
                .or_default()
                .insert(du.authority);
        }
        // Workers first, then pairs: a request that sees a pair always finds both workers.
        for w in registry.set_ksana_workers(self.cfg.policy, &prefill, &decode) {
            metrics.remove_worker(&w);
        }
        self.pairs.store(Arc::new(pairs));
        tracing::info!(pairs = ready.len(), "ksana ready pairs changed");
        *last = Some(ready.to_vec());
    }

    /// Asks the store thread for heartbeat expiry (at most one tick waits at a time).
    pub fn tick(&self) {
        if !self.tick_queued.swap(true, Ordering::Relaxed) && self.tx.try_send(Msg::Tick).is_err() {
            self.tick_queued.store(false, Ordering::Relaxed);
        }
    }

    /// Runs one node API request on the store thread and waits for its answer.
    pub async fn call(&self, route: Route, content_type: Option<Vec<u8>>, body: Bytes) -> Reply {
        let slot: Slot = Arc::new(Mutex::new(None));
        match self.tx.try_send(Msg::Api {
            route,
            content_type,
            body,
            reply: slot.clone(),
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Reply::detail(
                    503,
                    "node registry busy: too many node API requests waiting",
                );
            }
            Err(TrySendError::Disconnected(_)) => {
                return Reply::detail(500, "node registry stopped")
            }
        }
        let started = std::time::Instant::now();
        let mut pause = Duration::from_micros(100);
        loop {
            // Read before the answer: the store thread fills the slot, then drops its end.
            let alone = Arc::strong_count(&slot) == 1;
            if let Some(r) = slot.lock().ok().and_then(|mut s| s.take()) {
                return r;
            }
            if alone {
                return Reply::detail(500, "node registry stopped");
            }
            if started.elapsed() > REPLY_WAIT {
                return Reply::detail(503, "node registry did not answer in time");
            }
            monoio::time::sleep(pause).await;
            pause = (pause * 2).min(REPLY_POLL_MAX);
        }
    }
}

/// Serves a node API request (`POST` only: another method is FastAPI's 405).
pub(crate) async fn node_api(
    k: &Ksana,
    route: Route,
    req: Request<Full<Bytes>>,
) -> Response<RouterBody> {
    if req.method() != hyper::Method::POST {
        let mut r = reply(Reply::detail(405, "Method Not Allowed"));
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("POST"),
        );
        return r;
    }
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .map(|v| v.as_bytes().to_vec());
    let body = match Limited::new(req.into_body(), MAX_NODE_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return reply(Reply::detail(
                413,
                format!("body over {MAX_NODE_BODY} bytes"),
            ))
        }
    };
    reply(k.call(route, content_type, body).await)
}

fn reply(r: Reply) -> Response<RouterBody> {
    full(r.status, r.content_type, r.body)
}

/// Whether `path` goes to a prefill/decode pair under `--orchestration ksana`, as the peer proxies it:
/// `/generate`, and every path under `/v1/` and `/v2/` but pdx's own (`/v1/models*`, `/v1/workers`,
/// `/v1/planner/diversions`). Paths the peer does not serve keep pdx's OpenAI 404.
pub fn proxied(path: &str) -> bool {
    path == "/generate"
        || (path.starts_with("/v2/") && path.len() > 4)
        || (path.starts_with("/v1/")
            && path.len() > 4
            && !matches!(
                path,
                "/v1/workers" | "/v1/planner/diversions" | "/v1/models"
            )
            && !path.starts_with("/v1/models/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxied_routes() {
        for p in [
            "/generate",
            "/v1/embeddings",
            "/v2/models/x/infer",
            "/v1/chat/completions",
        ] {
            assert!(proxied(p), "{p}");
        }
        for p in [
            "/v1/",
            "/v2/",
            "/v1/workers",
            "/v1/models",
            "/v1/models/m",
            "/generate/x",
            "/health",
        ] {
            assert!(!proxied(p), "{p}");
        }
    }

    #[test]
    fn group_keys_name_the_registered_addresses() {
        let mut p = Pairs::default();
        p.addr.insert("127.0.0.1:1".into(), "127.0.0.1:1".into());
        p.decodes
            .entry("127.0.0.1:1".into())
            .or_default()
            .insert("127.0.0.1:2".into());
        assert!(p.paired("127.0.0.1:1", "127.0.0.1:2"));
        assert!(!p.paired("127.0.0.1:2", "127.0.0.1:1"));
        assert_eq!(
            p.group_key("127.0.0.1:1", "127.0.0.1:2"),
            "127.0.0.1:1__127.0.0.1:2"
        );
    }
}
