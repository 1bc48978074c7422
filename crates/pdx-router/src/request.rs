//! A completion request from the client: the body read under its size limit, parsed and validated once
//! ([`pdx_protocol::sampling`]), the SLO fields taken out, prompt tokens and block hashes counted, and the
//! [`Job`] handed to the orchestration ([`crate::orchestrate::run`]).

use crate::api::{error_response, Shared};
use crate::body::RouterBody;
use crate::registry::ModelTopo;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_LENGTH};
use hyper::{Request, Response};
use pdx_protocol::{ApiError, ChatCompletionRequest, CompletionRequest, KvTransferParams};
use std::sync::Arc;
use std::time::Instant;

/// Reads a client's request body under `max_body_bytes` (413 above it).
pub(crate) async fn read_body(sh: &Shared, req: Request<Full<Bytes>>) -> Result<Bytes, ApiError> {
    let max = sh.cfg.max_body_bytes;
    let too_large = || {
        ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("body over {max} bytes"),
        )
    };
    if let Some(len) = req.headers().get(CONTENT_LENGTH) {
        if len
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|n| n > max as u64)
        {
            return Err(too_large());
        }
    }
    // The server hands the body over whole (`Full`: one frame), so it is taken as it is: no collecting
    // into a buffer list and no copy.
    match req.into_body().frame().await {
        None => Ok(Bytes::new()),
        Some(Ok(f)) => {
            let b = f.into_data().unwrap_or_default();
            if b.len() > max {
                return Err(too_large());
            }
            Ok(b)
        }
        Some(Err(never)) => match never {},
    }
}

/// A parsed completion request (chat or text).
#[derive(Debug, Clone)]
pub enum CompletionBody {
    /// `/v1/chat/completions`.
    Chat(ChatCompletionRequest),
    /// `/v1/completions`.
    Text(CompletionRequest),
}

/// Serializes the request `r` (a `&mut` to it) into `out` with each listed field set to its value, then puts
/// the fields back: the request goes out changed without a copy of its messages and unknown fields. Evaluates
/// to the serialization's result and the values the fields held while serialized (in the order listed).
macro_rules! serialize_with {
    ($r:expr, $out:expr; $($field:ident = $value:expr),+ $(,)?) => {{
        let r = $r;
        $(let mut $field = $value; std::mem::swap(&mut r.$field, &mut $field);)+
        let res = serde_json::to_writer(&mut *$out, &*r);
        $(std::mem::swap(&mut r.$field, &mut $field);)+
        (res, ($($field,)+))
    }};
}

thread_local! {
    /// The thread's serialization buffer for upstream request bodies: a body is written here, then copied
    /// into a buffer of its exact size (one allocation per body, none for growing).
    static BODY_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(4096));
    /// The `kv_transfer_params` of every prefill request, built once per thread (see
    /// [`CompletionBody::prefill_bytes`]).
    static PREFILL_KV: std::cell::RefCell<Option<KvTransferParams>> =
        std::cell::RefCell::new(Some(prefill_kv()));
}

/// vLLM `toy_proxy_server.py`'s prefill `kv_transfer_params`: a remote decode, and the remote fields present
/// and null.
fn prefill_kv() -> KvTransferParams {
    let mut kv = KvTransferParams::for_prefill();
    for k in [
        "remote_engine_id",
        "remote_block_ids",
        "remote_host",
        "remote_port",
    ] {
        kv.extra.insert(k.into(), serde_json::Value::Null);
    }
    kv
}

/// `write` into the thread's [`BODY_BUF`], then the bytes written, in a buffer of their own. Empty if the
/// serialization fails (it cannot for these types: maps with string keys, no non-finite floats).
fn body_bytes(write: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>) -> Bytes {
    BODY_BUF.with_borrow_mut(|buf| {
        buf.clear();
        match write(buf) {
            Ok(()) => Bytes::copy_from_slice(buf),
            Err(_) => Bytes::new(),
        }
    })
}

