//! Request validation as vLLM's OpenAI server does it, for `/v1/chat/completions` and `/v1/completions`:
//! field types (vLLM's pydantic models, lax mode: `"0.5"` is a number), the model validators of
//! `ChatCompletionRequest` / `CompletionRequest` (`stream_options`, `top_logprobs`, `tools` and
//! `tool_choice`, `response_format`), and the range checks of `SamplingParams._verify_args`, with vLLM's
//! messages and status (400 `BadRequestError`).
//!
//! Sources: vLLM `vllm/entrypoints/openai/chat_completion/protocol.py` and `completion/protocol.py`
//! (request models and their validators), `vllm/sampling_params.py` (`_verify_args`), and the serving
//! layer's `"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set` and
//! `Requested sample logprobs of N, which is greater than max allowed: 20` (`--max-logprobs`, default 20).
//! Type errors read like pydantic's: `1 validation error:` and one `{'type': …, 'loc': ('body', field),
//! 'msg': …, 'input': …}` per bad field, the input clipped to 100 characters (vLLM echoes it whole).
//!
//! [`parse_chat`] and [`parse_completion`] parse a body once in the common case (it deserializes): only a body
//! that does not is parsed a second time, as JSON, to say which field is wrong.

use crate::error::ApiError;
use crate::openai::{ChatCompletionRequest, CompletionRequest, Extra};
use serde_json::Value;

/// vLLM's default `--max-logprobs`: the most `logprobs` (completions) or `top_logprobs` (chat) a request gets.
pub const MAX_LOGPROBS: u32 = 20;

/// vLLM's default `VLLM_MAX_N_SEQUENCES`: the largest `n`.
pub const MAX_N: u32 = 16384;

/// Below this temperature vLLM samples greedily (`_SAMPLING_EPS`).
const SAMPLING_EPS: f64 = 1e-5;

/// Which API a body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

/// `tool_choice`, resolved as vLLM does (`auto` when `tools` are given without it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// No tools, or `"none"`.
    #[default]
    None,
    /// `"auto"`: needs a tool-call parser on the server.
    Auto,
    /// `"required"`.
    Required,
    /// `{"type": "function", "function": {"name": …}}`.
    Named(String),
}

/// The sampling fields of a request, validated. Absent fields are `None` (the server's default applies).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sampling {
    /// Choices to generate (`n`, default 1).
    pub n: u32,
    /// `temperature`.
    pub temperature: Option<f64>,
    /// `top_p`.
    pub top_p: Option<f64>,
    /// `top_k` (0 or -1: off).
    pub top_k: Option<i64>,
    /// `min_p`.
    pub min_p: Option<f64>,
    /// `presence_penalty`.
    pub presence_penalty: Option<f64>,
    /// `frequency_penalty`.
    pub frequency_penalty: Option<f64>,
    /// `repetition_penalty`.
    pub repetition_penalty: Option<f64>,
    /// `seed` (`-1` means none, as in vLLM).
    pub seed: Option<i64>,
    /// Stop strings (`stop`, a string or a list).
    pub stop: Vec<String>,
    /// `include_stop_str_in_output`: keep the stop string at the end of the text.
    pub include_stop_str_in_output: bool,
    /// Log-probabilities wanted per output token: `Some(k)` returns the sampled token's and the `k` most
    /// likely ones' (chat `logprobs: true` with `top_logprobs: k`; completions `logprobs: k`).
    pub logprobs: Option<u32>,
    /// `tool_choice` over `tools`.
    pub tool_choice: ToolChoice,
    /// `response_format.type` (`text`, `json_object`, `json_schema`, `structural_tag`).
    pub response_format: Option<String>,
}

/// Field types of vLLM's request models.
#[derive(Clone, Copy, PartialEq)]
enum Ty {
    Str,
    Bool,
    Int,
    Float,
    List,
    Object,
    /// `str | list[str]` (`stop`).
    StrOrStrList,
    /// Not checked here (`messages`, `prompt`, `tool_choice`: their own validators).
    Skip,
}

