//! The KV-event subscriber of `pdx serve`: one thread, off the data path, with its own single-threaded
//! tokio runtime, subscribed to the KV event publisher of every worker that has one (vLLM
//! `--kv-events-config`, `pdx mock --kv-events-config`; the address from the worker's config entry or its
//! registration). It feeds the exact prefix index ([`pdx_router_core::kv_index`]) that `kv_aware` reads.
//!
//! * Every [`RECONCILE`] the thread compares the registry's workers with its subscriptions: workers added
//!   at runtime are subscribed, removed ones unsubscribed (their index entries and metric series go too).
//! * Per worker, a task keeps a SUB connection ([`crate::zmtp`]) to the publisher, reconnecting with
//!   backoff; each message must be `[topic, sequence (8 bytes BE), payload]` and goes to
//!   [`ExactIndex::on_live`]. When the index asks for a replay (on connect, and on a sequence gap) a second
//!   task opens a DEALER connection to the worker's replay socket, sends the start sequence and feeds every
//!   answer to the index until vLLM's end marker (sequence -1), within [`REPLAY_TIMEOUT`].
//! * Metrics per worker (`worker` label, the worker's URL): `pdx_kv_events_batches_total`,
//!   `pdx_kv_events_total`, `pdx_kv_events_gaps_total`, `pdx_kv_events_replays_total`,
//!   `pdx_kv_events_resets_total`, `pdx_kv_events_decode_errors_total`, `pdx_kv_index_blocks` and
//!   `pdx_kv_index_exact` (1 while the index knows the worker's cache exactly and `kv_aware` uses it).
//!
//! Nothing here runs on the request path: `kv_aware` takes the index's read lock once per pick
//! ([`crate::registry::Pool::pick`]); this thread takes the write lock once per received batch.

use crate::metrics::WorkerLabel;
use crate::registry::Registry;
use crate::zmtp::{Conn, Limits, SocketType};
use pdx_router_core::{ExactIndex, ReplayRequest, WorkerStats};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often the subscriptions follow the registry, and the metrics the index.
pub const RECONCILE: Duration = Duration::from_millis(200);
/// Longest TCP connect and ZMTP handshake with a publisher or replay socket.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest replay, from the request to the end marker.
pub const REPLAY_TIMEOUT: Duration = Duration::from_secs(10);
/// Most batches one replay may answer (vLLM keeps `buffer_steps`, 10000 by default).
pub const MAX_REPLAY_BATCHES: u64 = 1_000_000;
/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The KV-event metrics, per worker.
#[derive(Debug, Default)]
pub struct KvEventMetrics {
    /// Batches applied.
    pub batches: Family<WorkerLabel, Counter>,
    /// Events applied.
    pub events: Family<WorkerLabel, Counter>,
    /// Sequence gaps found.
    pub gaps: Family<WorkerLabel, Counter>,
    /// Replays asked for.
    pub replays: Family<WorkerLabel, Counter>,
    /// Resets (events lost for good; approximate until complete again).
    pub resets: Family<WorkerLabel, Counter>,
    /// Batches that did not decode.
    pub decode_errors: Family<WorkerLabel, Counter>,
    /// Blocks in the exact index.
    pub blocks: Family<WorkerLabel, Gauge>,
    /// 1 while the index knows the worker exactly.
    pub exact: Family<WorkerLabel, Gauge>,
}

