//! Optional self-registration with a router: `POST <router>/v1/workers` with
//! `{"role","pool","url","model"}` (JSON), repeated every `--heartbeat-secs` as a heartbeat.
//! Failures are logged and retried at the next heartbeat; the router side is a later issue.

use crate::MockArgs;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::time::Duration;

pub use pdx_protocol::Registration;

/// The registration body for a worker started with `args` and bound to `addr`.
pub fn registration(args: &MockArgs, addr: SocketAddr) -> Registration {
    let host = args.advertise_host.clone().unwrap_or_else(|| {
        if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        }
    });
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
    }
}

/// POSTs `body` as JSON to `url` (`http://host:port/path` only); returns the status code.
pub async fn post_json(url: &str, body: &impl serde::Serialize) -> Result<u16, String> {
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
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(body).map_err(|e| e.to_string())?,
        )))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

/// Registers now and then every `every_secs` seconds, forever.
pub async fn heartbeat(router: String, reg: Registration, every_secs: f64) {
    let url = format!("{}/v1/workers", router.trim_end_matches('/'));
    let every = Duration::from_secs_f64(every_secs.max(0.1));
    loop {
        match post_json(&url, &reg).await {
            Ok(s) if (200..300).contains(&s) => tracing::debug!(%url, "registered"),
            Ok(s) => tracing::warn!(%url, status = s, "registration refused"),
            Err(e) => tracing::warn!(%url, error = %e, "registration failed"),
        }
        tokio::time::sleep(every).await;
    }
}