/// `(field, type, nullable)` of both APIs.
const COMMON: &[(&str, Ty, bool)] = &[
    ("model", Ty::Str, true),
    ("stream", Ty::Bool, true),
    ("stream_options", Ty::Object, true),
    ("max_tokens", Ty::Int, true),
    ("min_tokens", Ty::Int, false),
    ("ignore_eos", Ty::Bool, false),
    ("n", Ty::Int, true),
    ("temperature", Ty::Float, true),
    ("top_p", Ty::Float, true),
    ("top_k", Ty::Int, true),
    ("min_p", Ty::Float, true),
    ("presence_penalty", Ty::Float, true),
    ("frequency_penalty", Ty::Float, true),
    ("repetition_penalty", Ty::Float, true),
    ("seed", Ty::Int, true),
    ("stop", Ty::StrOrStrList, true),
    ("stop_token_ids", Ty::List, true),
    ("include_stop_str_in_output", Ty::Bool, false),
    ("skip_special_tokens", Ty::Bool, false),
    ("logit_bias", Ty::Object, true),
    ("user", Ty::Str, true),
    ("echo", Ty::Bool, false),
    ("response_format", Ty::Object, true),
    ("kv_transfer_params", Ty::Object, true),
];
const CHAT: &[(&str, Ty, bool)] = &[
    ("messages", Ty::List, false),
    ("max_completion_tokens", Ty::Int, true),
    ("logprobs", Ty::Bool, true),
    ("top_logprobs", Ty::Int, true),
    ("tools", Ty::List, true),
    ("tool_choice", Ty::Skip, true),
    ("parallel_tool_calls", Ty::Bool, true),
    ("add_generation_prompt", Ty::Bool, false),
    ("continue_final_message", Ty::Bool, false),
];
const COMPLETIONS: &[(&str, Ty, bool)] = &[
    ("prompt", Ty::Skip, false),
    ("logprobs", Ty::Int, true),
    ("suffix", Ty::Str, true),
    ("best_of", Ty::Int, true),
];

/// Python's `repr` of a JSON value (pydantic's `input`), clipped to 100 characters.
fn py_repr(v: &Value) -> String {
    fn go(v: &Value, out: &mut String) {
        match v {
            Value::Null => out.push_str("None"),
            Value::Bool(b) => out.push_str(if *b { "True" } else { "False" }),
            Value::Number(n) => match n.as_f64() {
                Some(f) if !n.is_i64() && !n.is_u64() => out.push_str(&py_float(f)),
                _ => out.push_str(&n.to_string()),
            },
            Value::String(s) => {
                out.push('\'');
                for c in s.chars() {
                    match c {
                        '\'' => out.push_str("\\'"),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        c => out.push(c),
                    }
                }
                out.push('\'');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    go(x, out);
                    if out.len() > 200 {
                        break;
                    }
                }
                out.push(']');
            }
            Value::Object(m) => {
                out.push('{');
                for (i, (k, x)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    go(&Value::String(k.clone()), out);
                    out.push_str(": ");
                    go(x, out);
                    if out.len() > 200 {
                        break;
                    }
                }
                out.push('}');
            }
        }
    }
    let mut s = String::new();
    go(v, &mut s);
    if s.chars().count() > 100 {
        s = s.chars().take(97).collect::<String>() + "...";
    }
    s
}

/// A float as Python prints it (`-1.0`, `0.5`, `1e+30`).
fn py_float(f: f64) -> String {
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
        format!("{f:.1}")
    } else if f.is_nan() {
        "nan".into()
    } else if f.is_infinite() {
        if f > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{f}")
    }
}

/// One pydantic error entry.
struct TypeError {
    kind: &'static str,
    loc: String,
    msg: &'static str,
    input: String,
    field: String,
}

fn type_error(
    field: &str,
    sub: Option<&str>,
    kind: &'static str,
    msg: &'static str,
    v: &Value,
) -> TypeError {
    let loc = match sub {
        Some(s) => format!("('body', '{field}', '{s}')"),
        None => format!("('body', '{field}')"),
    };
    TypeError {
        kind,
        loc,
        msg,
        input: py_repr(v),
        field: field.to_string(),
    }
}

/// pydantic's message for a list of errors, as vLLM returns it (400, `param` = the first bad field).
fn validation_error(errors: &[TypeError]) -> ApiError {
    let mut m = format!(
        "{} validation error{}:",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    );
    for e in errors {
        m += &format!(
            "\n  {{'type': '{}', 'loc': {}, 'msg': '{}', 'input': {}}}",
            e.kind, e.loc, e.msg, e.input
        );
    }
    ApiError::invalid_param(&errors[0].field, m)
}

