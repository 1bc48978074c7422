//! The core's error type.

/// Errors of the sans-IO core. All of them are configuration or input errors, and none is
/// retryable: retrying the same call gives the same error.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CoreError {
    /// The global router grid is inconsistent (wrong mapping shape, zero resolution,
    /// `min >= max`, a pool index out of range).
    #[error("invalid global router config: {0}")]
    InvalidGrid(String),
    /// The grid JSON did not parse.
    #[error("global router config does not parse: {0}")]
    Parse(String),
    /// An unknown policy name.
    #[error("unknown routing policy `{0}` (round_robin, least_loaded, power_of_two, kv_aware)")]
    UnknownPolicy(String),
    /// A retry/breaker setting out of range.
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    /// A KV event batch (vLLM `KVEventBatch`, msgpack) that does not decode: malformed, or past a limit
    /// of [`crate::kv_events::DecodeLimits`].
    #[error("bad KV event batch at byte {offset}: {reason}")]
    KvEvents {
        /// Byte offset in the payload where decoding stopped.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
}
