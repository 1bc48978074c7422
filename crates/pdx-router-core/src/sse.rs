//! Allocation-free scanner of server-sent-event boundaries.
//!
//! The router forwards decode SSE chunks untouched; it only needs to know how many events
//! a chunk completes (to count streamed tokens and time TTFT/ITL). An event ends with a
//! blank line, `\n\n` (WHATWG HTML, "Server-sent events", event stream interpretation); the
//! two newlines may arrive in different chunks. `\r\n` line endings are not produced by
//! vLLM, SGLang or the mock and are not recognised.

/// The final event of an OpenAI-compatible stream, as its first bytes.
const DONE: &[u8; 12] = b"data: [DONE]";

/// Stream state: whether the last byte seen was `\n`, and the first bytes (up to 12) of the event not yet
/// complete, so that the `[DONE]` event is recognised however the chunks split it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SseScanner {
    last_newline: bool,
    head: [u8; DONE.len()],
    head_len: u8,
}

/// What one chunk contained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanResult {
    /// Events completed by this chunk.
    pub events: u32,
    /// One of the events completed by this chunk is the final `data: [DONE]` event (so `done` never exceeds
    /// `events`: token events are `events - done`).
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
        let mut done = false;
        // A newline that completes a boundary must sit at `expect` (right after the pending one).
        let mut pending = self.last_newline;
        let mut expect = 0;
        // Where the event in progress starts in this chunk.
        let mut start = 0;
        for i in memchr::memchr_iter(b'\n', chunk) {
            if pending && i == expect {
                self.note_head(&chunk[start..i]);
                events += 1;
                done |= self.head_len as usize == DONE.len() && self.head == *DONE;
                self.head_len = 0;
                start = i + 1;
                pending = false;
            } else {
                pending = true;
                expect = i + 1;
            }
        }
        self.note_head(&chunk[start..]);
        self.last_newline = pending && expect == chunk.len();
        ScanResult { events, done }
    }

    /// Keeps the first bytes of the event in progress (its part in this chunk is `part`), up to [`DONE`]'s length.
    fn note_head(&mut self, part: &[u8]) {
        let have = usize::from(self.head_len);
        let n = (DONE.len() - have).min(part.len());
        self.head[have..have + n].copy_from_slice(&part[..n]);
        self.head_len += n as u8;
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
        // `[DONE]` is reported with the chunk that completes its event, wherever the chunks split it, and never
        // without an event.
        for split in 0..=stream.len() {
            let mut s = SseScanner::new();
            let a = s.scan(&stream[..split]);
            let b = s.scan(&stream[split..]);
            assert!(
                u32::from(a.done) <= a.events && u32::from(b.done) <= b.events,
                "split at {split}"
            );
            // The event ends with the stream's last byte: the chunk holding it reports `[DONE]`.
            assert_eq!(
                (a.done, b.done),
                (split == stream.len(), split < stream.len()),
                "split at {split}"
            );
        }
        // Byte by byte as well.
        let mut s = SseScanner::new();
        let (mut events, mut done) = (0, 0);
        for b in stream {
            let r = s.scan(std::slice::from_ref(b));
            assert!(u32::from(r.done) <= r.events);
            (events, done) = (events + r.events, done + u32::from(r.done));
        }
        assert_eq!((events, done), (3, 1));
        // `[DONE]` inside a token's text is not the final event.
        let mut s = SseScanner::new();
        let r = s.scan(b"data: {\"text\":\"data: [DONE]\"}\n\n");
        assert_eq!((r.events, r.done), (1, false));
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
