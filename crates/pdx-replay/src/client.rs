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

/// What happened to one request.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Error kind (`connect`, `http_503`, `stream_error`, `timeout`, `incomplete`, …) or `None` on success.
    pub error: Option<String>,
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
        Err(_) => out.error = Some("timeout".into()),
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
        if e.is_connect() {
            "connect".to_string()
        } else {
            "http".to_string()
        }
    })?;
    if !resp.status().is_success() {
        return Err(format!("http_{}", resp.status().as_u16()));
    }
    let mut body = resp.into_body();
    let mut scanner = SseScanner::default();
    let (mut last, mut events, mut done) = (None::<Instant>, 0u32, false);
    let mut usage_tokens = None;
    let mut stream_error = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| "stream_broken".to_string())?;
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
                stream_error = true;
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
    if stream_error {
        return Err("stream_error".into());
    }
    if !done {
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
