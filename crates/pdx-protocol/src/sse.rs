//! Server-sent events framing as used by OpenAI-compatible streaming: each event is
//! `data: <json>\n\n`, and the stream ends with `data: [DONE]\n\n`.

use bytes::{BufMut, Bytes, BytesMut};

/// Prefix of every event line.
pub const DATA_PREFIX: &[u8] = b"data: ";
/// Event terminator.
pub const EVENT_SUFFIX: &[u8] = b"\n\n";
/// The final event.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// Frames one JSON payload as an SSE event.
pub fn event(json: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(json.len() + 8);
    put_event(&mut b, json);
    b.freeze()
}

/// Appends `data: <json>\n\n` to `buf`.
pub fn put_event(buf: &mut BytesMut, json: &[u8]) {
    buf.reserve(json.len() + 8);
    buf.put_slice(DATA_PREFIX);
    buf.put_slice(json);
    buf.put_slice(EVENT_SUFFIX);
}

/// Serializes `value` and frames it as an SSE event.
pub fn json_event<T: serde::Serialize>(value: &T) -> Result<Bytes, serde_json::Error> {
    Ok(event(&serde_json::to_vec(value)?))
}

/// Incremental SSE parser for clients (router, tests): feed bytes, get `data:` payloads.
/// `[DONE]` is returned as the payload `b"[DONE]"`.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    /// New parser.
    pub fn new() -> Self {
        Self::default()
    }
    /// Feeds bytes; returns the data payloads of the events completed by them.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let ev: Vec<u8> = self.buf.drain(..pos + 2).collect();
            let mut data = Vec::new();
            for line in ev[..pos].split(|&c| c == b'\n') {
                if let Some(rest) = line.strip_prefix(b"data:") {
                    let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                    if !data.is_empty() {
                        data.push(b'\n');
                    }
                    data.extend_from_slice(rest);
                }
            }
            if !data.is_empty() {
                out.push(data);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_parses_split_events() {
        let mut all = Vec::new();
        all.extend_from_slice(&event(br#"{"a":1}"#));
        all.extend_from_slice(DONE);
        assert_eq!(&all[..], &b"data: {\"a\":1}\n\ndata: [DONE]\n\n"[..]);
        let mut p = SseParser::new();
        let mut got = Vec::new();
        for c in all.chunks(3) {
            got.extend(p.feed(c));
        }
        assert_eq!(got, vec![br#"{"a":1}"#.to_vec(), b"[DONE]".to_vec()]);
    }
}