/// Checks (and, in pydantic's lax mode, converts in place: `"2"` → 2) one field's value.
fn check_type(field: &str, ty: Ty, nullable: bool, v: &mut Value, errors: &mut Vec<TypeError>) {
    if v.is_null() {
        if !nullable {
            let (kind, msg) = match ty {
                Ty::Int => ("int_type", "Input should be a valid integer"),
                Ty::Bool => ("bool_type", "Input should be a valid boolean"),
                Ty::List => ("list_type", "Input should be a valid list"),
                _ => ("missing", "Input should not be None"),
            };
            errors.push(type_error(field, None, kind, msg, v));
        }
        return;
    }
    match ty {
        Ty::Skip => {}
        Ty::Str => {
            if !v.is_string() {
                errors.push(type_error(
                    field,
                    None,
                    "string_type",
                    "Input should be a valid string",
                    v,
                ));
            }
        }
        Ty::List => {
            if !v.is_array() {
                errors.push(type_error(
                    field,
                    None,
                    "list_type",
                    "Input should be a valid list",
                    v,
                ));
            }
        }
        Ty::Object => {
            if !v.is_object() {
                errors.push(type_error(
                    field,
                    None,
                    "dict_type",
                    "Input should be a valid dictionary",
                    v,
                ));
            }
        }
        Ty::Bool => match v {
            Value::Bool(_) => {}
            Value::Number(n) if n.as_i64() == Some(0) || n.as_i64() == Some(1) => {
                *v = Value::Bool(n.as_i64() == Some(1));
            }
            Value::String(s) => match s.to_ascii_lowercase().as_str() {
                "true" | "t" | "yes" | "y" | "on" | "1" => *v = Value::Bool(true),
                "false" | "f" | "no" | "n" | "off" | "0" => *v = Value::Bool(false),
                _ => errors.push(type_error(
                    field,
                    None,
                    "bool_parsing",
                    "Input should be a valid boolean, unable to interpret input",
                    v,
                )),
            },
            _ => errors.push(type_error(
                field,
                None,
                "bool_type",
                "Input should be a valid boolean",
                v,
            )),
        },
        Ty::Int => match v {
            Value::Number(n) if n.is_i64() || n.is_u64() => {}
            Value::Number(n) => {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 9.2e18 {
                    *v = Value::from(f as i64);
                } else {
                    errors.push(type_error(
                        field,
                        None,
                        "int_from_float",
                        "Input should be a valid integer, got a number with a fractional part",
                        v,
                    ));
                }
            }
            Value::Bool(b) => *v = Value::from(i64::from(*b)),
            Value::String(s) => match s.trim().parse::<i64>() {
                Ok(i) => *v = Value::from(i),
                Err(_) => errors.push(type_error(
                    field,
                    None,
                    "int_parsing",
                    "Input should be a valid integer, unable to parse string as an integer",
                    v,
                )),
            },
            _ => errors.push(type_error(
                field,
                None,
                "int_type",
                "Input should be a valid integer",
                v,
            )),
        },
        Ty::Float => match v {
            Value::Number(_) => {}
            Value::Bool(b) => *v = Value::from(f64::from(u8::from(*b))),
            Value::String(s) => match s.trim().parse::<f64>() {
                Ok(f) if f.is_finite() => *v = Value::from(f),
                _ => errors.push(type_error(
                    field,
                    None,
                    "float_parsing",
                    "Input should be a valid number, unable to parse string as a number",
                    v,
                )),
            },
            _ => errors.push(type_error(
                field,
                None,
                "float_type",
                "Input should be a valid number",
                v,
            )),
        },
        Ty::StrOrStrList => match v {
            Value::String(_) => {}
            Value::Array(a) if a.iter().all(Value::is_string) => {}
            Value::Array(a) => {
                let (i, bad) = a
                    .iter()
                    .enumerate()
                    .find(|(_, x)| !x.is_string())
                    .expect("one is not a string");
                let mut e = type_error(
                    field,
                    None,
                    "string_type",
                    "Input should be a valid string",
                    bad,
                );
                e.loc = format!("('body', '{field}', 'list[str]', {i})");
                errors.push(e);
            }
            _ => {
                errors.push(type_error(
                    field,
                    Some("str"),
                    "string_type",
                    "Input should be a valid string",
                    v,
                ));
                errors.push(type_error(
                    field,
                    Some("list[str]"),
                    "list_type",
                    "Input should be a valid list",
                    v,
                ));
            }
        },
    }
}

