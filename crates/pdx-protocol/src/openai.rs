//! OpenAI-compatible request/response types, the subset vLLM's server accepts
//! (`vllm/entrypoints/openai/protocol.py`): `/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`, streaming chunks and `usage`.
//!
//! Requests keep every field they do not model in `extra`, so that a router can parse, edit
//! (e.g. set `kv_transfer_params`, `max_tokens = 1`) and re-serialize a body without dropping
//! sampling options it does not know about.

use crate::kv::{BootstrapParams, KvTransferParams};
use serde::{Deserialize, Serialize};

/// JSON object of fields not modelled by a type.
pub type Extra = serde_json::Map<String, serde_json::Value>;

/// `stream_options` (OpenAI): `include_usage` adds a final chunk with `choices: []` and `usage`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Send a final usage chunk before `[DONE]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    /// vLLM extension: `usage` on every chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuous_usage_stats: Option<bool>,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One content part of a chat message (`{"type":"text","text":"..."}`; other types kept as is).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    /// Part type (`text`, `image_url`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Text of a `text` part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Chat message content: a string or a list of parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts; only `text` parts contribute to the prompt.
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    /// Concatenated text (text parts joined by a space).
    pub fn text(&self) -> String {
        match self {
            MessageContent::Text(s) => s.clone(),
            MessageContent::Parts(p) => p
                .iter()
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// A chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: String,
    /// Content (may be null for assistant tool calls).
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Unknown fields (name, tool_calls, ...), preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    /// Model name; vLLM accepts a missing model (served model is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Conversation.
    pub messages: Vec<ChatMessage>,
    /// Stream the response as SSE chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Output length limit in tokens (legacy name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Output length limit in tokens (current name; wins over `max_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// vLLM: minimum output tokens before EOS may end the sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tokens: Option<u32>,
    /// vLLM: keep generating past EOS until the length limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_eos: Option<bool>,
    /// vLLM disaggregated-serving handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_transfer_params: Option<KvTransferParams>,
    /// SGLang PD-router bootstrap fields.
    #[serde(flatten)]
    pub bootstrap: BootstrapParams,
    /// Unknown fields (temperature, top_p, stop, tools, ...), preserved; [`crate::sampling::parse_chat`]
    /// validates them as vLLM does.
    #[serde(flatten)]
    pub extra: Extra,
}

impl ChatCompletionRequest {
    /// `max_completion_tokens`, else `max_tokens`.
    pub fn output_limit(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }
    /// Whether the response is streamed.
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }
}

/// `prompt` of `/v1/completions`: text, token ids, or (batched) lists of those.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One text prompt.
    Text(String),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several text prompts.
    Texts(Vec<String>),
    /// Several prompts as token ids.
    TokenBatches(Vec<Vec<u32>>),
}

/// `POST /v1/completions` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// Model name (optional in vLLM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Prompt.
    pub prompt: Prompt,
    /// Stream the response as SSE chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Output length limit in tokens (OpenAI default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// vLLM: minimum output tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tokens: Option<u32>,
    /// vLLM: keep generating past EOS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_eos: Option<bool>,
    /// vLLM disaggregated-serving handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_transfer_params: Option<KvTransferParams>,
    /// SGLang PD-router bootstrap fields.
    #[serde(flatten)]
    pub bootstrap: BootstrapParams,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

impl CompletionRequest {
    /// Whether the response is streamed.
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// EOS or a stop condition.
    Stop,
    /// Output length limit reached.
    Length,
    /// Aborted by the engine (vLLM).
    Abort,
}

impl FinishReason {
    /// The JSON string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    #[serde(default)]
    pub cached_tokens: u32,
}

/// Token accounting of one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Sum of the two.
    pub total_tokens: u32,
    /// Prefix-cache details (vLLM sends them when `enable_prompt_tokens_details`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

impl Usage {
    /// Usage from prompt and completion lengths.
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: None,
        }
    }
}

/// Assistant message of a non-streamed chat response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponseMessage {
    /// Always `assistant`.
    pub role: String,
    /// Generated text.
    #[serde(default)]
    pub content: Option<String>,
}

/// One choice of a chat response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Choice index.
    pub index: u32,
    /// Message.
    pub message: ChatResponseMessage,
    /// Log-probabilities, when asked for (vLLM's shape; see [`crate::sampling`]).
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    /// Why generation stopped.
    pub finish_reason: Option<FinishReason>,
    /// vLLM: the stop string (or stop token id) that ended generation, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<serde_json::Value>,
}

/// `chat.completion` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    /// Request id (`chatcmpl-...`).
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<ChatChoice>,
    /// Token accounting.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Disaggregation handshake (prefill engine's `request_finished` output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_transfer_params: Option<KvTransferParams>,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One choice of a completion response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    /// Choice index.
    pub index: u32,
    /// Generated text.
    pub text: String,
    /// Log-probabilities, when asked for (vLLM's shape; see [`crate::sampling`]).
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    /// Why generation stopped.
    pub finish_reason: Option<FinishReason>,
    /// vLLM: the stop string (or stop token id) that ended generation, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<serde_json::Value>,
}

