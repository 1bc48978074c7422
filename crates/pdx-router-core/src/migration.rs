//! Stream migration, sans-IO: moving a streamed decode to another worker mid-stream.
//!
//! When a decode worker fails mid-stream (its connection is lost, it sends a 5xx error event, or it goes
//! silent past the stream idle timeout), or, when enabled, when another worker of the pool is much less
//! loaded, the router re-issues the request with the text already sent appended (an assistant message
//! continued with `continue_final_message`, or the completion prompt extended) and `max_tokens` reduced by
//! the tokens already sent, and splices the new worker's stream onto the client's: same `id`, no role chunk
//! again, one `usage` at the end. NVIDIA Dynamo does the same at the token level on a worker failure
//! (`lib/llm/src/migration.rs`: the request is re-sent with the tokens generated so far); the HTTP
//! re-issue with `continue_final_message` / `add_generation_prompt: false` is what vLLM's OpenAI server
//! accepts (`vllm/entrypoints/openai/protocol.py`, `ChatCompletionRequest`).
//!
//! This module holds the decisions and the stream bookkeeping, with no I/O and no clock:
//! * [`Transcript`]: what the client has been sent so far, read from complete SSE events (`id`, the text of
//!   choice 0 still JSON-escaped, the token events, whether it finished), without allocating per event: its
//!   text buffer starts at [`FIRST_TEXT_BYTES`] at most and doubles, so a stream of n text bytes makes
//!   O(log n) allocations, and a stream that is held (not yet long) costs little memory;
//! * [`Splice`]: rewrites the events of a continuation stream for the client;
//! * [`MigrationBudget`]: at most N voluntary (score-gap) moves per sliding window, per pool;
//! * [`load_gap`]: the gap between a stream's worker and the pool's best one, the one place that decides
//!   what "better" means (today: in-flight tokens as the router counts them).

use crate::Candidate;
use memchr::memmem::Finder;
use std::collections::VecDeque;
use std::sync::OnceLock;

/// Why a stream moved (the `reason` label of `pdx_migrations_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoveReason {
    /// The upstream connection broke before the stream ended.
    ConnectionLost,
    /// The worker sent an SSE error event with a 5xx code (or none) before the end.
    ServerError,
    /// The worker sent nothing for the stream idle timeout.
    Stalled,
    /// Voluntary: another worker of the pool was better by more than the threshold.
    ScoreGap,
}

impl MoveReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::ConnectionLost => "connection_lost",
            MoveReason::ServerError => "server_error",
            MoveReason::Stalled => "stalled",
            MoveReason::ScoreGap => "score_gap",
        }
    }
}

/// At most `max_moves` moves in any window of `window_us` µs (a sliding window), for one pool.
#[derive(Debug, Clone)]
pub struct MigrationBudget {
    max_moves: u32,
    window_us: u64,
    moves: VecDeque<u64>,
}

impl MigrationBudget {
    /// A budget of `max_moves` per `window_us` µs (0 moves: never).
    pub fn new(max_moves: u32, window_us: u64) -> Self {
        Self {
            max_moves,
            window_us,
            moves: VecDeque::with_capacity(max_moves.min(1024) as usize),
        }
    }

    /// Takes one move at `now_us` if the window has room; false (and nothing taken) otherwise.
    pub fn try_take(&mut self, now_us: u64) -> bool {
        while self
            .moves
            .front()
            .is_some_and(|&t| now_us.saturating_sub(t) >= self.window_us)
        {
            self.moves.pop_front();
        }
        if self.moves.len() >= self.max_moves as usize {
            return false;
        }
        self.moves.push_back(now_us);
        true
    }

    /// Moves still allowed at `now_us`.
    pub fn available(&self, now_us: u64) -> u32 {
        let used = self
            .moves
            .iter()
            .filter(|&&t| now_us.saturating_sub(t) < self.window_us)
            .count() as u32;
        self.max_moves.saturating_sub(used)
    }
}

