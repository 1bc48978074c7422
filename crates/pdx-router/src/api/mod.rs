//! The HTTP API: the route table, `/health`, `/ready`, `/metrics`, and the model list
//! ([`models`]) and worker registration ([`workers`]) routes. Completions go to [`crate::request`].

pub mod models;
pub mod workers;

use crate::body::RouterBody;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::{Pool, Registry};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use pdx_protocol::ApiError;
use std::cell::Cell;
use std::sync::Arc;

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
    pub models: models::Catalog,
    /// Budgets of voluntary stream moves, per pool ([`crate::migrate`]).
    pub migration_budgets: crate::migrate::Budgets,
    /// The KsanaLLM node registry (`orchestration = "ksana"` only).
    pub ksana: Option<Arc<crate::ksana::Ksana>>,
    /// With `--discovery etcd://…`: registrations, heartbeats and drains taken by the admin API are written
    /// through to etcd, so every router sees them ([`crate::discovery`]).
    pub write_through: Option<pdx_discovery::etcd_driver::WriteThrough>,
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
    /// This thread's part of its request ids (the length of its id's debug form), computed once.
    static REQ_TID: u64 = format!("{:?}", std::thread::current().id()).len() as u64;
}

/// A request id, `pdx-` and 16 hex digits of a hash of the time, the thread and a per-thread sequence number,
/// then that number in hex; written without formatting machinery (one allocation, the header value's).
fn new_request_id() -> HeaderValue {
    let n = REQ_SEQ.with(|c| {
        let v = c.get() + 1;
        c.set(v);
        v
    });
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let h = pdx_tokens::mix64(t ^ n.rotate_left(32) ^ REQ_TID.with(|t| *t));
    request_id(h, n)
}

/// `pdx-{h:016x}{n:x}` as a header value.
fn request_id(h: u64, n: u64) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 4 + 16 + 16];
    out[..4].copy_from_slice(b"pdx-");
    for (i, o) in out[4..20].iter_mut().enumerate() {
        *o = HEX[((h >> (60 - 4 * i)) & 15) as usize];
    }
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, o) in out[20..20 + digits].iter_mut().enumerate() {
        *o = HEX[((n >> (4 * (digits - 1 - i))) & 15) as usize];
    }
    HeaderValue::from_bytes(&out[..20 + digits]).expect("ascii")
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
    let path = req.uri().path();
    let m = req.method().clone();
    if let Some(k) = &sh.ksana {
        // KsanaLLM's node API is open, as the peer's is (its nodes send no credentials); the addresses it
        // takes are routed only inside --worker-allow-cidr.
        if let Some(route) = pdx_ksana::Route::from_path(path) {
            return crate::ksana::node_api(k, route, req).await;
        }
    }
    let ksana_proxied = sh.ksana.is_some() && crate::ksana::proxied(path);
    if crate::front_auth::guards(path) || ksana_proxied {
        if let Err(e) = crate::front_auth::authorize(&sh.cfg.api_keys, req.headers()) {
            let mut r = error_response(&e);
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
            if matches!(path, "/v1/chat/completions" | "/v1/completions") {
                crate::front::count(sh, models::OTHER.into(), &r);
            }
            return r;
        }
    }
    if let (Some(id), &Method::GET) = (path.strip_prefix("/v1/models/"), &m) {
        return models::retrieve(sh, id);
    }
    match (path, &m) {
        ("/health", &Method::GET) => full(200, "text/plain", Bytes::new()),
        ("/ready", &Method::GET) => ready(sh),
        ("/metrics", &Method::GET) => full(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            sh.metrics.encode(),
        ),
        ("/v1/models", &Method::GET) => models::list(sh),
        ("/v1/chat/completions", &Method::POST) => {
            crate::request::completion(sh, req, rid, true).await
        }
        ("/v1/completions", &Method::POST) => crate::request::completion(sh, req, rid, false).await,
        (_, &Method::POST) if ksana_proxied => crate::orchestrate::ksana::raw(sh, req, rid).await,
        ("/v1/workers", &Method::GET | &Method::POST | &Method::DELETE) => {
            workers::route(sh, req).await
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

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_the_hash_and_the_sequence_number_in_hex() {
        for (h, n) in [
            (0, 0),
            (0, 1),
            (0xdead_beef, 0xf),
            (u64::MAX, 0x10),
            (0x0123_4567_89ab_cdef, 0xabc_def0),
            (1, u64::MAX),
        ] {
            assert_eq!(
                super::request_id(h, n).to_str().unwrap(),
                format!("pdx-{h:016x}{n:x}")
            );
        }
        let (a, b) = (super::new_request_id(), super::new_request_id());
        assert_ne!(a, b);
        assert!(a.to_str().unwrap().starts_with("pdx-") && a.len() >= 21);
    }
}
