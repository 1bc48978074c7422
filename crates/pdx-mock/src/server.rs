//! HTTP/1.1 server (hyper on current-thread tokio runtimes): routes, request parsing, and the
//! response bodies (full JSON, or SSE generated lazily as the client reads).

use crate::engine::{Admitted, Engine, Fault, GenRequest, TokenEvent};
use crate::tokenizer::output_choice;
use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Method, Request, Response, StatusCode};
use pdx_protocol::sampling::{Sampling, ToolChoice};
use pdx_protocol::*;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Largest request body accepted, bytes.
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// Response body: a full buffer or a lazily generated SSE stream.
pub enum MockBody {
    /// Whole body.
    Full(Option<Bytes>),
    /// SSE stream.
    Stream(Box<SseStream>),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            MockBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Stream(s) => s.poll_next(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }
    fn is_end_stream(&self) -> bool {
        matches!(self, MockBody::Full(None))
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Stream(_) => SizeHint::default(),
        }
    }
}

fn full(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<MockBody> {
    let mut r = Response::new(MockBody::Full(Some(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    r
}

fn json<T: serde::Serialize>(v: &T) -> Response<MockBody> {
    full(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(v).expect("response serializes"),
    )
}

/// The OpenAI error response for `e`.
pub fn error_response(e: &ApiError) -> Response<MockBody> {
    full(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        "application/json",
        e.to_json(),
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Routes one request.
pub async fn handle(
    engine: Arc<Engine>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    // vLLM's `--api-key` (`AuthenticationMiddleware`): `/v1` routes need one of the keys; health and metrics
    // stay open.
    if !engine.cfg.api_keys.is_empty() && (path == "/v1" || path.starts_with("/v1/")) {
        let given = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| engine.cfg.api_keys.iter().any(|k| k == g)) {
            return Ok(full(
                StatusCode::UNAUTHORIZED,
                "application/json",
                r#"{"error":"Unauthorized"}"#,
            ));
        }
    }
    let r = match (method.clone(), path.as_str()) {
        (Method::POST, "/v1/chat/completions") => {
            with_worker(&engine, completions(engine.clone(), req, true).await)
        }
        (Method::POST, "/v1/completions") => {
            with_worker(&engine, completions(engine.clone(), req, false).await)
        }
        (Method::GET, "/health") | (Method::GET, "/health_generate") | (Method::GET, "/ping") => {
            if engine.loading() {
                error_response(&ApiError::unavailable(
                    "model is loading (slow-start fault)",
                ))
            } else {
                full(StatusCode::OK, "application/json", Bytes::new())
            }
        }
        (Method::GET, "/v1/models") => json(&models(&engine)),
        (Method::GET, "/metrics") => full(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            engine.metrics.render(),
        ),
        (Method::GET, "/server_info") | (Method::GET, "/get_server_info") => {
            json(&server_info(&engine))
        }
        (Method::GET, "/model_info") | (Method::GET, "/get_model_info") => {
            json(&serde_json::json!({
                "model_path": engine.cfg.model,
                "tokenizer_path": engine.cfg.model,
                "is_generation": true,
                "preferred_sampling_params": null,
            }))
        }
        // vLLM's `POST /reset_prefix_cache` (dev mode): clears the prefix cache, publishing
        // `AllBlocksCleared`; refused with 409 while requests hold blocks (vLLM logs and does nothing then).
        (Method::POST, "/reset_prefix_cache") => {
            if engine.reset_prefix_cache() {
                full(StatusCode::OK, "application/json", Bytes::new())
            } else {
                full(
                    StatusCode::CONFLICT,
                    "application/json",
                    r#"{"error":{"message":"blocks are in use; the prefix cache was not reset","type":"Conflict","param":null,"code":409}}"#,
                )
            }
        }
        (Method::GET, "/version") => {
            json(&serde_json::json!({"version": env!("CARGO_PKG_VERSION")}))
        }
        (_, "/v1/chat/completions" | "/v1/completions" | "/health" | "/v1/models" | "/metrics") => {
            error_response(&ApiError::method_not_allowed(format!(
                "{method} not allowed on {path}"
            )))
        }
        _ => error_response(&ApiError::not_found(format!(
            "no route for {method} {path}"
        ))),
    };
    Ok(r)
}

/// Names the worker in `x-pdx-worker` (not a vLLM header; clients that do not know it ignore it).
fn with_worker(engine: &Engine, mut r: Response<MockBody>) -> Response<MockBody> {
    if let Ok(v) = hyper::header::HeaderValue::from_str(&engine.cfg.worker_id) {
        r.headers_mut().insert("x-pdx-worker", v);
    }
    r
}

fn models(e: &Engine) -> ModelList {
    ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: e.cfg.model.clone(),
            object: "model".into(),
            created: unix_now(),
            owned_by: "pdx-mock".into(),
            root: Some(e.cfg.model.clone()),
            max_model_len: Some(e.cfg.profile.model.max_model_len),
        }],
    }
}

fn server_info(e: &Engine) -> serde_json::Value {
    let ep = e.kv_endpoint();
    serde_json::json!({
        "model_path": e.cfg.model,
        "served_model_name": e.cfg.model,
        "disaggregation_mode": match e.cfg.role { crate::Role::Aggregated => "null", r => r.as_str() },
        "role": e.cfg.role,
        "page_size": e.cfg.block_size,
        "max_total_num_tokens": e.cfg.num_blocks as usize * e.cfg.block_size,
        "context_length": e.cfg.profile.model.max_model_len,
        "max_running_requests": e.cfg.profile.scheduler.max_num_seqs,
        "chunked_prefill_size": e.cfg.profile.scheduler.max_num_batched_tokens,
        "tp_size": 1,
        "dp_size": 1,
        "kv_engine_id": ep.as_ref().map(|p| p.engine_id.clone()),
        "kv_side_channel": ep.as_ref().map(|p| format!("{}:{}", p.host, p.port)),
        "version": env!("CARGO_PKG_VERSION"),
        "engine": "pdx-mock",
    })
}

struct Parsed {
    stream: bool,
    include_usage: bool,
    /// Log-probabilities per token: the sampled token's and this many top ones.
    logprobs: Option<u32>,
    gen: GenRequest,
}

/// What vLLM would accept but the mock cannot imitate, or would let a request cost it too much: refused
/// with 400 rather than ignored.
fn mock_limits(s: &Sampling) -> Result<(), ApiError> {
    use crate::generation::{MAX_CHOICES, MAX_STOP_BYTES, MAX_STOP_STRINGS};
    match &s.tool_choice {
        ToolChoice::None => {}
        // vLLM without --enable-auto-tool-choice/--tool-call-parser, which is what the mock is.
        ToolChoice::Auto => {
            return Err(ApiError::bad_request(
                "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set",
            ))
        }
        ToolChoice::Required | ToolChoice::Named(_) => {
            return Err(ApiError::invalid_param(
                "tool_choice",
                "pdx mock does not generate tool calls (tool_choice \"required\" or a named function): \
                 send no tools, or tool_choice \"none\"",
            ))
        }
    }
    if let Some(rf) = s.response_format.as_deref().filter(|rf| *rf != "text") {
        return Err(ApiError::invalid_param(
            "response_format",
            format!("pdx mock does not implement structured outputs (response_format type `{rf}`)"),
        ));
    }
    if s.n > MAX_CHOICES {
        return Err(ApiError::invalid_param(
            "n",
            format!(
                "pdx mock serves at most {MAX_CHOICES} choices per request, got n={}",
                s.n
            ),
        ));
    }
    if s.stop.len() > MAX_STOP_STRINGS || s.stop.iter().any(|x| x.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "pdx mock takes at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_BYTES} bytes"
            ),
        ));
    }
    Ok(())
}

