//! OpenAI error JSON, as vLLM's OpenAI server returns it.
//!
//! Shape: `{"error":{"message":"...","type":"BadRequestError","param":null,"code":400}}`
//! (vLLM `vllm/entrypoints/openai/protocol.py`, `ErrorResponse`/`ErrorInfo`; `code` is the HTTP
//! status as a number, `type` the error class name).

use serde::{Deserialize, Serialize};

/// The `error` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable message.
    pub message: String,
    /// Error class (`BadRequestError`, `NotFoundError`, `InternalServerError`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Offending request field, if known.
    #[serde(default)]
    pub param: Option<String>,
    /// HTTP status code as a number (vLLM) or a string code (OpenAI); kept as JSON.
    #[serde(default)]
    pub code: serde_json::Value,
}

/// Top-level error document: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorBody,
}

/// An API error with the HTTP status it is served with.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status (400, 404, 500, 503, ...).
    pub status: u16,
    /// Error class name.
    pub kind: &'static str,
    /// Message.
    pub message: String,
    /// Offending field.
    pub param: Option<String>,
}

impl ApiError {
    /// An error with an explicit status and class.
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
        }
    }
    /// 400 `BadRequestError` (malformed JSON, invalid field values).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequestError", message)
    }
    /// 400 naming the offending field.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::bad_request(message)
        }
    }
    /// 404 `NotFoundError` (unknown model, unknown route).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "NotFoundError", message)
    }
    /// 405 `MethodNotAllowed`.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }
    /// 500 `InternalServerError`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalServerError", message)
    }
    /// 503 `ServiceUnavailableError` (overloaded, KV cache full; retryable).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "ServiceUnavailableError", message)
    }
    /// True for statuses a router may retry on another worker (429, 5xx).
    pub fn is_retryable(&self) -> bool {
        self.status == 429 || self.status >= 500
    }
    /// The JSON document.
    pub fn to_response(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: serde_json::Value::from(self.status),
            },
        }
    }
    /// Serialized JSON body.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.to_response()).expect("error JSON serializes")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.kind, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_shape() {
        let e = ApiError::invalid_param("max_tokens", "max_tokens must be at least 1");
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["error"]["type"], "BadRequestError");
        assert_eq!(v["error"]["code"], 400);
        assert_eq!(v["error"]["param"], "max_tokens");
        assert!(!e.is_retryable());
        assert!(ApiError::unavailable("x").is_retryable());
        let back: ErrorResponse = serde_json::from_value(v).unwrap();
        assert_eq!(back.error.message, "max_tokens must be at least 1");
    }
}
