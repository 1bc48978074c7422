//! HTTP/1.1 server (hyper on current-thread tokio runtimes): routes, request parsing, and the
//! response bodies (full JSON, or SSE generated lazily as the client reads).

use crate::engine::{Admitted, Engine, Fault, GenRequest, TokenEvent};
use crate::tokenizer::output_choice;
use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Method, Request, Response, StatusCode};
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
        (Method::POST, "/v1/chat/completions") => completions(engine, req, true).await,
        (Method::POST, "/v1/completions") => completions(engine, req, false).await,
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
    gen: GenRequest,
}

fn parse(engine: &Engine, body: &[u8], chat: bool) -> Result<Parsed, ApiError> {
    let bad = |e: serde_json::Error| ApiError::bad_request(format!("invalid request body: {e}"));
    let check_model = |m: &Option<String>| match m {
        Some(m) if *m != engine.cfg.model => {
            Err(ApiError::not_found(format!("The model `{m}` does not exist.")).with_param("model"))
        }
        _ => Ok(()),
    };
    let tok = |e: pdx_tokens::TokenizerError| crate::MockError::from(e).to_api();
    if chat {
        let r: ChatCompletionRequest = serde_json::from_slice(body).map_err(bad)?;
        check_model(&r.model)?;
        if r.messages.is_empty() {
            return Err(ApiError::invalid_param(
                "messages",
                "messages must not be empty",
            ));
        }
        let prompt = engine.tokenizer.chat_prompt(&r.messages).map_err(tok)?;
        Ok(Parsed {
            stream: r.is_stream(),
            include_usage: r
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            gen: GenRequest {
                prompt,
                max_tokens: r.output_limit(),
                min_tokens: r.min_tokens,
                ignore_eos: r.ignore_eos.unwrap_or(false),
                kv: r.kv_transfer_params,
                bootstrap: r.bootstrap.is_set(),
                request_id: String::new(),
            },
        })
    } else {
        let r: CompletionRequest = serde_json::from_slice(body).map_err(bad)?;
        check_model(&r.model)?;
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
            gen: GenRequest {
                prompt,
                max_tokens: r.max_tokens,
                min_tokens: r.min_tokens,
                ignore_eos: r.ignore_eos.unwrap_or(false),
                kv: r.kv_transfer_params,
                bootstrap: r.bootstrap.is_set(),
                request_id: String::new(),
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
    let mut st = SseStream {
        fmt,
        adm,
        chat,
        include_usage: p.include_usage,
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
    let text = st.text();
    let kv = st.finish_request();
    let usage = Some(st.usage());
    let (created, model) = (unix_now(), engine.cfg.model.clone());
    if chat {
        json(&ChatCompletionResponse {
            id,
            object: "chat.completion".into(),
            created,
            model,
            choices: vec![ChatChoice {
                index: 0,
                message: ChatResponseMessage {
                    role: "assistant".into(),
                    content: Some(text),
                },
                logprobs: None,
                finish_reason: Some(st.adm.finish),
            }],
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
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: Some(st.adm.finish),
            }],
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
    sent: u32,
    phase: Phase,
    arrival: Instant,
    last_token: Instant,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    stalled: bool,
    timed: bool,
}

impl SseStream {
    fn piece(&self, i: u32) -> &str {
        let t = &self.adm.guard.engine().tokenizer;
        t.output_piece(output_choice(self.adm.seed, i, t.output_len()))
    }

    fn text(&self) -> String {
        // Pieces are JSON-escaped; unescape via serde for the non-streamed response.
        let mut s = String::with_capacity(self.adm.output_tokens as usize * 8 + 2);
        s.push('"');
        for i in 0..self.adm.output_tokens {
            s.push_str(self.piece(i));
        }
        s.push('"');
        serde_json::from_str(&s).unwrap_or_default()
    }

    fn usage(&self) -> Usage {
        let mut u = Usage::new(self.adm.prompt_tokens, self.adm.output_tokens);
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
            .inc_by(u64::from(self.adm.output_tokens));
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
        self.adm.guard.finish(self.adm.finish);
        kv
    }

    fn last_chunk(&mut self, piece: String, buf: &mut BytesMut) {
        let kv = self.finish_request();
        let fr = Some(self.adm.finish);
        let v = if self.chat {
            serde_json::to_vec(&ChatCompletionChunk {
                id: self.fmt.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.fmt.created,
                model: self.fmt.model.clone(),
                choices: vec![ChatChunkChoice {
                    index: 0,
                    delta: ChatDelta {
                        role: None,
                        content: Some(piece),
                    },
                    logprobs: None,
                    finish_reason: fr,
                }],
                usage: None,
                kv_transfer_params: kv,
            })
        } else {
            serde_json::to_vec(&CompletionChunk {
                id: self.fmt.id.clone(),
                object: "text_completion".into(),
                created: self.fmt.created,
                model: self.fmt.model.clone(),
                choices: vec![CompletionChunkChoice {
                    index: 0,
                    text: piece,
                    logprobs: None,
                    finish_reason: fr,
                }],
                usage: None,
                kv_transfer_params: kv,
            })
        };
        sse::put_event(buf, &v.expect("chunk serializes"));
    }

    fn emit_token(&mut self, buf: &mut BytesMut) {
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
                    if self.chat {
                        let v = serde_json::to_vec(&ChatCompletionChunk {
                            id: self.fmt.id.clone(),
                            object: "chat.completion.chunk".into(),
                            created: self.fmt.created,
                            model: self.fmt.model.clone(),
                            choices: vec![ChatChunkChoice {
                                index: 0,
                                delta: ChatDelta {
                                    role: Some("assistant".into()),
                                    content: Some(String::new()),
                                },
                                logprobs: None,
                                finish_reason: None,
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