/// How much better `best` is than `current` for a stream of `own_tokens` tokens, as a fraction of the current
/// worker's load: `(load(current) − (load(best) + own)) / load(current)`, where load is the in-flight tokens
/// the router counts. The stream's own tokens are counted on the target side, so a move never makes the target
/// look better than the source afterwards (no ping-pong between two workers). ≤ 0: no gain.
///
/// The one function that says what "better" means: a score policy with engine telemetry replaces the load here.
pub fn load_gap(current: &Candidate, best: &Candidate, own_tokens: u64) -> f64 {
    let cur = current.in_flight_tokens as f64;
    if cur <= 0.0 {
        return 0.0;
    }
    (cur - (best.in_flight_tokens + own_tokens) as f64) / cur
}

/// What one SSE event was, for the stream's bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A chunk of choice 0 carrying generated text (one token event).
    Token,
    /// The chat stream's opening chunk (`delta.role`, no text).
    Role,
    /// The usage chunk.
    Usage,
    /// `data: [DONE]`.
    Done,
    /// An error event; `server`: its code is 5xx or absent (a worker failure, not a bad request).
    Error {
        /// 5xx or no code.
        server: bool,
    },
    /// Anything else (comments, other choices, unknown shapes).
    Other,
}

/// Largest text the transcript keeps, bytes (escaped); a longer stream is no longer migratable.
pub const MAX_TRANSCRIPT_BYTES: usize = 8 << 20;

/// Largest first allocation of the transcript's text, bytes (escaped). Sizing the buffer for the whole
/// `max_tokens` up front (8 B a token) cost 8 KB per in-flight stream of 1000 tokens, most of the router's
/// memory per stream (issue 19's bar is 16 KiB); from here it doubles as the text grows, so forwarding
/// still makes only about log2(text bytes / 512) allocations per stream, none per chunk in between.
pub const FIRST_TEXT_BYTES: usize = 512;

/// What the client has been sent of one stream (choice 0), read event by event.
#[derive(Debug, Clone, Default)]
pub struct Transcript {
    chat: bool,
    id: Vec<u8>,
    text: Vec<u8>,
    tokens: u32,
    role: bool,
    finished: bool,
    usage: bool,
    done: bool,
    migratable: bool,
}

impl Transcript {
    /// A transcript of a chat (`delta.content`) or text-completion (`text`) stream; `expected_tokens` (the
    /// request's output limit) sizes the text buffer's first allocation, 8 B a token, at most
    /// [`FIRST_TEXT_BYTES`]; it doubles from there (see [`Transcript::event`]).
    pub fn new(chat: bool, expected_tokens: u32) -> Self {
        Self {
            chat,
            // Engines' ids are short (`chatcmpl-` and a uuid): room for one made once, here.
            id: Vec::with_capacity(64),
            text: Vec::with_capacity(
                (expected_tokens as usize)
                    .saturating_mul(8)
                    .min(FIRST_TEXT_BYTES),
            ),
            migratable: true,
            ..Default::default()
        }
    }

    /// Makes room for `more` text bytes (`len + more` ≤ [`MAX_TRANSCRIPT_BYTES`]): the capacity doubles (at
    /// least [`FIRST_TEXT_BYTES`], at least what is needed, at most the bound), so growing is O(log n) per
    /// stream and the buffer never holds more than twice its text (or the first allocation).
    fn reserve_text(&mut self, more: usize) {
        let need = self.text.len() + more;
        if need <= self.text.capacity() {
            return;
        }
        let target = (self.text.capacity() * 2)
            .max(FIRST_TEXT_BYTES)
            .max(need)
            .min(MAX_TRANSCRIPT_BYTES);
        self.text.reserve_exact(target - self.text.len());
    }