fn gen_params(s: &Sampling) -> crate::generation::GenParams {
    crate::generation::GenParams {
        n: s.n.max(1),
        seed: s.seed,
        stop: s.stop.clone(),
        include_stop_str: s.include_stop_str_in_output,
    }
}

/// Parses and validates a completion body as vLLM does (`pdx_protocol::sampling`), then what the mock adds
/// ([`mock_limits`]), and tokenizes the prompt.
fn parse(engine: &Engine, body: &[u8], chat: bool) -> Result<Parsed, ApiError> {
    let check_model = |m: &Option<String>| match m {
        Some(m) if *m != engine.cfg.model => {
            Err(ApiError::not_found(format!("The model `{m}` does not exist.")).with_param("model"))
        }
        _ => Ok(()),
    };
    let tok = |e: pdx_tokens::TokenizerError| crate::MockError::from(e).to_api();
    if chat {
        let (r, sampling) = pdx_protocol::sampling::parse_chat(body)?;
        check_model(&r.model)?;
        if r.messages.is_empty() {
            return Err(ApiError::invalid_param(
                "messages",
                "messages must not be empty",
            ));
        }
        mock_limits(&sampling)?;
        let prompt = engine.tokenizer.chat_prompt(&r.messages).map_err(tok)?;
        Ok(Parsed {
            stream: r.is_stream(),
            include_usage: r
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            logprobs: sampling.logprobs,
            gen: GenRequest {
                prompt,
                max_tokens: r.output_limit(),
                min_tokens: r.min_tokens,
                ignore_eos: r.ignore_eos.unwrap_or(false),
                kv: r.kv_transfer_params,
                bootstrap: r.bootstrap.is_set(),
                request_id: String::new(),
                params: gen_params(&sampling),
            },
        })
    } else {
        let (r, sampling) = pdx_protocol::sampling::parse_completion(body)?;
        check_model(&r.model)?;
        mock_limits(&sampling)?;
        let prompt = match &r.prompt {
            Prompt::Text(s) => {
                let mut v = Vec::new();
                engine.tokenizer.encode(s, &mut v).map_err(tok)?;
                v
            }
            Prompt::Tokens(t) => t.clone(),
            Prompt::Texts(t) if t.len() == 1 => {
                let mut v = Vec::new();
                engine.tokenizer.encode(&t[0], &mut v).map_err(tok)?;
                v
            }
            Prompt::TokenBatches(t) if t.len() == 1 => t[0].clone(),
            _ => {
                return Err(ApiError::invalid_param(
                    "prompt",
                    "batched prompts are not supported by pdx mock",
                ))
            }
        };
        Ok(Parsed {
            stream: r.is_stream(),
            include_usage: r
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            logprobs: sampling.logprobs,
            gen: GenRequest {
                prompt,
                max_tokens: r.max_tokens,
                min_tokens: r.min_tokens,
                ignore_eos: r.ignore_eos.unwrap_or(false),
                kv: r.kv_transfer_params,
                bootstrap: r.bootstrap.is_set(),
                request_id: String::new(),
                params: gen_params(&sampling),
            },
        })
    }
}

