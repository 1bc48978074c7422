//! KsanaLLM orchestration (`orchestration = "ksana"`), as KsanaLLM's `simple_router` runs it
//! (`generate.py`): one prefill and one decode node of a ready pair ([`crate::ksana`]) get the client's
//! body at once, with `kv-comm-group-key: <prefill inference_addr>__<decode inference_addr>` and
//! `kv-comm-request-id: <id>` (a new positive 31-bit integer per attempt, as the peer's CRC-based ids); the
//! decode node reads the prompt's KV from the prefill node over the pair's communicator.
//!
//! The pair: the prefill node by its pool's local policy among prefill nodes with an eligible ready
//! partner, then the decode node by its pool's policy among that node's ready partners (health checks,
//! breakers, load and drain apply as to any worker). Both requests are polled together until both response
//! heads are in (2xx) or one side failed; a failure before that drops the other side's request (its
//! connection closes, so the node frees the request) and the pair is tried again, with a new request id,
//! under the retry rules (`--prefill-attempts`, backoff). A 4xx other than 429 is the client's answer.
//!
//! Then the answer:
//! * not streamed (the decode's body has a length): the decode's body, as the peer returns it; the
//!   prefill's answer is read to its end in the background and dropped;
//! * `/generate` streamed: KsanaLLM's `\0`-delimited token stream merged as the peer merges it: the
//!   prefill's first token (up to and including its first `\0`), then the decode's bytes as they come, then
//!   `[DONE]\0`. As in the peer, the prefill's token is left out when a decode token comes first. The body is
//!   `application/octet-stream`;
//! * OpenAI streams (`/v1/*`, `/v2/*`): the decode's SSE stream as it is (the peer appends `[DONE]\0` to these
//!   too, which no SSE client reads; pdx does not).
//!
//! While a stream runs the prefill's answer is watched: a prefill node whose connection breaks before the
//! decode produced a byte (the decode cannot get the KV) ends the stream at once with an error (an SSE error
//! event, or `{"error":{…}}\0` on `/generate`, and no `[DONE]`), instead of leaving the client to wait for a
//! decode that cannot finish. A decode that breaks mid-stream ends it the same way.

use super::{count_pool_choice, retry_after, send_with, Orchestrator};
use crate::api::{error_response, full, Shared, X_PDX_WORKER};
use crate::body::{Forward, RouterBody, StreamStats};
use crate::ksana::Pairs;
use crate::registry::{LoadGuard, Pool, Worker, KSANA_DECODE_POOL, KSANA_PREFILL_POOL};
use crate::request::Job;
use crate::upstream::UpBody;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response};
use pdx_protocol::ApiError;
use pdx_router_core::{SseScanner, UpstreamFailure};
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// The token delimiter of KsanaLLM's `/generate` stream.
pub const DELIM: u8 = 0;
/// The end of a merged `/generate` stream (the peer's `EOS + DELIM`).
pub const EOS: &[u8] = b"[DONE]\0";
/// Longest first token kept from the prefill's stream, bytes (a token is one JSON chunk; beyond this the
/// bytes so far are sent as they are).
pub const MAX_FIRST: usize = 64 * 1024;
/// The last part of a `/generate` stream whose prefill node failed before the decode produced a token.
pub const GENERATE_PREFILL_FAILED: &[u8] = b"{\"error\":{\"message\":\"the prefill node failed before the decode produced a token\",\"type\":\"UpstreamError\",\"param\":null,\"code\":502}}\0";
/// The SSE event of the same failure on an OpenAI stream.
pub const SSE_PREFILL_FAILED: &[u8] = b"data: {\"error\":{\"message\":\"the prefill node failed before the decode produced a token\",\"type\":\"UpstreamError\",\"param\":null,\"code\":502}}\n\n";
/// The last part of a `/generate` stream whose decode node failed mid-stream (or went silent past the stream
/// idle timeout).
pub const GENERATE_DECODE_FAILED: &[u8] = b"{\"error\":{\"message\":\"upstream stream failed\",\"type\":\"UpstreamError\",\"param\":null,\"code\":502}}\0";

