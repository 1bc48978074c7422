//! Entry points for the fuzz targets in `fuzz/` (not a stable API): each runs one of the router's parsers of
//! untrusted bytes to completion and must return without panicking, whatever the input.
//!
//! - [`request_head`]: a client's request head and its body framing (`server`), as `serve_conn` parses them.
//! - [`upstream_response`]: a worker's response head and body framing ([`crate::h1`]), read until the end.
//! - [`completion_body`]: a client's `/v1/chat/completions` or `/v1/completions` JSON body.
//! - [`registration`]: a worker registration body.
//! - [`metrics_text`]: a worker's `/metrics` body, as the telemetry scraper reads it.

use crate::h1::{self, Chunk, Framing, Step};
use bytes::BytesMut;

/// Parses `data` as a client request: the head, then a `Content-Length` or chunked body from the bytes after it.
/// Returns whether a whole request was found.
pub fn request_head(data: &[u8]) -> bool {
    let mut buf = BytesMut::from(data);
    let Ok(Some(head)) = crate::server::parse_head(&mut buf) else {
        return false;
    };
    if head.chunked {
        return drain(Framing::Chunked(Chunk::Size), &mut buf, false);
    }
    let len = head.length.unwrap_or(0);
    (buf.len() as u64) >= len
}

/// Parses `data` as an upstream response (head and body, the connection closed after `data`). Returns whether a
/// whole response was found.
pub fn upstream_response(data: &[u8]) -> bool {
    let mut buf = BytesMut::from(data);
    let head_request = data.first().is_some_and(|b| b & 1 == 1);
    match h1::parse_head(&mut buf, head_request) {
        Ok(Some(head)) => drain(head.framing, &mut buf, true),
        _ => false,
    }
}

/// Runs a body decoder over `buf` until it ends, fails or needs more. Returns whether the body ended.
fn drain(mut framing: Framing, buf: &mut BytesMut, eof: bool) -> bool {
    // Every step consumes bytes or ends, so the loop is bounded by the input length; the cap is a second guard.
    for _ in 0..=buf.len() + 2 {
        match framing.step(buf, eof) {
            Ok(Step::Data(_)) => {}
            Ok(Step::Done) => return true,
            Ok(Step::More) | Err(_) => return false,
        }
    }
    panic!("body decoder made no progress");
}

/// Parses and validates `data` as a completion body, chat when `chat`; returns whether it is a valid request.
pub fn completion_body(data: &[u8], chat: bool) -> bool {
    // Parsed, then checked as the front checks it before any worker sees it.
    if chat {
        pdx_protocol::sampling::parse_chat(data).is_ok()
    } else {
        pdx_protocol::sampling::parse_completion(data).is_ok()
    }
}

/// Parses `data` as a worker registration body (`POST /v1/workers`) as the admin API does: strictly, then the
/// worker URL it names. Returns whether both passed.
pub fn registration(data: &[u8]) -> bool {
    pdx_protocol::parse_registration(data)
        .is_ok_and(|(reg, _, _)| crate::config::parse_worker_url(&reg.url).is_ok())
}

/// Reads `data` as a worker's `/metrics` body ([`crate::telemetry::gauges`]). Returns whether it parsed.
pub fn metrics_text(data: &[u8]) -> bool {
    std::str::from_utf8(data).is_ok_and(|t| crate::telemetry::gauges(t).is_ok())
}
