//! SGLang bootstrap orchestration (`orchestration = "sglang-bootstrap"`), as SGLang's router
//! (`sgl-router` / `sglang_router`, PD mode, and its `mini_lb`) runs it.
//!
//! One prefill and one decode worker are picked (global grid, then the pools' local policies, as for
//! `vllm-nixl`). The client body gets `bootstrap_host` (the prefill worker's host, from its URL),
//! `bootstrap_port` (the prefill worker's bootstrap server port, SGLang's
//! `--disaggregation-bootstrap-port`, default 8998) and `bootstrap_room` (a random integer below 2^63, new
//! for every pair); client `bootstrap_*` and `kv_transfer_params` are replaced or removed. The same bytes go
//! to both workers at once: the decode engine reaches the prefill engine's bootstrap server with host, port
//! and room and receives the KV from it, so neither request can finish alone.
//!
//! Both upstream requests are polled together until the prefill response has been read to its end (and
//! dropped: only the decode answers the client) and the decode's response head has arrived. Only then does
//! the client see a byte: the decode response, forwarded as `vllm-nixl` forwards its decode response
//! ([`crate::body::Forward`]: zero-copy frames, SSE scanning, TTFT/ITL). A prefill failure before that
//! point drops the decode request (its connection closes, so the engine frees the request's KV) and the
//! pair is tried again, with a new room, under the retry rules; likewise a decode failure drops the
//! prefill. See `docs/router.md`, "SGLang bootstrap orchestration".

use super::{
    count_pool_choice, eligible, failure_response, forward, pick_worker, retry_after, send_to,
    Orchestrator, Sent,
};
use crate::api::{error_response, full, Shared};
use crate::body::RouterBody;
use crate::metrics::PhaseLabel;
use crate::registry::{LoadGuard, Worker};
use crate::request::{CompletionBody, Job};
use crate::upstream::UpBody;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Response;
use pdx_protocol::{ApiError, BootstrapParams};
use pdx_router_core::UpstreamFailure;
use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

/// SGLang PD orchestration: prefill and decode at once, paired by `bootstrap_host`/`bootstrap_port`/
/// `bootstrap_room` (SGLang `sgl-router` PD mode).
#[derive(Debug, Clone, Copy)]
pub struct SglangBootstrap;

/// The `bootstrap_host` of a prefill worker: the host part of its `host:port` authority. An IPv6
/// address keeps its brackets, as `sglang_router` sends it (`maybe_wrap_ipv6_address`).
pub fn bootstrap_host(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        // `[::1]:8000` splits at the last colon, after the bracket; `[::1]` alone has no port.
        Some((h, p)) if !h.is_empty() && !p.contains(']') => h,
        _ => authority,
    }
}

thread_local! {
    // splitmix64 state; seeded from the process's random hasher keys so that restarts and threads differ.
    static ROOM: Cell<u64> = Cell::new({
        use std::hash::BuildHasher;
        std::collections::hash_map::RandomState::new()
            .hash_one((std::thread::current().id(), Instant::now()))
    });
}

/// A new `bootstrap_room`: uniformly random in `0..2^63`, as `sglang_router` draws it
/// (`random.randint(0, 2**63 - 1)`). splitmix64 over a per-thread random seed: the outputs of one thread are
/// distinct before the low bit is dropped, so a repeat needs two draws that differ only in that bit.
pub fn new_room() -> u64 {
    ROOM.with(|s| {
        let v = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        s.set(v);
        pdx_tokens::mix64(v) >> 1
    })
}

/// The body sent to both workers: the client's, with `kv_transfer_params` removed and the bootstrap
/// fields set to `b` (client values are overwritten).
pub fn pair_body(body: &mut CompletionBody, b: BootstrapParams) -> Bytes {
    body.set_kv(None);
    body.set_bootstrap(b);
    body.to_bytes()
}

/// How one prefill request ended before the pair was committed.
enum PrefillEnd {
    /// Retryable (connect, timeout, 429/5xx, a body cut short).
    Failed(UpstreamFailure),
    /// A 4xx other than 429: the request itself is bad; the engine's answer goes to the client.
    Fatal(Response<RouterBody>),
}