trait WithParam {
    fn with_param(self, p: &str) -> Self;
}
impl WithParam for ApiError {
    fn with_param(mut self, p: &str) -> Self {
        self.param = Some(p.to_string());
        self
    }
}

async fn completions(
    engine: Arc<Engine>,
    req: Request<Incoming>,
    chat: bool,
) -> Response<MockBody> {
    let arrival = Instant::now();
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error_response(&ApiError::new(
                413,
                "BadRequestError",
                format!("cannot read request body: {e}"),
            ))
        }
    };
    match engine.fault_for_request() {
        Some(Fault::Error) => return error_response(&ApiError::internal("injected fault: error")),
        Some(Fault::Hang) | Some(Fault::Crash) => std::future::pending::<()>().await,
        Some(Fault::Loading) => {
            return error_response(&ApiError::unavailable(
                "model is loading (slow-start fault)",
            ))
        }
        None => {}
    }
    let mut p = match parse(&engine, &body, chat) {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    let n = engine.next_request_number();
    p.gen.request_id = format!(
        "{}-{:x}-{n}",
        if chat { "chatcmpl" } else { "cmpl" },
        std::process::id()
    );
    let id = p.gen.request_id.clone();
    let adm = match engine.admit(p.gen).await {
        Ok(a) => a,
        Err(e) => return error_response(&e),
    };
    let fmt = ChunkFormat::new(&id, &engine.cfg.model, chat);
    // The pre-formatted fast path serves one choice without log-probabilities or a stop cut; anything else
    // goes through serde, chunk by chunk.
    let plain = adm.choices.len() == 1
        && p.logprobs.is_none()
        && adm.choices[0].text_len.is_none()
        && adm.choices[0].stop_reason.is_none();
    let offsets = vec![0; adm.choices.len()];
    let mut st = SseStream {
        fmt,
        adm,
        chat,
        include_usage: p.include_usage,
        logprobs: p.logprobs,
        plain,
        offsets,
        sent: 0,
        phase: Phase::Start,
        arrival,
        last_token: arrival,
        stall: None,
        stalled: false,
        timed: !engine.cfg.instant,
    };
    if p.stream {
        let mut r = Response::new(MockBody::Stream(Box::new(st)));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/event-stream"),
        );
        return r;
    }
    // Non-streaming: wait for every token (timed mode), then answer in one piece.
    if let Some(mut rx) = st.adm.events.take() {
        let mut got = 0;
        while got < st.adm.output_tokens {
            match rx.recv().await {
                Some(TokenEvent { finished }) => {
                    got += 1;
                    st.observe_token(got == 1);
                    if finished {
                        break;
                    }
                }
                None => {
                    return error_response(&ApiError::internal("request aborted by the engine"))
                }
            }
        }
        st.adm.events = Some(rx);
    } else {
        st.observe_token(true);
    }
    let kv = st.finish_request();
    let usage = Some(st.usage());
    let (created, model) = (unix_now(), engine.cfg.model.clone());
    let n = st.adm.choices.len();
    if chat {
        json(&ChatCompletionResponse {
            id,
            object: "chat.completion".into(),
            created,
            model,
            choices: (0..n)
                .map(|c| {
                    let plan = &st.adm.choices[c];
                    ChatChoice {
                        index: c as u32,
                        message: ChatResponseMessage {
                            role: "assistant".into(),
                            content: Some(st.text(c)),
                        },
                        logprobs: st.all_logprobs(c),
                        finish_reason: Some(plan.finish),
                        stop_reason: plan.stop_reason.clone().map(serde_json::Value::String),
                    }
                })
                .collect(),
            usage,
            kv_transfer_params: kv,
            extra: Default::default(),
        })
    } else {
        json(&CompletionResponse {
            id,
            object: "text_completion".into(),
            created,
            model,
            choices: (0..n)
                .map(|c| {
                    let plan = &st.adm.choices[c];
                    CompletionChoice {
                        index: c as u32,
                        text: st.text(c),
                        logprobs: st.all_logprobs(c),
                        finish_reason: Some(plan.finish),
                        stop_reason: plan.stop_reason.clone().map(serde_json::Value::String),
                    }
                })
                .collect(),
            usage,
            kv_transfer_params: kv,
            extra: Default::default(),
        })
    }
}