/// Type-checks every known field of `body` (converting lax values in place); `whole`: `body` is the whole
/// request, so its required fields (`messages`, `prompt`) must be there. Errors: pydantic's message.
fn check_types(
    body: &mut serde_json::Map<String, Value>,
    api: Api,
    whole: bool,
) -> Result<(), ApiError> {
    let own = match api {
        Api::Chat => CHAT,
        Api::Completions => COMPLETIONS,
    };
    let mut errors = Vec::new();
    for &(field, ty, nullable) in own.iter().chain(COMMON) {
        match body.get_mut(field) {
            Some(v) => check_type(field, ty, nullable, v, &mut errors),
            None if whole && matches!(field, "messages" | "prompt") => errors.push(TypeError {
                kind: "missing",
                loc: format!("('body', '{field}')"),
                msg: "Field required",
                input: "{...}".into(),
                field: field.into(),
            }),
            None => {}
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(validation_error(&errors))
    }
}

/// Integer fields the typed request holds as `u32`: vLLM's messages for values below their range, and values
/// above `u32::MAX` saturated (the engine's context-length check then refuses them, as vLLM's does).
fn check_u32_fields(body: &mut serde_json::Map<String, Value>) -> Result<(), ApiError> {
    for field in ["max_tokens", "max_completion_tokens", "min_tokens"] {
        let Some(v) = body.get_mut(field) else {
            continue;
        };
        let Some(i) = v.as_i64().or_else(|| v.as_u64().map(|_| i64::MAX)) else {
            continue;
        };
        if i < 0 || (i == 0 && field != "min_tokens") {
            return Err(ApiError::invalid_param(
                field,
                if field == "min_tokens" {
                    format!("min_tokens must be greater than or equal to 0, got {i}.")
                } else {
                    format!("max_tokens must be at least 1, got {i}.")
                },
            ));
        }
        if i > i64::from(u32::MAX) {
            *v = Value::from(u32::MAX);
        }
    }
    Ok(())
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid_param(param, msg)
}

/// The checks that need several fields or ranges, on a body whose types are right.
/// What the value checks need of the typed fields.
#[derive(Clone, Copy)]
struct Typed {
    stream: bool,
    stream_options: bool,
}

fn check_values(
    body: &serde_json::Map<String, Value>,
    typed: Typed,
    api: Api,
) -> Result<Sampling, ApiError> {
    let f = |k: &str| body.get(k).and_then(Value::as_f64);
    let i = |k: &str| {
        body.get(k)
            .and_then(|v| v.as_i64().or_else(|| v.as_u64().map(|_| i64::MAX)))
    };
    let b = |k: &str| body.get(k).and_then(Value::as_bool).unwrap_or(false);
    // Model validators (`mode="before"`).
    if typed.stream_options && !typed.stream {
        return Err(bad(
            "stream_options",
            "Stream options can only be defined when `stream=True`.",
        ));
    }
    let logprobs = match api {
        Api::Chat => {
            let top = i("top_logprobs");
            if let Some(t) = top {
                if t < 0 && t != -1 {
                    return Err(bad(
                        "top_logprobs",
                        "`top_logprobs` must be a positive value or -1.",
                    ));
                }
                if (t == -1 || t > 0) && !b("logprobs") {
                    return Err(bad(
                        "top_logprobs",
                        "when using `top_logprobs`, `logprobs` must be set to true.",
                    ));
                }
            }
            b("logprobs").then_some(top.unwrap_or(0))
        }
        Api::Completions => {
            let l = i("logprobs");
            if let Some(l) = l {
                if l < 0 && l != -1 {
                    return Err(bad(
                        "logprobs",
                        "`logprobs` must be a positive value or -1.",
                    ));
                }
            }
            l
        }
    };
    let logprobs = match logprobs {
        Some(k) if k == -1 || k > i64::from(MAX_LOGPROBS) => {
            return Err(bad(
                "logprobs",
                format!(
                    "Requested sample logprobs of {k}, which is greater than max allowed: {MAX_LOGPROBS}"
                ),
            ))
        }
        Some(k) => Some(k as u32),
        None => None,
    };
    let tool_choice = if api == Api::Chat {
        tool_choice(body)?
    } else {
        ToolChoice::None
    };
    let response_format = match body.get("response_format") {
        Some(Value::Object(rf)) => {
            let kinds = ["text", "json_object", "json_schema", "structural_tag"];
            let t = rf.get("type").and_then(Value::as_str).unwrap_or_default();
            if !kinds.contains(&t) {
                let v = rf.get("type").cloned().unwrap_or(Value::Null);
                let mut e = type_error(
                    "response_format",
                    None,
                    "literal_error",
                    "Input should be 'text', 'json_object', 'json_schema' or 'structural_tag'",
                    &v,
                );
                e.loc = "('body', 'response_format', 'type')".into();
                return Err(validation_error(&[e]));
            }
            if t == "json_schema" && rf.get("json_schema").is_none_or(Value::is_null) {
                return Err(bad(
                    "response_format",
                    "When response_format type is 'json_schema', the 'json_schema' field must be provided.",
                ));
            }
            Some(t.to_string())
        }
        _ => None,
    };
    // SamplingParams._verify_args.
    let n = i("n").unwrap_or(1);
    if n < 1 {
        return Err(bad("n", format!("n must be at least 1, got {n}.")));
    }
    if n > i64::from(MAX_N) {
        return Err(bad(
            "n",
            format!(
                "n must be at most {MAX_N}, got {n}. To increase this limit, set the VLLM_MAX_N_SEQUENCES environment variable."
            ),
        ));
    }
    for k in ["presence_penalty", "frequency_penalty"] {
        if let Some(v) = f(k) {
            if !(-2.0..=2.0).contains(&v) {
                return Err(bad(
                    k,
                    format!("{k} must be in [-2, 2], got {}.", py_float(v)),
                ));
            }
        }
    }
    if let Some(v) = f("repetition_penalty") {
        if v <= 0.0 {
            return Err(bad(
                "repetition_penalty",
                format!(
                    "repetition_penalty must be greater than zero, got {}.",
                    py_float(v)
                ),
            ));
        }
    }
    let temperature = f("temperature");
    if let Some(t) = temperature {
        if t < 0.0 {
            return Err(bad(
                "temperature",
                format!("temperature must be non-negative, got {}.", py_float(t)),
            ));
        }
        if t > 2.0 {
            return Err(bad(
                "temperature",
                format!("temperature must be in [0, 2], got {}.", py_float(t)),
            ));
        }
    }
    if let Some(p) = f("top_p") {
        if !(p > 0.0 && p <= 1.0) {
            return Err(bad(
                "top_p",
                format!("top_p must be in (0, 1], got {}.", py_float(p)),
            ));
        }
    }
    let top_k = i("top_k");
    if let Some(k) = top_k {
        if k < -1 {
            return Err(bad(
                "top_k",
                format!("top_k must be 0 (disable), or at least 1, got {k}."),
            ));
        }
    }
    if let Some(p) = f("min_p") {
        if !(0.0..=1.0).contains(&p) {
            return Err(bad(
                "min_p",
                format!("min_p must be in [0, 1], got {}.", py_float(p)),
            ));
        }
    }
    let seed = match body.get("seed") {
        Some(Value::Number(s)) if s.as_i64().is_none() => {
            let mut e = type_error(
                "seed",
                None,
                "less_than_equal",
                "Input should be less than or equal to 9223372036854775807",
                &Value::Number(s.clone()),
            );
            e.loc = "('body', 'seed')".into();
            return Err(validation_error(&[e]));
        }
        Some(Value::Number(s)) => s.as_i64().filter(|&s| s != -1),
        _ => None,
    };
    let stop: Vec<String> = match body.get("stop") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    if stop.iter().any(String::is_empty) {
        return Err(bad("stop", "stop cannot contain an empty string."));
    }
    let n = n as u32;
    if n > 1 && temperature.is_some_and(|t| t < SAMPLING_EPS) {
        return Err(bad(
            "n",
            format!("n must be 1 when using greedy sampling, got {n}."),
        ));
    }
    Ok(Sampling {
        n,
        temperature,
        top_p: f("top_p"),
        top_k,
        min_p: f("min_p"),
        presence_penalty: f("presence_penalty"),
        frequency_penalty: f("frequency_penalty"),
        repetition_penalty: f("repetition_penalty"),
        seed,
        stop,
        include_stop_str_in_output: b("include_stop_str_in_output"),
        logprobs,
        tool_choice,
        response_format,
    })
}

/// `ChatCompletionRequest.check_tool_usage`: `tools` and `tool_choice` together.
fn tool_choice(body: &serde_json::Map<String, Value>) -> Result<ToolChoice, ApiError> {
    let tools = body.get("tools").filter(|t| !t.is_null());
    if let Some(Value::Array(t)) = tools {
        if t.is_empty() {
            return Err(bad(
                "tools",
                "`tools` must not be an empty array. Either provide at least one tool or omit the field entirely.",
            ));
        }
        for (i, tool) in t.iter().enumerate() {
            let name = tool.pointer("/function/name");
            if !name.is_some_and(Value::is_string) {
                let mut e = type_error("tools", None, "missing", "Field required", tool);
                e.loc = format!("('body', 'tools', {i}, 'function', 'name')");
                return Err(validation_error(&[e]));
            }
        }
    }
    let choice = match body.get("tool_choice") {
        None if tools.is_some() => Value::String("auto".into()),
        None | Some(Value::Null) => return Ok(ToolChoice::None),
        Some(c) => c.clone(),
    };
    if choice == "none" {
        return Ok(ToolChoice::None);
    }
    let Some(Value::Array(tools)) = tools else {
        return Err(bad(
            "tool_choice",
            "When using `tool_choice`, `tools` must be set.",
        ));
    };
    match &choice {
        Value::String(s) if s == "auto" => Ok(ToolChoice::Auto),
        Value::String(s) if s == "required" => Ok(ToolChoice::Required),
        Value::Object(o) => {
            let usage = r#"Correct usage: `{"type": "function", "function": {"name": "my_function"}}`"#;
            let Some(Value::Object(function)) = o.get("function") else {
                return Err(bad(
                    "tool_choice.function",
                    format!(
                        "Invalid value for `function`: `{}` in `tool_choice`! {usage}",
                        o.get("function").map_or("None".into(), py_repr)
                    ),
                ));
            };
            let name = match function.get("name") {
                None => {
                    return Err(bad(
                        "tool_choice.function.name",
                        format!("Expected field `name` in `function` in `tool_choice`! {usage}"),
                    ))
                }
                Some(Value::String(n)) if !n.is_empty() => n.clone(),
                Some(other) => {
                    return Err(bad(
                        "tool_choice.function.name",
                        format!(
                            "Invalid `name` in `function`: `{}` in `tool_choice`! {usage}",
                            match other {
                                Value::String(s) => s.clone(),
                                v => py_repr(v),
                            }
                        ),
                    ))
                }
            };
            if !tools
                .iter()
                .any(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name.as_str()))
            {
                return Err(bad(
                    "tool_choice",
                    "The tool specified in `tool_choice` does not match any of the specified `tools`",
                ));
            }
            Ok(ToolChoice::Named(name))
        }
        other => Err(bad(
            "tool_choice",
            format!(
                "Invalid value for `tool_choice`: {}! Only named tools, \"none\", \"auto\" or \"required\" are supported.",
                match other {
                    Value::String(s) => s.clone(),
                    v => py_repr(v),
                }
            ),
        )),
    }
}

