//! The orchestrations, one module each: [`aggregated`], [`vllm_nixl`] (prefill then decode with vLLM
//! NixlConnector's `kv_transfer_params`, KV leases in [`handoff`]), [`sglang`] (prefill and decode at once,
//! paired by SGLang's bootstrap fields) and [`ksana`] (prefill and decode at once, paired by KsanaLLM's
//! `kv-comm-*` headers); and what they share: sending to a worker with the retry rules
//! ([`dispatch`]) and forwarding its answer ([`forward`]).

pub mod aggregated;
pub mod handoff;
pub mod ksana;
pub mod sglang;
pub mod vllm_nixl;

pub use aggregated::Aggregated;
pub use sglang::SglangBootstrap;
pub use vllm_nixl::VllmNixl;

use crate::api::{error_response, Shared, REQUEST_ID, X_PDX_WORKER};
use crate::body::{Forward, RouterBody, StreamStats};
use crate::config::OrchestrationKind;
use crate::metrics::{Label, PhaseLabel, PoolLabels};
use crate::registry::{LoadGuard, Pool, Worker};
use crate::request::Job;
use crate::upstream::{self, ConnectError, SendError, UpBody};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;
use pdx_protocol::ApiError;
use pdx_router_core::{PrefillDecision, SseScanner, UpstreamFailure};
use std::sync::Arc;
use std::time::Instant;

/// Runs `job` under the configured orchestration. Models without decode pools are served by their
/// aggregated pools under every orchestration.
pub(crate) async fn run(sh: &Arc<Shared>, job: Job) -> Response<RouterBody> {
    let pd = !job.model.decode.is_empty();
    match sh.cfg.orchestration {
        OrchestrationKind::VllmNixl if pd => VllmNixl.run(sh, job).await,
        // Boxed: its two upstream requests in flight at once make a large future, which would otherwise
        // size every request's routing future under every orchestration.
        OrchestrationKind::SglangBootstrap if pd => Box::pin(SglangBootstrap.run(sh, job)).await,
        // KsanaLLM nodes are the only workers under it (model `*`); its pools may be empty (then 503).
        OrchestrationKind::Ksana => Box::pin(ksana::Ksana.run(sh, job)).await,
        _ => Aggregated.run(sh, job).await,
    }
}

/// How one request is spread over workers. Implementations: [`VllmNixl`] (prefill then
/// decode with NixlConnector `kv_transfer_params`), [`SglangBootstrap`]
/// (prefill and decode at once with SGLang's `bootstrap_host/port/room`), [`ksana::Ksana`] (prefill and
/// decode at once with KsanaLLM's `kv-comm-group-key` / `kv-comm-request-id`) and [`Aggregated`].
#[allow(async_fn_in_trait)]
pub trait Orchestrator {
    /// Runs the request and returns the client's response.
    async fn run(&self, sh: &Arc<Shared>, job: Job) -> Response<RouterBody>;
}

/// A sent request with its response headers (the body owns the connection).
pub(crate) struct Sent {
    /// Response head; the body reads from the connection.
    pub(crate) resp: Response<UpBody>,
    /// In-flight accounting on the worker.
    pub(crate) guard: LoadGuard,
    /// The worker's pool (metrics).
    pub(crate) pool: Arc<Pool>,
    /// Tokens the router had in flight on the worker when this request was sent (before it).
    pub(crate) ahead_tokens: u64,
    /// When the request was sent.
    pub(crate) sent_at: Instant,
}

/// Sends `body` to `w`. A request that never fully left, or that a reused (pooled) connection dropped
/// before any response byte, is sent once more on a new connection, never on another pooled one (after a
/// worker restart every pooled connection to it may be dead). A failed connect flushes the worker's pool
/// and, with health checks on, marks it down until a check passes. A 2xx head marks it answering
/// ([`Worker::on_answered`]).
pub(crate) async fn send_to(
    sh: &Shared,
    w: &Arc<Worker>,
    path: &str,
    body: &[u8],
    rid: &HeaderValue,
    client_auth: Option<&HeaderValue>,
) -> Result<Response<UpBody>, UpstreamFailure> {
    send_to_abandonable(sh, w, path, body, rid, client_auth, None).await
}