    /// The stream's `id` as sent, JSON-escaped, without quotes (empty until the first event with one).
    pub fn id_escaped(&self) -> &[u8] {
        &self.id
    }
    /// The text of choice 0 sent so far, JSON-escaped, without quotes.
    pub fn text_escaped(&self) -> &[u8] {
        &self.text
    }
    /// The text of choice 0 sent so far (`None` if the escaped bytes do not parse as a JSON string).
    pub fn text(&self) -> Option<String> {
        let mut quoted = Vec::with_capacity(self.text.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(&self.text);
        quoted.push(b'"');
        serde_json::from_slice(&quoted).ok()
    }
    /// Token events of choice 0 sent so far.
    pub fn tokens(&self) -> u32 {
        self.tokens
    }
    /// The chat stream's role chunk was sent.
    pub fn role_sent(&self) -> bool {
        self.role
    }
    /// A `finish_reason` was sent: the generation is complete.
    pub fn finished(&self) -> bool {
        self.finished
    }
    /// The usage chunk was sent.
    pub fn usage_sent(&self) -> bool {
        self.usage
    }
    /// `[DONE]` was sent.
    pub fn done(&self) -> bool {
        self.done
    }
    /// The stream can still be moved: one choice, text within [`MAX_TRANSCRIPT_BYTES`], not finished.
    pub fn migratable(&self) -> bool {
        self.migratable && !self.finished && !self.done
    }
    /// Marks the stream as not movable (a shape the transcript cannot follow).
    pub fn forbid(&mut self) {
        self.migratable = false;
    }

    /// Reads one complete event (its bytes without the blank line that ends it) that the client is sent.
    pub fn event(&mut self, event: &[u8]) -> EventKind {
        let Some(p) = data_payload(event) else {
            return EventKind::Other;
        };
        if p == b"[DONE]" {
            self.done = true;
            return EventKind::Done;
        }
        if let Some(i) = value_of(p, &keys().error) {
            let server = match value_of(&p[i..], &keys().code) {
                Some(j) => !p[i + j..].starts_with(b"4"),
                None => true,
            };
            return EventKind::Error { server };
        }
        if self.id.is_empty() {
            if let Some(s) = value_of(p, &keys().id).and_then(|i| string_at(&p[i..])) {
                self.id.extend_from_slice(s);
            }
        }
        let usage = value_of(p, &keys().usage).is_some_and(|i| p[i..].starts_with(b"{"));
        if usage {
            self.usage = true;
        }
        let Some(ci) = value_of(p, &keys().choices).filter(|&i| p[i..].starts_with(b"[")) else {
            return if usage {
                EventKind::Usage
            } else {
                EventKind::Other
            };
        };
        let choices = &p[ci..];
        if choices.starts_with(b"[]") {
            return if usage {
                EventKind::Usage
            } else {
                EventKind::Other
            };
        }
        if value_of(choices, &keys().index).is_some_and(|i| !choices[i..].starts_with(b"0")) {
            // Another choice (n > 1): the transcript follows choice 0 only, so this stream stays put.
            self.migratable = false;
            return EventKind::Other;
        }
        if value_of(choices, &keys().finish_reason).is_some_and(|i| choices[i..].starts_with(b"\""))
        {
            self.finished = true;
        }
        let key = if self.chat {
            &keys().content
        } else {
            &keys().text
        };
        let Some(piece) = value_of(choices, key).and_then(|i| string_at(&choices[i..])) else {
            return EventKind::Other;
        };
        if self.chat && piece.is_empty() && value_of(choices, &keys().role).is_some() {
            self.role = true;
            return EventKind::Role;
        }
        if self.text.len() + piece.len() > MAX_TRANSCRIPT_BYTES {
            self.migratable = false;
        } else {
            self.reserve_text(piece.len());
            self.text.extend_from_slice(piece);
        }
        self.tokens += 1;
        EventKind::Token
    }
}

/// The payload of an event's first `data:` line (one optional space after the colon).
fn data_payload(event: &[u8]) -> Option<&[u8]> {
    let mut rest = event;
    while !rest.is_empty() {
        // Line ends found by SIMD search: the byte-by-byte split was most of this function's time.
        let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
        if let Some(p) = rest[..end].strip_prefix(b"data:") {
            return Some(p.strip_prefix(b" ").unwrap_or(p));
        }
        rest = rest.get(end + 1..).unwrap_or_default();
    }
    None
}

/// The keys [`Transcript::event`] looks up, each as its quoted bytes' SIMD searcher (`memchr::memmem`), built
/// once: an event is searched for up to eight keys, so a byte-by-byte search was most of the router's CPU time
/// per forwarded chunk (issue 19).
struct Keys {
    error: Finder<'static>,
    code: Finder<'static>,
    id: Finder<'static>,
    usage: Finder<'static>,
    choices: Finder<'static>,
    index: Finder<'static>,
    finish_reason: Finder<'static>,
    content: Finder<'static>,
    text: Finder<'static>,
    role: Finder<'static>,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        error: Finder::new(b"\"error\""),
        code: Finder::new(b"\"code\""),
        id: Finder::new(b"\"id\""),
        usage: Finder::new(b"\"usage\""),
        choices: Finder::new(b"\"choices\""),
        index: Finder::new(b"\"index\""),
        finish_reason: Finder::new(b"\"finish_reason\""),
        content: Finder::new(b"\"content\""),
        text: Finder::new(b"\"text\""),
        role: Finder::new(b"\"role\""),
    })
}

