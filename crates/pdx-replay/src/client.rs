//! One streamed request: send, read SSE events, time TTFT and inter-token gaps.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;

/// The HTTP client used for every request (keep-alive pool).
pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Builds the client.
pub fn http_client() -> HttpClient {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// Longest error message kept per failed request, bytes (error bodies are untrusted and may be huge).
const MAX_MESSAGE_BYTES: usize = 300;

/// Response headers that name the worker that served a request (pdx's router and mock send `x-pdx-worker`).
pub const WORKER_HEADERS: [&str; 2] = ["x-pdx-worker", "x-worker"];

/// What happened to one request.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Error kind (`connect`, `http_503`, `stream_error`, `timeout`, `incomplete`, …) or `None` on success.
    pub error: Option<String>,
    /// HTTP status of the response, when one came.
    pub status: Option<u16>,
    /// What the server or the connection said about a failure: the OpenAI error JSON's `message`, else the
    /// start of the body, or the socket error (at most 300 bytes).
    pub message: Option<String>,
    /// The worker that served the request, when a response header names it ([`WORKER_HEADERS`]).
    pub worker: Option<String>,
    /// Time to first token, µs.
    pub ttft_us: Option<u64>,
    /// Gaps between consecutive token events, µs.
    pub itl_us: Vec<u64>,
    /// End-to-end latency, µs.
    pub e2e_us: u64,
    /// Output tokens: `usage.completion_tokens` when the server sent it, else the token events counted.
    pub tokens: u32,
    /// Prompt tokens as the server reported them (`usage.prompt_tokens`), if it did.
    pub prompt_tokens: Option<u32>,
}

impl Outcome {
    /// Time per output token after the first, µs: (e2e − TTFT) / (tokens − 1) (vLLM's TPOT).
    pub fn tpot_us(&self) -> Option<f64> {
        let ttft = self.ttft_us?;
        (self.tokens > 1)
            .then(|| (self.e2e_us.saturating_sub(ttft)) as f64 / f64::from(self.tokens - 1))
    }
}

/// Scans SSE events out of a byte stream (events end with a blank line).
#[derive(Default)]
struct SseScanner {
    buf: Vec<u8>,
}

impl SseScanner {
    /// Feeds bytes; calls `on_data` with the payload of each complete `data:` line.
    fn feed(&mut self, chunk: &[u8], mut on_data: impl FnMut(&[u8])) {
        // CRLF line ends are legal SSE; dropping CR makes every event end with "\n\n".
        self.buf.extend(chunk.iter().filter(|&&b| b != b'\r'));
        let mut start = 0;
        while let Some(pos) = find(&self.buf[start..], b"\n\n") {
            let event = &self.buf[start..start + pos];
            for line in event.split(|&b| b == b'\n') {
                if let Some(data) = line.strip_prefix(b"data:") {
                    on_data(data.strip_prefix(b" ").unwrap_or(data));
                }
            }
            start += pos + 2;
        }
        self.buf.drain(..start);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `s` cut to at most [`MAX_MESSAGE_BYTES`] at a character boundary, on one line.
fn clip(s: &str) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut end = one_line.len().min(MAX_MESSAGE_BYTES);
    while !one_line.is_char_boundary(end) {
        end -= 1;
    }
    if end < one_line.len() {
        format!("{}…", &one_line[..end])
    } else {
        one_line
    }
}

/// The message of an error body: OpenAI's `{"error": {"message"}}`, vLLM's older `{"message"}`, FastAPI's
/// `{"detail"}`, else the start of the text.
pub fn error_message(body: &[u8]) -> Option<String> {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let m = v
            .pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("detail"))
            .or_else(|| v.get("error"));
        if let Some(m) = m {
            return Some(clip(&match m {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            }));
        }
    }
    let text = String::from_utf8_lossy(body);
    (!text.trim().is_empty()).then(|| clip(&text))
}

/// The innermost cause of an error (for hyper: the socket error, e.g. "Connection refused (os error 111)").
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    clip(&cur.to_string())
}

/// Sends `body` to `url` and reads the stream to its end (or `timeout`).
pub async fn run_request(
    client: &HttpClient,
    url: &hyper::Uri,
    body: Bytes,
    timeout: Duration,
) -> Outcome {
    let start = Instant::now();
    let mut out = Outcome::default();
    let result = tokio::time::timeout(timeout, stream(client, url, body, start, &mut out)).await;
    out.e2e_us = start.elapsed().as_micros() as u64;
    match result {
        Err(_) => {
            out.error = Some("timeout".into());
            out.message = Some(format!(
                "no complete response within {:.0} s (--timeout-secs)",
                timeout.as_secs_f64()
            ));
        }
        Ok(Err(kind)) => out.error = Some(kind),
        Ok(Ok(())) => {}
    }
    out
}

