//! The planner's error type.

/// Errors of the planner and its drivers.
#[derive(Debug, thiserror::Error)]
pub enum PlannerError {
    /// A configuration or profile is inconsistent (empty table, non-positive value, unknown
    /// pool); not retryable.
    #[error("invalid planner config: {0}")]
    Config(String),
    /// A planner or profile file could not be read or parsed; not retryable.
    #[error("cannot load {path}: {why}")]
    Load {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// An HTTP exchange with `pdx serve` or a worker failed (connect, timeout, bad status,
    /// malformed or oversized answer); retryable at the next interval.
    #[error("http {url}: {why}")]
    Http {
        /// The URL asked.
        url: String,
        /// Why it failed.
        why: String,
    },
    /// A connector could not start or stop a worker; retryable at the next interval.
    #[error("connector: {0}")]
    Connector(String),
}

impl PlannerError {
    /// True for failures that may go away at the next adjustment interval.
    pub fn is_retryable(&self) -> bool {
        matches!(self, PlannerError::Http { .. } | PlannerError::Connector(_))
    }
}
