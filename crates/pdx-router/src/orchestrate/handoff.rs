//! The KV handoff of the `vllm-nixl` orchestration: the prefill phase, and the KV blocks a prefill
//! worker then holds for the request until a decode worker takes them.
//!
//! vLLM's NixlConnector (and `pdx mock`) keeps a finished prefill's blocks until a decode engine reads them
//! and notifies it, or until `VLLM_NIXL_ABORT_REQUEST_TIMEOUT` (480 s). Three rules keep those blocks from
//! being stranded by the router:
//!
//! 1. No prefill starts without an eligible decode worker (503 with `Retry-After` instead; see
//!    [`crate::orchestrate::VllmNixl`]).
//! 2. The prefill request runs in its own task. When the client goes away meanwhile, the request is
//!    abandoned ([`upstream::Abandon`]): its connection is half closed, so the engine aborts a prefill still
//!    running (and frees its blocks), and an answer already on its way is still read.
//! 3. Every prefill that answered with `kv_transfer_params` is a [`KvLease`], counted against its worker
//!    (`kv_pending`, limited by `--max-pending-kv-requests` / `--max-pending-kv-tokens`). A decode that
//!    answers 2xx (it has the request, and reads the KV or, aborted, notifies the prefill) or 502 (it tried
//!    the read and failed: nothing left to free) takes it. A lease dropped untaken — the client went away,
//!    every decode refused the request — is released: the router sends a decode worker the request as the
//!    prefill ran it (`max_tokens` 1, not streamed) with the prefill's `kv_transfer_params`, and reads the
//!    answer to its end. The decode engine reads the blocks and notifies the prefill engine, which frees
//!    them: the NixlConnector protocol's own way, understood by every vLLM version with it, at the cost of
//!    one KV read and one decode step. See `docs/router.md`, "Prefilled KV".

use super::{dispatch, failure_response, pick_worker, send_to, Phase, Sent, Target};
use crate::api::{error_response, full, Shared};
use crate::body::RouterBody;
use crate::metrics::{OutcomeLabel, PhaseLabel};
use crate::registry::{LoadGuard, ModelTopo, Worker};
use crate::request::Job;
use crate::upstream::Abandon;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::HeaderValue;
use hyper::Response;
use pdx_protocol::{ApiError, KvTransferParams};
use pdx_router_core::{PrefillDecision, UpstreamFailure};
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest a release request may take (bounded further by the upstream timeout).
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