/// Index (in `json`) of the value of the first key `quoted_key` (the key with its quotes, as searched for by
/// the finder), after the colon and any spaces. In valid JSON the bytes `"key":` occur only as that key: inside
/// a string every quote is escaped.
fn value_of(json: &[u8], quoted_key: &Finder<'_>) -> Option<usize> {
    let n = quoted_key.needle().len();
    let mut from = 0;
    while let Some(rel) = quoted_key.find(&json[from..]) {
        let i = from + rel;
        let mut j = i + n;
        while json.get(j).is_some_and(|b| b.is_ascii_whitespace()) {
            j += 1;
        }
        if json.get(j) == Some(&b':') {
            j += 1;
            while json.get(j).is_some_and(|b| b.is_ascii_whitespace()) {
                j += 1;
            }
            return Some(j);
        }
        from = i + 1;
    }
    None
}

/// The escaped content of the JSON string starting at `s[0]` (a quote), without its quotes.
fn string_at(s: &[u8]) -> Option<&[u8]> {
    if s.first() != Some(&b'"') {
        return None;
    }
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'\\' => i += 2,
            b'"' => return Some(&s[1..i]),
            _ => i += 1,
        }
    }
    None
}

/// What to do with one event of a continuation stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrite {
    /// Send it as it is.
    Keep,
    /// Do not send it (the continuation's opening role chunk: the client had one).
    Drop,
    /// Send this event instead (complete, with its blank line).
    Replace(Vec<u8>),
}

/// Rewrites a continuation stream's events for the client: the original `id` on every chunk, the opening role
/// chunk dropped, and the usage made one total: the original's prompt tokens (the continuation's prompt tokens
/// less the `base_tokens` already sent, which it appended) and every completion token.
#[derive(Debug, Clone)]
pub struct Splice {
    id: Option<String>,
    base_tokens: u32,
    drop_role: bool,
}