/// KsanaLLM prefill ∥ decode with `kv-comm-*` headers.
#[derive(Debug, Clone, Copy)]
pub struct Ksana;

impl Orchestrator for Ksana {
    async fn run(&self, sh: &Arc<Shared>, job: Job) -> Response<RouterBody> {
        let body = job.body.to_bytes();
        let k = KJob {
            path: job.path,
            body,
            rid: &job.rid,
            auth: job.auth.as_ref(),
            hashes: &job.hashes,
            tokens: job.tokens,
            merge: false,
            model: &job.model.name,
            start: job.start,
        };
        run(sh, &k).await
    }
}

/// One request on its way to a pair.
#[derive(Debug)]
pub(crate) struct KJob<'a> {
    /// Upstream path (the client's).
    pub(crate) path: &'a str,
    /// The body both nodes get.
    pub(crate) body: Bytes,
    /// `x-request-id`.
    pub(crate) rid: &'a HeaderValue,
    /// The client's `Authorization`.
    pub(crate) auth: Option<&'a HeaderValue>,
    /// Prompt block hashes (`kv_aware` pools).
    pub(crate) hashes: &'a [u64],
    /// Load accounting, tokens.
    pub(crate) tokens: u64,
    /// `/generate`: merge the token streams.
    pub(crate) merge: bool,
    /// Model name (metrics).
    pub(crate) model: &'a crate::metrics::Label,
    /// Arrival.
    pub(crate) start: Instant,
}

thread_local! {
    static SEQ: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A `kv-comm-request-id`: a positive integer below 2^31, as the peer's (CRC-32 of pid and a counter, masked
/// to 31 bits, never 0): here splitmix64 of a per-thread random seed and a counter.
pub fn new_comm_id() -> u32 {
    let n = SEQ.with(|c| {
        let v = c.get().wrapping_add(1);
        c.set(v);
        v
    });
    let r = pdx_tokens::mix64(super::sglang::new_room() ^ n);
    ((r % 0x7FFF_FFFF) + 1) as u32
}

/// A prefill node with a ready partner among the eligible decode nodes not in `d_ex`, by the prefill pool's
/// policy, then one of its ready partners by the decode pool's policy.
fn pick_pair(
    pp: &Pool,
    dp: &Pool,
    pairs: &Pairs,
    (hashes, prompt_tokens): (&[u64], u64),
    (p_ex, d_ex): (&[u64], &[u64]),
    now: u64,
) -> Option<(Arc<Worker>, Arc<Worker>)> {
    let decodes = dp.workers.load();
    let prefills = pp.workers.load();
    let usable: HashSet<&str> = decodes
        .iter()
        .filter(|w| !d_ex.contains(&w.id) && w.eligible(now))
        .map(|w| w.authority.as_str())
        .collect();
    let mut ex = p_ex.to_vec();
    ex.extend(
        prefills
            .iter()
            .filter(|w| {
                !pairs
                    .decodes
                    .get(&w.authority)
                    .is_some_and(|ds| ds.iter().any(|d| usable.contains(d.as_str())))
            })
            .map(|w| w.id),
    );
    let wp = pp.pick(hashes, prompt_tokens, &ex, now)?;
    let mut ex = d_ex.to_vec();
    ex.extend(
        decodes
            .iter()
            .filter(|w| !pairs.paired(&wp.authority, &w.authority))
            .map(|w| w.id),
    );
    let wd = dp.pick(hashes, prompt_tokens, &ex, now)?;
    Some((wp, wd))
}

/// The prefill node's answer, read as it comes: its first token kept (`/generate`), the rest dropped.
pub(crate) struct PrefillWatch {
    body: UpBody,
    /// The prefill node's in-flight accounting, released when its answer ends.
    guard: Option<LoadGuard>,
    buf: BytesMut,
    first: Option<Bytes>,
    captured: bool,
    ended: bool,
    registry: Arc<crate::registry::Registry>,
}

impl PrefillWatch {
    fn new(
        body: UpBody,
        guard: LoadGuard,
        capture: bool,
        reg: Arc<crate::registry::Registry>,
    ) -> Self {
        PrefillWatch {
            body,
            guard: Some(guard),
            buf: BytesMut::new(),
            first: None,
            captured: !capture,
            ended: false,
            registry: reg,
        }
    }

    fn keep(&mut self, mut d: &[u8]) {
        if self.captured {
            return;
        }
        if self.buf.is_empty() {
            // Empty parts (a leading `\0`) are skipped, as the peer's split does.
            while d.first() == Some(&DELIM) {
                d = &d[1..];
            }
        }
        match d.iter().position(|&b| b == DELIM) {
            Some(i) => {
                self.buf.extend_from_slice(&d[..=i]);
                self.captured = true;
            }
            None => self.buf.extend_from_slice(d),
        }
        if self.buf.len() >= MAX_FIRST {
            self.captured = true;
        }
        if self.captured && !self.buf.is_empty() {
            self.first = Some(self.buf.split().freeze());
        }
    }

    /// Reads what the prefill node sent: `Ready(Ok)` at its end (the node is reported answering), `Ready(Err)`
    /// when its connection broke (reported failed), `Pending` otherwise.
    fn poll_progress(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UpstreamFailure>> {
        if self.ended {
            return Poll::Ready(Ok(()));
        }
        loop {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(f))) => {
                    if let Some(d) = f.data_ref() {
                        self.keep(d);
                    }
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    if !self.captured && !self.buf.is_empty() {
                        self.first = Some(self.buf.split().freeze());
                    }
                    self.captured = true;
                    if let Some(g) = self.guard.take() {
                        g.worker.report(true, self.registry.now_us());
                    }
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Some(Err(_))) => {
                    self.ended = true;
                    if let Some(g) = self.guard.take() {
                        g.worker
                            .report_failure(UpstreamFailure::Connect, self.registry.now_us());
                    }
                    return Poll::Ready(Err(UpstreamFailure::Connect));
                }
            }
        }
    }

    /// Reads the rest of the answer, for at most `limit`, and drops it.
    async fn finish(mut self, limit: std::time::Duration) {
        let _ =
            monoio::time::timeout(limit, std::future::poll_fn(|cx| self.poll_progress(cx))).await;
    }
}