impl KvEventMetrics {
    /// Registers the families in `r`.
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "pdx_kv_events_batches",
            "KV event batches applied to the exact prefix index, per worker",
            self.batches.clone(),
        );
        r.register(
            "pdx_kv_events",
            "KV events applied to the exact prefix index, per worker",
            self.events.clone(),
        );
        r.register(
            "pdx_kv_events_gaps",
            "Sequence gaps in a worker's KV event stream",
            self.gaps.clone(),
        );
        r.register(
            "pdx_kv_events_replays",
            "Replays of a worker's KV event batches asked for",
            self.replays.clone(),
        );
        r.register(
            "pdx_kv_events_resets",
            "Resets of a worker's exact index after KV events were lost for good",
            self.resets.clone(),
        );
        r.register(
            "pdx_kv_events_decode_errors",
            "KV event batches that did not decode",
            self.decode_errors.clone(),
        );
        r.register(
            "pdx_kv_index_blocks",
            "Blocks the exact prefix index holds for a worker",
            self.blocks.clone(),
        );
        r.register(
            "pdx_kv_index_exact",
            "1 while the exact prefix index knows the worker's cache exactly (kv_aware uses it)",
            self.exact.clone(),
        );
    }

    fn update(&self, label: &WorkerLabel, now: &WorkerStats, last: &WorkerStats) {
        let inc = |f: &Family<WorkerLabel, Counter>, n: u64, l: u64| {
            f.get_or_create(label).inc_by(n.saturating_sub(l));
        };
        inc(&self.batches, now.batches, last.batches);
        inc(&self.events, now.events, last.events);
        inc(&self.gaps, now.gaps, last.gaps);
        inc(&self.replays, now.replays, last.replays);
        inc(&self.resets, now.resets, last.resets);
        inc(&self.decode_errors, now.decode_errors, last.decode_errors);
        self.blocks.get_or_create(label).set(now.blocks as i64);
        self.exact.get_or_create(label).set(i64::from(now.exact));
    }

    fn remove(&self, label: &WorkerLabel) {
        for f in [
            &self.batches,
            &self.events,
            &self.gaps,
            &self.replays,
            &self.resets,
            &self.decode_errors,
        ] {
            f.remove(label);
        }
        self.blocks.remove(label);
        self.exact.remove(label);
    }
}

/// Starts the subscriber thread; it ends (with its subscriptions) within [`RECONCILE`] of `stop` being set.
///
/// Errors: the thread cannot be spawned.
pub fn spawn(
    registry: Arc<Registry>,
    metrics: Arc<crate::metrics::Metrics>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("pdx-router-kv-events".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "KV events: cannot start runtime");
                    return;
                }
            };
            rt.block_on(run(registry, metrics, stop));
        })?;
    Ok(())
}

struct Sub {
    label: WorkerLabel,
    task: tokio::task::JoinHandle<()>,
    last: WorkerStats,
}

async fn run(
    registry: Arc<Registry>,
    metrics: Arc<crate::metrics::Metrics>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let index = registry.exact.clone();
    let mut subs: HashMap<u64, Sub> = HashMap::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let workers = registry.workers();
        // Unsubscribe workers that are gone.
        subs.retain(|id, s| {
            let keep = workers.iter().any(|w| w.id == *id);
            if !keep {
                s.task.abort();
                if let Ok(mut ix) = index.write() {
                    ix.remove_worker(*id);
                }
                metrics.kv_events.remove(&s.label);
                tracing::info!(worker = %s.label.worker, "KV events: unsubscribed");
            }
            keep
        });
        // Subscribe new ones.
        for w in &workers {
            let Some(k) = &w.kv_events else { continue };
            if subs.contains_key(&w.id) {
                continue;
            }
            if let Ok(mut ix) = index.write() {
                ix.add_worker(w.id, k.replay.is_some());
            }
            tracing::info!(worker = %w.url, endpoint = %k.endpoint, replay = ?k.replay, "KV events: subscribing");
            let task = tokio::spawn(subscribe(
                index.clone(),
                w.id,
                w.url.to_string(),
                k.endpoint.clone(),
                k.replay.clone(),
            ));
            subs.insert(
                w.id,
                Sub {
                    label: WorkerLabel {
                        worker: w.url.clone(),
                    },
                    task,
                    last: WorkerStats::default(),
                },
            );
        }
        // Metrics follow the index.
        if let Ok(ix) = index.read() {
            for (id, s) in subs.iter_mut() {
                if let Some(now) = ix.stats(*id) {
                    if now.resets > s.last.resets || now.decode_errors > s.last.decode_errors {
                        tracing::warn!(
                            worker = %s.label.worker,
                            resets = now.resets,
                            decode_errors = now.decode_errors,
                            replay_failures = now.replay_failures,
                            "KV events lost: the worker's exact index was reset (approximate until complete again)"
                        );
                    }
                    if now.exact != s.last.exact {
                        tracing::info!(worker = %s.label.worker, exact = now.exact, "KV event index state");
                    }
                    metrics.kv_events.update(&s.label, &now, &s.last);
                    s.last = now;
                }
            }
        }
        tokio::time::sleep(RECONCILE).await;
    }
    for s in subs.values() {
        s.task.abort();
    }
}