/// Pre-formatted pieces of the middle chunks of a stream.
struct ChunkFormat {
    id: String,
    model: String,
    created: u64,
    head: Bytes,
    tail: Bytes,
}

impl ChunkFormat {
    fn new(id: &str, model: &str, chat: bool) -> Self {
        let created = unix_now();
        let m = serde_json::to_string(model).expect("string serializes");
        let (head, tail) = if chat {
            (
                format!(
                    r#"data: {{"id":"{id}","object":"chat.completion.chunk","created":{created},"model":{m},"choices":[{{"index":0,"delta":{{"content":""#
                ),
                "\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n".to_string(),
            )
        } else {
            (
                format!(
                    r#"data: {{"id":"{id}","object":"text_completion","created":{created},"model":{m},"choices":[{{"index":0,"text":""#
                ),
                "\",\"logprobs\":null,\"finish_reason\":null}]}\n\n".to_string(),
            )
        };
        Self {
            id: id.into(),
            model: model.into(),
            created,
            head: head.into(),
            tail: tail.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Tokens,
    Usage,
    Done,
    End,
}

/// A streamed response being generated.
pub struct SseStream {
    fmt: ChunkFormat,
    adm: Admitted,
    chat: bool,
    include_usage: bool,
    /// Log-probabilities per token (the sampled token's and this many top ones).
    logprobs: Option<u32>,
    /// One choice, no log-probabilities, no stop cut: the pre-formatted fast path.
    plain: bool,
    /// Per choice, bytes of its text sent so far.
    offsets: Vec<usize>,
    /// Steps sent (each gives every unfinished choice one token).
    sent: u32,
    phase: Phase,
    arrival: Instant,
    last_token: Instant,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    stalled: bool,
    timed: bool,
}

impl SseStream {
    /// JSON-escaped piece of token `i` of choice 0 (the fast path).
    fn piece(&self, i: u32) -> &str {
        let t = &self.adm.guard.engine().tokenizer;
        t.output_piece(output_choice(self.adm.choices[0].seed, i, t.output_len()))
    }

    /// The whole text of choice `c` (for the non-streamed response).
    fn text(&self, c: usize) -> String {
        let plan = &self.adm.choices[c];
        if self.plain {
            // Pieces are JSON-escaped; unescape via serde.
            let mut s = String::with_capacity(plan.tokens as usize * 8 + 2);
            s.push('"');
            for i in 0..plan.tokens {
                s.push_str(self.piece(i));
            }
            s.push('"');
            return serde_json::from_str(&s).unwrap_or_default();
        }
        let t = &self.adm.guard.engine().tokenizer;
        let mut offset = 0;
        (0..plan.tokens)
            .map(|i| crate::generation::visible_piece(t, plan, i, &mut offset))
            .collect()
    }

    /// Log-probabilities of token `i` of choice `c`, when asked for.
    fn token_logprobs(&self, c: usize, i: u32) -> Option<crate::generation::TokenLogprobs> {
        let t = &self.adm.guard.engine().tokenizer;
        self.logprobs
            .map(|k| crate::generation::logprobs(t, self.adm.choices[c].seed, i, k))
    }

    /// `logprobs` of every token of choice `c` (non-streamed response), in the API's shape.
    fn all_logprobs(&self, c: usize) -> Option<serde_json::Value> {
        self.logprobs?;
        let entries: Vec<_> = (0..self.adm.choices[c].tokens)
            .filter_map(|i| self.token_logprobs(c, i))
            .collect();
        Some(if self.chat {
            serde_json::json!({"content": entries.iter().map(crate::generation::chat_entry).collect::<Vec<_>>()})
        } else {
            crate::generation::completion_logprobs(&entries, 0)
        })
    }

    /// Output tokens of all choices.
    fn completion_tokens(&self) -> u32 {
        self.adm.choices.iter().map(|c| c.tokens).sum()
    }

    fn usage(&self) -> Usage {
        let mut u = Usage::new(self.adm.prompt_tokens, self.completion_tokens());
        u.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: self.adm.cached_tokens,
        });
        u
    }

