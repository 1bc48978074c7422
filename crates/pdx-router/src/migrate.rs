//! Stream migration (issue 17, item 5): a streamed decode continues on another worker when its worker fails
//! mid-stream (on by default) or, with a budget, when another worker of its pool is much less loaded (off by
//! default). See `docs/router.md`, "Stream migration".
//!
//! How a stream moves:
//! 1. While it is forwarded, the stream's [`Migration`] hands the client complete SSE events only (an event
//!    split across upstream frames is held until its end; a frame of whole events goes out as the same
//!    `Bytes`) and keeps a [`Transcript`] of them: the `id`, the text of choice 0, the token events.
//! 2. On a failure (the upstream body breaks or ends before the stream's end, a 5xx error event, the stream
//!    idle timeout) or a voluntary move, the old upstream request is dropped (its connection closes, so the
//!    engine aborts it and frees its KV) and [`JobReissue`] runs the request again through the configured
//!    orchestration, as a continuation: for chat an assistant message with the text already sent and
//!    `continue_final_message: true, add_generation_prompt: false`; for text completions the prompt extended
//!    by that text (a token-id prompt by its token ids, from the new workers' `POST /tokenize`); `max_tokens`
//!    (`max_completion_tokens`) and `min_tokens` less the tokens already sent. The worker(s) it left are
//!    avoided.
//! 3. The continuation's events are rewritten for the client ([`Splice`]): the original `id`, no second role
//!    chunk, one `usage` (the original's prompt tokens, every completion token).
//!
//! In disaggregated mode the continuation goes through the orchestration again (`vllm-nixl`: a prefill of the
//! prompt plus the text sent so far on a prefill worker, then a decode that reads that KV; `sglang-bootstrap`:
//! a new prefill/decode pair), not to a decode worker as an aggregated request: decode engines then keep
//! decoding only (an SGLang decode server cannot compute a prompt at all), and the prefill worker's prefix
//! cache usually holds most of the prompt already. Dynamo likewise re-sends the request through its normal
//! routing to a new worker.
//!
//! Not moved: non-streamed requests (no byte has reached the client: a failure is retried before the response
//! as any upstream failure), `n` > 1, `best_of` > 1, `echo`. Completion `logprobs.text_offset` restarts at 0
//! in a continuation.

use crate::api::Shared;
use crate::body::RouterBody;
use crate::metrics::{Metrics, ReasonLabel};
use crate::registry::{LoadGuard, Worker};
use crate::request::{CompletionBody, Job};
use crate::upstream::UpBody;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use pdx_protocol::{ChatMessage, MessageContent, Prompt};
use pdx_router_core::migration::{load_gap, EventKind, MigrationBudget, Rewrite};
use pdx_router_core::{Candidate, MoveReason, Splice, Transcript};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Largest `POST /tokenize` answer read, bytes.
const MAX_TOKENIZE_BYTES: usize = 16 << 20;

/// Largest event held while it is incomplete, bytes: a longer one ends the stream's migratability (it is then
/// forwarded as it comes).
const MAX_HELD_BYTES: usize = 1 << 20;

/// The continuation's upstream body and its in-flight accounting.
pub struct Resumed<B> {
    /// The continuation's response body (its head was 2xx).
    pub body: B,
    /// Its load on the new worker.
    pub guard: Option<LoadGuard>,
}

/// A re-issue in flight: the continuation, or `None` when no worker could take it.
pub type Resuming<B> = Pin<Box<dyn Future<Output = Option<Resumed<B>>>>>;

/// Who re-issues a stream: the router ([`JobReissue`]) or a test's fake.
pub trait Reissue<B> {
    /// Starts the continuation of a stream whose client has been sent `t`, leaving worker `from`; `None` when
    /// the stream cannot move (out of moves, no output limit left, ...).
    fn start(
        &mut self,
        t: &Transcript,
        reason: MoveReason,
        from: Option<&Arc<Worker>>,
    ) -> Option<Resuming<B>>;