/// [`send_to`], watching `abandon` while it waits for the response head ([`upstream::Abandon`]).
pub(crate) async fn send_to_abandonable(
    sh: &Shared,
    w: &Arc<Worker>,
    path: &str,
    body: &[u8],
    rid: &HeaderValue,
    client_auth: Option<&HeaderValue>,
    abandon: Option<&upstream::Abandon>,
) -> Result<Response<UpBody>, UpstreamFailure> {
    send_with(sh, w, path, body, rid, client_auth, &[], abandon).await
}

/// [`send_to_abandonable`] with up to two more request headers (`extra`, e.g. KsanaLLM's `kv-comm-*`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn send_with(
    sh: &Shared,
    w: &Arc<Worker>,
    path: &str,
    body: &[u8],
    rid: &HeaderValue,
    client_auth: Option<&HeaderValue>,
    extra: &[(&str, &[u8])],
    abandon: Option<&upstream::Abandon>,
) -> Result<Response<UpBody>, UpstreamFailure> {
    let timeout = sh.cfg.upstream_timeout;
    let auth = crate::front_auth::upstream(w, client_auth);
    let mut all: [(&str, &[u8]); 6] = [("", &[]); 6];
    all[..3].copy_from_slice(&[
        ("host", w.authority.as_bytes()),
        ("content-type", b"application/json"),
        (REQUEST_ID, rid.as_bytes()),
    ]);
    let mut n = 3;
    if let Some(a) = auth {
        all[n] = ("authorization", a.as_bytes());
        n += 1;
    }
    for h in extra.iter().take(all.len() - n) {
        all[n] = *h;
        n += 1;
    }
    let headers = &all[..n];
    let mut fresh = false;
    loop {
        let got = if fresh {
            upstream::connect(&w.authority, timeout).await
        } else {
            upstream::get(&w.authority, timeout).await
        };
        let conn = match got {
            Ok(c) => c,
            Err(ConnectError::Failed) => {
                w.on_connect_failed(sh.cfg.health_interval.is_some());
                return Err(UpstreamFailure::Connect);
            }
            Err(ConnectError::Timeout) => return Err(UpstreamFailure::Timeout),
        };
        let reused = conn.reused;
        let sent = upstream::send_abandonable(conn, "POST", path, headers, body, abandon);
        let abandoned = || abandon.is_some_and(upstream::Abandon::is_fired);
        match monoio::time::timeout(timeout, sent).await {
            Err(_) => return Err(UpstreamFailure::Timeout),
            Ok(Ok(r)) => {
                if r.status().is_success() {
                    w.on_answered();
                }
                return Ok(r);
            }
            Ok(Err(SendError::NotSent)) if !fresh && !abandoned() => fresh = true,
            Ok(Err(SendError::Closed)) if reused && !fresh && !abandoned() => fresh = true,
            Ok(Err(SendError::Decode(_))) => return Err(UpstreamFailure::BadResponse),
            Ok(Err(_)) => return Err(UpstreamFailure::Connect),
        }
    }
}

/// What [`dispatch`] needs of a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    /// Model name (metrics).
    pub(crate) model: &'a Label,
    /// Prompt block hashes (`kv_aware`, `score`).
    pub(crate) hashes: &'a [u64],
    /// Prompt tokens.
    pub(crate) isl: u64,
    /// Load accounting, tokens (prompt + output limit; a prefill: prompt + 1).
    pub(crate) tokens: u64,
    /// Upstream path.
    pub(crate) path: &'static str,
    /// Request id.
    pub(crate) rid: &'a HeaderValue,
    /// The client's `Authorization` ([`crate::front_auth::upstream`]).
    pub(crate) auth: Option<&'a HeaderValue>,
}

impl Job {
    pub(crate) fn target(&self) -> Target<'_> {
        Target {
            model: &self.model.name,
            hashes: &self.hashes,
            isl: self.isl,
            tokens: self.tokens,
            path: self.path,
            rid: &self.rid,
            auth: self.auth.as_ref(),
        }
    }
}

/// What a [`dispatch`] sends: the phase (its metrics label) and how the KV reaches a decode worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// A prefill request (`max_tokens=1`, `do_remote_decode`).
    Prefill,
    /// A decode request. With `kv_from_prefill` the decode reads the prompt's KV from the prefill worker
    /// (NixlConnector `kv_transfer_params`): a 502 then means the KV could not be read (vLLM NixlConnector,
    /// `KVTransferError`), the prefill worker's fault, not the decode's, so another decode worker would fail
    /// the same way. Without it the decode computes the prompt itself (decode-only fallback).
    Decode { kv_from_prefill: bool },
    /// A request to an aggregated worker.
    Aggregated,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Prefill => "prefill",
            Phase::Decode { .. } => "decode",
            Phase::Aggregated => "aggregated",
        }
    }
}