/// Sends the prefill request and reads its response to the end, dropping it (only the decode answers
/// the client). A clean end returns the connection to the pool.
async fn prefill(
    sh: &Shared,
    w: &Arc<Worker>,
    path: &str,
    body: &[u8],
    rid: &hyper::header::HeaderValue,
    auth: Option<&hyper::header::HeaderValue>,
) -> Result<(), PrefillEnd> {
    let resp = send_to(sh, w, path, body, rid, auth)
        .await
        .map_err(PrefillEnd::Failed)?;
    let status = resp.status();
    if !status.is_success() {
        let s = status.as_u16();
        if UpstreamFailure::Status(s).is_retryable() {
            // Read the error body (bounded) so the connection can be reused.
            let _ =
                monoio::time::timeout(sh.cfg.upstream_timeout, resp.into_body().collect()).await;
            return Err(PrefillEnd::Failed(UpstreamFailure::Status(s)));
        }
        let collected =
            monoio::time::timeout(sh.cfg.upstream_timeout, resp.into_body().collect()).await;
        let bytes = match collected {
            Ok(Ok(b)) => b.to_bytes(),
            _ => Bytes::new(),
        };
        let mut r = full(s, "application/json", bytes);
        *r.status_mut() = status;
        return Err(PrefillEnd::Fatal(r));
    }
    // Frames are dropped as they come: nothing of a (possibly streamed) prefill answer is kept.
    let mut b = resp.into_body();
    let drain = async {
        while let Some(f) = b.frame().await {
            f.map_err(|_| UpstreamFailure::Connect)?;
        }
        Ok::<(), UpstreamFailure>(())
    };
    match monoio::time::timeout(sh.cfg.upstream_timeout, drain).await {
        Ok(r) => r.map_err(PrefillEnd::Failed),
        Err(_) => Err(PrefillEnd::Failed(UpstreamFailure::Timeout)),
    }
}

/// How one prefill/decode pair ended.
enum PairEnd {
    /// The prefill ended well and the decode answered 2xx: the decode response goes to the client.
    Committed {
        /// The decode response (head read, body unread).
        decode: Response<UpBody>,
        /// Prefill request duration, seconds.
        prefill_s: f64,
    },
    /// The prefill failed first (the decode request is dropped).
    Prefill(PrefillEnd),
    /// The decode failed before its response head, or answered 429/5xx (the prefill request is dropped).
    DecodeFailed(UpstreamFailure),
    /// The decode answered a 4xx other than 429: given to the client as is.
    DecodeFatal(Response<UpBody>),
}

