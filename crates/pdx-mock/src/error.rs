//! The crate's error type.

use pdx_protocol::ApiError;

/// Errors of the mock engine. [`MockError::is_retryable`] tells transient conditions (a
/// router may retry elsewhere) from fatal ones.
#[derive(Debug, thiserror::Error)]
pub enum MockError {
    /// Bad configuration (flags, profile file, tokenizer file). Fatal.
    #[error("configuration error: {0}")]
    Config(String),
    /// The HTTP listen address is held by another process, or cannot be bound. Fatal at startup.
    #[error(transparent)]
    Listen(#[from] pdx_listen::ListenError),
    /// I/O error (accept, profile read). Fatal at startup.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The tokenizer failed on an input. Fatal for that request (400).
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// Not enough free KV blocks right now. Retryable.
    #[error("KV cache full: need {needed} blocks, {available} available")]
    OutOfBlocks {
        /// Blocks the request needs.
        needed: u32,
        /// Blocks free or evictable.
        available: u32,
    },
    /// The request can never fit in the KV cache. Fatal for that request (400).
    #[error("request needs {needed} KV blocks but the cache has only {capacity}")]
    TooLarge {
        /// Blocks the request needs.
        needed: u32,
        /// Cache capacity in blocks.
        capacity: u32,
    },
    /// The remote KV could not be read (unknown engine, unreachable agent, transfer error).
    /// Retryable: the router should re-run the prefill.
    #[error("KV transfer from {engine} failed: {reason}")]
    Transfer {
        /// Remote engine id.
        engine: String,
        /// What went wrong.
        reason: String,
    },
    /// The KV read from the remote engine does not hold the expected bytes (expired, evicted,
    /// or corrupt). Retryable: re-run the prefill.
    #[error(
        "KV from {engine} failed verification at prompt block {block} (expired, evicted or corrupt)"
    )]
    KvMismatch {
        /// Remote engine id.
        engine: String,
        /// Index of the first bad block in the prompt.
        block: usize,
    },
    /// The server was stopped by the crash fault. Fatal.
    #[error("crashed by fault injection after {0} requests")]
    Crashed(u64),
}

impl MockError {
    /// Whether retrying (possibly on another worker) can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            MockError::OutOfBlocks { .. }
                | MockError::Transfer { .. }
                | MockError::KvMismatch { .. }
        )
    }

    /// The OpenAI error the HTTP layer answers with.
    pub fn to_api(&self) -> ApiError {
        match self {
            MockError::Tokenizer(_) | MockError::TooLarge { .. } => {
                ApiError::bad_request(self.to_string())
            }
            MockError::OutOfBlocks { .. } => ApiError::unavailable(self.to_string()),
            MockError::Transfer { .. } | MockError::KvMismatch { .. } => {
                ApiError::new(502, "KVTransferError", self.to_string())
            }
            _ => ApiError::internal(self.to_string()),
        }
    }
}

impl From<pdx_tokens::TokenizerError> for MockError {
    fn from(e: pdx_tokens::TokenizerError) -> Self {
        match e {
            pdx_tokens::TokenizerError::Load(m) => MockError::Config(m),
            pdx_tokens::TokenizerError::Encode(m) => MockError::Tokenizer(m),
        }
    }
}