/// A body that did not deserialize: says why, as vLLM would (pydantic's type errors, or the JSON error).
fn explain<T: serde::de::DeserializeOwned>(
    body: &[u8],
    api: Api,
    first: serde_json::Error,
) -> Result<(T, Value), ApiError> {
    let mut v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "1 validation error:\n  {{'type': 'json_invalid', 'loc': ('body', {}), 'msg': 'JSON decode error', 'input': {{}}, 'ctx': {{'error': '{e}'}}}}",
            e.column()
        ))
    })?;
    let Value::Object(map) = &mut v else {
        return Err(validation_error(&[TypeError {
            kind: "model_attributes_type",
            loc: "('body',)".into(),
            msg: "Input should be a valid dictionary or object to extract fields from",
            input: py_repr(&v),
            field: "body".into(),
        }]));
    };
    check_types(map, api, true)?;
    check_u32_fields(map)?;
    let parsed = serde_json::from_value::<T>(v.clone()).map_err(|e| {
        // A nested shape (a message without `role`, a prompt of the wrong type): serde's words.
        let e = if e.to_string() == first.to_string() {
            first
        } else {
            e
        };
        ApiError::bad_request(format!(
            "1 validation error:\n  {{'type': 'value_error', 'loc': ('body',), 'msg': '{e}'}}"
        ))
    })?;
    Ok((parsed, v))
}