impl CompletionBody {
    pub(crate) fn model(&self) -> Option<&str> {
        match self {
            Self::Chat(r) => r.model.as_deref(),
            Self::Text(r) => r.model.as_deref(),
        }
    }
    pub(crate) fn is_stream(&self) -> bool {
        match self {
            Self::Chat(r) => r.is_stream(),
            Self::Text(r) => r.is_stream(),
        }
    }
    fn extra_mut(&mut self) -> &mut pdx_protocol::Extra {
        match self {
            Self::Chat(r) => &mut r.extra,
            Self::Text(r) => &mut r.extra,
        }
    }
    fn output_limit(&self) -> u64 {
        u64::from(match self {
            Self::Chat(r) => r.output_limit().unwrap_or(16),
            Self::Text(r) => r.max_tokens.unwrap_or(16),
        })
    }
    pub(crate) fn set_kv(&mut self, p: Option<KvTransferParams>) {
        match self {
            Self::Chat(r) => r.kv_transfer_params = p,
            Self::Text(r) => r.kv_transfer_params = p,
        }
    }
    /// Sets the SGLang bootstrap fields; `Default` removes them (only the router pairs workers: a client's
    /// `bootstrap_room` would make engines wait for a KV handoff nobody set up).
    pub(crate) fn set_bootstrap(&mut self, b: pdx_protocol::BootstrapParams) {
        match self {
            Self::Chat(r) => r.bootstrap = b,
            Self::Text(r) => r.bootstrap = b,
        }
    }
    /// Prompt token ids under the mock's built-in tokenizer and chat template.
    fn tokens(&self) -> Vec<u32> {
        let t = pdx_tokens::Tokenizer::Builtin;
        match self {
            Self::Chat(r) => t.chat_prompt(&r.messages).unwrap_or_default(),
            Self::Text(r) => match &r.prompt {
                pdx_protocol::Prompt::Text(s) => {
                    let mut v = Vec::new();
                    let _ = t.encode(s, &mut v);
                    v
                }
                pdx_protocol::Prompt::Tokens(v) => v.clone(),
                pdx_protocol::Prompt::Texts(ss) => {
                    let mut v = Vec::new();
                    for s in ss {
                        let _ = t.encode(s, &mut v);
                    }
                    v
                }
                pdx_protocol::Prompt::TokenBatches(b) => b.concat(),
            },
        }
    }
    /// The prefill request of the vLLM NixlConnector flow (vLLM `toy_proxy_server.py`): this request with
    /// `stream` false, no `stream_options` or `min_tokens`, `max_tokens` (and a `max_completion_tokens` the
    /// client set) 1, and `kv_transfer_params` asking for a remote decode. The fields are set for the
    /// serialization and put back after it, so the request (its messages, its unknown fields) is not copied.
    pub(crate) fn prefill_bytes(&mut self) -> Bytes {
        // The thread's prefill `kv_transfer_params` are lent to the request for the serialization and taken back.
        PREFILL_KV.with_borrow_mut(|kv| {
            body_bytes(|buf| match self {
                Self::Chat(r) => {
                    let mct = r.max_completion_tokens.is_some().then_some(1);
                    let (res, (.., back)) = serialize_with!(r, buf; stream = Some(false),
                        stream_options = None, max_tokens = Some(1), max_completion_tokens = mct,
                        min_tokens = None, kv_transfer_params = kv.take());
                    *kv = back;
                    res
                }
                Self::Text(r) => {
                    let (res, (.., back)) = serialize_with!(r, buf; stream = Some(false),
                        stream_options = None, max_tokens = Some(1), min_tokens = None,
                        kv_transfer_params = kv.take());
                    *kv = back;
                    res
                }
            })
        })
    }
    /// The request as it is.
    pub(crate) fn to_bytes(&self) -> Bytes {
        body_bytes(|buf| match self {
            Self::Chat(r) => serde_json::to_writer(buf, r),
            Self::Text(r) => serde_json::to_writer(buf, r),
        })
    }
    /// The decode request of the vLLM NixlConnector flow: this request with `kv` (the prefill's answer, or
    /// `None` for a decode without remote KV) as its `kv_transfer_params`. `kv` is lent for the serialization
    /// and given back: the lease on the prefilled KV keeps it, to release the blocks if no decode takes them.
    pub(crate) fn decode_bytes(&mut self, kv: &mut Option<KvTransferParams>) -> Bytes {
        body_bytes(|buf| {
            let (res, (back,)) = match self {
                Self::Chat(r) => serialize_with!(r, buf; kv_transfer_params = kv.take()),
                Self::Text(r) => serialize_with!(r, buf; kv_transfer_params = kv.take()),
            };
            *kv = back;
            res
        })
    }
}