thread_local! {
    /// This thread's runtime runs (tasks may be spawned). Cleared before a server thread's runtime ends,
    /// when tasks still pending are dropped outside it.
    static LIVE: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread's runtime as running (true) or ending (false).
pub(crate) fn set_live(v: bool) {
    LIVE.with(|l| l.set(v));
}

/// What the prefill phase and a release need of a request, owned (they run in tasks of their own).
#[derive(Debug)]
pub(crate) struct PrefillJob {
    model: Arc<ModelTopo>,
    hashes: Vec<u64>,
    tokens: u64,
    isl: u64,
    path: &'static str,
    rid: HeaderValue,
    /// The client's `Authorization` ([`crate::front_auth::upstream`]).
    auth: Option<HeaderValue>,
    /// The prefill request body (`max_tokens` 1, not streamed, `do_remote_decode`).
    body: Bytes,
    /// Decode pool tried first (grid, then the planner's diversions).
    decode_first: usize,
    /// Prefill pool tried first (grid, then the planner's diversions).
    prefill_first: usize,
    /// Fired when the client goes away during the prefill (in the job: one allocation for both).
    abandon: Abandon,
}

impl PrefillJob {
    fn target(&self) -> Target<'_> {
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

/// Counts one request's prefilled KV against its prefill worker while it lives.
#[derive(Debug)]
struct Pending {
    worker: Arc<Worker>,
    tokens: u64,
}

impl Pending {
    fn new(worker: Arc<Worker>, tokens: u64) -> Self {
        worker.kv_pending.fetch_add(1, Ordering::Relaxed);
        worker
            .kv_pending_tokens
            .fetch_add(tokens, Ordering::Relaxed);
        Self { worker, tokens }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.worker.kv_pending.fetch_sub(1, Ordering::Relaxed);
        self.worker
            .kv_pending_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

/// KV blocks a prefill worker holds for one request until a decode takes them (see the module docs).
/// Dropped untaken, it releases them.
#[derive(Debug)]
pub(crate) struct KvLease {
    sh: Arc<Shared>,
    job: Rc<PrefillJob>,
    kv: Option<KvTransferParams>,
    pending: Option<Pending>,
}

impl KvLease {
    fn new(sh: Arc<Shared>, job: Rc<PrefillJob>, kv: KvTransferParams, w: Arc<Worker>) -> Self {
        let pending = Pending::new(w, job.isl);
        Self {
            sh,
            job,
            kv: Some(kv),
            pending: Some(pending),
        }
    }

    /// The prefill worker that holds the KV.
    pub(crate) fn holder(&self) -> &Arc<Worker> {
        &self
            .pending
            .as_ref()
            .expect("lease holds its worker")
            .worker
    }

    /// The prefill's `kv_transfer_params`, lent to the decode request's serialization
    /// ([`crate::request::CompletionBody::decode_bytes`]); `Some` until [`Self::taken`].
    pub(crate) fn kv_mut(&mut self) -> &mut Option<KvTransferParams> {
        &mut self.kv
    }

    /// A decode took the KV (or tried to and failed): nothing to release.
    pub(crate) fn taken(mut self) {
        self.kv = None;
    }
}

impl Drop for KvLease {
    fn drop(&mut self) {
        let (Some(kv), Some(pending)) = (self.kv.take(), self.pending.take()) else {
            return;
        };
        if !LIVE.with(Cell::get) {
            tracing::warn!(prefill = %pending.worker.url, "router stopping: prefilled KV left to the engine's timeout");
            return;
        }
        let (sh, job) = (self.sh.clone(), self.job.clone());
        monoio::spawn(release(sh, job, kv, pending));
    }
}

/// The body of a release: the prefill request with the prefill's answer as its `kv_transfer_params`.
pub fn release_body(prefill_body: &[u8], kv: &KvTransferParams) -> Option<Bytes> {
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(prefill_body).ok()?;
    v.insert("kv_transfer_params".into(), serde_json::to_value(kv).ok()?);
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

/// Releases a lease's KV through a decode worker (see the module docs); counts the outcome in
/// `pdx_kv_releases_total{outcome}`.
async fn release(sh: Arc<Shared>, job: Rc<PrefillJob>, kv: KvTransferParams, pending: Pending) {
    let outcome = release_via_decode(&sh, &job, &kv).await;
    if outcome == "released" {
        tracing::debug!(prefill = %pending.worker.url, "prefilled KV released");
    } else {
        tracing::warn!(prefill = %pending.worker.url, outcome, "prefilled KV not released: the prefill engine keeps it until its own timeout");
    }
    sh.metrics
        .kv_releases
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
    drop(pending);
}

async fn release_via_decode(sh: &Shared, job: &PrefillJob, kv: &KvTransferParams) -> &'static str {
    let Some(body) = release_body(&job.body, kv) else {
        return "failed";
    };
    let now = sh.registry.now_us();
    let Some((_pool, w)) = pick_worker(
        &job.model.decode,
        job.decode_first,
        &job.hashes,
        job.isl,
        &[],
        now,
    ) else {
        return "no_decode";
    };
    let _load = LoadGuard::new(w.clone(), job.isl + 1);
    let limit = sh.cfg.upstream_timeout.min(RELEASE_TIMEOUT);
    let exchange = async {
        let resp = send_to(sh, &w, job.path, &body, &job.rid, job.auth.as_ref()).await?;
        let status = resp.status();
        resp.into_body()
            .collect()
            .await
            .map_err(|_| UpstreamFailure::Connect)?;
        Ok::<_, UpstreamFailure>(status)
    };
    let r = monoio::time::timeout(limit, exchange)
        .await
        .unwrap_or(Err(UpstreamFailure::Timeout));
    let now = sh.registry.now_us();
    match r {
        Ok(s) if s.is_success() => {
            w.report(true, now);
            "released"
        }
        Ok(s) => {
            let f = UpstreamFailure::Status(s.as_u16());
            if f.is_retryable() {
                w.report_failure(f, now);
            } else {
                w.report(true, now);
            }
            "refused"
        }
        Err(f) => {
            w.report_failure(f, now);
            "failed"
        }
    }
}

/// Fires its prefill job's [`Abandon`] when dropped armed (the request's future was dropped: its client went
/// away).
struct FireOnDrop(Option<Rc<PrefillJob>>);

impl Drop for FireOnDrop {
    fn drop(&mut self) {
        if let Some(pj) = self.0.take() {
            pj.abandon.fire();
        }
    }
}

/// The part of a prefill response the router reads.
#[derive(serde::Deserialize)]
struct PrefillAnswer {
    kv_transfer_params: Option<KvTransferParams>,
}

/// A prefill's outcome for the orchestration: `Ok(None)` means the decode-only fallback (or no prefill
/// pool); `Ok(Some)` the lease on the prefilled KV, which holds the `kv_transfer_params` for the decode
/// ([`KvLease::kv_mut`]).
pub(crate) type PrefillResult = Result<Option<KvLease>, Response<RouterBody>>;

/// Runs the prefill of `job` on a worker not in `exclude`, in a task of its own (so the client going
/// away abandons the request rather than cutting it; see the module docs). `prefill_first` is the prefill
/// pool tried first, `decode_first` the decode pool a release would try first (both chosen once per request
/// by the caller: [`crate::divert::apply`] counts each choice). `permit` is the request's admission slot
/// on the prefill pool: given back with the prefill's duration when it succeeds, without a sample otherwise.
pub(crate) async fn prefill(
    sh: &Arc<Shared>,
    job: &mut Job,
    exclude: &[u64],
    prefill_first: usize,
    decode_first: usize,
    permit: Option<crate::admission::Permit>,
) -> PrefillResult {
    if job.model.prefill.is_empty() {
        return Ok(None);
    }
    let body = job.body.prefill_bytes();
    let pj = Rc::new(PrefillJob {
        model: job.model.clone(),
        hashes: job.hashes.clone(),
        // A prefill request holds the prompt and produces one token.
        tokens: job.isl + 1,
        isl: job.isl,
        path: job.path,
        rid: job.rid.clone(),
        auth: job.auth.clone(),
        body,
        decode_first,
        prefill_first,
        abandon: Abandon::default(),
    });
    let mut fire = FireOnDrop(Some(pj.clone()));
    let task = monoio::spawn(prefill_task(sh.clone(), pj, exclude.to_vec(), permit));
    let r = task.await;
    fire.0 = None;
    r
}

async fn prefill_task(
    sh: Arc<Shared>,
    pj: Rc<PrefillJob>,
    exclude: Vec<u64>,
    permit: Option<crate::admission::Permit>,
) -> PrefillResult {
    match run_prefill(&sh, &pj, exclude, &pj.abandon, permit).await {
        Ok(Some((kv, w))) => {
            let fired = pj.abandon.is_fired();
            let lease = KvLease::new(sh.clone(), pj, kv, w);
            if fired {
                // Nobody waits for this answer: the lease is dropped here, so the KV is released.
                tracing::debug!("client gone after its prefill: releasing the prefilled KV");
                drop(lease);
                return Ok(None);
            }
            Ok(Some(lease))
        }
        Ok(None) => Ok(None),
        Err(r) => Err(r),
    }
}

/// The prefill with retries (`dispatch`), then the fallback rule.
async fn run_prefill(
    sh: &Shared,
    pj: &PrefillJob,
    exclude: Vec<u64>,
    abandon: &Abandon,
    permit: Option<crate::admission::Permit>,
) -> Result<Option<(KvTransferParams, Arc<Worker>)>, Response<RouterBody>> {
    let pools = &pj.model.prefill;
    let first = pj.prefill_first;
    let t0 = Instant::now();
    let sent = dispatch(
        sh,
        pj.target(),
        pools,
        first,
        pj.body.clone(),
        Phase::Prefill,
        exclude,
        Some(abandon),
    )
    .await;
    let failure = match sent {
        Ok(sent) => {
            let Sent {
                resp,
                guard,
                ahead_tokens,
                sent_at,
                ..
            } = sent;
            let status = resp.status();
            // The answer, read whole: one frame as it came, without a frame list.
            let collected = monoio::time::timeout(
                sh.cfg.upstream_timeout,
                crate::body::collect_bytes(resp.into_body()),
            )
            .await;
            let w = &guard.worker;
            match collected {
                Ok(Ok(bytes)) => {
                    if !status.is_success() {
                        // Fatal (4xx): the request itself is bad; give the engine's answer.
                        let mut r = full(status.as_u16(), "application/json", bytes);
                        *r.status_mut() = status;
                        return Err(r);
                    }
                    // Only `kv_transfer_params` is read (the rest is skipped, not built).
                    let kv = serde_json::from_slice::<PrefillAnswer>(&bytes)
                        .ok()
                        .and_then(|a| a.kv_transfer_params)
                        .filter(|kv| kv.do_remote_prefill);
                    if let Some(kv) = kv {
                        w.report(true, sh.registry.now_us());
                        // The prefill's duration on this worker is its TTFT there, and, over the prompt
                        // tokens it had queued plus this prompt, a sample of its prefill speed.
                        let secs = sent_at.elapsed().as_secs_f64();
                        w.with_telemetry(|t| {
                            t.observe_ttft(secs);
                            t.observe_prefill(secs, ahead_tokens + pj.isl);
                        });
                        if let Some(p) = permit {
                            p.done(secs);
                        }
                        sh.metrics
                            .phase
                            .get_or_create(&PhaseLabel { phase: "prefill" })
                            .observe(t0.elapsed().as_secs_f64());
                        return Ok(Some((kv, w.clone())));
                    }
                    w.report(false, sh.registry.now_us());
                    UpstreamFailure::BadResponse
                }
                Ok(Err(_)) => {
                    w.report_failure(UpstreamFailure::Connect, sh.registry.now_us());
                    UpstreamFailure::Connect
                }
                Err(_) => {
                    w.report_failure(UpstreamFailure::Timeout, sh.registry.now_us());
                    UpstreamFailure::Timeout
                }
            }
        }
        Err(Ok(r)) => return Err(r),
        Err(Err(f)) => f,
    };
    if abandon.is_fired() {
        return Ok(None);
    }
    // `dispatch` already retried other workers; what is left is the fallback rule.
    match sh.cfg.retry.exhausted(failure == UpstreamFailure::Timeout) {
        PrefillDecision::DecodeOnly => {
            tracing::debug!(?failure, "prefill failed: decode-only fallback");
            sh.metrics
                .fallbacks
                .get_or_create(&PhaseLabel {
                    phase: "decode_only",
                })
                .inc();
            Ok(None)
        }
        PrefillDecision::Fail { status: 504 } => Err(failure_response(UpstreamFailure::Timeout)),
        _ => Err(error_response(&ApiError::unavailable(
            "prefill failed on every worker",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_body_is_the_prefill_with_the_prefills_answer() {
        let prefill = br#"{"model":"m","prompt":"hi","max_tokens":1,"stream":false,"kv_transfer_params":{"do_remote_decode":true,"do_remote_prefill":false}}"#;
        let kv: KvTransferParams = serde_json::from_str(
            r#"{"do_remote_decode":false,"do_remote_prefill":true,"remote_engine_id":"p","remote_block_ids":[1,2],"remote_host":"127.0.0.1","remote_port":5600,"remote_request_id":"cmpl-1"}"#,
        )
        .unwrap();
        let b = release_body(prefill, &kv).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["max_tokens"], 1);
        assert_eq!(v["stream"], false);
        assert_eq!(v["prompt"], "hi");
        assert_eq!(v["kv_transfer_params"]["do_remote_prefill"], true);
        assert_eq!(v["kv_transfer_params"]["remote_block_ids"][1], 2);
        assert_eq!(v["kv_transfer_params"]["remote_request_id"], "cmpl-1");
        assert!(release_body(b"not json", &kv).is_none());
    }
}