/// Picks a worker of `pools` (preferring `pools[first]`, skipping the ids in `exclude`) and sends;
/// retries other workers on retryable failures under the retry policy. `Err` is the client's response,
/// or the last failure. For a decode that reads its KV from the prefill worker, a 502 ends the dispatch at
/// once, without counting against the decode worker, so the caller can redo the prefill. Once `abandon`
/// fires (the client went away) a failure ends the dispatch without a retry or a count against the worker.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn dispatch(
    sh: &Shared,
    job: Target<'_>,
    pools: &[Arc<Pool>],
    first: usize,
    body: Bytes,
    phase: Phase,
    mut exclude: Vec<u64>,
    abandon: Option<&upstream::Abandon>,
) -> Result<Sent, Result<Response<RouterBody>, UpstreamFailure>> {
    let mut attempt = 1;
    loop {
        if abandon.is_some_and(upstream::Abandon::is_fired) {
            // The client left during a backoff: no new attempt.
            return Err(Err(UpstreamFailure::Connect));
        }
        let now = sh.registry.now_us();
        let Some((pool, w)) = pick_worker(pools, first, job.hashes, job.isl, &exclude, now) else {
            return Err(Err(UpstreamFailure::Status(503)));
        };
        count_pool_choice(sh, job.model, &pool);
        let ahead_tokens = w
            .in_flight_tokens
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut guard = LoadGuard::new(w.clone(), job.tokens);
        if pool.policy == pdx_router_core::Policy::Score && phase != Phase::Prefill {
            // The `score` policy balances decode work by tokens still to come.
            guard.track_output(job.tokens.saturating_sub(job.isl));
        }
        let sent_at = Instant::now();
        let sent = send_to_abandonable(sh, &w, job.path, &body, job.rid, job.auth, abandon).await;
        let failure = match sent {
            Ok(resp) => {
                let s = resp.status().as_u16();
                if resp.status().is_success() || !UpstreamFailure::Status(s).is_retryable() {
                    if !resp.status().is_success() {
                        w.report(true, sh.registry.now_us());
                    }
                    return Ok(Sent {
                        resp,
                        guard,
                        pool,
                        ahead_tokens,
                        sent_at,
                    });
                }
                // Retryable status: read the error body so the connection can be reused.
                let _ = resp.into_body().collect().await;
                if s == 502
                    && phase
                        == (Phase::Decode {
                            kv_from_prefill: true,
                        })
                {
                    w.report(true, sh.registry.now_us());
                    return Err(Err(UpstreamFailure::Status(s)));
                }
                UpstreamFailure::Status(s)
            }
            Err(f) => f,
        };
        drop(guard);
        if abandon.is_some_and(upstream::Abandon::is_fired) {
            return Err(Err(failure));
        }
        if failure.counts_against_worker() {
            w.report_failure(failure, sh.registry.now_us());
        }
        exclude.push(w.id);
        let left = eligible(pools, &exclude, sh.registry.now_us());
        tracing::debug!(worker = %w.url, ?failure, attempt, "attempt failed");
        if !retry_after(sh, phase.label(), attempt, failure, left).await {
            return Err(Err(failure));
        }
        attempt += 1;
    }
}

/// A worker of `pools` for a request of `isl` prompt tokens, trying `pools[first]` first and leaving out the
/// ids in `exclude`.
pub(crate) fn pick_worker(
    pools: &[Arc<Pool>],
    first: usize,
    hashes: &[u64],
    isl: u64,
    exclude: &[u64],
    now_us: u64,
) -> Option<(Arc<Pool>, Arc<Worker>)> {
    std::iter::once(first)
        .chain((0..pools.len()).filter(|&i| i != first))
        .filter_map(|i| pools.get(i))
        .find_map(|p| Some((p.clone(), p.pick(hashes, isl, exclude, now_us)?)))
}

/// Counts a pool choice (`pdx_pool_choices_total`).
pub(crate) fn count_pool_choice(sh: &Shared, model: &Label, pool: &Pool) {
    sh.metrics
        .pool_choices
        .get_or_create(&PoolLabels {
            model: model.clone(),
            role: pool.role.as_str(),
            pool: pool.name.clone(),
        })
        .inc();
}

