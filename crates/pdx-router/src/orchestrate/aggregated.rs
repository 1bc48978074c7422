//! Aggregated workers only: one worker computes prefill and decode.

use super::{dispatch, failure_response, forward, Orchestrator, Phase};
use crate::api::{error_response, Shared};
use crate::body::RouterBody;
use crate::request::Job;
use hyper::Response;
use pdx_protocol::ApiError;
use std::sync::Arc;
use std::time::Instant;

/// Aggregated workers only.
#[derive(Debug, Clone, Copy)]
pub struct Aggregated;

impl Orchestrator for Aggregated {
    async fn run(&self, sh: &Arc<Shared>, job: Job) -> Response<RouterBody> {
        let pools = &job.model.aggregated;
        if pools.is_empty() {
            return error_response(&ApiError::unavailable("no aggregated pool for this model"));
        }
        let first = crate::divert::apply(sh, &job.model, pools, 0);
        // Admission shaping of the chosen pool; the slot goes back at the first token. A continued stream was
        // admitted already.
        let permit = match pools.get(first).filter(|_| !job.continuation) {
            Some(p) => match crate::admission::admit(sh, p, job.ttft_ms).await {
                Ok(permit) => permit,
                Err(r) => return r,
            },
            None => None,
        };
        let body = job.body.to_bytes();
        let t = job.target();
        match dispatch(
            sh,
            t,
            pools,
            first,
            body,
            Phase::Aggregated,
            job.avoid.clone(),
            None,
        )
        .await
        {
            Ok(sent) => forward(sh, job, sent, false, Instant::now(), permit, None),
            Err(Ok(r)) => r,
            Err(Err(f)) => failure_response(f),
        }
    }
}
