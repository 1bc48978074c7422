//! Request handling: routes, the OpenAI front, and the orchestrations.

use crate::body::{Forward, RouterBody, StreamStats};
use crate::config::{Config, OrchestrationKind};
use crate::metrics::{Metrics, PhaseLabel, PoolLabels};
use crate::registry::{LoadGuard, ModelTopo, Pool, Registry, Worker};
use crate::upstream::{self, ConnectError, SendError, UpBody};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use pdx_protocol::{ApiError, ChatCompletionRequest, CompletionRequest, KvTransferParams};
use pdx_router_core::{PrefillDecision, SseScanner, UpstreamFailure};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Instant;

/// State shared by every thread.
#[derive(Debug)]
pub struct Shared {
    /// Configuration.
    pub cfg: Config,
    /// Workers and pools.
    pub registry: Arc<Registry>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Graceful-shutdown state.
    pub drain: crate::shutdown::Drain,
    /// The models listed on `/v1/models` (refreshed by the control loop).
    pub models: crate::models::Catalog,
}

/// Request id header.
pub const REQUEST_ID: &str = "x-request-id";

/// Response header naming the worker that served a completion, by its URL (the decode, or the aggregated
/// worker); `pdx replay --export` reads it, and `pdx mock` sends its engine id in it.
pub const X_PDX_WORKER: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static("x-pdx-worker");

