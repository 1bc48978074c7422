//! The etcd I/O around [`crate::etcd`]: the router's watcher thread ([`spawn`]), its write-through of
//! registrations ([`WriteThrough`]), and a worker's own registration with a lease ([`register`], what
//! `pdx mock --register-etcd` runs).
//!
//! Every RPC has a deadline ([`EtcdOptions::request_timeout`]) and every failure a backoff
//! ([`crate::backoff`]); the connection sends HTTP/2 pings, so a silent etcd is noticed within about
//! [`EtcdOptions::keep_alive`] twice. A failure never removes a worker: the watch resumes from its revision
//! (or lists again after a compaction) once etcd answers.

use crate::etcd::{EtcdTarget, EtcdWatch, EventKind, KeyValue, Step, WatchBatch};
use crate::{DiscoveryError, Sink};
use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions, WatchOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Most keys the watch tracks ([`crate::DEFAULT_MAX_ENTRIES`]).
    pub max_entries: usize,
    /// Deadline of one unary RPC (range, put, lease grant, keep-alive).
    pub request_timeout: Duration,
    /// Deadline of a TCP connect.
    pub connect_timeout: Duration,
    /// HTTP/2 ping interval and ping timeout of the connection.
    pub keep_alive: Duration,
    /// `(user, password)` for etcd's authentication (`PDX_ETCD_USERNAME`, `PDX_ETCD_PASSWORD`).
    pub user: Option<(String, String)>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            max_entries: crate::DEFAULT_MAX_ENTRIES,
            request_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(2),
            keep_alive: Duration::from_secs(2),
            user: None,
        }
    }
}

impl EtcdOptions {
    /// The defaults, with the credentials of `PDX_ETCD_USERNAME` and `PDX_ETCD_PASSWORD` when both are set.
    pub fn from_env() -> Self {
        let user = match (
            std::env::var("PDX_ETCD_USERNAME"),
            std::env::var("PDX_ETCD_PASSWORD"),
        ) {
            (Ok(u), Ok(p)) if !u.is_empty() => Some((u, p)),
            _ => None,
        };
        Self {
            user,
            ..Self::default()
        }
    }
}

async fn connect(target: &EtcdTarget, opts: &EtcdOptions) -> Result<Client, DiscoveryError> {
    let mut o = ConnectOptions::new()
        .with_connect_timeout(opts.connect_timeout)
        .with_keep_alive(opts.keep_alive, opts.keep_alive)
        .with_keep_alive_while_idle(true);
    if let Some((u, p)) = &opts.user {
        o = o.with_user(u.clone(), p.clone());
    }
    deadline(opts, Client::connect(&target.endpoints, Some(o))).await
}