impl Splice {
    /// A splice after `t` (the transcript at the move).
    pub fn new(t: &Transcript) -> Self {
        let mut quoted = Vec::with_capacity(t.id.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(&t.id);
        quoted.push(b'"');
        Self {
            id: serde_json::from_slice(&quoted)
                .ok()
                .filter(|s: &String| !s.is_empty()),
            base_tokens: t.tokens,
            drop_role: t.role,
        }
    }

    /// The rewrite of one complete event (without its blank line).
    pub fn rewrite(&self, event: &[u8]) -> Rewrite {
        let Some(p) = data_payload(event) else {
            return Rewrite::Keep;
        };
        let Ok(serde_json::Value::Object(mut v)) = serde_json::from_slice(p) else {
            return Rewrite::Keep; // `[DONE]`, or not JSON
        };
        if v.contains_key("error") {
            return Rewrite::Keep;
        }
        if let Some(c) = v
            .get("choices")
            .and_then(|c| c.as_array())
            .and_then(|c| c.first())
        {
            let delta = c.get("delta");
            let role_only = delta.is_some_and(|d| {
                d.get("role").is_some()
                    && d.get("content")
                        .is_none_or(|x| x.as_str().is_some_and(str::is_empty) || x.is_null())
            }) && c.get("finish_reason").is_none_or(|f| f.is_null());
            if role_only && self.drop_role {
                return Rewrite::Drop;
            }
        }
        if let (Some(id), Some(slot)) = (&self.id, v.get_mut("id")) {
            *slot = serde_json::Value::String(id.clone());
        }
        if let Some(serde_json::Value::Object(u)) = v.get_mut("usage") {
            let get = |u: &serde_json::Map<String, serde_json::Value>, k: &str| {
                u.get(k).and_then(|x| x.as_u64()).unwrap_or(0)
            };
            let base = u64::from(self.base_tokens);
            let prompt = get(u, "prompt_tokens").saturating_sub(base);
            let completion = get(u, "completion_tokens") + base;
            u.insert("prompt_tokens".into(), prompt.into());
            u.insert("completion_tokens".into(), completion.into());
            u.insert("total_tokens".into(), (prompt + completion).into());
            if let Some(serde_json::Value::Object(d)) = u.get_mut("prompt_tokens_details") {
                if let Some(c) = d.get("cached_tokens").and_then(|x| x.as_u64()) {
                    d.insert("cached_tokens".into(), c.min(prompt).into());
                }
            }
        }
        let mut out = Vec::with_capacity(p.len() + 16);
        out.extend_from_slice(b"data: ");
        if serde_json::to_writer(&mut out, &v).is_err() {
            return Rewrite::Keep;
        }
        out.extend_from_slice(b"\n\n");
        Rewrite::Replace(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(tokens: u64) -> Candidate {
        Candidate::new(0, 1, tokens, true)
    }

    #[test]
    fn an_events_payload_is_its_first_data_line() {
        assert_eq!(data_payload(b"data: {\"a\":1}"), Some(&b"{\"a\":1}"[..]));
        assert_eq!(data_payload(b"data:x"), Some(&b"x"[..]));
        assert_eq!(
            data_payload(b": ping\nevent: m\ndata: y\ndata: z"),
            Some(&b"y"[..])
        );
        assert_eq!(data_payload(b"data: "), Some(&b""[..]));
        assert_eq!(data_payload(b": ping\n"), None);
        assert_eq!(data_payload(b""), None);
        assert_eq!(data_payload(b"\n\ndata: w"), Some(&b"w"[..]));
        assert_eq!(data_payload(b"event: data: no"), None);
    }

    #[test]
    fn keys_are_found_only_as_keys() {
        let j = br#"{"text": "the \"text\": inside", "x":1, "text" : "v"}"#;
        let i = value_of(j, &keys().text).unwrap();
        assert_eq!(string_at(&j[i..]), Some(&br#"the \"text\": inside"#[..]));
        let j = br#"{"a":"text","text"  :  "v"}"#;
        assert_eq!(
            string_at(&j[value_of(j, &keys().text).unwrap()..]),
            Some(&b"v"[..])
        );
        assert_eq!(value_of(br#"{"texts":1}"#, &keys().text), None);
        assert_eq!(value_of(br#"{"text""#, &keys().text), None);
    }

    #[test]
    fn budget_allows_n_moves_per_sliding_window() {
        let mut b = MigrationBudget::new(2, 1_000_000);
        assert!(b.try_take(0));
        assert!(b.try_take(10));
        assert!(!b.try_take(20), "third move in the window");
        assert_eq!(b.available(500_000), 0);
        assert!(!b.try_take(999_999));
        assert!(b.try_take(1_000_000), "the first move left the window");
        assert!(!b.try_take(1_000_005));
        assert!(b.try_take(1_000_010));
        assert_eq!(b.available(5_000_000), 2);
        let mut never = MigrationBudget::new(0, 1);
        assert!(!never.try_take(0));
    }

    #[test]
    fn the_gap_counts_the_stream_on_the_target_side() {
        assert_eq!(load_gap(&cand(1000), &cand(100), 100), 0.8);
        // After a move the roles swap and the gap is negative: no move back.
        assert!(load_gap(&cand(200), &cand(900), 100) < 0.0);
        assert_eq!(load_gap(&cand(0), &cand(0), 10), 0.0);
    }

    const CHAT: &[&str] = &[
        r#"data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
        r#"data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" a \"b\""},"logprobs":null,"finish_reason":null}]}"#,
        r#"data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"\n c"},"logprobs":{"content":[{"token":"x"}]},"finish_reason":null}]}"#,
    ];

    #[test]
    fn the_transcript_follows_choice_zero() {
        let mut t = Transcript::new(true, 16);
        assert_eq!(t.event(CHAT[0].as_bytes()), EventKind::Role);
        assert_eq!(t.event(CHAT[1].as_bytes()), EventKind::Token);
        assert_eq!(t.event(CHAT[2].as_bytes()), EventKind::Token);
        assert_eq!(t.tokens(), 2);
        assert_eq!(t.text().as_deref(), Some(" a \"b\"\n c"));
        assert_eq!(t.id_escaped(), b"chatcmpl-7");
        assert!(t.migratable());
        let fin = r#"data: {"id":"chatcmpl-7","choices":[{"index":0,"delta":{"content":" d"},"finish_reason":"length"}]}"#;
        assert_eq!(t.event(fin.as_bytes()), EventKind::Token);
        assert!(t.finished() && !t.migratable());
        let usage = r#"data: {"id":"chatcmpl-7","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}"#;
        assert_eq!(t.event(usage.as_bytes()), EventKind::Usage);
        assert_eq!(t.event(b"data: [DONE]"), EventKind::Done);
        assert!(t.done() && t.usage_sent());

        let mut c = Transcript::new(false, 4);
        let ev = r#"data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":" x","logprobs":{"text_offset":[0],"tokens":["x"]},"finish_reason":null}]}"#;
        assert_eq!(c.event(ev.as_bytes()), EventKind::Token);
        assert_eq!(c.text().as_deref(), Some(" x"));
        let other =
            r#"data: {"id":"cmpl-1","choices":[{"index":1,"text":" y","finish_reason":null}]}"#;
        assert_eq!(c.event(other.as_bytes()), EventKind::Other);
        assert!(!c.migratable(), "n > 1 is not followed");
    }

    /// A text event carrying `piece` (already JSON-safe).
    fn text_event(piece: &str) -> String {
        format!(
            r#"data: {{"id":"cmpl-1","object":"text_completion","choices":[{{"index":0,"text":"{piece}","finish_reason":null}}]}}"#
        )
    }

    #[test]
    fn the_text_buffer_starts_small_and_doubles_up_to_its_bound() {
        // A 1000-token request no longer takes 8 KB up front.
        let t = Transcript::new(false, 1000);
        assert_eq!(t.text.capacity(), FIRST_TEXT_BYTES);
        // A short request takes less than the first allocation.
        assert_eq!(Transcript::new(false, 4).text.capacity(), 32);

        let mut t = Transcript::new(false, 1000);
        let ev = text_event(" word"); // 5 B of text an event
        let mut caps = vec![t.text.capacity()];
        for _ in 0..100_000 {
            assert_eq!(t.event(ev.as_bytes()), EventKind::Token);
            if t.text.capacity() != *caps.last().unwrap() {
                caps.push(t.text.capacity());
            }
            // Never more than twice the text once past the first allocation.
            assert!(t.text.capacity() <= (2 * t.text.len()).max(FIRST_TEXT_BYTES));
        }
        assert_eq!(t.text_escaped().len(), 500_000);
        // 512 B doubled to 512 KiB: 10 growths for 500 kB of text.
        assert_eq!(caps.len(), 11, "{caps:?}");
        assert!(caps.windows(2).all(|w| w[1] == 2 * w[0]), "{caps:?}");
        assert_eq!(t.text().unwrap().len(), 500_000);

        // The first piece may be longer than the first allocation.
        let mut t = Transcript::new(false, 1);
        let long = "y".repeat(3000);
        t.event(text_event(&long).as_bytes());
        assert_eq!(t.text_escaped(), long.as_bytes());
        assert_eq!(t.text.capacity(), 3000);
    }

    #[test]
    fn the_text_buffer_stops_at_its_bound_and_the_stream_stays_put() {
        let mut t = Transcript::new(false, 1000);
        let piece = "z".repeat(1 << 16); // 64 KiB an event
        let ev = text_event(&piece);
        for _ in 0..(MAX_TRANSCRIPT_BYTES >> 16) {
            t.event(ev.as_bytes());
            assert!(t.text.capacity() <= MAX_TRANSCRIPT_BYTES);
        }
        assert_eq!(t.text_escaped().len(), MAX_TRANSCRIPT_BYTES);
        assert!(t.migratable());
        // One more byte than the bound: kept out, and the stream is no longer movable.
        assert_eq!(t.event(text_event("!").as_bytes()), EventKind::Token);
        assert_eq!(t.text_escaped().len(), MAX_TRANSCRIPT_BYTES);
        assert_eq!(t.text.capacity(), MAX_TRANSCRIPT_BYTES);
        assert!(!t.migratable());
        assert_eq!(t.tokens() as usize, (MAX_TRANSCRIPT_BYTES >> 16) + 1);
    }

    #[test]
    fn error_events_tell_server_failures_from_bad_requests() {
        let mut t = Transcript::new(true, 1);
        let e500 = br#"data: {"error":{"message":"boom","type":"InternalServerError","param":null,"code":500}}"#;
        let e400 = br#"data: {"error":{"message":"bad","type":"BadRequestError","code":400}}"#;
        let bare = br#"data: {"error":"engine dead"}"#;
        assert_eq!(t.event(e500), EventKind::Error { server: true });
        assert_eq!(t.event(e400), EventKind::Error { server: false });
        assert_eq!(t.event(bare), EventKind::Error { server: true });
        // A key-like text inside a string is not a key.
        let tricky = br#"data: {"id":"x","choices":[{"index":0,"delta":{"content":"\"error\": no"},"finish_reason":null}]}"#;
        assert_eq!(t.event(tricky), EventKind::Token);
        assert_eq!(t.text().as_deref(), Some("\"error\": no"));
    }

    #[test]
    fn the_splice_keeps_the_id_drops_the_role_chunk_and_totals_the_usage() {
        let mut t = Transcript::new(true, 4);
        for e in CHAT {
            t.event(e.as_bytes());
        }
        let s = Splice::new(&t);
        let role = r#"data: {"id":"chatcmpl-99","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        assert_eq!(s.rewrite(role.as_bytes()), Rewrite::Drop);
        let tok = r#"data: {"id":"chatcmpl-99","choices":[{"index":0,"delta":{"content":" e"},"finish_reason":null}]}"#;
        let Rewrite::Replace(out) = s.rewrite(tok.as_bytes()) else {
            panic!("rewritten")
        };
        let v: serde_json::Value = serde_json::from_slice(&out[6..out.len() - 2]).unwrap();
        assert_eq!(v["id"], "chatcmpl-7");
        assert_eq!(v["choices"][0]["delta"]["content"], " e");
        assert!(out.ends_with(b"\n\n"));
        let usage = r#"data: {"id":"chatcmpl-99","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":12}}}"#;
        let Rewrite::Replace(out) = s.rewrite(usage.as_bytes()) else {
            panic!("rewritten")
        };
        let v: serde_json::Value = serde_json::from_slice(&out[6..out.len() - 2]).unwrap();
        assert_eq!(v["usage"]["prompt_tokens"], 10);
        assert_eq!(v["usage"]["completion_tokens"], 7);
        assert_eq!(v["usage"]["total_tokens"], 17);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 10);
        assert_eq!(s.rewrite(b"data: [DONE]"), Rewrite::Keep);
        // A stream that failed before its role chunk went out keeps the continuation's.
        let none = Splice::new(&Transcript::new(true, 1));
        assert!(matches!(none.rewrite(role.as_bytes()), Rewrite::Replace(_)));
    }
}