    /// Whether the stream should move now of its own accord (checked between events).
    fn voluntary(&mut self, _t: &Transcript, _current: Option<&Arc<Worker>>) -> bool {
        false
    }
}

/// The migration state of one forwarded stream.
pub struct Migration<B> {
    /// What the client has been sent.
    pub transcript: Transcript,
    /// Upstream frames (or their tails) holding an event not complete yet: sent, as they are, once it is.
    held: Vec<Bytes>,
    /// Bytes in `held`.
    held_len: usize,
    /// Scratch copy of held bytes plus the next frame, to read an event that spans frames (reused).
    scratch: Vec<u8>,
    /// Frames owed to the client, in order (reused).
    out: VecDeque<Bytes>,
    /// Set once the stream has moved: rewrites the continuation's events.
    splice: Option<Splice>,
    /// The re-issue in flight, and why.
    pending: Option<(Resuming<B>, MoveReason)>,
    reissue: Box<dyn Reissue<B>>,
    /// A voluntary move is due at the next event boundary.
    pub move_due: bool,
    /// Why the stream last started to move.
    pub last_reason: Option<MoveReason>,
    metrics: Option<Arc<Metrics>>,
}

impl<B> std::fmt::Debug for Migration<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("tokens", &self.transcript.tokens())
            .field("moved", &self.splice.is_some())
            .field("pending", &self.pending.is_some())
            .finish()
    }
}

impl<B> Migration<B> {
    /// Migration of a `chat` (or text completion) stream expected to be about `expected_tokens` long, re-issued
    /// by `reissue`, counted in `metrics`.
    pub fn new(
        chat: bool,
        expected_tokens: u32,
        reissue: Box<dyn Reissue<B>>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Self {
            transcript: Transcript::new(chat, expected_tokens),
            held: Vec::with_capacity(4),
            held_len: 0,
            scratch: Vec::new(),
            out: VecDeque::with_capacity(4),
            splice: None,
            pending: None,
            reissue,
            move_due: false,
            last_reason: None,
            metrics,
        }
    }

    /// Whether the stream has moved at least once.
    pub fn moved(&self) -> bool {
        self.splice.is_some()
    }

    /// The next frame owed to the client.
    pub fn next_out(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }

    /// Takes one upstream data frame. Complete events go to the transcript and, in order, to the frames owed
    /// to the client ([`Self::next_out`]): as the upstream frames themselves (a frame held because it ended
    /// mid-event goes out once the event is complete), or rewritten once the stream has moved. Returns the
    /// failure found in the frame (a 5xx error event, or `[DONE]` before any `finish_reason`); the bytes from
    /// it on are then in [`FrameFailure::rest`], not owed.
    pub fn on_data(&mut self, data: Bytes) -> Option<FrameFailure> {
        let joined = !self.held.is_empty();
        if joined {
            self.scratch.clear();
            for h in &self.held {
                self.scratch.extend_from_slice(h);
            }
            self.scratch.extend_from_slice(&data);
        }
        let base = self.held_len;
        let mut spliced: Option<BytesMut> = self.splice.as_ref().map(|_| BytesMut::new());
        let mut pos = 0;
        let mut failed = None;
        {
            let buf: &[u8] = if joined { &self.scratch } else { &data };
            while let Some(rel) = find_blank_line(&buf[pos..]) {
                let end = pos + rel;
                let ev = &buf[pos..end];
                let kind = self.transcript.event(ev);
                let cut_short = kind == EventKind::Done && !self.transcript.finished();
                if kind == (EventKind::Error { server: true }) || cut_short {
                    failed = Some(MoveReason::ServerError);
                    break;
                }
                if let (Some(s), Some(o)) = (&self.splice, spliced.as_mut()) {
                    match s.rewrite(ev) {
                        Rewrite::Drop => {}
                        Rewrite::Keep => o.extend_from_slice(&buf[pos..end + 2]),
                        Rewrite::Replace(v) => o.extend_from_slice(&v),
                    }
                }
                pos = end + 2;
            }
        }
        // `pos`: end of the last complete, good event (in the held bytes plus `data`), or where the failure
        // starts.
        if let Some(reason) = failed {
            let rest = if joined {
                Bytes::copy_from_slice(&self.scratch[pos..])
            } else {
                data.slice(pos..)
            };
            if pos >= base {
                self.flush_good(spliced, data, pos - base);
            }
            self.held.clear();
            self.held_len = 0;
            return Some(FrameFailure { reason, rest });
        }
        if pos < base || (pos == 0 && !data.is_empty()) {
            // No event completed: the whole frame is held too.
            self.held_len += data.len();
            self.held.push(data);
            if self.held_len > MAX_HELD_BYTES {
                // An event this long is not an engine's token chunk: stop holding, forward as it comes.
                self.transcript.forbid();
                self.out.extend(self.held.drain(..));
                self.held_len = 0;
            }
            return None;
        }
        let upto = pos - base;
        let tail = (upto < data.len()).then(|| data.slice(upto..));
        self.flush_good(spliced, data, upto);
        self.held.clear();
        self.held_len = 0;
        if let Some(t) = tail {
            self.held_len = t.len();
            self.held.push(t);
        }
        None
    }