/// `f` within the request timeout.
async fn deadline<T>(
    opts: &EtcdOptions,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, DiscoveryError> {
    match tokio::time::timeout(opts.request_timeout, f).await {
        Ok(r) => r.map_err(DiscoveryError::from),
        Err(_) => Err(DiscoveryError::Etcd(format!(
            "no answer within {:?}",
            opts.request_timeout
        ))),
    }
}

/// A running etcd watcher; stops when dropped.
#[derive(Debug)]
pub struct EtcdDiscovery {
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for EtcdDiscovery {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the watcher of `target` on a thread of its own: lists the prefix, watches it, and hands every
/// change to `sink`; with `writes`, also performs the registrations written through to etcd.
///
/// Errors: an I/O error when the thread or its runtime cannot start.
pub fn spawn(
    target: EtcdTarget,
    opts: EtcdOptions,
    sink: Sink,
    writes: Option<WriteThrough>,
) -> std::io::Result<EtcdDiscovery> {
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("pdx-etcd".into())
        .spawn(move || {
            rt.block_on(async move {
                let state = Arc::new(Mutex::new(EtcdWatch::new(
                    &target.watch_prefix(),
                    opts.max_entries,
                )));
                let writer = writes.map(|w| {
                    tokio::spawn(write_loop(
                        target.clone(),
                        opts.clone(),
                        w,
                        state.clone(),
                        stop_rx.clone(),
                    ))
                });
                watch_loop(&target, &opts, &state, &sink, stop_rx).await;
                if let Some(w) = writer {
                    w.abort();
                }
            });
        })?;
    Ok(EtcdDiscovery {
        stop,
        thread: Some(thread),
    })
}

/// Why a watch session ended.
enum Ended {
    Stopped,
    Broken(DiscoveryError),
}

async fn watch_loop(
    target: &EtcdTarget,
    opts: &EtcdOptions,
    state: &Mutex<EtcdWatch>,
    sink: &Sink,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut retry = Retry::default();
    loop {
        if *stop.borrow() {
            return;
        }
        let session = async {
            let mut client = connect(target, opts).await?;
            session(&mut client, target, opts, state, sink, &mut retry).await
        };
        let ended = tokio::select! {
            r = session => match r {
                Ok(()) => Ended::Stopped,
                Err(e) => Ended::Broken(e),
            },
            _ = stop.changed() => Ended::Stopped,
        };
        match ended {
            Ended::Stopped => return,
            Ended::Broken(e) => {
                if let Ok(mut s) = state.lock() {
                    s.on_broken();
                }
                let since = *retry
                    .broken_since
                    .get_or_insert_with(std::time::Instant::now);
                if retry.attempt == 0 {
                    tracing::warn!(error = %e, endpoints = ?target.endpoints,
                        "etcd watch broken: keeping the workers known, retrying");
                } else {
                    tracing::debug!(error = %e, away_secs = since.elapsed().as_secs_f64(), "etcd still away");
                }
                let wait = crate::backoff(retry.attempt);
                retry.attempt = retry.attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// The watch loop's retries: failed attempts in a row (the backoff's exponent) and when the current outage began.
#[derive(Default)]
struct Retry {
    attempt: u32,
    broken_since: Option<std::time::Instant>,
}

impl Retry {
    /// etcd answered: the backoff starts over, and an outage, if one was on, is over.
    fn answered(&mut self) {
        self.attempt = 0;
        if let Some(t) = self.broken_since.take() {
            tracing::info!(away_secs = t.elapsed().as_secs_f64(), "etcd watch resumed");
        }
    }
}

/// One connected session: list when needed, then watch until the stream breaks (an error) or is canceled
/// (back to list). Marks `retry` answered once etcd answers.
async fn session(
    client: &mut Client,
    target: &EtcdTarget,
    opts: &EtcdOptions,
    state: &Mutex<EtcdWatch>,
    sink: &Sink,
    retry: &mut Retry,
) -> Result<(), DiscoveryError> {
    let prefix = target.watch_prefix();
    loop {
        let step = state
            .lock()
            .map(|s| s.step())
            .map_err(|_| DiscoveryError::Etcd("state lock poisoned".into()))?;
        match step {
            Step::List => {
                let limit = opts.max_entries as i64 + 1;
                let resp = deadline(
                    opts,
                    client.get(
                        prefix.as_bytes(),
                        Some(GetOptions::new().with_prefix().with_limit(limit)),
                    ),
                )
                .await?;
                // Without the store's revision the watch would start from 1 (the whole history): refuse, back off.
                let revision = resp
                    .header()
                    .map(|h| h.revision())
                    .filter(|r| *r > 0)
                    .ok_or_else(|| DiscoveryError::Etcd("list answer without a revision".into()))?;
                retry.answered();
                let kvs = resp.kvs().iter().map(|kv| KeyValue {
                    key: kv.key(),
                    value: kv.value(),
                    mod_revision: kv.mod_revision(),
                    lease: kv.lease(),
                });
                let changes = state
                    .lock()
                    .map(|mut s| s.on_list(revision, kvs))
                    .unwrap_or_default();
                tracing::debug!(
                    revision,
                    keys = resp.kvs().len(),
                    changes = changes.len(),
                    "etcd listed"
                );
                if !changes.is_empty() {
                    sink(changes);
                }
            }
            Step::Watch { start_revision } => {
                let mut stream = deadline(
                    opts,
                    client.watch(
                        prefix.as_bytes(),
                        Some(
                            WatchOptions::new()
                                .with_prefix()
                                .with_start_revision(start_revision)
                                .with_progress_notify(),
                        ),
                    ),
                )
                .await?;
                retry.answered();
                loop {
                    let Some(resp) = stream.message().await? else {
                        return Err(DiscoveryError::Etcd("watch stream closed".into()));
                    };
                    let raw = &resp.0;
                    let events = raw
                        .events
                        .iter()
                        .filter_map(|e| {
                            let kind = match e.r#type {
                                0 => EventKind::Put,
                                1 => EventKind::Delete,
                                other => {
                                    tracing::warn!(kind = other, "unknown etcd event ignored");
                                    return None;
                                }
                            };
                            let kv = e.kv.as_ref()?;
                            Some((
                                kind,
                                KeyValue {
                                    key: &kv.key,
                                    value: &kv.value,
                                    mod_revision: kv.mod_revision,
                                    lease: kv.lease,
                                },
                            ))
                        })
                        .collect();
                    let batch = WatchBatch {
                        header_revision: raw.header.as_ref().map(|h| h.revision).unwrap_or(0),
                        created: raw.created,
                        canceled: raw.canceled,
                        compact_revision: raw.compact_revision,
                        events,
                    };
                    let (changes, relist) = state
                        .lock()
                        .map(|mut s| (s.on_watch(&batch), s.step() == Step::List))
                        .map_err(|_| DiscoveryError::Etcd("state lock poisoned".into()))?;
                    if !changes.is_empty() {
                        sink(changes);
                    }
                    if relist {
                        break;
                    }
                    if raw.canceled {
                        return Err(DiscoveryError::Etcd(format!(
                            "watch canceled: {}",
                            raw.cancel_reason
                        )));
                    }
                }
            }
        }
    }
}

/// What a router writes through to etcd for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    /// Registration or heartbeat: the key holds `value` with a lease of `ttl_secs`, kept alive by this call.
    Put { value: Vec<u8>, ttl_secs: i64 },
    /// Drain: delete the key.
    Delete,
}

#[derive(Debug, Default)]
struct Pending {
    ops: Mutex<HashMap<String, Op>>,
    wake: tokio::sync::Notify,
}

/// The registration API's write-through to etcd: a router that takes a registration (or heartbeat, or
/// drain) at `POST`/`DELETE /v1/workers` hands it here, and the watcher thread writes it to the worker's
/// key, so every router sees the worker.
///
/// Calls never block on etcd: operations wait in a map with one entry per key (a later operation on a key
/// replaces an earlier one that has not been written), so while etcd is away the map holds at most one
/// entry per worker the router knows.
///
/// Each key the router writes gets a lease of its own with the heartbeat TTL; a heartbeat renews it (one
/// keep-alive), and puts the value again only when the key is missing or carries another lease (the worker
/// heartbeats another router too, or the lease expired).
#[derive(Debug, Clone)]
pub struct WriteThrough {
    target: EtcdTarget,
    pending: Arc<Pending>,
}

impl WriteThrough {
    /// Write-through to `target`'s prefix (performed once [`spawn`] is given it).
    pub fn new(target: &EtcdTarget) -> Self {
        Self {
            target: target.clone(),
            pending: Arc::default(),
        }
    }

    fn queue(&self, key: String, op: Op) {
        if let Ok(mut m) = self.pending.ops.lock() {
            m.insert(key, op);
        }
        self.pending.wake.notify_one();
    }

    /// A registration or heartbeat of `body` (a registration body the router accepted): the key holds it
    /// with a lease of `ttl_secs` seconds (at least 2, etcd's minimum) renewed by each call.
    ///
    /// Errors: [`DiscoveryError::BadValue`] for a body that is not a registration.
    pub fn put(&self, body: &[u8], ttl_secs: u64) -> Result<(), DiscoveryError> {
        let w = crate::DiscoveredWorker::from_body(body)?;
        let value = crate::canonical_body(body)?;
        let ttl_secs = ttl_secs.clamp(2, i64::MAX as u64) as i64;
        self.queue(
            self.target.key_for(&w.registration),
            Op::Put { value, ttl_secs },
        );
        Ok(())
    }

    /// A drain: deletes the worker's key, so every router drains it.
    pub fn delete(&self, reg: &pdx_protocol::Registration) {
        self.queue(self.target.key_for(reg), Op::Delete);
    }

    /// Operations not written yet.
    pub fn pending(&self) -> usize {
        self.pending.ops.lock().map(|m| m.len()).unwrap_or(0)
    }

    fn take(&self) -> HashMap<String, Op> {
        self.pending
            .ops
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
    }

    /// Puts `op` back unless a newer operation on `key` arrived meanwhile.
    fn requeue(&self, key: String, op: Op) {
        if let Ok(mut m) = self.pending.ops.lock() {
            m.entry(key).or_insert(op);
        }
    }
}

async fn write_loop(
    target: EtcdTarget,
    opts: EtcdOptions,
    writes: WriteThrough,
    state: Arc<Mutex<EtcdWatch>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // The lease this router holds on each key it wrote, with the value it wrote.
    let mut mine: HashMap<String, (i64, Vec<u8>)> = HashMap::new();
    let mut client: Option<Client> = None;
    let mut attempt = 0u32;
    loop {
        if writes.pending() == 0 {
            tokio::select! {
                _ = writes.pending.wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
        let mut ops = writes.take().into_iter();
        while let Some((key, op)) = ops.next() {
            let c = match &mut client {
                Some(c) => c,
                None => match connect(&target, &opts).await {
                    Ok(c) => client.insert(c),
                    Err(e) => {
                        tracing::debug!(error = %e, "etcd write-through: cannot connect");
                        writes.requeue(key, op);
                        ops.for_each(|(k, o)| writes.requeue(k, o));
                        break;
                    }
                },
            };
            let current = state.lock().ok().and_then(|s| s.lease_of(&key));
            match write(c, &opts, &key, &op, current, &mut mine).await {
                Ok(()) => attempt = 0,
                Err(e) => {
                    tracing::warn!(key, error = %e, "etcd write-through failed: retrying");
                    client = None;
                    writes.requeue(key, op);
                    ops.for_each(|(k, o)| writes.requeue(k, o));
                    break;
                }
            }
        }
        if client.is_none() && writes.pending() > 0 {
            let wait = crate::backoff(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// Performs one write-through operation. `current` is the lease the watch last saw on the key.
async fn write(
    c: &mut Client,
    opts: &EtcdOptions,
    key: &str,
    op: &Op,
    current: Option<i64>,
    mine: &mut HashMap<String, (i64, Vec<u8>)>,
) -> Result<(), DiscoveryError> {
    match op {
        Op::Put { value, ttl_secs } => {
            if let Some((id, v)) = mine.get(key) {
                if v == value && current == Some(*id) && keep_alive_once(c, opts, *id).await? {
                    return Ok(());
                }
            }
            let lease = deadline(opts, c.lease_grant(*ttl_secs, None)).await?.id();
            deadline(
                opts,
                c.put(
                    key.as_bytes(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
            )
            .await?;
            tracing::debug!(key, lease, "registration written through to etcd");
            if let Some((old, _)) = mine.insert(key.to_string(), (lease, value.clone())) {
                // The key no longer carries it; let it go rather than wait for its TTL.
                let _ = deadline(opts, c.lease_revoke(old)).await;
            }
            Ok(())
        }
        Op::Delete => {
            deadline(opts, c.delete(key.as_bytes(), None)).await?;
            if let Some((old, _)) = mine.remove(key) {
                let _ = deadline(opts, c.lease_revoke(old)).await;
            }
            tracing::debug!(key, "drain written through to etcd");
            Ok(())
        }
    }
}

/// One keep-alive of `lease`; false when etcd no longer knows it (expired or revoked).
async fn keep_alive_once(
    c: &mut Client,
    opts: &EtcdOptions,
    lease: i64,
) -> Result<bool, DiscoveryError> {
    let (mut keeper, mut stream) = deadline(opts, c.lease_keep_alive(lease)).await?;
    deadline(opts, keeper.keep_alive()).await?;
    let resp = deadline(opts, stream.message()).await?;
    Ok(resp.is_some_and(|r| r.ttl() > 0))
}

/// A worker's own registration (`pdx mock --register-etcd`): puts `body` under its key with a lease of
/// `ttl_secs` (at least 2) and keeps the lease alive every third of the TTL until `stop` turns true, then
/// revokes it (the key goes at once). etcd away: retries with backoff, keeping the same lease when etcd
/// still knows it (etcd renews every lease when its leader comes back), else granting a new one; a key
/// deleted meanwhile (a drain at a router) is put again at the next round, as a heartbeat re-registers a
/// drained worker with the registration API.
///
/// Errors: [`DiscoveryError::BadValue`] at once for a body that is not a registration; nothing else (every
/// etcd failure is retried).
pub async fn register(
    target: EtcdTarget,
    opts: EtcdOptions,
    body: Vec<u8>,
    ttl_secs: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), DiscoveryError> {
    let w = crate::DiscoveredWorker::from_body(&body)?;
    let value = crate::canonical_body(&body)?;
    let key = target.key_for(&w.registration);
    let ttl = ttl_secs.clamp(2, 1 << 31) as i64;
    let every = Duration::from_millis((ttl as u64 * 1000 / 3).max(500));
    let mut lease: Option<i64> = None;
    let mut client: Option<Client> = None;
    let mut attempt = 0u32;
    let mut announced = false;
    loop {
        let round = async {
            let c = match &mut client {
                Some(c) => c,
                None => client.insert(connect(&target, &opts).await?),
            };
            let alive = match lease {
                Some(id) => keep_alive_once(c, &opts, id).await?,
                None => false,
            };
            let id = match (alive, lease) {
                (true, Some(id)) => id,
                _ => deadline(&opts, c.lease_grant(ttl, None)).await?.id(),
            };
            let present = alive
                && deadline(
                    &opts,
                    c.get(key.as_bytes(), Some(GetOptions::new().with_keys_only())),
                )
                .await?
                .kvs()
                .first()
                .is_some_and(|kv| kv.lease() == id);
            if !present {
                deadline(
                    &opts,
                    c.put(
                        key.as_bytes(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(id)),
                    ),
                )
                .await?;
            }
            Ok::<_, DiscoveryError>((id, present))
        };
        let wait = match round.await {
            Ok((id, present)) => {
                if !announced || !present {
                    tracing::info!(key, lease = id, ttl_secs = ttl, "registered in etcd");
                    announced = true;
                }
                lease = Some(id);
                attempt = 0;
                every
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "etcd registration failed: retrying");
                client = None;
                let w = crate::backoff(attempt);
                attempt = attempt.saturating_add(1);
                w
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {
                if let (Some(c), Some(id)) = (&mut client, lease) {
                    let _ = deadline(&opts, c.lease_revoke(id)).await;
                    tracing::info!(key, "etcd registration revoked");
                }
                return Ok(());
            }
        }
    }
}
