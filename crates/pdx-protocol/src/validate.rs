//! Request validation: the checks vLLM's OpenAI server runs on a completion request before it schedules
//! anything, so a router can refuse a bad request itself, once, before a prefill worker spends a prompt's
//! worth of compute on it (and before a decode worker refuses it after the KV moved).
//!
//! Sources: vLLM `vllm/sampling_params.py` (`SamplingParams._verify_args`, `_verify_num_sequences`,
//! `_verify_greedy_sampling`) and `vllm/entrypoints/openai/protocol.py` (`validate_stream_options`,
//! `check_logprobs`). Messages follow vLLM's wording, with the field as `param`; every error is a
//! 400 `BadRequestError` ([`ApiError::invalid_param`]).
//!
//! Sampling fields the wire types do not model live in the request's `extra` map as JSON values. Their types
//! are checked strictly: a number field takes a JSON number (or `null`), an integer field an integral
//! number; a string such as `"0.5"` is refused (pydantic's lax mode in vLLM would coerce it).

use crate::{ApiError, ChatCompletionRequest, CompletionRequest, Extra, Prompt, StreamOptions};
use serde_json::Value;

/// Validates a `/v1/chat/completions` body.
///
/// Errors: a 400 [`ApiError`] naming the first offending field.
pub fn chat(r: &ChatCompletionRequest) -> Result<(), ApiError> {
    if r.messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must not be empty",
        ));
    }
    positive_limit("max_tokens", r.max_tokens)?;
    positive_limit("max_completion_tokens", r.max_completion_tokens)?;
    min_tokens(r.min_tokens, r.output_limit())?;
    stream_options(r.stream, r.stream_options.as_ref())?;
    sampling(&r.extra)?;
    if let Some(v) = present(&r.extra, "logprobs") {
        if !v.is_boolean() {
            return Err(ApiError::invalid_param(
                "logprobs",
                "logprobs must be a boolean",
            ));
        }
    }
    if let Some(v) = present(&r.extra, "top_logprobs") {
        match integer(v) {
            Some(n) if n >= 0 || n == -1 => {}
            _ => {
                return Err(ApiError::invalid_param(
                    "top_logprobs",
                    "top_logprobs must be a positive value or -1",
                ))
            }
        }
    }
    Ok(())
}

/// Validates a `/v1/completions` body.
///
/// Errors: a 400 [`ApiError`] naming the first offending field.
pub fn completion(r: &CompletionRequest) -> Result<(), ApiError> {
    let empty = match &r.prompt {
        Prompt::Text(_) => false,
        Prompt::Tokens(t) => t.is_empty(),
        Prompt::Texts(t) => t.is_empty(),
        Prompt::TokenBatches(b) => b.is_empty() || b.iter().any(Vec::is_empty),
    };
    if empty {
        return Err(ApiError::invalid_param(
            "prompt",
            "prompt must not be empty",
        ));
    }
    positive_limit("max_tokens", r.max_tokens)?;
    min_tokens(r.min_tokens, r.max_tokens)?;
    stream_options(r.stream, r.stream_options.as_ref())?;
    sampling(&r.extra)?;
    if let Some(v) = present(&r.extra, "logprobs") {
        match integer(v) {
            Some(n) if n >= 0 || n == -1 => {}
            _ => {
                return Err(ApiError::invalid_param(
                    "logprobs",
                    "logprobs must be non-negative or -1",
                ))
            }
        }
    }
    Ok(())
}

/// `extra[key]` unless absent or `null` (an explicit `null` means "default", as in vLLM).
fn present<'a>(extra: &'a Extra, key: &str) -> Option<&'a Value> {
    extra.get(key).filter(|v| !v.is_null())
}

/// An integral JSON number (`3`, or `3.0` as pydantic accepts it) that fits `i64`.
fn integer(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e18)
            .map(|f| f as i64)
    })
}

/// A finite JSON number, or the 400 for `key`.
fn number(extra: &Extra, key: &str) -> Result<Option<f64>, ApiError> {
    match present(extra, key) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            Some(x) => Err(ApiError::invalid_param(
                key,
                format!("{key} must be a finite number, got {x}."),
            )),
            None => Err(ApiError::invalid_param(
                key,
                format!("{key} must be a number, got {}", kind(v)),
            )),
        },
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn positive_limit(key: &str, v: Option<u32>) -> Result<(), ApiError> {
    match v {
        Some(0) => Err(ApiError::invalid_param(
            key,
            format!("{key} must be at least 1, got 0."),
        )),
        _ => Ok(()),
    }
}