/// `text_completion` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    /// Request id (`cmpl-...`).
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<CompletionChoice>,
    /// Token accounting.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Disaggregation handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_transfer_params: Option<KvTransferParams>,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Delta of a streamed chat chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatDelta {
    /// `assistant` on the first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Text piece.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// Choice of a streamed chat chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    /// Choice index.
    pub index: u32,
    /// Delta.
    pub delta: ChatDelta,
    /// Log-probabilities of this chunk's tokens, when asked for.
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    /// Set on the last content chunk.
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
    /// vLLM: the stop string that ended generation, on the last chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<serde_json::Value>,
}

/// `chat.completion.chunk` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// Request id, same on every chunk.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Model name.
    pub model: String,
    /// Choices (empty on the final usage chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Usage (final chunk with `include_usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Disaggregation handshake (vLLM puts it on the last chunk of a prefill request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_transfer_params: Option<KvTransferParams>,
}

/// Choice of a streamed completion chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChunkChoice {
    /// Choice index.
    pub index: u32,
    /// Text piece.
    pub text: String,
    /// Log-probabilities of this chunk's tokens, when asked for.
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    /// Set on the last content chunk.
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
    /// vLLM: the stop string that ended generation, on the last chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<serde_json::Value>,
}

/// Streamed `text_completion` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChunk {
    /// Request id.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Model name.
    pub model: String,
    /// Choices (empty on the final usage chunk).
    pub choices: Vec<CompletionChunkChoice>,
    /// Usage (final chunk with `include_usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Disaggregation handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_transfer_params: Option<KvTransferParams>,
}

/// Entry of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// Served model name.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Owner (`vllm` in vLLM).
    pub owned_by: String,
    /// Model path/name it was loaded from.
    #[serde(default)]
    pub root: Option<String>,
    /// Context length in tokens.
    #[serde(default)]
    pub max_model_len: Option<u32>,
}

/// `GET /v1/models` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// Models.
    pub data: Vec<ModelCard>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_request_keeps_unknown_fields_and_bootstrap() {
        let j = r#"{"model":"m","messages":[{"role":"user","content":"hi","name":"x"}],
            "temperature":0.5,"max_completion_tokens":7,"max_tokens":3,"stream":true,
            "stream_options":{"include_usage":true},"bootstrap_host":"h","bootstrap_port":8998,
            "bootstrap_room":18446744073709551615}"#;
        let r: ChatCompletionRequest = serde_json::from_str(j).unwrap();
        assert_eq!(r.output_limit(), Some(7));
        assert!(r.is_stream());
        assert_eq!(r.bootstrap.bootstrap_room, Some(u64::MAX));
        assert_eq!(r.bootstrap.bootstrap_port, Some(8998));
        assert!(
            !r.extra.contains_key("bootstrap_room"),
            "bootstrap fields not duplicated in extra"
        );
        assert_eq!(r.extra["temperature"], 0.5);
        assert_eq!(r.messages[0].extra["name"], "x");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["temperature"], 0.5);
        assert_eq!(v["bootstrap_room"], u64::MAX);
        assert!(v.get("kv_transfer_params").is_none());
    }

    #[test]
    fn content_parts_and_null_content() {
        let j = r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},
            {"type":"image_url","image_url":{"url":"u"}},{"type":"text","text":"b"}]},
            {"role":"assistant","content":null}]}"#;
        let r: ChatCompletionRequest = serde_json::from_str(j).unwrap();
        assert_eq!(r.messages[0].content.as_ref().unwrap().text(), "a b");
        assert!(r.messages[1].content.is_none());
        assert!(r.model.is_none());
    }

    #[test]
    fn completion_prompt_variants() {
        let p = |s: &str| serde_json::from_str::<CompletionRequest>(s).unwrap().prompt;
        assert_eq!(p(r#"{"prompt":"x"}"#), Prompt::Text("x".into()));
        assert_eq!(p(r#"{"prompt":[1,2]}"#), Prompt::Tokens(vec![1, 2]));
        assert_eq!(
            p(r#"{"prompt":["a","b"]}"#),
            Prompt::Texts(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            p(r#"{"prompt":[[1],[2,3]]}"#),
            Prompt::TokenBatches(vec![vec![1], vec![2, 3]])
        );
        assert!(serde_json::from_str::<CompletionRequest>(r#"{"prompt":[-1]}"#).is_err());
        assert!(serde_json::from_str::<CompletionRequest>(r#"{"model":"m"}"#).is_err());
    }

    #[test]
    fn finish_reason_and_usage_serialize_like_openai() {
        let u = Usage::new(3, 4);
        let v = serde_json::to_value(&u).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"prompt_tokens":3,"completion_tokens":4,"total_tokens":7})
        );
        assert_eq!(
            serde_json::to_value(FinishReason::Length).unwrap(),
            "length"
        );
        let c: ChatCompletionChunk = serde_json::from_str(
            r#"{"id":"a","object":"chat.completion.chunk","created":1,"model":"m",
            "choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}]}"#,
        )
        .unwrap();
        assert_eq!(c.choices[0].finish_reason, Some(FinishReason::Stop));
    }
}