/// Runs one pair: both requests polled together until the pair is committed or one side failed. What is
/// still in flight on the other side is dropped with this future (its connection closes).
async fn pair(sh: &Shared, job: &Job, wp: &Arc<Worker>, wd: &Arc<Worker>, body: &Bytes) -> PairEnd {
    let t0 = Instant::now();
    let mut pf = std::pin::pin!(async {
        let r = prefill(sh, wp, job.path, body, &job.rid, job.auth.as_ref()).await;
        (r, t0.elapsed().as_secs_f64())
    });
    let mut df = std::pin::pin!(send_to(sh, wd, job.path, body, &job.rid, job.auth.as_ref()));
    let mut p: Option<(Result<(), PrefillEnd>, f64)> = None;
    let mut d: Option<Result<Response<UpBody>, UpstreamFailure>> = None;
    std::future::poll_fn(|cx| {
        if p.is_none() {
            if let Poll::Ready(r) = pf.as_mut().poll(cx) {
                p = Some(r);
            }
        }
        if d.is_none() {
            if let Poll::Ready(r) = df.as_mut().poll(cx) {
                d = Some(r);
            }
        }
        let prefill_failed = matches!(p, Some((Err(_), _)));
        let decode_failed = match &d {
            Some(Ok(r)) => !r.status().is_success(),
            Some(Err(_)) => true,
            None => false,
        };
        if prefill_failed || decode_failed || (p.is_some() && d.is_some()) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    // A prefill failure is judged first: it is what a decode waiting for its KV would fail on too.
    if let Some((Err(e), _)) = p {
        return PairEnd::Prefill(e);
    }
    match d {
        Some(Err(f)) => PairEnd::DecodeFailed(f),
        Some(Ok(r)) if !r.status().is_success() => {
            let s = r.status().as_u16();
            if UpstreamFailure::Status(s).is_retryable() {
                // The error body is not read: the connection closes with it (the engine aborts).
                PairEnd::DecodeFailed(UpstreamFailure::Status(s))
            } else {
                PairEnd::DecodeFatal(r)
            }
        }
        Some(Ok(decode)) => PairEnd::Committed {
            decode,
            prefill_s: p.map_or(0.0, |(_, s)| s),
        },
        // Unreachable by the loop's exit condition; answered as a decode failure rather than a panic.
        None => PairEnd::DecodeFailed(UpstreamFailure::Connect),
    }
}

/// The answer once no pair is left to try: 504 after a timeout, else 503.
fn give_up(last: Option<UpstreamFailure>, side: &str) -> Response<RouterBody> {
    match last {
        Some(UpstreamFailure::Timeout) => failure_response(UpstreamFailure::Timeout),
        Some(_) => error_response(&ApiError::unavailable(format!(
            "{side} failed on every worker"
        ))),
        None => error_response(&ApiError::unavailable(format!("no healthy {side} worker"))),
    }
}

impl Orchestrator for SglangBootstrap {
    async fn run(&self, sh: &Arc<Shared>, mut job: Job) -> Response<RouterBody> {
        let model = job.model.clone();
        let (prefill_pools, decode_pools) = (&model.prefill, &model.decode);
        let (first_p, first_d) = match &model.grid {
            Some(g) => (
                g.select_prefill_pool(job.isl, job.ttft_ms),
                g.select_decode_pool(job.isl, job.itl_ms),
            ),
            None => (0, 0),
        };
        let first_p = crate::divert::apply(sh, &model, prefill_pools, first_p);
        let first_d = crate::divert::apply(sh, &model, decode_pools, first_d);
        // Admission shaping of the decode pool the grid chose, then of the prefill pool: one slot for the
        // request's pairs, given back with the committed pair's prefill duration.
        let (mut permit, mut decode_slot) = match crate::admission::admit_pd(
            sh,
            &job,
            prefill_pools.get(first_p),
            decode_pools.get(first_d),
        )
        .await
        {
            Ok(slots) => slots,
            Err(r) => return r,
        };
        let mut p_ex: Vec<u64> = Vec::new();
        let mut d_ex: Vec<u64> = job.avoid.clone();
        let mut last: Option<UpstreamFailure> = None;
        let mut attempt = 1;
        loop {
            let now = sh.registry.now_us();
            // Both sides must have a candidate before either is picked: a pick takes the worker's
            // circuit-breaker permission. There is no decode-only fallback: an SGLang decode server in
            // `--disaggregation-mode decode` cannot compute a prompt without its prefill peer.
            for (pools, ex, side) in [
                (prefill_pools, &p_ex, "prefill"),
                (decode_pools, &d_ex, "decode"),
            ] {
                if eligible(pools, ex, now) == 0 {
                    return give_up(last, side);
                }
            }
            let (Some((pp, wp)), Some((dp, wd))) = (
                pick_worker(prefill_pools, first_p, &job.hashes, job.isl, &p_ex, now),
                pick_worker(decode_pools, first_d, &job.hashes, job.isl, &d_ex, now),
            ) else {
                return give_up(last, "prefill or decode");
            };
            for pool in [&pp, &dp] {
                count_pool_choice(sh, &model.name, pool);
            }
            let body = pair_body(
                &mut job.body,
                BootstrapParams {
                    bootstrap_host: Some(bootstrap_host(&wp.authority).to_string()),
                    bootstrap_port: Some(wp.bootstrap_port),
                    bootstrap_room: Some(new_room()),
                },
            );
            let ahead_tokens = wp
                .in_flight_tokens
                .load(std::sync::atomic::Ordering::Relaxed);
            let p_guard = LoadGuard::new(wp.clone(), job.isl + 1);
            let mut d_guard = LoadGuard::new(wd.clone(), job.tokens);
            if dp.policy == pdx_router_core::Policy::Score {
                d_guard.track_output(job.tokens.saturating_sub(job.isl));
            }
            let sent_at = Instant::now();
            let (failure, side) = match pair(sh, &job, &wp, &wd, &body).await {
                PairEnd::Committed { decode, prefill_s } => {
                    wp.report(true, sh.registry.now_us());
                    drop(p_guard);
                    wp.with_telemetry(|t| {
                        t.observe_ttft(prefill_s);
                        t.observe_prefill(prefill_s, ahead_tokens + job.isl);
                    });
                    if let Some(p) = permit.take() {
                        p.done(prefill_s);
                    }
                    sh.metrics
                        .phase
                        .get_or_create(&PhaseLabel { phase: "prefill" })
                        .observe(prefill_s);
                    let sent = Sent {
                        resp: decode,
                        guard: d_guard,
                        pool: dp,
                        ahead_tokens: 0,
                        sent_at,
                    };
                    return forward(
                        sh,
                        job,
                        sent,
                        true,
                        Instant::now(),
                        None,
                        decode_slot.take(),
                    );
                }
                PairEnd::Prefill(PrefillEnd::Fatal(r)) => {
                    wp.report(true, sh.registry.now_us());
                    return r;
                }
                PairEnd::DecodeFatal(resp) => {
                    // The engine answered: it is up, the request is at fault (as `dispatch` judges it).
                    wd.report(true, sh.registry.now_us());
                    let sent = Sent {
                        resp,
                        guard: d_guard,
                        pool: dp,
                        ahead_tokens: 0,
                        sent_at,
                    };
                    return forward(
                        sh,
                        job,
                        sent,
                        false,
                        Instant::now(),
                        None,
                        decode_slot.take(),
                    );
                }
                PairEnd::Prefill(PrefillEnd::Failed(f)) => {
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
            drop((p_guard, d_guard));
            last = Some(failure);
            let (pools, ex) = if side == "prefill" {
                (prefill_pools, &p_ex)
            } else {
                (decode_pools, &d_ex)
            };
            let left = eligible(pools, ex, sh.registry.now_us());
            tracing::debug!(prefill = %wp.url, decode = %wd.url, ?failure, side, attempt, "bootstrap pair failed");
            if !retry_after(sh, side, attempt, failure, left).await {
                // Out of attempts or workers (the decode-only fallback does not apply here).
                return give_up(Some(failure), side);
            }
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_authority() {
        assert_eq!(bootstrap_host("10.0.0.1:30000"), "10.0.0.1");
        assert_eq!(bootstrap_host("prefill-0.svc:80"), "prefill-0.svc");
        assert_eq!(bootstrap_host("[::1]:30000"), "[::1]");
        assert_eq!(bootstrap_host("[fe80::1]"), "[fe80::1]");
        assert_eq!(bootstrap_host("h"), "h");
    }

    #[test]
    fn rooms_are_below_2_63_and_distinct() {
        let rooms: std::collections::HashSet<u64> = (0..10_000).map(|_| new_room()).collect();
        assert_eq!(rooms.len(), 10_000);
        assert!(rooms.iter().all(|&r| r < 1 << 63));
        // Spread over the range, not a counter.
        assert!(rooms.iter().any(|&r| r > 1 << 62));
    }

    #[test]
    fn pair_body_replaces_client_fields() {
        let raw = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,
            "bootstrap_host":"evil","bootstrap_port":1,"bootstrap_room":7,
            "kv_transfer_params":{"do_remote_prefill":true},"temperature":0.5}"#;
        let mut body = CompletionBody::Chat(serde_json::from_str(raw).unwrap());
        let b = pair_body(
            &mut body,
            BootstrapParams {
                bootstrap_host: Some("10.0.0.1".into()),
                bootstrap_port: Some(8998),
                bootstrap_room: Some(42),
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["bootstrap_host"], "10.0.0.1");
        assert_eq!(v["bootstrap_port"], 8998);
        assert_eq!(v["bootstrap_room"], 42);
        assert!(v.get("kv_transfer_params").is_none(), "{v}");
        assert_eq!(v["temperature"], 0.5);
        assert_eq!(v["stream"], true);
        assert_eq!(v["messages"][0]["content"], "hi");
    }
}