    fn observe_token(&mut self, first: bool) {
        let now = Instant::now();
        let m = &self.adm.guard.engine().metrics;
        if first {
            m.ttft.observe((now - self.arrival).as_secs_f64());
        } else if self.timed {
            m.itl.observe((now - self.last_token).as_secs_f64());
        }
        self.last_token = now;
    }

    /// Final bookkeeping; returns the prefill's `kv_transfer_params` when it holds KV.
    fn finish_request(&mut self) -> Option<KvTransferParams> {
        let m = &self.adm.guard.engine().metrics;
        m.prompt_tokens.inc_by(u64::from(self.adm.prompt_tokens));
        m.generation_tokens
            .inc_by(u64::from(self.completion_tokens()));
        m.e2e.observe(self.arrival.elapsed().as_secs_f64());
        let kv = if self.adm.hold_for_remote {
            Some(
                self.adm
                    .guard
                    .hold_for_remote(&self.fmt.id, self.adm.prompt_tokens),
            )
        } else {
            None
        };
        self.adm.guard.finish(self.adm.choices[0].finish);
        kv
    }

    fn last_chunk(&mut self, piece: String, buf: &mut BytesMut) {
        let kv = self.finish_request();
        let finish_reason = Some(self.adm.choices[0].finish);
        self.put_chunk(
            buf,
            ChunkParts {
                index: 0,
                text: piece,
                logprobs: None,
                finish_reason,
                stop_reason: None,
                kv,
            },
        );
    }

