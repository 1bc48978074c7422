//! The transfer engine's error type.

use std::time::Duration;

/// Errors of the KV transfer engine. [`TransferError::is_retryable`] tells transient failures (a peer that may
/// come back, a timeout) from fatal ones (invalid descriptors, malformed metadata).
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// A descriptor is not inside a registered region of the named agent.
    #[error(
        "descriptor {index} ({addr:#x}+{len}) is not inside a registered region of agent `{agent}`"
    )]
    NotRegistered {
        /// Agent whose registrations were searched.
        agent: String,
        /// Index of the descriptor in its list.
        index: usize,
        /// Start address of the descriptor.
        addr: u64,
        /// Length of the descriptor in bytes.
        len: u64,
    },
    /// A descriptor or request is malformed (zero length, mismatched lengths, index out of range, …).
    #[error("invalid transfer request: {0}")]
    Invalid(String),
    /// No metadata of that remote agent has been loaded (or it was invalidated).
    #[error("unknown remote agent `{0}`")]
    UnknownRemote(String),
    /// Agent metadata bytes could not be decoded or violate a limit.
    #[error("invalid agent metadata: {0}")]
    BadMetadata(String),
    /// A wire frame could not be decoded or violates a limit: the connection is closed.
    #[error("protocol error from `{peer}`: {reason}")]
    Protocol {
        /// Peer agent (or address) that sent the frame.
        peer: String,
        /// What was wrong.
        reason: String,
    },
    /// The remote agent refused or failed the request (its message is kept).
    #[error("remote agent `{peer}` failed the request: {message}")]
    Remote {
        /// Remote agent name.
        peer: String,
        /// The remote's error message.
        message: String,
    },
    /// A peer refused this agent, or this agent refused a peer, for want of the shared agent secret (one side has
    /// none, the secrets differ, or the peer could not prove it holds it). Not retryable: fix the configuration.
    #[error("authentication with `{peer}` failed: {reason}")]
    Unauthenticated {
        /// Peer agent name (or address).
        peer: String,
        /// What failed.
        reason: String,
    },
    /// The connection to a peer was lost (the peer exited or the network failed).
    #[error("peer `{peer}` disconnected: {reason}")]
    PeerDisconnected {
        /// Peer agent name.
        peer: String,
        /// What was observed.
        reason: String,
    },
    /// No progress from a peer within the configured bound.
    #[error("peer `{peer}` made no progress for {after:?}")]
    Timeout {
        /// Peer agent name.
        peer: String,
        /// The bound that elapsed.
        after: Duration,
    },
    /// The request is already posted and not yet complete.
    #[error("transfer request is still in progress")]
    InProgress,
    /// A registered region is still used by prepared descriptor lists or transfer requests.
    #[error("memory region {0} is still used by {1} prepared lists or transfer requests")]
    RegionInUse(u64, usize),
    /// The chosen transport cannot serve this request (wrong locality or memory kind, or not built in).
    #[error("transport `{transport}` cannot serve this request: {reason}")]
    TransportUnavailable {
        /// Transport name, as used on the command line.
        transport: &'static str,
        /// Why not.
        reason: String,
    },
    /// The memory kind needs support this build or machine lacks (pinned and device memory need CUDA).
    #[error("{0} memory is unavailable in this build (needs CUDA support)")]
    Unavailable(&'static str),
    /// The agent is shut down.
    #[error("agent is shut down")]
    Shutdown,
    /// A CUDA operation failed, or CUDA is unavailable on this machine (`CudaError::Unavailable`: no driver).
    #[error(transparent)]
    Cuda(#[from] pdx_cuda::CudaError),
    /// A host-memory or socket operation failed.
    #[error(transparent)]
    Sys(#[from] pdx_sys::SysError),
    /// A socket operation failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl TransferError {
    /// True when the same operation may succeed later (peer lost, timeout, request still running, transient
    /// I/O); false for errors that repeat until the input changes.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransferError::PeerDisconnected { .. }
            | TransferError::Timeout { .. }
            | TransferError::InProgress
            | TransferError::RegionInUse(..)
            | TransferError::Io { .. } => true,
            TransferError::Sys(e) => e.is_retryable(),
            TransferError::Cuda(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// A copy for fanning one failure out to several waiters (I/O sources become their message).
    pub(crate) fn duplicate(&self) -> TransferError {
        match self {
            TransferError::PeerDisconnected { peer, reason } => TransferError::PeerDisconnected {
                peer: peer.clone(),
                reason: reason.clone(),
            },
            TransferError::Timeout { peer, after } => TransferError::Timeout {
                peer: peer.clone(),
                after: *after,
            },
            TransferError::Remote { peer, message } => TransferError::Remote {
                peer: peer.clone(),
                message: message.clone(),
            },
            TransferError::Protocol { peer, reason } => TransferError::Protocol {
                peer: peer.clone(),
                reason: reason.clone(),
            },
            TransferError::Unauthenticated { peer, reason } => TransferError::Unauthenticated {
                peer: peer.clone(),
                reason: reason.clone(),
            },
            TransferError::NotRegistered {
                agent,
                index,
                addr,
                len,
            } => TransferError::NotRegistered {
                agent: agent.clone(),
                index: *index,
                addr: *addr,
                len: *len,
            },
            TransferError::Invalid(m) => TransferError::Invalid(m.clone()),
            TransferError::UnknownRemote(m) => TransferError::UnknownRemote(m.clone()),
            TransferError::BadMetadata(m) => TransferError::BadMetadata(m.clone()),
            TransferError::InProgress => TransferError::InProgress,
            TransferError::RegionInUse(id, n) => TransferError::RegionInUse(*id, *n),
            TransferError::TransportUnavailable { transport, reason } => {
                TransferError::TransportUnavailable {
                    transport,
                    reason: reason.clone(),
                }
            }
            TransferError::Unavailable(k) => TransferError::Unavailable(k),
            TransferError::Shutdown => TransferError::Shutdown,
            TransferError::Cuda(e) => TransferError::Cuda(e.clone()),
            // I/O errors keep their kind and message.
            TransferError::Sys(e) => TransferError::Io {
                op: "host memory",
                source: std::io::Error::new(sys_kind(e), e.to_string()),
            },
            TransferError::Io { op, source } => TransferError::Io {
                op,
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
        }
    }
}

fn sys_kind(e: &pdx_sys::SysError) -> std::io::ErrorKind {
    match e {
        pdx_sys::SysError::Io { source, .. } => source.kind(),
        _ => std::io::ErrorKind::Other,
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, TransferError>;
