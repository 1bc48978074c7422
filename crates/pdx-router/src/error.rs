//! The router's error type.

/// Errors of `pdx serve`.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// Bad flags or config file (fatal).
    #[error("config: {0}")]
    Config(String),
    /// A core (grid, policy) error (fatal).
    #[error(transparent)]
    Core(#[from] pdx_router_core::CoreError),
    /// A worker URL that is not `http://host:port` (registration: 400; config: fatal).
    #[error("{0}")]
    BadWorkerUrl(String),
    /// A registration outside `--worker-allow-cidr` (403).
    #[error("{0}")]
    WorkerNotAllowed(String),
    /// The registry holds `--max-workers` registered workers already (429).
    #[error("worker registry is full ({max} registered workers, --max-workers)")]
    RegistryFull {
        /// The limit.
        max: usize,
    },
    /// Socket or runtime error (listen, spawn): fatal at start.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// An upstream request failed (retryable on another worker).
    #[error("upstream {worker}: {reason}")]
    Upstream {
        /// Worker URL.
        worker: String,
        /// What failed.
        reason: String,
    },
}

impl RouterError {
    /// True for errors another attempt (another worker) may not hit.
    pub fn is_retryable(&self) -> bool {
        matches!(self, RouterError::Upstream { .. })
    }
}