pub(crate) fn full(
    status: u16,
    ctype: &'static str,
    body: impl Into<Bytes>,
) -> Response<RouterBody> {
    let mut r = Response::new(RouterBody::Full(Some(body.into())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// The OpenAI error response for `e`. A 503 says when to come back (`Retry-After: 1`, seconds): the
/// conditions behind it (no worker up, none with room) are expected to clear within a health-check recheck.
pub fn error_response(e: &ApiError) -> Response<RouterBody> {
    let mut r = full(e.status, "application/json", e.to_json());
    if e.status == 503 {
        r.headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

thread_local! {
    static REQ_SEQ: Cell<u64> = const { Cell::new(0) };
}

fn new_request_id() -> HeaderValue {
    let n = REQ_SEQ.with(|c| {
        let v = c.get() + 1;
        c.set(v);
        v
    });
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let tid = std::thread::current().id();
    let h = pdx_tokens::mix64(t ^ n.rotate_left(32) ^ (format!("{tid:?}").len() as u64));
    HeaderValue::from_str(&format!("pdx-{h:016x}{n:x}")).expect("ascii")
}

/// Handles one request (never fails: errors are OpenAI error responses).
pub async fn handle(
    sh: Arc<Shared>,
    req: Request<Full<Bytes>>,
) -> Result<Response<RouterBody>, std::convert::Infallible> {
    let rid = match req.headers().get(REQUEST_ID) {
        Some(v) if !v.is_empty() && v.len() <= 256 => v.clone(),
        _ => new_request_id(),
    };
    let mut resp = route(&sh, req, &rid).await;
    resp.headers_mut().insert(REQUEST_ID, rid);
    Ok(resp)
}

async fn route(
    sh: &Arc<Shared>,
    req: Request<Full<Bytes>>,
    rid: &HeaderValue,
) -> Response<RouterBody> {
    let path = req.uri().path().to_string();
    let m = req.method().clone();
    if crate::front_auth::guards(&path) {
        if let Err(e) = crate::front_auth::authorize(&sh.cfg.api_keys, req.headers()) {
            let mut r = error_response(&e);
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
            if matches!(path.as_str(), "/v1/chat/completions" | "/v1/completions") {
                crate::front::count(sh, crate::models::OTHER.into(), &r);
            }
            return r;
        }
    }
    if let (Some(id), &Method::GET) = (path.strip_prefix("/v1/models/"), &m) {
        return crate::models::retrieve(sh, id);
    }
    match (path.as_str(), &m) {
        ("/health", &Method::GET) => full(200, "text/plain", Bytes::new()),
        ("/ready", &Method::GET) => ready(sh),
        ("/metrics", &Method::GET) => full(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            sh.metrics.encode(),
        ),
        ("/v1/models", &Method::GET) => crate::models::list(sh),
        ("/v1/chat/completions", &Method::POST) => completion(sh, req, rid, true).await,
        ("/v1/completions", &Method::POST) => completion(sh, req, rid, false).await,
        ("/v1/workers", &Method::GET | &Method::POST | &Method::DELETE) => {
            crate::admin::workers(sh, req).await
        }
        ("/v1/planner/diversions", _) => crate::divert::route(sh, req).await,
        ("/health" | "/ready" | "/metrics" | "/v1/models", _)
        | ("/v1/chat/completions" | "/v1/completions" | "/v1/workers", _) => error_response(
            &ApiError::method_not_allowed(format!("{m} not allowed on {path}")),
        ),
        _ => error_response(&ApiError::not_found(format!("no route {path}"))),
    }
}

fn ready(sh: &Shared) -> Response<RouterBody> {
    if sh.drain.is_draining() {
        return error_response(&ApiError::unavailable("shutting down"));
    }
    let now = sh.registry.now_us();
    let snap = sh.registry.snap.load();
    let any = |pools: &[Arc<Pool>]| pools.iter().any(|p| p.eligible_count(&[], now) > 0);
    let ok = snap.models.values().any(|m| {
        any(&m.aggregated) || (any(&m.decode) && (m.prefill.is_empty() || any(&m.prefill)))
    });
    if ok {
        full(200, "application/json", r#"{"status":"ready"}"#)
    } else {
        error_response(&ApiError::unavailable("no healthy worker"))
    }
}

async fn read_body(sh: &Shared, req: Request<Full<Bytes>>) -> Result<Bytes, ApiError> {
    let max = sh.cfg.max_body_bytes;
    let too_large = || {
        ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("body over {max} bytes"),
        )
    };
    if let Some(len) = req.headers().get(CONTENT_LENGTH) {
        if len
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|n| n > max as u64)
        {
            return Err(too_large());
        }
    }
    match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(format!("cannot read body: {e}"))),
    }
}

/// A parsed completion request (chat or text).
#[derive(Debug, Clone)]
pub enum CompletionBody {
    /// `/v1/chat/completions`.
    Chat(ChatCompletionRequest),
    /// `/v1/completions`.
    Text(CompletionRequest),
}

impl CompletionBody {
    fn model(&self) -> Option<&str> {
        match self {
            Self::Chat(r) => r.model.as_deref(),
            Self::Text(r) => r.model.as_deref(),
        }
    }
    fn is_stream(&self) -> bool {
        match self {
            Self::Chat(r) => r.is_stream(),
            Self::Text(r) => r.is_stream(),
        }
    }
    fn extra_mut(&mut self) -> &mut pdx_protocol::Extra {
        match self {
            Self::Chat(r) => &mut r.extra,
            Self::Text(r) => &mut r.extra,
        }
    }
    fn output_limit(&self) -> u64 {
        u64::from(match self {
            Self::Chat(r) => r.output_limit().unwrap_or(16),
            Self::Text(r) => r.max_tokens.unwrap_or(16),
        })
    }
    pub(crate) fn set_kv(&mut self, p: Option<KvTransferParams>) {
        match self {
            Self::Chat(r) => r.kv_transfer_params = p,
            Self::Text(r) => r.kv_transfer_params = p,
        }
    }
    /// Sets the SGLang bootstrap fields; `Default` removes them (only the router pairs workers: a client's
    /// `bootstrap_room` would make engines wait for a KV handoff nobody set up).
    pub(crate) fn set_bootstrap(&mut self, b: pdx_protocol::BootstrapParams) {
        match self {
            Self::Chat(r) => r.bootstrap = b,
            Self::Text(r) => r.bootstrap = b,
        }
    }
    /// Prompt token ids under the mock's built-in tokenizer and chat template.
    fn tokens(&self) -> Vec<u32> {
        let t = pdx_tokens::Tokenizer::Builtin;
        match self {
            Self::Chat(r) => t.chat_prompt(&r.messages).unwrap_or_default(),
            Self::Text(r) => match &r.prompt {
                pdx_protocol::Prompt::Text(s) => {
                    let mut v = Vec::new();
                    let _ = t.encode(s, &mut v);
                    v
                }
                pdx_protocol::Prompt::Tokens(v) => v.clone(),
                pdx_protocol::Prompt::Texts(ss) => {
                    let mut v = Vec::new();
                    for s in ss {
                        let _ = t.encode(s, &mut v);
                    }
                    v
                }
                pdx_protocol::Prompt::TokenBatches(b) => b.concat(),
            },
        }
    }
    /// The prefill request of the vLLM NixlConnector flow (vLLM `toy_proxy_server.py`).
    pub(crate) fn prefill_bytes(&self) -> Bytes {
        let mut kv = KvTransferParams::for_prefill();
        for k in [
            "remote_engine_id",
            "remote_block_ids",
            "remote_host",
            "remote_port",
        ] {
            kv.extra.insert(k.into(), serde_json::Value::Null);
        }
        let v = match self.clone() {
            Self::Chat(mut r) => {
                r.stream = Some(false);
                r.stream_options = None;
                r.max_tokens = Some(1);
                if r.max_completion_tokens.is_some() {
                    r.max_completion_tokens = Some(1);
                }
                r.min_tokens = None;
                r.kv_transfer_params = Some(kv);
                serde_json::to_vec(&r)
            }
            Self::Text(mut r) => {
                r.stream = Some(false);
                r.stream_options = None;
                r.max_tokens = Some(1);
                r.min_tokens = None;
                r.kv_transfer_params = Some(kv);
                serde_json::to_vec(&r)
            }
        };
        Bytes::from(v.unwrap_or_default())
    }
    pub(crate) fn to_bytes(&self) -> Bytes {
        Bytes::from(
            match self {
                Self::Chat(r) => serde_json::to_vec(r),
                Self::Text(r) => serde_json::to_vec(r),
            }
            .unwrap_or_default(),
        )
    }
}

/// SLO targets read from the body: top-level `ttft_target_ms` / `itl_target_ms`, or the same
/// names inside Dynamo's `nvext` object. They (and `nvext`) are removed before forwarding.
fn take_slo(body: &mut CompletionBody) -> Result<(Option<f64>, Option<f64>), ApiError> {
    let extra = body.extra_mut();
    let nvext = extra.remove("nvext");
    let mut get = |k: &str| -> Result<Option<f64>, ApiError> {
        let v = extra
            .remove(k)
            .or_else(|| nvext.as_ref().and_then(|n| n.get(k)).cloned());
        match v {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .map(Some)
                .ok_or_else(|| {
                    ApiError::invalid_param(k, format!("{k} must be a non-negative number"))
                }),
        }
    };
    Ok((get("ttft_target_ms")?, get("itl_target_ms")?))
}

/// One client request on its way through the orchestration.
#[derive(Debug)]
pub struct Job {
    /// Model topology.
    pub model: Arc<ModelTopo>,
    /// Parsed body (client `kv_transfer_params` removed).
    pub body: CompletionBody,
    /// Upstream path.
    pub path: &'static str,
    /// Request id.
    pub rid: HeaderValue,
    /// The client's `Authorization`, sent upstream to workers without their own key
    /// ([`crate::front_auth::upstream`]).
    pub auth: Option<HeaderValue>,
    /// Prompt block hashes (`kv_aware` pools only).
    pub hashes: Vec<u64>,
    /// Prompt tokens (tokenized when a grid or `kv_aware` needs them, else bytes / 4).
    pub isl: u64,
    /// Prompt + output limit, tokens (load accounting).
    pub tokens: u64,
    /// TTFT target, ms.
    pub ttft_ms: Option<f64>,
    /// ITL target, ms.
    pub itl_ms: Option<f64>,
    /// Arrival.
    pub start: Instant,
}

/// A completion request; every answer is counted in `pdx_requests_total` ([`crate::front::count`]).
async fn completion(
    sh: &Arc<Shared>,
    req: Request<Full<Bytes>>,
    rid: &HeaderValue,
    chat: bool,
) -> Response<RouterBody> {
    let mut label = None;
    let resp = run_completion(sh, req, rid, chat, &mut label).await;
    let label = label.unwrap_or_else(|| crate::models::OTHER.to_string());
    crate::front::count(sh, label, &resp);
    resp
}

/// [`completion`]; sets `label` to the request's model label once the body is parsed.
async fn run_completion(
    sh: &Arc<Shared>,
    req: Request<Full<Bytes>>,
    rid: &HeaderValue,
    chat: bool,
    label: &mut Option<String>,
) -> Response<RouterBody> {
    let start = Instant::now();
    let auth = req.headers().get(hyper::header::AUTHORIZATION).cloned();
    let raw = match read_body(sh, req).await {
        Ok(b) => b,
        Err(e) => return error_response(&e),
    };
    // Parsed and validated once here, as vLLM's server does it (`pdx_protocol::sampling`), so a bad request
    // costs no worker anything (not a prefill, then a decode's 400). What an engine may or may not support
    // (tool parsers, structured outputs) is left to the engine.
    let parsed = if chat {
        pdx_protocol::sampling::parse_chat(&raw).map(|(r, _)| CompletionBody::Chat(r))
    } else {
        pdx_protocol::sampling::parse_completion(&raw).map(|(r, _)| CompletionBody::Text(r))
    };
    let mut body = match parsed {
        Ok(b) => b,
        Err(e) => {
            // Counted under the model the client named, when the body says (a second parse, on errors only).
            #[derive(serde::Deserialize)]
            struct Named {
                model: Option<String>,
            }
            let named = serde_json::from_slice::<Named>(&raw)
                .ok()
                .and_then(|n| n.model);
            *label = Some(sh.models.label(&sh.registry.snap.load(), named.as_deref()));
            return error_response(&e);
        }
    };
    *label = Some(sh.models.label(&sh.registry.snap.load(), body.model()));
    let (ttft_ms, itl_ms) = match take_slo(&mut body) {
        Ok(t) => t,
        Err(e) => return error_response(&e),
    };
    // Client-supplied transfer and pairing fields are the router's to set, under every orchestration.
    body.set_kv(None);
    body.set_bootstrap(Default::default());
    let snap = sh.registry.snap.load();
    let Some(model) = snap.model(body.model()).cloned() else {
        if !crate::front::has_workers(&snap) {
            return error_response(&crate::front::no_workers());
        }
        return error_response(&ApiError::not_found(format!(
            "the model `{}` does not exist",
            body.model().unwrap_or("")
        )));
    };
    let need_hashes = model.needs_hashes();
    let (isl, hashes) = if need_hashes || model.grid.is_some() {
        let toks = body.tokens();
        let h = if need_hashes {
            pdx_tokens::block_hashes(&toks, model.block_size)
        } else {
            Vec::new()
        };
        (toks.len() as u64, h)
    } else {
        (raw.len() as u64 / 4, Vec::new())
    };
    let tokens = isl + body.output_limit();
    let job = Job {
        model,
        body,
        path: if chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        },
        rid: rid.clone(),
        auth,
        hashes,
        isl,
        tokens,
        ttft_ms,
        itl_ms,
        start,
    };
    // Models without decode pools are served by their aggregated pools under every orchestration.
    let pd = !job.model.decode.is_empty();
    match sh.cfg.orchestration {
        OrchestrationKind::VllmNixl if pd => VllmNixl.run(sh, job).await,
        // Boxed: its two upstream requests in flight at once make a large future, which would otherwise
        // size every request's routing future under every orchestration.
        OrchestrationKind::SglangBootstrap if pd => {
            Box::pin(crate::bootstrap::SglangBootstrap.run(sh, job)).await
        }
        _ => Aggregated.run(sh, job).await,
    }
}

/// How one request is spread over workers. Implementations: [`VllmNixl`] (prefill then
/// decode with NixlConnector `kv_transfer_params`), [`crate::bootstrap::SglangBootstrap`]
/// (prefill and decode at once with SGLang's `bootstrap_host/port/room`) and [`Aggregated`].
/// KsanaLLM's communication-id flow fits the same shape.
#[allow(async_fn_in_trait)]
pub trait Orchestrator {
    /// Runs the request and returns the client's response.
    async fn run(&self, sh: &Arc<Shared>, job: Job) -> Response<RouterBody>;
}

/// Aggregated workers only.
#[derive(Debug, Clone, Copy)]
pub struct Aggregated;

/// vLLM NixlConnector prefill → decode.
#[derive(Debug, Clone, Copy)]
pub struct VllmNixl;

/// A sent request with its response headers (the body owns the connection).
pub(crate) struct Sent {
    /// Response head; the body reads from the connection.
    pub(crate) resp: Response<UpBody>,
    /// In-flight accounting on the worker.
    pub(crate) guard: LoadGuard,
    /// The worker's pool (metrics).
    pub(crate) pool: Arc<Pool>,
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
    let timeout = sh.cfg.upstream_timeout;
    let auth = crate::front_auth::upstream(w, client_auth);
    let all: [(&str, &[u8]); 4] = [
        ("host", w.authority.as_bytes()),
        ("content-type", b"application/json"),
        (REQUEST_ID, rid.as_bytes()),
        ("authorization", auth.map_or(&[][..], HeaderValue::as_bytes)),
    ];
    let headers = &all[..if auth.is_some() { 4 } else { 3 }];
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
    pub(crate) model: &'a str,
    /// Prompt block hashes (`kv_aware`).
    pub(crate) hashes: &'a [u64],
    /// Load accounting, tokens.
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
        let Some((pool, w)) = pick_worker(pools, first, job.hashes, &exclude, now) else {
            return Err(Err(UpstreamFailure::Status(503)));
        };
        count_pool_choice(sh, job.model, &pool);
        let guard = LoadGuard::new(w.clone(), job.tokens);
        let sent = send_to_abandonable(sh, &w, job.path, &body, job.rid, job.auth, abandon).await;
        let failure = match sent {
            Ok(resp) => {
                let s = resp.status().as_u16();
                if resp.status().is_success() || !UpstreamFailure::Status(s).is_retryable() {
                    if !resp.status().is_success() {
                        w.report(true, sh.registry.now_us());
                    }
                    return Ok(Sent { resp, guard, pool });
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

/// A worker of `pools` for a request, trying `pools[first]` first and leaving out the ids in `exclude`.
pub(crate) fn pick_worker(
    pools: &[Arc<Pool>],
    first: usize,
    hashes: &[u64],
    exclude: &[u64],
    now_us: u64,
) -> Option<(Arc<Pool>, Arc<Worker>)> {
    std::iter::once(first)
        .chain((0..pools.len()).filter(|&i| i != first))
        .filter_map(|i| pools.get(i))
        .find_map(|p| Some((p.clone(), p.pick(hashes, exclude, now_us)?)))
}

/// Counts a pool choice (`pdx_pool_choices_total`).
pub(crate) fn count_pool_choice(sh: &Shared, model: &str, pool: &Pool) {
    sh.metrics
        .pool_choices
        .get_or_create(&PoolLabels {
            model: model.to_string(),
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

/// Wraps the chosen worker's response for the client (`pd`: observe the `decode_first_token` phase).
pub(crate) fn forward(
    sh: &Arc<Shared>,
    job: &Job,
    sent: Sent,
    pd: bool,
    headers_at: Instant,
) -> Response<RouterBody> {
    let Sent { resp, guard, pool } = sent;
    // Counted with the answer's model label by the front ([`crate::front::count`]).
    let served = crate::front::Served {
        pool: pool.name.clone(),
        worker: guard.worker.clone(),
    };
    let stream = job.body.is_stream() && resp.status().is_success();
    let (parts, incoming) = resp.into_parts();
    let mut out = Response::new(RouterBody::Forward(Box::new(Forward {
        body: incoming,
        guard: Some(guard),
        stream,
        scanner: SseScanner::new(),
        stats: StreamStats {
            start: job.start,
            headers_at,
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
    })));
    *out.status_mut() = parts.status;
    for h in [CONTENT_TYPE, hyper::header::CACHE_CONTROL] {
        if let Some(v) = parts.headers.get(&h) {
            out.headers_mut().insert(h, v.clone());
        }
    }
    // The worker that produced the answer (decode, or aggregated), by its URL, for clients such as
    // `pdx replay --export`; the engine's own `x-pdx-worker`, if any, is replaced.
    out.headers_mut()
        .insert(X_PDX_WORKER, served.worker.url_header.clone());
    out.extensions_mut().insert(served);
    out
}

impl Orchestrator for Aggregated {
    async fn run(&self, sh: &Arc<Shared>, job: Job) -> Response<RouterBody> {
        let pools = &job.model.aggregated;
        if pools.is_empty() {
            return error_response(&ApiError::unavailable("no aggregated pool for this model"));
        }
        let body = job.body.to_bytes();
        let t = job.target();
        let first = crate::divert::apply(sh, &job.model, pools, 0);
        match dispatch(
            sh,
            t,
            pools,
            first,
            body,
            Phase::Aggregated,
            Vec::new(),
            None,
        )
        .await
        {
            Ok(sent) => forward(sh, &job, sent, false, Instant::now()),
            Err(Ok(r)) => r,
            Err(Err(f)) => failure_response(f),
        }
    }
}

impl Orchestrator for VllmNixl {
    async fn run(&self, sh: &Arc<Shared>, mut job: Job) -> Response<RouterBody> {
        let grid = job.model.grid.as_ref();
        let first = crate::divert::apply(
            sh,
            &job.model,
            &job.model.decode,
            grid.map_or(0, |g| g.select_decode_pool(job.isl, job.itl_ms)),
        );
        let prefill_first = crate::divert::apply(
            sh,
            &job.model,
            &job.model.prefill,
            grid.map_or(0, |g| g.select_prefill_pool(job.isl, job.ttft_ms)),
        );
        let decode = job.model.decode.clone();
        // No prefill without a decode worker to take its KV: the blocks would wait for a decode that
        // cannot come (until the engine's own timeout, 480 s in vLLM).
        if eligible(&decode, &[], sh.registry.now_us()) == 0 {
            return error_response(&ApiError::unavailable(
                "no decode worker can take a request now",
            ));
        }
        // Prefill workers whose KV the decode could not read (a 502 from the decode): the pair is redone
        // on another prefill worker, within the prefill attempts.
        let mut failed_prefill: Vec<u64> = Vec::new();
        loop {
            // `lease`: the prefill worker holds the KV for this request until a decode takes it; dropped
            // untaken (the client went away, no decode would take the request), it is released.
            let prefilled = match crate::handoff::prefill(
                sh,
                &job,
                &failed_prefill,
                prefill_first,
                first,
            )
            .await
            {
                Ok(p) => p,
                Err(r) => return r,
            };
            let handoff = Instant::now();
            let (kv, mut lease) = match prefilled {
                Some((kv, lease)) => (Some(kv), Some(lease)),
                None => (None, None),
            };
            let holder = lease.as_ref().map(|l| l.holder().clone());
            job.body.set_kv(kv);
            let phase = Phase::Decode {
                kv_from_prefill: holder.is_some(),
            };
            let body = job.body.to_bytes();
            let t = job.target();
            let failure = match dispatch(sh, t, &decode, first, body, phase, Vec::new(), None).await
            {
                Ok(sent) => {
                    let now = Instant::now();
                    if sent.resp.status().is_success() {
                        // The decode engine has the request: it reads the KV (the prefill frees it on
                        // the read's notification), or, aborted, notifies the prefill itself.
                        if let Some(l) = lease.take() {
                            l.taken();
                        }
                    }
                    if holder.is_some() {
                        sh.metrics
                            .phase
                            .get_or_create(&PhaseLabel {
                                phase: "kv_handoff",
                            })
                            .observe((now - handoff).as_secs_f64());
                    }
                    return forward(sh, &job, sent, holder.is_some(), now);
                }
                Err(Ok(r)) => return r,
                Err(Err(f)) => f,
            };
            let Some(w) = holder.filter(|_| failure == UpstreamFailure::Status(502)) else {
                return failure_response(failure);
            };
            // The decode could not read the KV: the prefill worker lost it (or died); nothing to release.
            if let Some(l) = lease.take() {
                l.taken();
            }
            w.report(false, sh.registry.now_us());
            failed_prefill.push(w.id);
            let left = eligible(&job.model.prefill, &failed_prefill, sh.registry.now_us());
            let attempt = failed_prefill.len() as u32;
            tracing::debug!(prefill = %w.url, attempt, "decode could not read the KV: prefill again");
            if !retry_after(sh, "kv_handoff", attempt, failure, left).await {
                return error_response(&ApiError::new(
                    502,
                    "KVTransferError",
                    "the decode could not read the prompt's KV from any prefill worker",
                ));
            }
        }
    }
}