/// Workers of `pools` that could take a request now, leaving out the ids in `exclude`.
pub(crate) fn eligible(pools: &[Arc<Pool>], exclude: &[u64], now_us: u64) -> usize {
    pools
        .iter()
        .map(|p| p.eligible_count(exclude, now_us))
        .sum()
}

/// After failed attempt number `attempt` (`left` workers still eligible), asks the retry policy; on a retry,
/// counts it under `phase` (`pdx_retries_total`) and sleeps the backoff. True to try again.
pub(crate) async fn retry_after(
    sh: &Shared,
    phase: &'static str,
    attempt: u32,
    failure: UpstreamFailure,
    left: usize,
) -> bool {
    match sh.cfg.retry.on_prefill_failure(attempt, failure, left) {
        PrefillDecision::Retry { backoff_us } => {
            sh.metrics
                .retries
                .get_or_create(&PhaseLabel { phase })
                .inc();
            monoio::time::sleep(std::time::Duration::from_micros(backoff_us)).await;
            true
        }
        _ => false,
    }
}

pub(crate) fn failure_response(f: UpstreamFailure) -> Response<RouterBody> {
    match f {
        UpstreamFailure::Timeout => {
            error_response(&ApiError::new(504, "GatewayTimeout", "upstream timed out"))
        }
        UpstreamFailure::Status(503) => error_response(&ApiError::unavailable("no healthy worker")),
        _ => error_response(&ApiError::unavailable("no worker could serve the request")),
    }
}

/// Wraps the chosen worker's response for the client (`pd`: observe the `decode_first_token` phase;
/// `admission`: the request's admission slot, given back at the first token event or the end; `decode_slot`:
/// its slot of the decode pool's admission, fed ITL samples and given back at the end). A 2xx
/// stream that may move ([`crate::migrate`]) keeps `job` to re-issue it from.
pub(crate) fn forward(
    sh: &Arc<Shared>,
    job: Job,
    sent: Sent,
    pd: bool,
    headers_at: Instant,
    admission: Option<crate::admission::Permit>,
    decode_slot: Option<crate::admission::Permit>,
) -> Response<RouterBody> {
    let Sent {
        resp, guard, pool, ..
    } = sent;
    let stream = job.body.is_stream() && resp.status().is_success();
    let start = job.start;
    let m = &sh.cfg.migration;
    let migration = (job.body.is_stream()
        && resp.status().is_success()
        && (m.max_moves > 0 || m.gap.is_some())
        && crate::migrate::movable(&job.body))
    .then(move || {
        let chat = matches!(job.body, crate::request::CompletionBody::Chat(_));
        let expected = crate::migrate::JobReissue::expected_tokens(&job);
        Box::new(crate::migrate::Migration::new(
            chat,
            expected,
            Box::new(crate::migrate::JobReissue::new(sh.clone(), job)),
            Some(sh.metrics.clone()),
        ))
    });
    // Counted with the answer's model label by the front ([`crate::front::count`]).
    let served = crate::front::Served {
        pool: pool.name.clone(),
        worker: guard.worker.clone(),
    };
    let worker_header = served.worker.url_header.clone();
    let (parts, incoming) = resp.into_parts();
    let mut out = Response::new(RouterBody::Forward(Box::new(Forward {
        body: Some(incoming),
        guard: Some(guard),
        stream,
        scanner: SseScanner::new(),
        stats: StreamStats {
            start,
            headers_at,
            first_event: None,
            last_event: None,
            events: 0,
            pd,
        },
        metrics: Some(sh.metrics.clone()),
        registry: Some(sh.registry.clone()),
        done: false,
        idle_timeout: Some(sh.cfg.stream_idle_timeout),
        idle_timer: None,
        progressed: false,
        migration,
        admission,
        decode_slot: decode_slot.map(|p| Box::new(crate::body::DecodeSlot::new(p))),
        served: Some(served),
    })));
    *out.status_mut() = parts.status;
    for h in [CONTENT_TYPE, hyper::header::CACHE_CONTROL] {
        if let Some(v) = parts.headers.get(&h) {
            out.headers_mut().insert(h, v.clone());
        }
    }
    // The worker that produced the answer (decode, or aggregated), by its URL, for clients such as
    // `pdx replay --export`; the engine's own `x-pdx-worker`, if any, is replaced.
    out.headers_mut().insert(X_PDX_WORKER, worker_header);
    out
}