    /// Owes the client the good events that end `upto` bytes into `data`: the held frames and `data[..upto]`,
    /// or, once moved, their rewrite.
    fn flush_good(&mut self, spliced: Option<BytesMut>, data: Bytes, upto: usize) {
        match spliced {
            Some(o) if !o.is_empty() => self.out.push_back(o.freeze()),
            Some(_) => {}
            None => {
                self.out.extend(self.held.drain(..));
                if upto == data.len() {
                    if !data.is_empty() {
                        self.out.push_back(data);
                    }
                } else if upto > 0 {
                    self.out.push_back(data.slice(..upto));
                }
            }
        }
    }

    /// The held bytes of an incomplete last event, at the end of the upstream body (owed as they came).
    pub fn flush_held(&mut self) {
        self.held_len = 0;
        self.out.extend(self.held.drain(..));
    }

    /// Queues bytes owed to the client as they are (an error event nobody could move the stream past).
    pub fn owe(&mut self, b: Bytes) {
        self.out.push_back(b);
    }

    /// Starts moving the stream off worker `from` for `reason`; false when it cannot move.
    pub fn start(&mut self, reason: MoveReason, from: Option<&Arc<Worker>>) -> bool {
        self.move_due = false;
        if !self.transcript.migratable() || self.pending.is_some() {
            return false;
        }
        self.last_reason = Some(reason);
        match self.reissue.start(&self.transcript, reason, from) {
            Some(f) => {
                // Whatever was held of an incomplete event came from the worker being left: dropped.
                self.held.clear();
                self.held_len = 0;
                self.pending = Some((f, reason));
                true
            }
            None => {
                // It will not be able to later either (out of moves, nothing left to generate).
                self.transcript.forbid();
                self.count_failed(reason);
                false
            }
        }
    }

    /// Whether a re-issue is in flight.
    pub fn resuming(&self) -> bool {
        self.pending.is_some()
    }

    /// Polls the re-issue in flight: `Ready(Some)` is the continuation (from now on its events are spliced),
    /// `Ready(None)` a move that found no worker.
    pub fn poll_resume(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Resumed<B>>> {
        let Some((f, reason)) = self.pending.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let reason = *reason;
        match f.as_mut().poll(cx) {
            std::task::Poll::Pending => std::task::Poll::Pending,
            std::task::Poll::Ready(r) => {
                self.pending = None;
                match &r {
                    Some(_) => {
                        self.splice = Some(Splice::new(&self.transcript));
                        if let Some(m) = &self.metrics {
                            m.migrations
                                .get_or_create(&ReasonLabel {
                                    reason: reason.as_str(),
                                })
                                .inc();
                        }
                        tracing::info!(
                            reason = reason.as_str(),
                            tokens_sent = self.transcript.tokens(),
                            "stream moved to another worker"
                        );
                    }
                    None => self.count_failed(reason),
                }
                std::task::Poll::Ready(r)
            }
        }
    }

    fn count_failed(&self, reason: MoveReason) {
        if let Some(m) = &self.metrics {
            m.migrations_failed
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str(),
                })
                .inc();
        }
        tracing::warn!(
            reason = reason.as_str(),
            tokens_sent = self.transcript.tokens(),
            "stream could not move to another worker"
        );
    }

    /// Asks whether a voluntary move is due (between events only).
    pub fn check_voluntary(&mut self, current: Option<&Arc<Worker>>) {
        if self.held.is_empty() && self.transcript.migratable() && self.pending.is_none() {
            self.move_due = self.reissue.voluntary(&self.transcript, current);
        }
    }
}