/// Parses and validates a `/v1/chat/completions` body as vLLM does (module docs).
///
/// Errors: 400 `BadRequestError` with vLLM's message, `param` naming the field.
pub fn parse_chat(body: &[u8]) -> Result<(ChatCompletionRequest, Sampling), ApiError> {
    let r = match serde_json::from_slice::<ChatCompletionRequest>(body) {
        Ok(r) => r,
        Err(e) => explain::<ChatCompletionRequest>(body, Api::Chat, e)?.0,
    };
    let typed = Typed {
        stream: r.is_stream(),
        stream_options: r.stream_options.is_some(),
    };
    if r.messages.is_empty() {
        return Err(bad("messages", "messages must not be empty"));
    }
    at_least_one("max_tokens", r.max_tokens)?;
    at_least_one("max_completion_tokens", r.max_completion_tokens)?;
    min_tokens_within(r.min_tokens, r.output_limit())?;
    let sampling = validate_extra(&r.extra, typed, Api::Chat)?;
    // `ChatCompletionRequest.check_generation_prompt`: continuing the final message opens no new turn, and
    // `add_generation_prompt` defaults to true.
    let flag = |k: &str| r.extra.get(k).and_then(serde_json::Value::as_bool);
    if flag("continue_final_message") == Some(true) && flag("add_generation_prompt").unwrap_or(true)
    {
        return Err(bad(
            "continue_final_message",
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
        ));
    }
    Ok((r, sampling))
}

/// Parses and validates a `/v1/completions` body as vLLM does (module docs).
///
/// Errors: 400 `BadRequestError` with vLLM's message, `param` naming the field.
pub fn parse_completion(body: &[u8]) -> Result<(CompletionRequest, Sampling), ApiError> {
    let r = match serde_json::from_slice::<CompletionRequest>(body) {
        Ok(r) => r,
        Err(e) => explain::<CompletionRequest>(body, Api::Completions, e)?.0,
    };
    let typed = Typed {
        stream: r.is_stream(),
        stream_options: r.stream_options.is_some(),
    };
    let empty = match &r.prompt {
        crate::Prompt::Text(_) => false,
        crate::Prompt::Tokens(t) => t.is_empty(),
        crate::Prompt::Texts(t) => t.is_empty(),
        crate::Prompt::TokenBatches(b) => b.is_empty() || b.iter().any(Vec::is_empty),
    };
    if empty {
        return Err(bad("prompt", "prompt must not be empty"));
    }
    at_least_one("max_tokens", r.max_tokens)?;
    min_tokens_within(r.min_tokens, r.max_tokens)?;
    let sampling = validate_extra(&r.extra, typed, Api::Completions)?;
    Ok((r, sampling))
}

/// `SamplingParams._verify_args`: an output limit, when given, of at least 1 token (a typed field, so the type
/// pass does not see it).
fn at_least_one(field: &str, v: Option<u32>) -> Result<(), ApiError> {
    match v {
        Some(0) => Err(bad(field, "max_tokens must be at least 1, got 0.")),
        _ => Ok(()),
    }
}

/// `SamplingParams._verify_args`: `min_tokens` at most `max_tokens`.
fn min_tokens_within(min: Option<u32>, max: Option<u32>) -> Result<(), ApiError> {
    match (min, max) {
        (Some(n), Some(m)) if n > m => Err(bad(
            "min_tokens",
            format!("min_tokens must be less than or equal to max_tokens={m}, got {n}."),
        )),
        _ => Ok(()),
    }
}