async fn stream(
    client: &HttpClient,
    url: &hyper::Uri,
    body: Bytes,
    start: Instant,
    out: &mut Outcome,
) -> Result<(), String> {
    let req = hyper::Request::post(url.clone())
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .body(Full::new(body))
        .map_err(|_| "bad_request".to_string())?;
    let resp = client.request(req).await.map_err(|e| {
        out.message = Some(root_cause(&e));
        if e.is_connect() {
            "connect".to_string()
        } else {
            "http".to_string()
        }
    })?;
    out.status = Some(resp.status().as_u16());
    out.worker = WORKER_HEADERS.iter().find_map(|h| {
        resp.headers()
            .get(*h)
            .and_then(|v| v.to_str().ok())
            .map(clip)
    });
    if !resp.status().is_success() {
        let status = resp.status().as_u16();
        // At most 64 KiB of an error body are read, for its message.
        let body = http_body_util::Limited::new(resp.into_body(), 64 << 10)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        out.message = error_message(&body).or_else(|| {
            hyper::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason().map(str::to_owned))
        });
        return Err(format!("http_{status}"));
    }
    let mut body = resp.into_body();
    let mut scanner = SseScanner::default();
    let (mut last, mut events, mut done) = (None::<Instant>, 0u32, false);
    let mut usage_tokens = None;
    let mut stream_error: Option<String> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            out.message = Some(root_cause(&e));
            "stream_broken".to_string()
        })?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        scanner.feed(data, |payload| {
            if payload == b"[DONE]" {
                done = true;
                return;
            }
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
                return;
            };
            if v.get("error").is_some() {
                stream_error = error_message(payload);
                return;
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                usage_tokens = u
                    .get("completion_tokens")
                    .and_then(|t| t.as_u64())
                    .map(|t| t as u32);
                out.prompt_tokens = u
                    .get("prompt_tokens")
                    .and_then(|t| t.as_u64())
                    .map(|t| t as u32);
            }
            let choice = v.get("choices").and_then(|c| c.get(0));
            let text = choice.and_then(|c| {
                c.get("delta")
                    .and_then(|d| d.get("content"))
                    .or_else(|| c.get("text"))
                    .and_then(|t| t.as_str())
            });
            if text.is_some_and(|t| !t.is_empty()) {
                match last {
                    None => out.ttft_us = Some(now.duration_since(start).as_micros() as u64),
                    Some(prev) => out.itl_us.push(now.duration_since(prev).as_micros() as u64),
                }
                last = Some(now);
                events += 1;
            }
        });
    }
    out.tokens = usage_tokens.unwrap_or(events);
    if let Some(m) = stream_error {
        out.message = Some(m);
        return Err("stream_error".into());
    }
    if !done {
        out.message = Some("the stream ended without `data: [DONE]`".into());
        return Err("incomplete".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scanner_splits_events_across_chunks() {
        let mut s = SseScanner::default();
        let mut got = Vec::new();
        s.feed(b"data: {\"a\":1}\n\nda", |d| got.push(d.to_vec()));
        s.feed(b"ta: [DONE]\r\n\r", |d| got.push(d.to_vec()));
        assert_eq!(got.len(), 1, "the second event is not complete yet");
        s.feed(b"\ndata: x\n", |d| got.push(d.to_vec()));
        assert_eq!(got, vec![b"{\"a\":1}".to_vec(), b"[DONE]".to_vec()]);
    }

    #[test]
    fn error_messages_come_from_the_body() {
        let openai = br#"{"error":{"message":"The model `x` does not exist.","type":"NotFoundError","code":404}}"#;
        assert_eq!(
            error_message(openai).as_deref(),
            Some("The model `x` does not exist.")
        );
        assert_eq!(
            error_message(br#"{"detail":"Not Found"}"#).as_deref(),
            Some("Not Found")
        );
        assert_eq!(
            error_message(b"<html>\n bad   gateway </html>").as_deref(),
            Some("<html> bad gateway </html>")
        );
        assert_eq!(error_message(b""), None);
        let long = "é".repeat(1000);
        let m = error_message(long.as_bytes()).unwrap();
        assert!(m.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8(), "{}", m.len());
    }

    #[test]
    fn tpot_follows_vllm_definition() {
        let o = Outcome {
            ttft_us: Some(100),
            e2e_us: 1100,
            tokens: 11,
            ..Default::default()
        };
        assert_eq!(o.tpot_us(), Some(100.0));
        assert_eq!(Outcome { tokens: 1, ..o }.tpot_us(), None);
    }
}