/// SLO targets read from the body: top-level `ttft_target_ms` / `itl_target_ms`, or the same
/// names inside Dynamo's `nvext` object. They (and `nvext`) are removed before forwarding.
fn take_slo(body: &mut CompletionBody) -> Result<(Option<f64>, Option<f64>), ApiError> {
    let extra = body.extra_mut();
    let nvext = extra.remove("nvext");
    let mut get = |k: &str| -> Result<Option<f64>, ApiError> {
        let v = extra
            .remove(k)
            .or_else(|| nvext.as_ref().and_then(|n| n.get(k)).cloned());
        match v {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .map(Some)
                .ok_or_else(|| {
                    ApiError::invalid_param(k, format!("{k} must be a non-negative number"))
                }),
        }
    };
    Ok((get("ttft_target_ms")?, get("itl_target_ms")?))
}

/// One client request on its way through the orchestration.
#[derive(Debug)]
pub struct Job {
    /// Model topology.
    pub model: Arc<ModelTopo>,
    /// Parsed body (client `kv_transfer_params` removed).
    pub body: CompletionBody,
    /// Upstream path.
    pub path: &'static str,
    /// Request id.
    pub rid: HeaderValue,
    /// The client's `Authorization`, sent upstream to workers without their own key
    /// ([`crate::front_auth::upstream`]).
    pub auth: Option<HeaderValue>,
    /// Prompt block hashes (`kv_aware` pools only).
    pub hashes: Vec<u64>,
    /// Prompt tokens (tokenized when a grid or `kv_aware` needs them, else bytes / 4).
    pub isl: u64,
    /// Prompt + output limit, tokens (load accounting).
    pub tokens: u64,
    /// TTFT target, ms.
    pub ttft_ms: Option<f64>,
    /// ITL target, ms.
    pub itl_ms: Option<f64>,
    /// Arrival.
    pub start: Instant,
    /// Decode (or aggregated) workers this request must not go to: those a migrated stream left
    /// ([`crate::migrate`]); empty for a new request.
    pub avoid: Vec<u64>,
    /// A stream continued on another worker ([`crate::migrate`]): it was admitted as a new request, and its
    /// slots of admission shaping stay with the client's stream, so it takes none again.
    pub continuation: bool,
}

/// A completion request; every answer is counted in `pdx_requests_total` ([`crate::front::count`]).
pub(crate) async fn completion(
    sh: &Arc<Shared>,
    req: Request<Full<Bytes>>,
    rid: &HeaderValue,
    chat: bool,
) -> Response<RouterBody> {
    let mut label = None;
    let resp = run_completion(sh, req, rid, chat, &mut label).await;
    let label = label.unwrap_or_else(|| crate::api::models::OTHER.into());
    crate::front::count(sh, label, &resp);
    resp
}