    /// Writes one stream chunk of one choice, in the request's shape (chat or text completion), as an SSE
    /// event. `logprobs` is already in that shape.
    fn put_chunk(&self, buf: &mut BytesMut, p: ChunkParts) {
        let v = if self.chat {
            serde_json::to_vec(&ChatCompletionChunk {
                id: self.fmt.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.fmt.created,
                model: self.fmt.model.clone(),
                choices: vec![ChatChunkChoice {
                    index: p.index,
                    delta: ChatDelta {
                        role: None,
                        content: Some(p.text),
                    },
                    logprobs: p.logprobs,
                    finish_reason: p.finish_reason,
                    stop_reason: p.stop_reason,
                }],
                usage: None,
                kv_transfer_params: p.kv,
            })
        } else {
            serde_json::to_vec(&CompletionChunk {
                id: self.fmt.id.clone(),
                object: "text_completion".into(),
                created: self.fmt.created,
                model: self.fmt.model.clone(),
                choices: vec![CompletionChunkChoice {
                    index: p.index,
                    text: p.text,
                    logprobs: p.logprobs,
                    finish_reason: p.finish_reason,
                    stop_reason: p.stop_reason,
                }],
                usage: None,
                kv_transfer_params: p.kv,
            })
        };
        sse::put_event(buf, &v.expect("chunk serializes"));
    }

    /// One step of the general path: a chunk per unfinished choice (its piece, cut at a stop string; its
    /// log-probabilities; `finish_reason` and `stop_reason` when it ends). The last step also finishes the
    /// request and carries `kv_transfer_params` on its last chunk.
    fn emit_step(&mut self, buf: &mut BytesMut) {
        let j = self.sent;
        self.observe_token(j == 0);
        let last_step = j + 1 == self.adm.output_tokens;
        let mut kv = if last_step {
            self.finish_request()
        } else {
            None
        };
        let last_choice = self
            .adm
            .choices
            .iter()
            .rposition(|c| c.tokens == self.adm.output_tokens)
            .unwrap_or(0);
        let engine = self.adm.guard.engine().clone();
        let t = &engine.tokenizer;
        for c in 0..self.adm.choices.len() {
            let plan = &self.adm.choices[c];
            if j >= plan.tokens {
                continue;
            }
            let before = self.offsets[c];
            let text = crate::generation::visible_piece(t, plan, j, &mut self.offsets[c]);
            let ends = j + 1 == plan.tokens;
            let (finish_reason, stop_reason) = if ends {
                (
                    Some(plan.finish),
                    plan.stop_reason.clone().map(serde_json::Value::String),
                )
            } else {
                (None, None)
            };
            let lp = self.token_logprobs(c, j);
            let kv = if last_step && c == last_choice {
                kv.take()
            } else {
                None
            };
            let logprobs = lp.map(|lp| {
                if self.chat {
                    serde_json::json!({"content": [crate::generation::chat_entry(&lp)]})
                } else {
                    crate::generation::completion_logprobs(&[lp], before)
                }
            });
            self.put_chunk(
                buf,
                ChunkParts {
                    index: c as u32,
                    text,
                    logprobs,
                    finish_reason,
                    stop_reason,
                    kv,
                },
            );
        }
        self.sent += 1;
    }

