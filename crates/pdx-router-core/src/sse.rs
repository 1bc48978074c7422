//! Allocation-free scanner of server-sent-event boundaries.
//!
//! The router forwards decode SSE chunks untouched; it only needs to know how many events
//! a chunk completes (to count streamed tokens and time TTFT/ITL). An event ends with a
//! blank line, `\n\n` (WHATWG HTML, "Server-sent events", event stream interpretation); the
//! two newlines may arrive in different chunks. `\r\n` line endings are not produced by
//! vLLM, SGLang or the mock and are not recognised.

/// Stream state: whether the last byte seen was `\n`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SseScanner {
    last_newline: bool,
}

/// What one chunk contained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanResult {
    /// Events completed by this chunk.
    pub events: u32,
    /// The chunk contains the final `data: [DONE]` event.
    pub done: bool,
}

impl SseScanner {
    /// A scanner at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Scans one chunk.
    pub fn scan(&mut self, chunk: &[u8]) -> ScanResult {
        let mut events = 0;
        let mut prev = self.last_newline;
        for &b in chunk {
            let nl = b == b'\n';
            if nl && prev {
                events += 1;
                prev = false;
            } else {
                prev = nl;
            }
        }
        self.last_newline = prev;
        let done = chunk.windows(12).any(|w| w == b"data: [DONE]");
        ScanResult { events, done }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_events_across_chunk_splits() {
        let stream = b"data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: [DONE]\n\n";
        for split in 0..stream.len() {
            let mut s = SseScanner::new();
            let a = s.scan(&stream[..split]);
            let b = s.scan(&stream[split..]);
            assert_eq!(a.events + b.events, 3, "split at {split}");
        }
        let mut s = SseScanner::new();
        let r = s.scan(stream);
        assert_eq!(
            r,
            ScanResult {
                events: 3,
                done: true
            }
        );
        // Three newlines are one boundary plus a dangling newline.
        let mut s = SseScanner::new();
        assert_eq!(s.scan(b"x\n\n\n").events, 1);
        assert_eq!(s.scan(b"\n").events, 1);
    }
}
