//! vLLM NixlConnector orchestration (`orchestration = "vllm-nixl"`), as vLLM's `toy_proxy_server.py` and
//! vllm-router run it: a prefill request (`max_tokens = 1`, `do_remote_decode`) whose answer carries the
//! `kv_transfer_params` the decode request needs to read the prompt's KV; then the decode request, whose answer
//! goes to the client. The prefill worker holds the KV until a decode takes it ([`super::handoff`]).

use super::{dispatch, eligible, failure_response, forward, retry_after, Orchestrator, Phase};
use crate::api::{error_response, Shared};
use crate::body::RouterBody;
use crate::metrics::PhaseLabel;
use crate::request::Job;
use hyper::Response;
use pdx_protocol::ApiError;
use pdx_router_core::UpstreamFailure;
use std::sync::Arc;
use std::time::Instant;

/// vLLM NixlConnector prefill → decode.
#[derive(Debug, Clone, Copy)]
pub struct VllmNixl;

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
        if eligible(&decode, &job.avoid, sh.registry.now_us()) == 0 {
            return error_response(&ApiError::unavailable(
                "no decode worker can take a request now",
            ));
        }
        // Admission shaping of the decode pool the grid chose, then of the prefill pool (its slot covers the
        // first prefill; one redone after a failed KV read is not held back again).
        let (mut permit, mut decode_slot) = match crate::admission::admit_pd(
            sh,
            &job,
            job.model.prefill.get(prefill_first),
            job.model.decode.get(first),
        )
        .await
        {
            Ok(slots) => slots,
            Err(r) => return r,
        };
        // Prefill workers whose KV the decode could not read (a 502 from the decode): the pair is redone
        // on another prefill worker, within the prefill attempts.
        let mut failed_prefill: Vec<u64> = Vec::new();
        loop {
            // `lease`: the prefill worker holds the KV for this request until a decode takes it; dropped
            // untaken (the client went away, no decode would take the request), it is released.
            let prefilled = match super::handoff::prefill(
                sh,
                &mut job,
                &failed_prefill,
                prefill_first,
                first,
                permit.take(),
            )
            .await
            {
                Ok(p) => p,
                Err(r) => return r,
            };
            let handoff = Instant::now();
            let mut lease = prefilled;
            let holder = lease.as_ref().map(|l| l.holder().clone());
            let phase = Phase::Decode {
                kv_from_prefill: holder.is_some(),
            };
            let body = match lease.as_mut() {
                Some(l) => job.body.decode_bytes(l.kv_mut()),
                None => job.body.decode_bytes(&mut None),
            };
            let t = job.target();
            let avoid = job.avoid.clone();
            let failure = match dispatch(sh, t, &decode, first, body, phase, avoid, None).await {
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
                    return forward(
                        sh,
                        job,
                        sent,
                        holder.is_some(),
                        now,
                        None,
                        decode_slot.take(),
                    );
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