/// A failure found in an upstream frame.
#[derive(Debug)]
pub struct FrameFailure {
    /// Why the stream should move.
    pub reason: MoveReason,
    /// The bytes from the failure on (sent as they are when the stream cannot move).
    pub rest: Bytes,
}

/// Index of the first `\n\n` (the blank line that ends an SSE event).
fn find_blank_line(b: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', b).find(|&i| b.get(i + 1) == Some(&b'\n'))
}

/// Budgets of voluntary moves, one per pool (by name).
#[derive(Debug, Default)]
pub struct Budgets(Mutex<HashMap<String, MigrationBudget>>);

impl Budgets {
    /// Takes one voluntary move of `pool` at `now_us` under `max` moves per `window_us`.
    pub fn try_take(&self, pool: &str, max: u32, window_us: u64, now_us: u64) -> bool {
        let Ok(mut m) = self.0.lock() else {
            return false;
        };
        if !m.contains_key(pool) {
            m.insert(pool.to_string(), MigrationBudget::new(max, window_us));
        }
        m.get_mut(pool).is_some_and(|b| b.try_take(now_us))
    }
}

/// Whether a request's stream can be followed and moved: one choice, no `best_of`, no `echo`, one prompt.
pub(crate) fn movable(body: &CompletionBody) -> bool {
    let (extra, one_prompt) = match body {
        CompletionBody::Chat(r) => (&r.extra, true),
        CompletionBody::Text(r) => (
            &r.extra,
            match &r.prompt {
                Prompt::Texts(v) => v.len() == 1,
                Prompt::TokenBatches(v) => v.len() == 1,
                _ => true,
            },
        ),
    };
    let int = |k: &str| extra.get(k).and_then(|v| v.as_u64()).unwrap_or(1);
    one_prompt
        && int("n") <= 1
        && int("best_of") <= 1
        && !extra.get("echo").and_then(|v| v.as_bool()).unwrap_or(false)
}

/// The client's output limit, tokens (`max_completion_tokens`, else `max_tokens`; text completions default to
/// 16 as in the OpenAI API and vLLM); `None` for chat without one (until the context is full).
fn output_limit(body: &CompletionBody) -> Option<u32> {
    match body {
        CompletionBody::Chat(r) => r.output_limit(),
        CompletionBody::Text(r) => Some(r.max_tokens.unwrap_or(16)),
    }
}