/// How one pair ended before the client saw a byte.
enum PairEnd {
    /// Both heads 2xx.
    Committed {
        prefill: Box<PrefillWatch>,
        decode: Response<UpBody>,
    },
    /// The prefill failed (connect, timeout, 429/5xx, its answer broke before the decode's head).
    PrefillFailed(UpstreamFailure),
    /// The prefill answered another 4xx: the client's answer.
    PrefillFatal(Response<UpBody>),
    /// The decode failed (connect, timeout, 429/5xx).
    DecodeFailed(UpstreamFailure),
    /// The decode answered another 4xx: the client's answer.
    DecodeFatal(Response<UpBody>),
}

/// Sends to both nodes at once and polls both until both heads are in or a side failed.
async fn pair(
    sh: &Shared,
    job: &KJob<'_>,
    (wp, wd): (&Arc<Worker>, &Arc<Worker>),
    p_guard: LoadGuard,
    group_key: &str,
    comm_id: &str,
) -> PairEnd {
    let extra: [(&str, &[u8]); 2] = [
        ("kv-comm-group-key", group_key.as_bytes()),
        ("kv-comm-request-id", comm_id.as_bytes()),
    ];
    let mut pf = std::pin::pin!(send_with(
        sh, wp, job.path, &job.body, job.rid, job.auth, &extra, None
    ));
    let mut df = std::pin::pin!(send_with(
        sh, wd, job.path, &job.body, job.rid, job.auth, &extra, None
    ));
    let mut p_guard = Some(p_guard);
    let mut watch: Option<PrefillWatch> = None;
    let mut p_end: Option<PairEnd> = None;
    let mut d: Option<Result<Response<UpBody>, UpstreamFailure>> = None;
    std::future::poll_fn(|cx| {
        if watch.is_none() && p_end.is_none() {
            if let Poll::Ready(r) = pf.as_mut().poll(cx) {
                match r {
                    Ok(resp) if resp.status().is_success() => {
                        // The prefill's accounting moves into the watch (this arm runs once: the future is
                        // not polled again).
                        if let Some(g) = p_guard.take() {
                            let reg = sh.registry.clone();
                            watch = Some(PrefillWatch::new(resp.into_body(), g, job.merge, reg));
                        }
                    }
                    Ok(resp) => {
                        let s = resp.status().as_u16();
                        p_end = Some(if UpstreamFailure::Status(s).is_retryable() {
                            PairEnd::PrefillFailed(UpstreamFailure::Status(s))
                        } else {
                            PairEnd::PrefillFatal(resp)
                        });
                    }
                    Err(f) => p_end = Some(PairEnd::PrefillFailed(f)),
                }
            }
        }
        // The prefill's answer is read while the decode's head is awaited: a prefill that breaks first is a
        // prefill failure, not a decode that hangs.
        if let Some(w) = watch.as_mut() {
            if let Poll::Ready(Err(f)) = w.poll_progress(cx) {
                p_end = Some(PairEnd::PrefillFailed(f));
            }
        }
        if d.is_none() {
            if let Poll::Ready(r) = df.as_mut().poll(cx) {
                d = Some(r);
            }
        }
        let decode_done = match &d {
            Some(Ok(r)) => !r.status().is_success() || watch.is_some(),
            Some(Err(_)) => true,
            None => false,
        };
        if p_end.is_some() || decode_done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    // A prefill failure is judged first: a decode waiting for its KV would fail on it too.
    if let Some(e) = p_end {
        return e;
    }
    match d {
        Some(Err(f)) => PairEnd::DecodeFailed(f),
        Some(Ok(r)) if !r.status().is_success() => {
            let s = r.status().as_u16();
            if UpstreamFailure::Status(s).is_retryable() {
                PairEnd::DecodeFailed(UpstreamFailure::Status(s))
            } else {
                PairEnd::DecodeFatal(r)
            }
        }
        Some(Ok(decode)) => match watch {
            Some(prefill) => PairEnd::Committed {
                prefill: Box::new(prefill),
                decode,
            },
            None => PairEnd::PrefillFailed(UpstreamFailure::Connect),
        },
        None => PairEnd::DecodeFailed(UpstreamFailure::Connect),
    }
}

/// The answer once no pair is left to try.
fn give_up(last: Option<(UpstreamFailure, &str)>) -> Response<RouterBody> {
    match last {
        Some((UpstreamFailure::Timeout, _)) => super::failure_response(UpstreamFailure::Timeout),
        Some((_, side)) => error_response(&ApiError::unavailable(format!(
            "the {side} node failed on every ready KsanaLLM pair tried"
        ))),
        None => error_response(&ApiError::unavailable(
            "no ready KsanaLLM prefill/decode pair: nodes register with POST /RegisterNode and heartbeat, \
             and a rank-0 prefill node registers a comm id for each decode group",
        )),
    }
}

/// Runs `job` on ready pairs until one answers or the retry rules give up.
pub(crate) async fn run(sh: &Arc<Shared>, job: &KJob<'_>) -> Response<RouterBody> {
    let Some(k) = sh.ksana.clone() else {
        return error_response(&ApiError::unavailable("the KsanaLLM node registry is off"));
    };
    let snap = sh.registry.snap.load();
    let pool = |list: Option<&Vec<Arc<Pool>>>, name: &str| {
        list.and_then(|l| l.iter().find(|p| p.name == name).cloned())
    };
    let topo = snap.models.get("*");
    let (Some(pp), Some(dp)) = (
        pool(topo.map(|m| &m.prefill), KSANA_PREFILL_POOL),
        pool(topo.map(|m| &m.decode), KSANA_DECODE_POOL),
    ) else {
        return give_up(None);
    };
    drop(snap);
    let mut p_ex: Vec<u64> = Vec::new();
    let mut d_ex: Vec<u64> = Vec::new();
    let mut last: Option<(UpstreamFailure, &str)> = None;
    let mut attempt = 1;
    loop {
        let pairs = k.pairs.load();
        let now = sh.registry.now_us();
        let Some((wp, wd)) = pick_pair(
            &pp,
            &dp,
            &pairs,
            (job.hashes, job.tokens),
            (&p_ex, &d_ex),
            now,
        ) else {
            return give_up(last);
        };
        count_pool_choice(sh, job.model, &pp);
        count_pool_choice(sh, job.model, &dp);
        let key = pairs.group_key(&wp.authority, &wd.authority);
        drop(pairs);
        let comm = new_comm_id().to_string();
        let p_guard = LoadGuard::new(wp.clone(), job.tokens);
        let d_guard = LoadGuard::new(wd.clone(), job.tokens);
        let (failure, side) = match pair(sh, job, (&wp, &wd), p_guard, &key, &comm).await {
            PairEnd::Committed { prefill, decode } => {
                return answer(sh, job, prefill, decode, d_guard, &dp);
            }
            PairEnd::PrefillFatal(r) => {
                wp.report(true, sh.registry.now_us());
                return collected(sh, r).await;
            }
            PairEnd::DecodeFatal(r) => {
                wd.report(true, sh.registry.now_us());
                return collected(sh, r).await;
            }
            PairEnd::PrefillFailed(f) => {
                if f.counts_against_worker() {
                    wp.report_failure(f, sh.registry.now_us());
                }
                p_ex.push(wp.id);
                (f, "prefill")
            }
            PairEnd::DecodeFailed(f) => {
                if f.counts_against_worker() {
                    wd.report_failure(f, sh.registry.now_us());
                }
                d_ex.push(wd.id);
                (f, "decode")
            }
        };
        drop(d_guard);
        last = Some((failure, side));
        let left = {
            let pairs = k.pairs.load();
            usize::from(pick_possible(
                &pp,
                &dp,
                &pairs,
                (&p_ex, &d_ex),
                sh.registry.now_us(),
            ))
        };
        tracing::debug!(prefill = %wp.url, decode = %wd.url, ?failure, side, attempt, "ksana pair failed");
        if !retry_after(sh, side, attempt, failure, left).await {
            return give_up(last);
        }
        attempt += 1;
    }
}

/// Whether any pair is left once `p_ex` and `d_ex` are out (without taking a breaker permission).
fn pick_possible(
    pp: &Pool,
    dp: &Pool,
    pairs: &Pairs,
    (p_ex, d_ex): (&[u64], &[u64]),
    now: u64,
) -> bool {
    let decodes = dp.workers.load();
    let usable: HashSet<&str> = decodes
        .iter()
        .filter(|w| !d_ex.contains(&w.id) && w.eligible(now))
        .map(|w| w.authority.as_str())
        .collect();
    pp.workers.load().iter().any(|w| {
        !p_ex.contains(&w.id)
            && w.eligible(now)
            && pairs
                .decodes
                .get(&w.authority)
                .is_some_and(|ds| ds.iter().any(|d| usable.contains(d.as_str())))
    })
}

/// A node's 4xx answer, read (bounded by the upstream timeout) and passed on with its status and type.
async fn collected(sh: &Shared, r: Response<UpBody>) -> Response<RouterBody> {
    let status = r.status();
    let ctype = r.headers().get(CONTENT_TYPE).cloned();
    let bytes = match monoio::time::timeout(sh.cfg.upstream_timeout, r.into_body().collect()).await
    {
        Ok(Ok(b)) => b.to_bytes(),
        _ => Bytes::new(),
    };
    let mut out = full(status.as_u16(), "application/json", bytes);
    if let Some(c) = ctype {
        out.headers_mut().insert(CONTENT_TYPE, c);
    }
    out
}

/// The client's response of a committed pair.
fn answer(
    sh: &Arc<Shared>,
    job: &KJob<'_>,
    prefill: Box<PrefillWatch>,
    decode: Response<UpBody>,
    guard: LoadGuard,
    pool: &Arc<Pool>,
) -> Response<RouterBody> {
    let served = crate::front::Served {
        pool: pool.name.clone(),
        worker: guard.worker.clone(),
    };
    let worker_header = served.worker.url_header.clone();
    let (parts, incoming) = decode.into_parts();
    let streamed = incoming.size_hint().exact().is_none();
    let sse = streamed && !job.merge;
    let forward = Forward {
        body: Some(incoming),
        guard: Some(guard),
        stream: sse,
        scanner: SseScanner::new(),
        stats: StreamStats {
            start: job.start,
            headers_at: Instant::now(),
            first_event: None,
            last_event: None,
            events: 0,
            pd: true,
        },
        metrics: Some(sh.metrics.clone()),
        registry: Some(sh.registry.clone()),
        done: false,
        idle_timeout: Some(sh.cfg.stream_idle_timeout),
        idle_timer: None,
        progressed: false,
        // KsanaLLM pairs are not migrated: the decode reads its KV under the pair's comm id.
        migration: None,
        admission: None,
        decode_slot: None,
        served: Some(served),
    };
    let body = if streamed {
        RouterBody::Ksana(Box::new(Merged {
            prefill: Some(*prefill),
            decode: Some(forward),
            merge: job.merge,
            decode_started: false,
            first_sent: !job.merge,
            done: false,
            metrics: sh.metrics.clone(),
            start: job.start,
            last_token: None,
        }))
    } else {
        // The decode's whole answer is here; the prefill's is read to its end in the background.
        let limit = sh.cfg.upstream_timeout;
        monoio::spawn(prefill.finish(limit));
        RouterBody::Forward(Box::new(forward))
    };
    let mut out = Response::new(body);
    *out.status_mut() = parts.status;
    if job.merge && streamed {
        out.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    } else {
        for h in [CONTENT_TYPE, hyper::header::CACHE_CONTROL] {
            if let Some(v) = parts.headers.get(&h) {
                out.headers_mut().insert(h, v.clone());
            }
        }
    }
    out.headers_mut().insert(X_PDX_WORKER, worker_header);
    out
}

/// A streamed answer of a pair: the decode's stream (forwarded frame by frame, as the same `Bytes`), with
/// the prefill's answer watched beside it and, on `/generate`, its first token put first and `[DONE]\0`
/// last.
pub struct Merged {
    prefill: Option<PrefillWatch>,
    decode: Option<Forward<UpBody>>,
    merge: bool,
    decode_started: bool,
    first_sent: bool,
    done: bool,
    metrics: Arc<crate::metrics::Metrics>,
    start: Instant,
    last_token: Option<Instant>,
}

impl std::fmt::Debug for Merged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Merged")
            .field("merge", &self.merge)
            .field("done", &self.done)
            .finish()
    }
}