/// Type-checks the untyped fields (`extra`) and runs the value checks over them. Lax values (`"0.5"`) are
/// converted in a copy: the request keeps the client's JSON, and a body without such fields costs no copy.
fn validate_extra(extra: &Extra, typed: Typed, api: Api) -> Result<Sampling, ApiError> {
    if extra.is_empty() {
        return check_values(extra, typed, api);
    }
    let mut body = extra.clone();
    check_types(&mut body, api, false)?;
    check_values(&body, typed, api)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(extra: &str) -> Result<Sampling, ApiError> {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"hi"}}]{extra}}}"#);
        parse_chat(body.as_bytes()).map(|(_, s)| s)
    }

    fn completion(extra: &str) -> Result<Sampling, ApiError> {
        let body = format!(r#"{{"prompt":"hi"{extra}}}"#);
        parse_completion(body.as_bytes()).map(|(_, s)| s)
    }

    #[test]
    fn defaults() {
        let s = chat("").unwrap();
        assert_eq!(s.n, 1);
        assert_eq!(s.logprobs, None);
        assert!(s.stop.is_empty());
        assert_eq!(s.tool_choice, ToolChoice::None);
    }

    #[test]
    fn wrong_types_read_like_pydantic() {
        let e = chat(r#","temperature":"hot""#).unwrap_err();
        assert_eq!((e.status, e.kind), (400, "BadRequestError"));
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert_eq!(
            e.message,
            "1 validation error:\n  {'type': 'float_parsing', 'loc': ('body', 'temperature'), 'msg': \
             'Input should be a valid number, unable to parse string as a number', 'input': 'hot'}"
        );
        // A typed field (serde fails first): the same kind of message.
        let e = chat(r#","max_tokens":"many","stream":[1]"#).unwrap_err();
        assert!(
            e.message.starts_with("2 validation errors:"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("'loc': ('body', 'max_tokens')"),
            "{}",
            e.message
        );
        assert!(e.message.contains("'type': 'bool_type'"), "{}", e.message);
        // `stop` is a union: pydantic reports both branches.
        let e = chat(r#","stop":5"#).unwrap_err();
        assert!(e.message.contains("('body', 'stop', 'str')") && e.message.contains("list[str]"));
        let e = chat(r#","n":1.5"#).unwrap_err();
        assert!(e.message.contains("int_from_float"), "{}", e.message);
        assert!(chat(r#","logprobs":"maybe""#).is_err());
        let e = parse_chat(b"{\"messages\": [").unwrap_err();
        assert!(e.message.contains("json_invalid"), "{}", e.message);
        let e = parse_chat(b"[1]").unwrap_err();
        assert!(e.message.contains("valid dictionary"), "{}", e.message);
        let e = parse_chat(b"{}").unwrap_err();
        assert!(e.message.contains("('body', 'messages')") && e.message.contains("Field required"));
    }

    #[test]
    fn lax_values_are_accepted_as_pydantic_does() {
        let s = chat(r#","temperature":"0.5","n":"2","max_tokens":"7","stream":"true","seed":3.0"#)
            .unwrap();
        assert_eq!((s.temperature, s.n, s.seed), (Some(0.5), 2, Some(3)));
        let (r, _) =
            parse_chat(br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"7"}"#)
                .unwrap();
        assert_eq!(r.max_tokens, Some(7));
    }

    #[test]
    fn ranges_as_sampling_params() {
        let msg = |r: Result<Sampling, ApiError>| r.unwrap_err().message;
        assert_eq!(
            msg(chat(r#","temperature":-1"#)),
            "temperature must be non-negative, got -1.0."
        );
        assert_eq!(
            msg(chat(r#","temperature":2.5"#)),
            "temperature must be in [0, 2], got 2.5."
        );
        assert_eq!(
            msg(chat(r#","top_p":0"#)),
            "top_p must be in (0, 1], got 0.0."
        );
        assert_eq!(msg(chat(r#","n":0"#)), "n must be at least 1, got 0.");
        assert_eq!(
            msg(chat(r#","top_k":-2"#)),
            "top_k must be 0 (disable), or at least 1, got -2."
        );
        assert_eq!(
            msg(chat(r#","presence_penalty":3"#)),
            "presence_penalty must be in [-2, 2], got 3.0."
        );
        assert_eq!(
            msg(chat(r#","stop":["a",""]"#)),
            "stop cannot contain an empty string."
        );
        assert_eq!(
            msg(chat(r#","n":2,"temperature":0"#)),
            "n must be 1 when using greedy sampling, got 2."
        );
        assert_eq!(
            msg(chat(r#","max_tokens":-3"#)),
            "max_tokens must be at least 1, got -3."
        );
        assert_eq!(
            msg(chat(r#","min_tokens":-1"#)),
            "min_tokens must be greater than or equal to 0, got -1."
        );
        assert_eq!(
            msg(chat(r#","stream_options":{"include_usage":true}"#)),
            "Stream options can only be defined when `stream=True`."
        );
        assert!(chat(r#","seed":9223372036854775808"#)
            .unwrap_err()
            .message
            .contains("less_than_equal"));
        assert_eq!(chat(r#","seed":-1"#).unwrap().seed, None, "-1 is no seed");
        // Huge limits saturate; the engine's context check refuses them.
        let (r, _) =
            parse_chat(br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":99999999999}"#)
                .unwrap();
        assert_eq!(r.max_tokens, Some(u32::MAX));
    }

    #[test]
    fn logprobs_as_vllm() {
        assert_eq!(chat(r#","logprobs":true"#).unwrap().logprobs, Some(0));
        assert_eq!(
            chat(r#","logprobs":true,"top_logprobs":5"#)
                .unwrap()
                .logprobs,
            Some(5)
        );
        assert_eq!(
            chat(r#","top_logprobs":5"#).unwrap_err().message,
            "when using `top_logprobs`, `logprobs` must be set to true."
        );
        assert_eq!(
            chat(r#","logprobs":true,"top_logprobs":21"#)
                .unwrap_err()
                .message,
            "Requested sample logprobs of 21, which is greater than max allowed: 20"
        );
        assert_eq!(completion(r#","logprobs":3"#).unwrap().logprobs, Some(3));
        assert_eq!(
            completion(r#","logprobs":-2"#).unwrap_err().message,
            "`logprobs` must be a positive value or -1."
        );
        // Completions take an integer, chat a boolean.
        assert!(completion(r#","logprobs":true"#).is_ok(), "lax: true is 1");
        assert!(chat(r#","logprobs":3"#).is_err());
    }

    #[test]
    fn stop_and_seed() {
        let s = chat(r#","stop":"\n\n","seed":42,"include_stop_str_in_output":true"#).unwrap();
        assert_eq!(s.stop, vec!["\n\n".to_string()]);
        assert_eq!(s.seed, Some(42));
        assert!(s.include_stop_str_in_output);
        assert_eq!(chat(r#","stop":["a","b"]"#).unwrap().stop.len(), 2);
    }

    #[test]
    fn tools_and_tool_choice_as_vllm() {
        let tool = r#"{"type":"function","function":{"name":"get_weather","parameters":{}}}"#;
        let s = chat(&format!(r#","tools":[{tool}]"#)).unwrap();
        assert_eq!(
            s.tool_choice,
            ToolChoice::Auto,
            "tools without tool_choice mean auto"
        );
        let s = chat(&format!(r#","tools":[{tool}],"tool_choice":"none""#)).unwrap();
        assert_eq!(s.tool_choice, ToolChoice::None);
        let s = chat(&format!(
            r#","tools":[{tool}],"tool_choice":{{"type":"function","function":{{"name":"get_weather"}}}}"#
        ))
        .unwrap();
        assert_eq!(s.tool_choice, ToolChoice::Named("get_weather".into()));
        let msg = |r: Result<Sampling, ApiError>| r.unwrap_err().message;
        assert_eq!(
            msg(chat(r#","tool_choice":"auto""#)),
            "When using `tool_choice`, `tools` must be set."
        );
        assert!(msg(chat(r#","tools":[]"#)).starts_with("`tools` must not be an empty array."));
        assert_eq!(
            msg(chat(&format!(r#","tools":[{tool}],"tool_choice":"sometimes""#))),
            "Invalid value for `tool_choice`: sometimes! Only named tools, \"none\", \"auto\" or \"required\" are supported."
        );
        assert_eq!(
            msg(chat(&format!(
                r#","tools":[{tool}],"tool_choice":{{"type":"function","function":{{"name":"other"}}}}"#
            ))),
            "The tool specified in `tool_choice` does not match any of the specified `tools`"
        );
        assert!(msg(chat(r#","tools":[{"type":"function"}]"#)).contains("'function', 'name')"));
    }

    #[test]
    fn response_format_as_vllm() {
        assert_eq!(
            chat(r#","response_format":{"type":"json_object"}"#)
                .unwrap()
                .response_format
                .as_deref(),
            Some("json_object")
        );
        assert!(chat(r#","response_format":{"type":"xml"}"#)
            .unwrap_err()
            .message
            .contains("literal_error"));
        assert_eq!(
            chat(r#","response_format":{"type":"json_schema"}"#)
                .unwrap_err()
                .message,
            "When response_format type is 'json_schema', the 'json_schema' field must be provided."
        );
    }

    #[test]
    fn inputs_are_clipped_in_messages() {
        let long = "x".repeat(10_000);
        let e = chat(&format!(r#","temperature":"{long}""#)).unwrap_err();
        assert!(e.message.len() < 400, "{}", e.message.len());
    }
}
