//! Optional self-registration with a router: `POST <router>/v1/workers` with
//! `{"role","pool","url","model"}` (JSON), repeated every `--heartbeat-secs` as a heartbeat,
//! with `Authorization: Bearer <admin token>` when the router has one (`--admin-token` or
//! `PDX_ADMIN_TOKEN`). Failures are logged and retried at the next heartbeat.

use crate::{MockArgs, MockError};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderValue;
use std::net::SocketAddr;
use std::time::Duration;

/// The `Authorization` header of registration POSTs: `Bearer TOKEN` with the router's admin
/// token from `flag` (`--admin-token`), else from `env` (`PDX_ADMIN_TOKEN`); `None` without
/// either (an empty value counts as none). Marked sensitive, so it is never logged.
///
/// Errors: [`MockError::Config`] when the token holds anything but printable ASCII (a header
/// value cannot hold control characters; tokens are ASCII, RFC 6750 section 2.1).
pub fn admin_authorization(
    flag: Option<&str>,
    env: Option<&str>,
) -> Result<Option<HeaderValue>, MockError> {
    let Some(token) = flag.or(env).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let bad = || {
        MockError::Config(
            "the admin token (--admin-token or PDX_ADMIN_TOKEN) must be printable ASCII".into(),
        )
    };
    if !token.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(bad());
    }
    let mut v = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| bad())?;
    v.set_sensitive(true);
    Ok(Some(v))
}

pub use pdx_protocol::Registration;

/// The registration body for a worker started with `args` and bound to `addr`; `kv_events`: the ports of
/// its KV event publisher and replay socket, sent as `tcp://<advertise host>:PORT`.
pub fn registration(
    args: &MockArgs,
    addr: SocketAddr,
    kv_events: Option<(u16, Option<u16>)>,
) -> Registration {
    let host = args.advertise_host.clone().unwrap_or_else(|| {
        if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        }
    });
    let zmq_host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    Registration {
        role: args.role.as_str().into(),
        pool: args
            .pool
            .clone()
            .unwrap_or_else(|| args.role.as_str().into()),
        url: args
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{host}:{}", addr.port())),
        model: args.model.clone(),
        api_key: args.api_key.first().cloned(),
        kv_events_endpoint: kv_events.map(|(p, _)| format!("tcp://{zmq_host}:{p}")),
        kv_events_replay_endpoint: kv_events
            .and_then(|(_, r)| r)
            .map(|p| format!("tcp://{zmq_host}:{p}")),
    }
}

/// POSTs `body` as JSON to `url` (`http://host:port/path` only), with `authorization` as its
/// `Authorization` header if given; returns the status code.
pub async fn post_json(
    url: &str,
    body: &impl serde::Serialize,
    authorization: Option<&HeaderValue>,
) -> Result<u16, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("only http:// URLs are supported: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = hyper::Request::post(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(auth) = authorization {
        req = req.header(hyper::header::AUTHORIZATION, auth.clone());
    }
    let req = req
        .body(Full::new(Bytes::from(
            serde_json::to_vec(body).map_err(|e| e.to_string())?,
        )))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

/// Registers now and then every `every_secs` seconds, forever, with `authorization` (from
/// [`admin_authorization`]) on every POST.
pub async fn heartbeat(
    router: String,
    reg: Registration,
    authorization: Option<HeaderValue>,
    every_secs: f64,
) {
    let url = format!("{}/v1/workers", router.trim_end_matches('/'));
    let every = Duration::from_secs_f64(every_secs.max(0.1));
    loop {
        match post_json(&url, &reg, authorization.as_ref()).await {
            Ok(s) if (200..300).contains(&s) => tracing::debug!(%url, "registered"),
            Ok(401) => tracing::warn!(
                %url,
                status = 401,
                token_sent = authorization.is_some(),
                "registration refused: the router wants its admin token (--admin-token or PDX_ADMIN_TOKEN)"
            ),
            Ok(s) => tracing::warn!(%url, status = s, "registration refused"),
            Err(e) => tracing::warn!(%url, error = %e, "registration failed"),
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_over_the_environment_and_bad_tokens_are_refused() {
        let value = |flag, env| {
            admin_authorization(flag, env)
                .unwrap()
                .map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(value(None, None), None);
        assert_eq!(value(Some(""), None), None);
        assert_eq!(value(None, Some("e")).as_deref(), Some("Bearer e"));
        assert_eq!(value(Some("f"), Some("e")).as_deref(), Some("Bearer f"));
        assert!(admin_authorization(None, Some("t"))
            .unwrap()
            .unwrap()
            .is_sensitive());
        for bad in ["a\nb", "a\rb", "tök", "a\u{7f}"] {
            assert!(
                matches!(
                    admin_authorization(Some(bad), None),
                    Err(MockError::Config(_))
                ),
                "{bad:?}"
            );
        }
    }
}