/// Keeps one worker's SUB connection, reconnecting with backoff.
async fn subscribe(
    index: Arc<RwLock<ExactIndex>>,
    id: u64,
    url: String,
    endpoint: String,
    replay: Option<String>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match Conn::connect(
            &endpoint,
            SocketType::Sub,
            CONNECT_TIMEOUT,
            Limits::default(),
        )
        .await
        {
            Ok(mut c) => {
                if let Err(e) = c.subscribe(b"").await {
                    tracing::debug!(worker = %url, error = %e, "KV events: subscribe failed");
                } else {
                    backoff = Duration::from_millis(100);
                    tracing::debug!(worker = %url, %endpoint, "KV events: connected");
                    let req = index.write().ok().and_then(|mut ix| ix.on_connected(id));
                    start_replay(&index, req, &replay);
                    let e = read_live(&mut c, &index, id, &replay).await;
                    tracing::info!(worker = %url, error = %e, "KV events: subscription lost; reconnecting");
                }
            }
            Err(e) => {
                tracing::debug!(worker = %url, %endpoint, error = %e, "KV events: connect failed")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Reads live batches until the connection fails; returns the error.
async fn read_live(
    c: &mut Conn,
    index: &Arc<RwLock<ExactIndex>>,
    id: u64,
    replay: &Option<String>,
) -> std::io::Error {
    loop {
        let frames = match c.recv().await {
            Ok(f) => f,
            Err(e) => return e,
        };
        let [_topic, seq, payload] = frames.as_slice() else {
            return std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("KV event message of {} frames (expected 3)", frames.len()),
            );
        };
        let Ok(seq) = <[u8; 8]>::try_from(seq.as_ref()) else {
            return std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "KV event sequence is not 8 bytes",
            );
        };
        let seq = u64::from_be_bytes(seq);
        let req = match index.write() {
            Ok(mut ix) => ix.on_live(id, seq, payload),
            Err(_) => return std::io::Error::other("index lock poisoned"),
        };
        start_replay(index, req, replay);
    }
}

/// Runs a replay the index asks for. The index asks for one at a time per worker (live batches wait
/// behind it), and the task runs the follow-up replays an ended one asks for, so at most one task per
/// worker talks to its replay socket.
fn start_replay(
    index: &Arc<RwLock<ExactIndex>>,
    req: Option<ReplayRequest>,
    replay: &Option<String>,
) {
    let Some(req) = req else { return };
    let Some(addr) = replay.clone() else {
        // The index asks only when the worker has a replay socket; without one, fail it at once.
        if let Ok(mut ix) = index.write() {
            ix.on_replay_failed(req.worker);
        }
        return;
    };
    let index = index.clone();
    tokio::spawn(async move {
        let mut next = Some(req);
        while let Some(r) = next.take() {
            let ok = tokio::time::timeout(REPLAY_TIMEOUT, run_replay(&index, &addr, r)).await;
            match ok {
                Ok(Ok(more)) => next = more,
                Ok(Err(e)) => {
                    tracing::warn!(%addr, error = %e, "KV event replay failed; the worker's index is reset");
                    if let Ok(mut ix) = index.write() {
                        ix.on_replay_failed(r.worker);
                    }
                }
                Err(_) => {
                    tracing::warn!(%addr, "KV event replay timed out; the worker's index is reset");
                    if let Ok(mut ix) = index.write() {
                        ix.on_replay_failed(r.worker);
                    }
                }
            }
        }
    });
}

/// One replay: `[empty, from]` out, `[empty, seq, payload]` in until the end marker. Returns the next
/// replay the index asks for, if any.
async fn run_replay(
    index: &Arc<RwLock<ExactIndex>>,
    addr: &str,
    r: ReplayRequest,
) -> std::io::Result<Option<ReplayRequest>> {
    let mut c = Conn::connect(addr, SocketType::Dealer, CONNECT_TIMEOUT, Limits::default()).await?;
    c.send(&[b"", &r.from.to_be_bytes()]).await?;
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    for _ in 0..=MAX_REPLAY_BATCHES {
        let frames = c.recv().await?;
        let [empty, seq, payload] = frames.as_slice() else {
            return Err(bad("replay answer is not [empty, sequence, payload]"));
        };
        if !empty.is_empty() {
            return Err(bad("replay answer without the empty delimiter"));
        }
        let seq =
            <[u8; 8]>::try_from(seq.as_ref()).map_err(|_| bad("replay sequence is not 8 bytes"))?;
        let mut ix = index
            .write()
            .map_err(|_| std::io::Error::other("index lock poisoned"))?;
        if seq == pdx_router_core::kv_events::END_SEQ {
            return Ok(ix.on_replay_end(r.worker));
        }
        ix.on_replay(r.worker, u64::from_be_bytes(seq), payload);
    }
    Err(bad("replay longer than MAX_REPLAY_BATCHES"))
}