/// [`completion`]; sets `label` to the request's model label once the body is parsed.
async fn run_completion(
    sh: &Arc<Shared>,
    req: Request<Full<Bytes>>,
    rid: &HeaderValue,
    chat: bool,
    label: &mut Option<crate::metrics::Label>,
) -> Response<RouterBody> {
    let start = Instant::now();
    let auth = req.headers().get(hyper::header::AUTHORIZATION).cloned();
    let raw = match read_body(sh, req).await {
        Ok(b) => b,
        Err(e) => return error_response(&e),
    };
    // Parsed and validated once here, as vLLM's server does it (`pdx_protocol::sampling`), so a bad request
    // costs no worker anything (not a prefill, then a decode's 400). What an engine may or may not support
    // (tool parsers, structured outputs) is left to the engine.
    let parsed = if chat {
        pdx_protocol::sampling::parse_chat(&raw).map(|(r, _)| CompletionBody::Chat(r))
    } else {
        pdx_protocol::sampling::parse_completion(&raw).map(|(r, _)| CompletionBody::Text(r))
    };
    let mut body = match parsed {
        Ok(b) => b,
        Err(e) => {
            // Counted under the model the client named, when the body says (a second parse, on errors only).
            #[derive(serde::Deserialize)]
            struct Named {
                model: Option<String>,
            }
            let named = serde_json::from_slice::<Named>(&raw)
                .ok()
                .and_then(|n| n.model);
            *label = Some(sh.models.label(&sh.registry.snap.load(), named.as_deref()));
            return error_response(&e);
        }
    };
    *label = Some(sh.models.label(&sh.registry.snap.load(), body.model()));
    let (ttft_ms, itl_ms) = match take_slo(&mut body) {
        Ok(t) => t,
        Err(e) => return error_response(&e),
    };
    // Client-supplied transfer and pairing fields are the router's to set, under every orchestration.
    body.set_kv(None);
    body.set_bootstrap(Default::default());
    let snap = sh.registry.snap.load();
    let Some(model) = snap.model(body.model()).cloned() else {
        if !crate::front::has_workers(&snap) {
            return error_response(&crate::front::no_workers());
        }
        return error_response(&ApiError::not_found(format!(
            "the model `{}` does not exist",
            body.model().unwrap_or("")
        )));
    };
    let need_hashes = model.needs_hashes();
    let (isl, hashes) = if need_hashes || model.grid.is_some() {
        let toks = body.tokens();
        let h = if need_hashes {
            pdx_tokens::block_hashes(&toks, model.block_size)
        } else {
            Vec::new()
        };
        (toks.len() as u64, h)
    } else {
        (raw.len() as u64 / 4, Vec::new())
    };
    let tokens = isl + body.output_limit();
    let job = Job {
        model,
        body,
        path: if chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        },
        rid: rid.clone(),
        auth,
        hashes,
        isl,
        tokens,
        ttft_ms,
        itl_ms,
        start,
        avoid: Vec::new(),
        continuation: false,
    };
    crate::orchestrate::run(sh, job).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefill_request_leaves_the_request_as_it_was() {
        let raw = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":9,"max_completion_tokens":9,"min_tokens":2,"temperature":0.5,"x_other":[1]}"#;
        let (r, _) = pdx_protocol::sampling::parse_chat(raw).expect("valid");
        let mut body = CompletionBody::Chat(r);
        let before = body.to_bytes();
        let p: serde_json::Value = serde_json::from_slice(&body.prefill_bytes()).unwrap();
        assert_eq!(body.to_bytes(), before, "the request is unchanged");
        assert_eq!(p["stream"], false);
        assert_eq!(p["max_tokens"], 1);
        assert_eq!(p["max_completion_tokens"], 1);
        assert!(p.get("stream_options").is_none() && p.get("min_tokens").is_none());
        assert_eq!(p["temperature"], 0.5);
        assert_eq!(p["x_other"][0], 1);
        assert_eq!(p["messages"][0]["content"], "hi");
        let kv = &p["kv_transfer_params"];
        assert_eq!(kv["do_remote_decode"], true);
        assert_eq!(kv["do_remote_prefill"], false);
        for k in [
            "remote_engine_id",
            "remote_block_ids",
            "remote_host",
            "remote_port",
        ] {
            assert!(kv[k].is_null() && kv.get(k).is_some(), "{k}");
        }

        // Without a client `max_completion_tokens`, none is added; a text request the same way.
        let (r, _) = pdx_protocol::sampling::parse_chat(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":9}"#,
        )
        .expect("valid");
        let p: serde_json::Value =
            serde_json::from_slice(&CompletionBody::Chat(r).prefill_bytes()).unwrap();
        assert!(p.get("max_completion_tokens").is_none());
        let (r, _) = pdx_protocol::sampling::parse_completion(
            br#"{"model":"m","prompt":"hi","stream":true,"max_tokens":9,"min_tokens":1}"#,
        )
        .expect("valid");
        let mut body = CompletionBody::Text(r);
        let before = body.to_bytes();
        let p: serde_json::Value = serde_json::from_slice(&body.prefill_bytes()).unwrap();
        assert_eq!(body.to_bytes(), before);
        assert_eq!(
            (p["stream"].clone(), p["max_tokens"].clone()),
            (false.into(), 1.into())
        );
        assert!(p.get("min_tokens").is_none());
        assert_eq!(p["kv_transfer_params"]["do_remote_decode"], true);
    }
}
