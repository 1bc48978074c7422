//! `POST /generate` in KsanaLLM's own shape (`src/ksana_llm/python/serving_server.py` and
//! `ksana_llm/ksana_engine.py` in Tencent/KsanaLLM).
//!
//! Request: `{"prompt": "text"}` or `{"input_tokens": [ids]}` (it wins over `prompt`) or `{"messages": [...]}`
//! (the mock's chat template), with `"sampling_config": {"max_new_tokens", "num_return_sequences",
//! "ignore_eos", "stop_strings", ...}` and `"stream"` (default `true`). Sampling knobs the mock's fixed text
//! makes moot (`temperature`, `topk`, `topp`, `repetition_penalty`, ...) are type-checked and otherwise
//! ignored; what it cannot imitate (beam search, log-probabilities, stop token ids) is refused with 400
//! rather than ignored.
//!
//! Answer: `{"texts": [text per sequence], "output_token_ids": [[ids] per sequence], "logprobs": [],
//! "input_token_ids": [prompt ids]}`; streamed, one such JSON object per step followed by a `\0` byte, each
//! with the whole output so far (KsanaLLM's `StreamingIterator` sends the tokens from the end of the input
//! on). The engine sends no end marker: a KsanaLLM router appends `[DONE]\0` after merging the prefill's
//! first chunk with the decode's.
//!
//! With `kv-comm-group-key` / `kv-comm-request-id` headers a prefill answers its first token and keeps the
//! KV for the group's decode, which reads it before it generates ([`crate::ksana`]). Errors are OpenAI
//! error JSON with their HTTP status, like the mock's other routes.

use crate::engine::{Admitted, Engine, GenRequest};
use crate::generation::{GenParams, MAX_CHOICES, MAX_STOP_BYTES, MAX_STOP_STRINGS};
use crate::ksana::KvComm;
use crate::server::{error_response, fault_gate, read_body, MockBody};
use crate::tokenizer::output_choice;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response};
use pdx_protocol::{ApiError, ChatMessage};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// `sampling_config` (KsanaLLM's `GenerationConfig` keys).
#[derive(Debug, Default, serde::Deserialize)]
struct SamplingConfig {
    /// Output tokens at most; -1 (KsanaLLM's default): the engine's default.
    max_new_tokens: Option<i64>,
    num_return_sequences: Option<u32>,
    num_beams: Option<u32>,
    ignore_eos: Option<bool>,
    stop_strings: Option<Vec<String>>,
    stop_token_ids: Option<Vec<u32>>,
    logprobs: Option<u32>,
    temperature: Option<f64>,
    topk: Option<i64>,
    topp: Option<f64>,
    repetition_penalty: Option<f64>,
    length_penalty: Option<f64>,
    do_sample: Option<bool>,
    enable_thinking: Option<bool>,
}

/// The `/generate` body.
#[derive(Debug, serde::Deserialize)]
struct GenerateBody {
    prompt: Option<String>,
    input_tokens: Option<Vec<u32>>,
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    sampling_config: SamplingConfig,
    stream: Option<bool>,
}

fn invalid(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid_param(param, msg)
}

