//! The admin API: `GET`, `POST` and `DELETE /v1/workers` (list, register or heartbeat, drain); the same
//! token guards `GET`/`PUT /v1/planner/diversions` ([`crate::divert`]).
//!
//! With an admin token configured (`--admin-token`, `admin_token` in the file), every one of these needs
//! `Authorization: Bearer TOKEN`: registration decides where user traffic goes, the list reveals the
//! deployment, and a drain takes workers out. The token is compared in constant time (for tokens of the
//! same length). Without a token the API is open, and `pdx serve` warns at start when it listens beyond
//! loopback. Registrations are parsed strictly ([`pdx_protocol::parse_registration`]) and their URLs
//! checked ([`crate::config::parse_worker_url`], the allow-list, `--max-workers`: see
//! [`crate::registry::Registry::register_with_bootstrap_port`]). With `--discovery etcd://…`, a
//! registration or heartbeat taken here is written through to the worker's etcd key with a lease of one
//! heartbeat TTL, and a drain deletes the key, so every router watching the prefix follows
//! ([`crate::discovery`]).

use crate::api::{error_response, full, Shared};
use crate::body::RouterBody;
use crate::RouterError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response};
use pdx_protocol::ApiError;

/// Largest admin request body, bytes (a registration is a few hundred).
pub const MAX_ADMIN_BODY: usize = 64 * 1024;

/// True when `a` and `b` are equal, in time that depends only on their lengths (a token must not leak
/// through how long a wrong guess takes to be refused).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `None` when no token is configured or the request carries it; else the 401 response.
pub(crate) fn refusal(sh: &Shared, req: &Request<Full<Bytes>>) -> Option<Response<RouterBody>> {
    let tok = sh.cfg.admin_token.as_ref()?;
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    if given.is_some_and(|g| constant_time_eq(g, tok.as_bytes())) {
        return None;
    }
    let mut r = error_response(&ApiError::new(
        401,
        "AuthenticationError",
        "the admin API needs `Authorization: Bearer <admin token>` (missing or wrong token)",
    ));
    r.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static("Bearer"),
    );
    Some(r)
}

/// Handles `/v1/workers`.
pub async fn route(sh: &Shared, req: Request<Full<Bytes>>) -> Response<RouterBody> {
    if let Some(r) = refusal(sh, &req) {
        return r;
    }
    match *req.method() {
        Method::GET => list(sh),
        _ if !sh.cfg.registration => {
            error_response(&ApiError::not_found("registration is disabled"))
        }
        Method::POST | Method::DELETE => change(sh, req).await,
        ref m => error_response(&ApiError::method_not_allowed(format!(
            "{m} not allowed on /v1/workers"
        ))),
    }
}

fn json(v: &serde_json::Value) -> Response<RouterBody> {
    full(200, "application/json", v.to_string())
}

fn list(sh: &Shared) -> Response<RouterBody> {
    let now = sh.registry.now_us();
    let ws: Vec<serde_json::Value> = sh
        .registry
        .workers()
        .iter()
        .map(|w| {
            serde_json::json!({
                "id": w.id, "url": w.url, "role": w.role.as_str(), "pool": w.pool, "model": w.model,
                "bootstrap_port": w.bootstrap_port,
                "state": w.state(now), "registered": w.registered,
                "discovered": w.discovered.load(std::sync::atomic::Ordering::Relaxed),
                "in_flight": w.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                "kv_pending": w.kv_pending.load(std::sync::atomic::Ordering::Relaxed),
            })
        })
        .collect();
    json(&serde_json::json!({ "workers": ws }))
}

pub(crate) async fn read_small(req: Request<Full<Bytes>>) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
    {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("admin request body over {MAX_ADMIN_BODY} bytes"),
        )),
        Err(e) => Err(ApiError::bad_request(format!("cannot read body: {e}"))),
    }
}

/// The API error for a refused registration.
pub fn registration_error(e: &RouterError) -> ApiError {
    match e {
        RouterError::BadWorkerUrl(m) => ApiError::invalid_param("url", m.clone()),
        RouterError::WorkerNotAllowed(m) => ApiError::new(403, "PermissionDeniedError", m.clone()),
        RouterError::RegistryFull { .. } => ApiError::new(429, "RegistryFullError", e.to_string()),
        e => ApiError::bad_request(e.to_string()),
    }
}

async fn change(sh: &Shared, req: Request<Full<Bytes>>) -> Response<RouterBody> {
    let delete = req.method() == Method::DELETE;
    let query_url = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("url=")))
        .map(str::to_string);
    let body = match read_small(req).await {
        Ok(b) => b,
        Err(e) => return error_response(&e),
    };
    if delete {
        let url = match query_url {
            Some(u) => u,
            None => match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(v) => match v.get("url").and_then(|u| u.as_str()) {
                    Some(u) => u.to_string(),
                    None => {
                        return error_response(&ApiError::invalid_param("url", "url is required"))
                    }
                },
                Err(e) => {
                    return error_response(&ApiError::bad_request(format!("malformed JSON: {e}")))
                }
            },
        };
        if let Some(wt) = &sh.write_through {
            // Every router drains it: its key goes (a worker that heartbeats puts it back, as it registers
            // again here).
            let url = url.trim_end_matches('/');
            for w in sh.registry.workers().iter().filter(|w| w.url == url) {
                wt.delete(&pdx_protocol::Registration {
                    role: w.role.as_str().into(),
                    pool: w.pool.to_string(),
                    url: w.url.to_string(),
                    model: w.model.clone(),
                    api_key: None,
                    kv_events_endpoint: None,
                    kv_events_replay_endpoint: None,
                });
            }
        }
        let n = sh.registry.drain(&url);
        if n == 0 {
            return error_response(&ApiError::not_found(format!(
                "no worker {}",
                url.escape_debug()
            )));
        }
        return json(&serde_json::json!({"draining": n, "url": url}));
    }
    let (reg, _role, port) = match pdx_protocol::parse_registration(&body) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    match sh.registry.register_with_bootstrap_port(&reg, port) {
        Ok((id, created)) => {
            if let Some(wt) = &sh.write_through {
                // The key's lease lasts one heartbeat TTL (whole seconds, rounded up) and this heartbeat
                // renews it, so the worker leaves every router as it would leave this one.
                let ttl_secs = sh.cfg.heartbeat_ttl_us.div_ceil(1_000_000);
                if let Err(e) = wt.put(&body, ttl_secs) {
                    tracing::warn!(error = %e, "registration not written through to etcd");
                }
            }
            json(&serde_json::json!({"id": id, "created": created}))
        }
        Err(e) => error_response(&registration_error(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
