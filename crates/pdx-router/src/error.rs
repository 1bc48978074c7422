//! The router's error type.

/// Errors of `pdx serve` (all fatal at start: a failed upstream request is not an error of the router but
/// a [`pdx_router_core::UpstreamFailure`] handled by the core's retry rules).
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
    /// The listen address is held by another process, or cannot be bound: fatal at start.
    #[error(transparent)]
    Listen(#[from] pdx_listen::ListenError),
    /// The KsanaLLM node registry's database cannot be opened or read: fatal at start.
    #[error("ksana node registry: {0}")]
    Ksana(#[from] pdx_ksana::KsanaError),
    /// Socket or runtime error (spawn): fatal at start.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