/// Parses and checks a `/generate` body and tokenizes its prompt: the generation request and whether to
/// stream. Errors: 400 for malformed JSON, a missing prompt, bad limits, or what the mock cannot imitate.
pub fn parse(tokenizer: &crate::Tokenizer, body: &[u8]) -> Result<(GenRequest, bool), ApiError> {
    let b: GenerateBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid /generate body: {e}")))?;
    let s = &b.sampling_config;
    let max_tokens = match s.max_new_tokens {
        None | Some(-1) => None,
        Some(n) if n >= 1 && n <= i64::from(u32::MAX) => Some(n as u32),
        Some(n) => {
            return Err(invalid(
                "sampling_config.max_new_tokens",
                format!("max_new_tokens must be -1 or at least 1, got {n}"),
            ))
        }
    };
    let n = s.num_return_sequences.unwrap_or(1);
    if n == 0 || n > MAX_CHOICES {
        return Err(invalid(
            "sampling_config.num_return_sequences",
            format!("pdx mock serves 1 to {MAX_CHOICES} sequences per request, got {n}"),
        ));
    }
    if s.num_beams.is_some_and(|b| b > 1) {
        return Err(invalid(
            "sampling_config.num_beams",
            "pdx mock does not do beam search",
        ));
    }
    if s.logprobs.is_some_and(|l| l > 0) {
        return Err(invalid(
            "sampling_config.logprobs",
            "pdx mock does not return KsanaLLM log-probabilities",
        ));
    }
    if s.stop_token_ids.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(invalid(
            "sampling_config.stop_token_ids",
            "pdx mock's text does not stop at token ids; use stop_strings",
        ));
    }
    if let Some(t) = s.temperature.filter(|t| !t.is_finite() || *t < 0.0) {
        return Err(invalid(
            "sampling_config.temperature",
            format!("temperature must be a finite number >= 0, got {t}"),
        ));
    }
    if let Some(p) = s.topp.filter(|p| !(0.0..=1.0).contains(p)) {
        return Err(invalid(
            "sampling_config.topp",
            format!("topp must be within 0..=1, got {p}"),
        ));
    }
    let _ = (
        s.topk,
        s.repetition_penalty,
        s.length_penalty,
        s.do_sample,
        s.enable_thinking,
    );
    let stop = s.stop_strings.clone().unwrap_or_default();
    if stop.len() > MAX_STOP_STRINGS
        || stop
            .iter()
            .any(|x| x.is_empty() || x.len() > MAX_STOP_BYTES)
    {
        return Err(invalid(
            "sampling_config.stop_strings",
            format!("pdx mock takes at most {MAX_STOP_STRINGS} stop strings of 1 to {MAX_STOP_BYTES} bytes"),
        ));
    }
    let tok = |e: pdx_tokens::TokenizerError| crate::MockError::from(e).to_api();
    let prompt = match (&b.input_tokens, &b.prompt, &b.messages) {
        (Some(ids), _, _) => ids.clone(),
        (None, Some(text), _) => {
            let mut v = Vec::new();
            tokenizer.encode(text, &mut v).map_err(tok)?;
            v
        }
        (None, None, Some(m)) if !m.is_empty() => tokenizer.chat_prompt(m).map_err(tok)?,
        _ => {
            return Err(ApiError::bad_request(
                "a /generate body needs `prompt`, `input_tokens` or `messages`",
            ))
        }
    };
    let gen = GenRequest {
        prompt,
        max_tokens,
        min_tokens: None,
        ignore_eos: s.ignore_eos.unwrap_or(false),
        params: GenParams {
            n,
            seed: None,
            stop,
            include_stop_str: false,
        },
        ..Default::default()
    };
    Ok((gen, b.stream.unwrap_or(true)))
}

/// Serves `POST /generate` (module docs).
pub(crate) async fn generate(engine: Arc<Engine>, req: Request<Incoming>) -> Response<MockBody> {
    let arrival = Instant::now();
    let comm = match KvComm::from_headers(req.headers()) {
        Ok(c) => c,
        Err(e) => return error_response(&e),
    };
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Some(r) = fault_gate(&engine).await {
        return r;
    }
    let (mut gen, stream) = match parse(&engine.tokenizer, &body) {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    gen.ksana = comm;
    gen.request_id = format!(
        "generate-{:x}-{}",
        std::process::id(),
        engine.next_request_number()
    );
    let input = serde_json::to_string(&gen.prompt).expect("ids serialize");
    let adm = match engine.admit(gen).await {
        Ok(a) => a,
        Err(e) => return error_response(&e),
    };
    let choices = adm.choices.len();
    let mut st = KsanaStream {
        adm,
        sent: 0,
        texts: vec![String::new(); choices],
        offsets: vec![0; choices],
        ids: vec![Vec::new(); choices],
        input,
        arrival,
        last_token: arrival,
        timed: !engine.cfg.instant,
        done: false,
    };
    if stream {
        let mut r = Response::new(MockBody::Ksana(Box::new(st)));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/octet-stream"),
        );
        return r;
    }
    // Not streamed: every token (timed mode: as the scheduler makes them), then one answer.
    if let Some(mut rx) = st.adm.events.take() {
        let mut got = 0;
        while got < st.adm.output_tokens {
            match rx.recv().await {
                Some(ev) => {
                    got += 1;
                    st.observe_token();
                    st.advance(1);
                    if ev.finished {
                        break;
                    }
                }
                None => {
                    return error_response(&ApiError::internal("request aborted by the engine"))
                }
            }
        }
        st.adm.events = Some(rx);
    }
    let rest = st.adm.output_tokens - st.sent;
    if rest > 0 {
        st.observe_token();
        st.advance(rest);
    }
    st.finish();
    crate::server::full(
        hyper::StatusCode::OK,
        "application/json",
        render(&st.texts, &st.ids, &st.input),
    )
}

/// `{"texts", "output_token_ids", "logprobs": [], "input_token_ids"}` with `input` already JSON.
fn render(texts: &[String], ids: &[Vec<u32>], input: &str) -> Vec<u8> {
    let mut v =
        Vec::with_capacity(64 + input.len() + texts.iter().map(|t| t.len() + 8).sum::<usize>());
    v.extend_from_slice(b"{\"texts\":");
    serde_json::to_writer(&mut v, texts).expect("texts serialize");
    v.extend_from_slice(b",\"output_token_ids\":");
    serde_json::to_writer(&mut v, ids).expect("ids serialize");
    v.extend_from_slice(b",\"logprobs\":[],\"input_token_ids\":");
    v.extend_from_slice(input.as_bytes());
    v.push(b'}');
    v
}