/// The continuation body after `sent` tokens whose text is `text` (token ids `ids` for a token-id prompt);
/// `None` when nothing is left to generate or the prompt needs ids that are missing.
pub(crate) fn continuation_body(
    body: &CompletionBody,
    text: &str,
    ids: Option<&[u32]>,
    sent: u32,
) -> Option<CompletionBody> {
    let remaining = match output_limit(body) {
        Some(l) if l <= sent => return None,
        Some(l) => Some(l - sent),
        None => None,
    };
    let mut b = body.clone();
    b.set_kv(None);
    b.set_bootstrap(Default::default());
    if sent == 0 && text.is_empty() {
        // Nothing reached the client: the request as it came.
        return Some(b);
    }
    match &mut b {
        CompletionBody::Chat(r) => {
            if r.max_completion_tokens.is_some() {
                r.max_completion_tokens = remaining;
            }
            if r.max_tokens.is_some() {
                r.max_tokens = remaining;
            }
            r.min_tokens = r.min_tokens.map(|m| m.saturating_sub(sent));
            let continuing = r
                .extra
                .get("continue_final_message")
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
                && r.messages.last().is_some_and(|m| m.role == "assistant");
            match r.messages.last_mut() {
                Some(m) if continuing => match &mut m.content {
                    Some(MessageContent::Text(s)) => s.push_str(text),
                    Some(MessageContent::Parts(p)) => p.push(pdx_protocol::ContentPart {
                        kind: "text".into(),
                        text: Some(text.to_string()),
                        extra: Default::default(),
                    }),
                    None => m.content = Some(MessageContent::Text(text.to_string())),
                },
                _ => r.messages.push(ChatMessage {
                    role: "assistant".into(),
                    content: Some(MessageContent::Text(text.to_string())),
                    extra: Default::default(),
                }),
            }
            // vLLM: continue the final (assistant) message instead of opening a new turn; the two flags must
            // not both be true (`ChatCompletionRequest.check_generation_prompt`).
            r.extra.insert(
                "continue_final_message".into(),
                serde_json::Value::Bool(true),
            );
            r.extra.insert(
                "add_generation_prompt".into(),
                serde_json::Value::Bool(false),
            );
        }
        CompletionBody::Text(r) => {
            r.max_tokens = remaining;
            r.min_tokens = r.min_tokens.map(|m| m.saturating_sub(sent));
            match &mut r.prompt {
                Prompt::Text(s) => s.push_str(text),
                Prompt::Texts(v) if v.len() == 1 => v[0].push_str(text),
                Prompt::Tokens(t) => t.extend_from_slice(ids?),
                Prompt::TokenBatches(v) if v.len() == 1 => v[0].extend_from_slice(ids?),
                _ => return None,
            }
        }
    }
    Some(b)
}

/// Whether the continuation of `body` needs the sent text as token ids (a token-id completion prompt).
fn needs_ids(body: &CompletionBody) -> bool {
    matches!(
        body,
        CompletionBody::Text(r) if matches!(r.prompt, Prompt::Tokens(_) | Prompt::TokenBatches(_))
    )
}

/// The router's [`Reissue`]: runs the request's continuation through the orchestration.
pub(crate) struct JobReissue {
    sh: Arc<Shared>,
    /// The client's request (every continuation is built from it).
    job: Job,
    /// Moves made on failures.
    moves: u32,
    /// Workers left so far.
    avoid: Vec<u64>,
    /// A voluntary move's target: the only worker of its pool the continuation may go to.
    target: Option<(u64, Vec<u64>)>,
    /// Next voluntary check.
    next_check: Instant,
}

impl JobReissue {
    pub(crate) fn new(sh: Arc<Shared>, job: Job) -> Self {
        Self {
            sh,
            job,
            moves: 0,
            avoid: Vec::new(),
            target: None,
            next_check: Instant::now(),
        }
    }

    /// The client's output limit (tokens), sizing the transcript.
    pub(crate) fn expected_tokens(job: &Job) -> u32 {
        output_limit(&job.body).unwrap_or(256)
    }
}

impl Reissue<UpBody> for JobReissue {
    fn start(
        &mut self,
        t: &Transcript,
        reason: MoveReason,
        from: Option<&Arc<Worker>>,
    ) -> Option<Resuming<UpBody>> {
        let cfg = &self.sh.cfg.migration;
        let mut avoid = self.avoid.clone();
        if reason == MoveReason::ScoreGap {
            let (_, others) = self.target.take()?;
            avoid.extend(others);
        } else {
            if self.moves >= cfg.max_moves {
                return None;
            }
            self.moves += 1;
            if let Some(w) = from {
                self.avoid.push(w.id);
                avoid.push(w.id);
            }
        }
        let text = t.text()?;
        let sent = t.tokens();
        if output_limit(&self.job.body).is_some_and(|l| l <= sent) {
            return None;
        }
        let sh = self.sh.clone();
        let base = Job {
            model: self.job.model.clone(),
            body: self.job.body.clone(),
            path: self.job.path,
            rid: self.job.rid.clone(),
            auth: self.job.auth.clone(),
            hashes: self.job.hashes.clone(),
            isl: self.job.isl + u64::from(sent),
            tokens: self.job.tokens,
            ttft_ms: self.job.ttft_ms,
            itl_ms: self.job.itl_ms,
            start: Instant::now(),
            avoid,
            continuation: true,
        };
        Some(Box::pin(async move {
            let ids = if needs_ids(&base.body) {
                Some(tokenize(&sh, &base, &text).await?)
            } else {
                None
            };
            let body = continuation_body(&base.body, &text, ids.as_deref(), sent)?;
            let job = Job { body, ..base };
            resume(sh, job).await
        }))
    }