impl Merged {
    /// The pool and worker of the decode ([`RouterBody::served`]).
    pub(crate) fn served(&self) -> Option<&crate::front::Served> {
        self.decode.as_ref().and_then(|f| f.served.as_ref())
    }

    /// TTFT and ITL of a `/generate` stream: tokens are the `\0`-delimited parts.
    fn observe(&mut self, data: &[u8]) {
        if !self.merge {
            return;
        }
        let tokens = data.iter().filter(|&&b| b == DELIM).count();
        if tokens == 0 {
            return;
        }
        let now = Instant::now();
        match self.last_token {
            None => self.metrics.ttft.observe((now - self.start).as_secs_f64()),
            Some(t) => self
                .metrics
                .itl
                .observe((now - t).as_secs_f64() / tokens as f64),
        }
        self.last_token = Some(now);
    }

    fn fail(&mut self, part: &'static [u8]) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.done = true;
        // Dropping the decode's body closes its connection: the node stops the request.
        self.decode = None;
        self.prefill = None;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(part)))))
    }
}

impl Body for Merged {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(w) = this.prefill.as_mut() {
            match w.poll_progress(cx) {
                Poll::Ready(Err(_)) if !this.decode_started => {
                    tracing::warn!("ksana prefill node failed before the decode produced a token: ending the stream");
                    let part = if this.merge {
                        GENERATE_PREFILL_FAILED
                    } else {
                        SSE_PREFILL_FAILED
                    };
                    return this.fail(part);
                }
                Poll::Ready(_) => {
                    let first = w.first.take();
                    this.prefill = None;
                    if let (Some(tok), false) = (first, this.first_sent) {
                        this.first_sent = true;
                        if !this.decode_started {
                            this.observe(&tok);
                            return Poll::Ready(Some(Ok(Frame::data(tok))));
                        }
                    }
                }
                Poll::Pending => {
                    if let (Some(tok), false) = (w.first.take(), this.first_sent) {
                        this.first_sent = true;
                        if !this.decode_started {
                            this.observe(&tok);
                            return Poll::Ready(Some(Ok(Frame::data(tok))));
                        }
                    }
                }
            }
        }
        let Some(d) = this.decode.as_mut() else {
            this.done = true;
            return Poll::Ready(None);
        };
        match Pin::new(d).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(f))) => {
                this.decode_started = true;
                // As in the peer, a decode token that comes before the prefill's leaves the prefill's out.
                this.first_sent = true;
                if let Some(data) = f.data_ref() {
                    let data = data.clone();
                    this.observe(&data);
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(_))) => this.fail(GENERATE_DECODE_FAILED),
            Poll::Ready(None) => {
                this.done = true;
                this.decode = None;
                this.prefill = None;
                if this.merge {
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(EOS)))))
                } else {
                    Poll::Ready(None)
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// A `/generate`, `/v1/*` or `/v2/*` request the router does not parse as an OpenAI completion: the body
/// must be JSON (the peer reads it with `req.json()`); its bytes go to the pair as they came. Counted in
/// `pdx_requests_total` under the body's `model` (if any).
pub(crate) async fn raw(
    sh: &Arc<Shared>,
    req: Request<http_body_util::Full<Bytes>>,
    rid: &HeaderValue,
) -> Response<RouterBody> {
    let start = Instant::now();
    let path = req.uri().path().to_string();
    let auth = req.headers().get(hyper::header::AUTHORIZATION).cloned();
    let (resp, label) = match crate::request::read_body(sh, req).await {
        Err(e) => (error_response(&e), None),
        Ok(raw) => match serde_json::from_slice::<serde_json::Value>(&raw) {
            Err(e) => (
                error_response(&ApiError::bad_request(format!("the body is not JSON: {e}"))),
                None,
            ),
            Ok(v) => {
                let model = v.get("model").and_then(|m| m.as_str()).map(String::from);
                let label = sh.models.label(&sh.registry.snap.load(), model.as_deref());
                let tokens = raw.len() as u64 / 4 + 16;
                let model = crate::metrics::Label::from(model.as_deref().unwrap_or("*"));
                let job = KJob {
                    path: &path,
                    body: raw,
                    rid,
                    auth: auth.as_ref(),
                    hashes: &[],
                    tokens,
                    merge: path == "/generate",
                    model: &model,
                    start,
                };
                (Box::pin(run(sh, &job)).await, Some(label))
            }
        },
    };
    crate::front::count(
        sh,
        label.unwrap_or_else(|| crate::api::models::OTHER.into()),
        &resp,
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_ids_are_positive_31_bit_and_distinct() {
        // Random 31-bit ids: 10,000 of them repeat one about 2 % of the time (the birthday bound), more than 10
        // almost never (a fixed or narrow id would repeat thousands).
        let ids: HashSet<u32> = (0..10_000).map(|_| new_comm_id()).collect();
        assert!(ids.len() >= 9_990, "{} distinct", ids.len());
        assert!(ids.iter().all(|&i| i > 0 && i <= 0x7FFF_FFFF));
    }

    #[test]
    fn the_error_parts_are_json() {
        for p in [GENERATE_PREFILL_FAILED, GENERATE_DECODE_FAILED] {
            let v: serde_json::Value = serde_json::from_slice(&p[..p.len() - 1]).unwrap();
            assert_eq!(v["error"]["code"], 502);
        }
        let ev = std::str::from_utf8(SSE_PREFILL_FAILED).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(ev.trim().strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["error"]["type"], "UpstreamError");
        assert!(crate::body::STREAM_ERROR_EVENT.starts_with(b"data: "));
    }
}