/// A streamed `/generate` answer, generated as the client reads: one JSON object and a `\0` per step (in
/// `--instant` mode per `--instant-tokens-per-chunk` steps), each with the whole output so far.
pub struct KsanaStream {
    adm: Admitted,
    /// Steps done (each gives every unfinished sequence one token).
    sent: u32,
    texts: Vec<String>,
    offsets: Vec<usize>,
    ids: Vec<Vec<u32>>,
    /// `input_token_ids`, as JSON.
    input: String,
    arrival: Instant,
    last_token: Instant,
    timed: bool,
    done: bool,
}

impl KsanaStream {
    /// Adds `k` steps of tokens to every unfinished sequence.
    fn advance(&mut self, k: u32) {
        let engine = self.adm.guard.engine().clone();
        let t = &engine.tokenizer;
        for _ in 0..k {
            let j = self.sent;
            for (c, plan) in self.adm.choices.iter().enumerate() {
                if j >= plan.tokens {
                    continue;
                }
                let piece = crate::generation::visible_piece(t, plan, j, &mut self.offsets[c]);
                self.texts[c].push_str(&piece);
                self.ids[c].push(t.output_token_id(output_choice(plan.seed, j, t.output_len())));
            }
            self.sent += 1;
        }
    }

    fn observe_token(&mut self) {
        let now = Instant::now();
        let m = &self.adm.guard.engine().metrics;
        if self.sent == 0 {
            m.ttft.observe((now - self.arrival).as_secs_f64());
        } else if self.timed {
            m.itl.observe((now - self.last_token).as_secs_f64());
        }
        self.last_token = now;
    }

    /// Counts the finished request (once).
    fn finish(&mut self) {
        let m = &self.adm.guard.engine().metrics;
        m.prompt_tokens.inc_by(u64::from(self.adm.prompt_tokens));
        let out: u32 = self.adm.choices.iter().map(|c| c.tokens).sum();
        m.generation_tokens.inc_by(u64::from(out));
        m.e2e.observe(self.arrival.elapsed().as_secs_f64());
        let reason = self.adm.choices[0].finish;
        self.adm.guard.finish(reason);
    }

    fn chunk(&self) -> Bytes {
        let mut v = render(&self.texts, &self.ids, &self.input);
        v.push(0);
        Bytes::from(v)
    }

    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.done {
            return Poll::Ready(None);
        }
        let avail = match self.adm.events.as_mut() {
            None => self.adm.guard.engine().cfg.instant_tokens_per_chunk,
            Some(rx) => match rx.poll_recv(cx) {
                Poll::Ready(Some(_)) => 1,
                // The engine dropped the request: end the stream short (the client sees no last chunk).
                Poll::Ready(None) => {
                    self.done = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            },
        };
        let k = avail.min(self.adm.output_tokens - self.sent);
        self.observe_token();
        self.advance(k);
        if self.sent >= self.adm.output_tokens {
            self.finish();
            self.done = true;
        }
        Poll::Ready(Some(self.chunk()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_checked() {
        let t = crate::Tokenizer::Builtin;
        let ok = |b: &str| parse(&t, b.as_bytes()).map(|(g, s)| (g.prompt.len(), g.max_tokens, s));
        assert_eq!(ok(r#"{"prompt":"a b c"}"#).unwrap(), (3, None, true));
        assert_eq!(
            ok(r#"{"input_tokens":[5,6],"prompt":"x","stream":false,"sampling_config":{"max_new_tokens":4,"temperature":0.0,"topk":1,"topp":0.0,"stop_token_ids":[]}}"#).unwrap(),
            (2, Some(4), false)
        );
        assert_eq!(
            ok(r#"{"messages":[{"role":"user","content":"hi"}],"sampling_config":{"max_new_tokens":-1}}"#)
                .unwrap()
                .1,
            None
        );
        for bad in [
            "{",
            "{}",
            r#"{"prompt":5}"#,
            r#"{"input_tokens":[-1]}"#,
            r#"{"prompt":"a","sampling_config":{"max_new_tokens":0}}"#,
            r#"{"prompt":"a","sampling_config":{"max_new_tokens":-2}}"#,
            r#"{"prompt":"a","sampling_config":{"num_return_sequences":0}}"#,
            r#"{"prompt":"a","sampling_config":{"num_return_sequences":17}}"#,
            r#"{"prompt":"a","sampling_config":{"num_beams":4}}"#,
            r#"{"prompt":"a","sampling_config":{"logprobs":2}}"#,
            r#"{"prompt":"a","sampling_config":{"stop_token_ids":[2]}}"#,
            r#"{"prompt":"a","sampling_config":{"topp":2}}"#,
            r#"{"prompt":"a","sampling_config":{"temperature":-1}}"#,
            r#"{"prompt":"a","sampling_config":{"stop_strings":[""]}}"#,
            r#"{"prompt":"a","sampling_config":"x"}"#,
            r#"{"prompt":"a","stream":"yes"}"#,
            r#"{"messages":[]}"#,
        ] {
            let e = parse(&t, bad.as_bytes()).unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
        }
    }
}