    fn emit_token(&mut self, buf: &mut BytesMut) {
        if !self.plain {
            return self.emit_step(buf);
        }
        let i = self.sent;
        self.observe_token(i == 0);
        if i + 1 == self.adm.output_tokens {
            let piece: String =
                serde_json::from_str(&format!("\"{}\"", self.piece(i))).unwrap_or_default();
            self.last_chunk(piece, buf);
        } else {
            let piece = self.piece(i);
            let (h, t) = (self.fmt.head.clone(), self.fmt.tail.clone());
            buf.reserve(h.len() + t.len() + piece.len());
            buf.put_slice(&h);
            buf.put_slice(piece.as_bytes());
            buf.put_slice(&t);
        }
        self.sent += 1;
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut buf = BytesMut::new();
        let ready = |buf: BytesMut| {
            if buf.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(Some(buf.freeze()))
            }
        };
        loop {
            match self.phase {
                Phase::Start => {
                    // vLLM opens a chat stream with one role chunk per choice.
                    for c in 0..self.adm.choices.len() {
                        if !self.chat {
                            break;
                        }
                        let v = serde_json::to_vec(&ChatCompletionChunk {
                            id: self.fmt.id.clone(),
                            object: "chat.completion.chunk".into(),
                            created: self.fmt.created,
                            model: self.fmt.model.clone(),
                            choices: vec![ChatChunkChoice {
                                index: c as u32,
                                delta: ChatDelta {
                                    role: Some("assistant".into()),
                                    content: Some(String::new()),
                                },
                                logprobs: None,
                                finish_reason: None,
                                stop_reason: None,
                            }],
                            usage: None,
                            kv_transfer_params: None,
                        })
                        .expect("chunk serializes");
                        sse::put_event(&mut buf, &v);
                    }
                    self.phase = Phase::Tokens;
                }
                Phase::Tokens => {
                    if self.sent >= self.adm.output_tokens {
                        self.phase = Phase::Usage;
                        continue;
                    }
                    // stall fault
                    let faults = &self.adm.guard.engine().cfg.profile.faults;
                    if !self.stalled && faults.stall_after_tokens == Some(self.sent) {
                        match faults.stall_secs {
                            None => return ready(buf),
                            Some(s) => {
                                if self.stall.is_none() {
                                    self.stall = Some(Box::pin(tokio::time::sleep(
                                        Duration::from_secs_f64(s),
                                    )));
                                }
                                match self.stall.as_mut().expect("set").as_mut().poll(cx) {
                                    Poll::Pending => return ready(buf),
                                    Poll::Ready(()) => {
                                        self.stalled = true;
                                        self.stall = None;
                                    }
                                }
                            }
                        }
                    }
                    let stall_at = if self.stalled {
                        None
                    } else {
                        faults.stall_after_tokens
                    };
                    let avail = match self.adm.events.as_mut() {
                        None => self.adm.guard.engine().cfg.instant_tokens_per_chunk,
                        Some(rx) => match rx.poll_recv(cx) {
                            Poll::Ready(Some(_)) => 1,
                            Poll::Ready(None) => {
                                // the engine dropped us: end the stream without [DONE]
                                self.phase = Phase::End;
                                return ready(buf);
                            }
                            Poll::Pending => return ready(buf),
                        },
                    };
                    let mut k = 0;
                    while k < avail
                        && self.sent < self.adm.output_tokens
                        && stall_at != Some(self.sent)
                    {
                        self.emit_token(&mut buf);
                        k += 1;
                    }
                    if self.adm.events.is_none() && self.sent < self.adm.output_tokens {
                        return ready(buf);
                    }
                }
                Phase::Usage => {
                    if self.include_usage {
                        let usage = Some(self.usage());
                        let v = if self.chat {
                            serde_json::to_vec(&ChatCompletionChunk {
                                id: self.fmt.id.clone(),
                                object: "chat.completion.chunk".into(),
                                created: self.fmt.created,
                                model: self.fmt.model.clone(),
                                choices: vec![],
                                usage,
                                kv_transfer_params: None,
                            })
                        } else {
                            serde_json::to_vec(&CompletionChunk {
                                id: self.fmt.id.clone(),
                                object: "text_completion".into(),
                                created: self.fmt.created,
                                model: self.fmt.model.clone(),
                                choices: vec![],
                                usage,
                                kv_transfer_params: None,
                            })
                        };
                        sse::put_event(&mut buf, &v.expect("chunk serializes"));
                    }
                    self.phase = Phase::Done;
                }
                Phase::Done => {
                    buf.put_slice(sse::DONE);
                    self.phase = Phase::End;
                    return Poll::Ready(Some(buf.freeze()));
                }
                Phase::End => {
                    return if buf.is_empty() {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(buf.freeze()))
                    };
                }
            }
        }
    }
}

use std::future::Future;

/// The fields of one stream chunk that differ between chunks ([`SseStream::put_chunk`]).
struct ChunkParts {
    index: u32,
    text: String,
    logprobs: Option<serde_json::Value>,
    finish_reason: Option<FinishReason>,
    stop_reason: Option<serde_json::Value>,
    kv: Option<KvTransferParams>,
}
