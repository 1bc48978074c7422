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

    /// Scans one chunk: SIMD searches for its newlines and for `data: [DONE]` (`memchr`), so a token event
    /// of ~200 bytes costs a few dozen nanoseconds, not a byte-by-byte loop (issue 19's chunks per CPU-second).
    pub fn scan(&mut self, chunk: &[u8]) -> ScanResult {
        let mut events = 0;
        // A newline that completes a boundary must sit at `expect` (right after the pending one).
        let mut pending = self.last_newline;
        let mut expect = 0;
        for i in memchr::memchr_iter(b'\n', chunk) {
            if pending && i == expect {
                events += 1;
                pending = false;
            } else {
                pending = true;
                expect = i + 1;
            }
        }
        self.last_newline = pending && expect == chunk.len();
        let done = done_finder().find(chunk).is_some();
        ScanResult { events, done }
    }
}

/// The searcher for `data: [DONE]`, built once.
fn done_finder() -> &'static memchr::memmem::Finder<'static> {
    static DONE: std::sync::OnceLock<memchr::memmem::Finder<'static>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| memchr::memmem::Finder::new(b"data: [DONE]"))
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

    /// The byte-by-byte definition the SIMD scan must agree with.
    fn reference(last_newline: &mut bool, chunk: &[u8]) -> u32 {
        let mut events = 0;
        for &b in chunk {
            let nl = b == b'\n';
            if nl && *last_newline {
                events += 1;
                *last_newline = false;
            } else {
                *last_newline = nl;
            }
        }
        events
    }

    #[test]
    fn agrees_with_the_byte_by_byte_definition_on_any_split() {
        // Every string of up to 8 bytes over {'\n', 'x'}, split at every point.
        for len in 0..=8u32 {
            for bits in 0..(1u32 << len) {
                let bytes: Vec<u8> = (0..len)
                    .map(|i| if bits >> i & 1 == 1 { b'\n' } else { b'x' })
                    .collect();
                for split in 0..=bytes.len() {
                    let (mut s, mut r) = (SseScanner::new(), false);
                    for part in [&bytes[..split], &bytes[split..]] {
                        assert_eq!(
                            s.scan(part).events,
                            reference(&mut r, part),
                            "{bytes:?} at {split}"
                        );
                        assert_eq!(s.last_newline, r, "{bytes:?} at {split}");
                    }
                }
            }
        }
    }
}