fn min_tokens(min: Option<u32>, max: Option<u32>) -> Result<(), ApiError> {
    match (min, max) {
        (Some(n), Some(m)) if n > m => Err(ApiError::invalid_param(
            "min_tokens",
            format!("min_tokens must be less than or equal to max_tokens={m}, got {n}."),
        )),
        _ => Ok(()),
    }
}

fn stream_options(stream: Option<bool>, o: Option<&StreamOptions>) -> Result<(), ApiError> {
    if o.is_some() && stream != Some(true) {
        return Err(ApiError::invalid_param(
            "stream_options",
            "Stream options can only be defined when `stream=True`.",
        ));
    }
    Ok(())
}

/// The sampling parameters both routes share (`SamplingParams._verify_args`).
fn sampling(extra: &Extra) -> Result<(), ApiError> {
    let n = match present(extra, "n") {
        None => 1,
        Some(v) => match integer(v) {
            Some(n) if n >= 1 => n,
            Some(n) => {
                return Err(ApiError::invalid_param(
                    "n",
                    format!("n must be at least 1, got {n}."),
                ))
            }
            None => {
                return Err(ApiError::invalid_param(
                    "n",
                    format!("n must be an int, got {}", kind(v)),
                ))
            }
        },
    };
    if let Some(t) = number(extra, "temperature")? {
        if t < 0.0 {
            return Err(ApiError::invalid_param(
                "temperature",
                format!("temperature must be non-negative, got {t}."),
            ));
        }
        if t > 2.0 {
            return Err(ApiError::invalid_param(
                "temperature",
                format!("temperature must be in [0, 2], got {t}."),
            ));
        }
        // vLLM's `_SAMPLING_EPS`: below it sampling is greedy, and greedy sampling has one sequence.
        if t < 1e-5 && n > 1 {
            return Err(ApiError::invalid_param(
                "n",
                format!("n must be 1 when using greedy sampling, got {n}."),
            ));
        }
    }
    if let Some(p) = number(extra, "top_p")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid_param(
                "top_p",
                format!("top_p must be in (0, 1], got {p}."),
            ));
        }
    }
    if let Some(v) = present(extra, "top_k") {
        match integer(v) {
            Some(k) if k >= -1 => {}
            Some(k) => {
                return Err(ApiError::invalid_param(
                    "top_k",
                    format!("top_k must be 0 (disable), or at least 1, got {k}."),
                ))
            }
            None => {
                return Err(ApiError::invalid_param(
                    "top_k",
                    format!("top_k must be an integer, got {}", kind(v)),
                ))
            }
        }
    }
    if let Some(p) = number(extra, "min_p")? {
        if !(0.0..=1.0).contains(&p) {
            return Err(ApiError::invalid_param(
                "min_p",
                format!("min_p must be in [0, 1], got {p}."),
            ));
        }
    }
    for key in ["presence_penalty", "frequency_penalty"] {
        if let Some(p) = number(extra, key)? {
            if !(-2.0..=2.0).contains(&p) {
                return Err(ApiError::invalid_param(
                    key,
                    format!("{key} must be in [-2, 2], got {p}."),
                ));
            }
        }
    }
    if let Some(p) = number(extra, "repetition_penalty")? {
        if p <= 0.0 {
            return Err(ApiError::invalid_param(
                "repetition_penalty",
                format!("repetition_penalty must be greater than zero, got {p}."),
            ));
        }
    }
    if let Some(v) = present(extra, "seed") {
        if integer(v).is_none() {
            return Err(ApiError::invalid_param(
                "seed",
                format!("seed must be an integer, got {}", kind(v)),
            ));
        }
    }
    if let Some(v) = present(extra, "stop") {
        let empty = match v {
            Value::String(s) => s.is_empty(),
            Value::Array(a) if a.iter().all(Value::is_string) => {
                a.iter().any(|s| s.as_str() == Some(""))
            }
            _ => {
                return Err(ApiError::invalid_param(
                    "stop",
                    "stop must be a string or a list of strings",
                ))
            }
        };
        if empty {
            return Err(ApiError::invalid_param(
                "stop",
                "stop cannot contain an empty string.",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_with(fields: Value) -> Result<(), ApiError> {
        let mut body =
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in fields.as_object().unwrap() {
            body[k] = v.clone();
        }
        chat(&serde_json::from_value(body).unwrap())
    }

    fn completion_with(fields: Value) -> Result<(), ApiError> {
        let mut body = serde_json::json!({"model": "m", "prompt": "hi"});
        for (k, v) in fields.as_object().unwrap() {
            body[k] = v.clone();
        }
        completion(&serde_json::from_value(body).unwrap())
    }

    #[test]
    fn good_requests_pass() {
        for f in [
            serde_json::json!({}),
            serde_json::json!({"max_tokens": 1, "n": 2, "temperature": 0.7, "top_p": 1, "top_k": -1,
                "min_p": 0, "presence_penalty": -2, "frequency_penalty": 2.0, "repetition_penalty": 1.1,
                "seed": 7, "stop": ["a", "b"], "logprobs": true, "top_logprobs": 5,
                "stream": true, "stream_options": {"include_usage": true}}),
            serde_json::json!({"temperature": null, "n": null, "stop": null, "max_tokens": null}),
            serde_json::json!({"temperature": 0, "n": 1, "min_tokens": 3, "max_completion_tokens": 3}),
        ] {
            chat_with(f.clone()).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
        completion_with(serde_json::json!({"logprobs": 2, "stop": "x", "n": 3.0})).unwrap();
    }

    #[test]
    fn bad_requests_name_the_field() {
        for (f, param, msg) in [
            (
                serde_json::json!({"max_tokens": 0}),
                "max_tokens",
                "max_tokens must be at least 1, got 0.",
            ),
            (
                serde_json::json!({"max_completion_tokens": 0}),
                "max_completion_tokens",
                "at least 1",
            ),
            (
                serde_json::json!({"max_tokens": 4, "min_tokens": 5}),
                "min_tokens",
                "max_tokens=4, got 5",
            ),
            (
                serde_json::json!({"n": 0}),
                "n",
                "n must be at least 1, got 0.",
            ),
            (serde_json::json!({"n": "2"}), "n", "must be an int"),
            (serde_json::json!({"n": 1.5}), "n", "must be an int"),
            (
                serde_json::json!({"n": 2, "temperature": 0}),
                "n",
                "greedy sampling",
            ),
            (
                serde_json::json!({"temperature": -0.1}),
                "temperature",
                "non-negative",
            ),
            (
                serde_json::json!({"temperature": 2.5}),
                "temperature",
                "[0, 2]",
            ),
            (
                serde_json::json!({"temperature": "hot"}),
                "temperature",
                "must be a number, got a string",
            ),
            (
                serde_json::json!({"temperature": true}),
                "temperature",
                "a boolean",
            ),
            (serde_json::json!({"top_p": 0}), "top_p", "(0, 1]"),
            (serde_json::json!({"top_p": 1.01}), "top_p", "(0, 1]"),
            (
                serde_json::json!({"top_k": -2}),
                "top_k",
                "at least 1, got -2",
            ),
            (serde_json::json!({"top_k": 0.5}), "top_k", "integer"),
            (serde_json::json!({"min_p": 2}), "min_p", "[0, 1]"),
            (
                serde_json::json!({"presence_penalty": 3}),
                "presence_penalty",
                "[-2, 2]",
            ),
            (
                serde_json::json!({"frequency_penalty": -2.5}),
                "frequency_penalty",
                "[-2, 2]",
            ),
            (
                serde_json::json!({"repetition_penalty": 0}),
                "repetition_penalty",
                "greater than zero",
            ),
            (serde_json::json!({"seed": "x"}), "seed", "integer"),
            (serde_json::json!({"stop": ""}), "stop", "empty string"),
            (
                serde_json::json!({"stop": ["a", ""]}),
                "stop",
                "empty string",
            ),
            (serde_json::json!({"stop": [1]}), "stop", "list of strings"),
            (
                serde_json::json!({"stream_options": {"include_usage": true}}),
                "stream_options",
                "stream=True",
            ),
            (
                serde_json::json!({"stream": false, "stream_options": {}}),
                "stream_options",
                "stream=True",
            ),
            (serde_json::json!({"logprobs": 3}), "logprobs", "boolean"),
            (
                serde_json::json!({"top_logprobs": -3}),
                "top_logprobs",
                "-1",
            ),
        ] {
            let e = chat_with(f.clone()).expect_err(&f.to_string());
            assert_eq!((e.status, e.kind), (400, "BadRequestError"), "{f}");
            assert_eq!(e.param.as_deref(), Some(param), "{f}: {e}");
            assert!(e.message.contains(msg), "{f}: {e}");
        }
        let e = chat(&serde_json::from_str(r#"{"messages":[]}"#).unwrap()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        for (f, param) in [
            (serde_json::json!({"max_tokens": 0}), "max_tokens"),
            (serde_json::json!({"logprobs": -2}), "logprobs"),
            (serde_json::json!({"prompt": []}), "prompt"),
            (serde_json::json!({"prompt": [[1], []]}), "prompt"),
            (serde_json::json!({"temperature": 9}), "temperature"),
        ] {
            let e = completion_with(f.clone()).expect_err(&f.to_string());
            assert_eq!(e.param.as_deref(), Some(param), "{f}: {e}");
        }
    }
}