    fn voluntary(&mut self, t: &Transcript, current: Option<&Arc<Worker>>) -> bool {
        let Some(g) = &self.sh.cfg.migration.gap else {
            return false;
        };
        let now = Instant::now();
        if now < self.next_check {
            return false;
        }
        self.next_check = now + g.check_every;
        if output_limit(&self.job.body)
            .is_some_and(|l| l.saturating_sub(t.tokens()) < g.min_remaining_tokens)
        {
            return false;
        }
        let Some(w) = current else {
            return false;
        };
        let m = &self.job.model;
        let pools = if m.decode.is_empty() {
            &m.aggregated
        } else {
            &m.decode
        };
        let Some(pool) = pools.iter().find(|p| p.name == w.pool) else {
            return false;
        };
        let now_us = self.sh.registry.now_us();
        let cand = |x: &Worker| {
            Candidate::new(
                x.id,
                x.in_flight.load(Ordering::Relaxed),
                x.in_flight_tokens.load(Ordering::Relaxed),
                true,
            )
        };
        let workers = pool.workers.load();
        let Some(best) = workers
            .iter()
            .filter(|x| x.id != w.id && !self.avoid.contains(&x.id) && x.eligible(now_us))
            .min_by_key(|x| x.in_flight_tokens.load(Ordering::Relaxed))
        else {
            return false;
        };
        if load_gap(&cand(w), &cand(best), self.job.tokens) < g.threshold {
            return false;
        }
        if !self
            .sh
            .migration_budgets
            .try_take(&pool.name, g.budget, g.window_us, now_us)
        {
            return false;
        }
        let others = workers
            .iter()
            .map(|x| x.id)
            .filter(|&id| id != best.id)
            .collect();
        self.target = Some((best.id, others));
        true
    }
}

/// Runs the continuation `job` through the orchestration and takes its upstream body.
async fn resume(sh: Arc<Shared>, job: Job) -> Option<Resumed<UpBody>> {
    let resp = crate::orchestrate::run(&sh, job).await;
    if !resp.status().is_success() {
        tracing::warn!(
            status = resp.status().as_u16(),
            "stream continuation refused"
        );
        return None;
    }
    match resp.into_body() {
        RouterBody::Forward(f) => {
            let f = *f;
            Some(Resumed {
                body: f.body?,
                guard: f.guard,
            })
        }
        RouterBody::Full(_) | RouterBody::Ksana(_) => None,
    }
}

/// The token ids of `text` from a worker of the request's model (`POST /tokenize`, vLLM's route, without
/// special tokens), for a token-id prompt's continuation.
async fn tokenize(sh: &Shared, job: &Job, text: &str) -> Option<Vec<u32>> {
    let now = sh.registry.now_us();
    let m = &job.model;
    let w = m
        .decode
        .iter()
        .chain(&m.aggregated)
        .chain(&m.prefill)
        .flat_map(|p| p.workers.load().iter().cloned().collect::<Vec<_>>())
        .find(|w| !job.avoid.contains(&w.id) && w.eligible(now))?;
    let body = serde_json::to_vec(&serde_json::json!({
        "model": job.body.model().unwrap_or(&w.model),
        "prompt": text,
        "add_special_tokens": false,
    }))
    .ok()?;
    let resp = crate::orchestrate::send_to(sh, &w, "/tokenize", &body, &job.rid, job.auth.as_ref())
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let b = monoio::time::timeout(
        sh.cfg.upstream_timeout,
        http_body_util::Limited::new(resp.into_body(), MAX_TOKENIZE_BYTES).collect(),
    )
    .await
    .ok()?
    .ok()?
    .to_bytes();
    #[derive(serde::Deserialize)]
    struct Tokens {
        tokens: Vec<u32>,
    }
    serde_json::from_slice::<Tokens>(&b).ok().map(|t| t.tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(raw: &str) -> CompletionBody {
        CompletionBody::Chat(serde_json::from_str(raw).unwrap())
    }
    fn text(raw: &str) -> CompletionBody {
        CompletionBody::Text(serde_json::from_str(raw).unwrap())
    }
    fn json(b: &CompletionBody) -> serde_json::Value {
        serde_json::from_slice(&b.to_bytes()).unwrap()
    }

    #[test]
    fn a_chat_continues_the_assistant_message_with_fewer_tokens() {
        let b = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":10,"min_tokens":4,"temperature":0.3}"#,
        );
        let c = json(&continuation_body(&b, " so far", None, 3).unwrap());
        assert_eq!(c["messages"][1]["role"], "assistant");
        assert_eq!(c["messages"][1]["content"], " so far");
        assert_eq!(c["continue_final_message"], true);
        assert_eq!(c["add_generation_prompt"], false);
        assert_eq!(c["max_tokens"], 7);
        assert_eq!(c["min_tokens"], 1);
        assert_eq!(c["temperature"], 0.3);
        assert_eq!(c["stream"], true);
        // A second move continues the same assistant message.
        let again = json(
            &continuation_body(&chat(&serde_json::to_string(&c).unwrap()), " more", None, 2)
                .unwrap(),
        );
        assert_eq!(again["messages"].as_array().unwrap().len(), 2);
        assert_eq!(again["messages"][1]["content"], " so far more");
        // Nothing left: no continuation.
        assert!(continuation_body(&b, "x", None, 10).is_none());
        // Nothing sent: the request as it came.
        let same = json(&continuation_body(&b, "", None, 0).unwrap());
        assert_eq!(same, json(&b));
        let mct =
            chat(r#"{"messages":[{"role":"user","content":"hi"}],"max_completion_tokens":5}"#);
        assert_eq!(
            json(&continuation_body(&mct, "x", None, 2).unwrap())["max_completion_tokens"],
            3
        );
    }

    #[test]
    fn a_completion_extends_its_prompt_text_or_ids() {
        let b = text(r#"{"prompt":"Once","max_tokens":8,"stream":true}"#);
        let c = json(&continuation_body(&b, " upon a", None, 2).unwrap());
        assert_eq!(c["prompt"], "Once upon a");
        assert_eq!(c["max_tokens"], 6);
        let d = text(r#"{"prompt":"Once","stream":true}"#);
        assert_eq!(
            json(&continuation_body(&d, " x", None, 4).unwrap())["max_tokens"],
            12,
            "the default limit of 16"
        );
        let ids = text(r#"{"prompt":[1,2,3],"max_tokens":5}"#);
        assert!(needs_ids(&ids));
        assert!(continuation_body(&ids, " a b", None, 2).is_none());
        let c = json(&continuation_body(&ids, " a b", Some(&[7, 8]), 2).unwrap());
        assert_eq!(c["prompt"], serde_json::json!([1, 2, 3, 7, 8]));
        assert_eq!(c["max_tokens"], 3);
    }

    #[test]
    fn only_single_choice_streams_move() {
        assert!(movable(&chat(r#"{"messages":[],"n":1}"#)));
        assert!(!movable(&chat(r#"{"messages":[],"n":2}"#)));
        assert!(!movable(&text(r#"{"prompt":"a","echo":true}"#)));
        assert!(!movable(&text(r#"{"prompt":"a","best_of":3}"#)));
        assert!(!movable(&text(r#"{"prompt":["a","b"]}"#)));
        assert!(movable(&text(r#"{"prompt":[1,2]}"#)));
    }
}
