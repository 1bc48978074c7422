//! Agent configuration ([`AgentConfig`]), per-request options ([`XferOptions`]), and the agent's identity as its
//! own connections present it.

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::AgentSecret;
use crate::transport::TransportKind;

/// Configuration of an [`Agent`](crate::Agent).
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Agent name, unique among agents that talk to each other (1..=256 bytes).
    pub name: String,
    /// Address of the agent's listener (TCP transport, notifications, metadata side channel). Default
    /// `127.0.0.1:0` (an ephemeral loopback port); `None` runs no listener, so peers cannot reach this agent
    /// by TCP nor send it notifications.
    pub listen: Option<SocketAddr>,
    /// Host to advertise in metadata instead of the bound IP (set it when listening on `0.0.0.0`).
    pub advertise_host: Option<String>,
    /// Transports this agent may use as an initiator, in order of preference. Default: every host transport
    /// (`local`, `shm`, `cma`, `tcp`), plus `ucx` when built with the `ucx` feature. Listing `ucx` also makes
    /// the agent serve UCX: it creates a UCX worker and `ucp_mem_map`s every region it registers.
    pub transports: Vec<TransportKind>,
    /// A peer that makes no progress for this long while transfers are outstanding is declared dead and its
    /// transfers fail. Default 2 s.
    pub peer_timeout: Duration,
    /// Fault in every page of allocated and mapped memory up front, so transfers take no page faults.
    /// Default true.
    pub populate: bool,
    /// Threads that share one `local`/`shm` copy of at least `parallel_copy_min_bytes` (the posting thread is
    /// one of them). One core does not saturate memory bandwidth, so two threads copy large batches faster than
    /// one (A/B figures: `docs/benchmarks.md`, "Third session: streaming stores"). Default: available cores, at
    /// most 4.
    pub copy_threads: usize,
    /// Smallest transfer (bytes) split across `copy_threads`; smaller ones stay on the posting thread, where
    /// starting the threads costs more than it saves (the same A/B table). Default 16 MiB.
    pub parallel_copy_min_bytes: u64,
    /// Smallest `cma` transfer (bytes) split across `copy_threads`, each thread one `process_vm_readv` /
    /// `process_vm_writev` of its share. The kernel copies a page at a time on the calling thread (pinning each
    /// remote page), so one thread moves well under what memcpy does; a second core helps batches large enough to
    /// pay for starting a thread (a 64 × 64 KiB batch did better on one: `docs/benchmarks.md`, "Python").
    /// Default 8 MiB; `u64::MAX` keeps every `cma` copy on the posting thread.
    pub parallel_cma_min_bytes: u64,
    /// Smallest `local`/`shm` transfer (bytes) copied with non-temporal stores (`pdx_sys::copy_streaming`)
    /// instead of `memcpy`. A batch this large does not stay in this core's caches anyway, and the bytes are
    /// for the peer, not this core; streaming stores skip reading each destination line first. Smaller batches
    /// keep `memcpy`, which wins while source and destination stay cached (the same A/B table). Default 8 MiB; `u64::MAX` turns it off.
    pub streaming_copy_min_bytes: u64,
    /// Shared secret of the agent protocol (see [`crate::auth`]). With one, the listener and the Unix socket
    /// serve only connections that prove they hold the same secret (HMAC-SHA256 challenge–response, both ways),
    /// and this agent connects only to peers that prove it too. Default: none (every peer that can reach the
    /// listener is trusted; see docs/transfer.md, Trust model).
    pub secret: Option<AgentSecret>,
    /// Most incoming connections (TCP and Unix together) open at once; more are closed as they are accepted.
    /// Idle connections cost no thread (they wait in epoll), only a socket. Default 1024.
    pub max_connections: usize,
    /// Most threads serving incoming connections at once (started on demand, gone after 10 s idle); connections
    /// with a frame to serve wait for a free one. Default 64.
    pub max_handler_threads: usize,
    /// An incoming connection that sends no frame for this long is closed. Initiators send a keepalive every
    /// 30 s while idle, so keep this above a minute. Unix links of same-host peers are exempt (they are the
    /// peers' liveness signal). Default 120 s.
    pub idle_timeout: Duration,
    /// An incoming connection must complete its first frame (with a secret: the whole handshake) within this.
    /// Default 5 s.
    pub handshake_timeout: Duration,
}

impl AgentConfig {
    /// The defaults, with a name.
    pub fn new(name: impl Into<String>) -> Self {
        AgentConfig {
            name: name.into(),
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            advertise_host: None,
            transports: default_transports(),
            peer_timeout: Duration::from_secs(2),
            populate: true,
            copy_threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            parallel_copy_min_bytes: 16 << 20,
            parallel_cma_min_bytes: 8 << 20,
            streaming_copy_min_bytes: 8 << 20,
            secret: None,
            max_connections: 1024,
            max_handler_threads: 64,
            idle_timeout: Duration::from_secs(120),
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

fn default_transports() -> Vec<TransportKind> {
    #[allow(unused_mut)]
    let mut t = TransportKind::HOST.to_vec();
    #[cfg(feature = "ucx")]
    t.push(TransportKind::Ucx);
    // GPU memory only ever moves over `cuda`; host memory never does, so listing it costs nothing.
    t.push(TransportKind::Cuda);
    t
}

/// Options of one transfer request.
#[derive(Clone, Debug, Default)]
pub struct XferOptions {
    /// Notification delivered to the remote agent when the transfer completes (at most 64 KiB).
    pub notif: Option<Vec<u8>>,
    /// Force this transport instead of the automatic choice.
    pub transport: Option<TransportKind>,
}

/// This agent as its outgoing connections introduce it (the `Hello` or the secret handshake, the exchange over a
/// same-host peer's Unix socket): its configuration and instance id. What the connection code needs of the
/// agent, and nothing else.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Identity<'a> {
    /// The agent's configuration (name, secret, peer timeout, populate).
    pub config: &'a AgentConfig,
    /// The agent's random instance id.
    pub instance_id: u64,
}

impl Identity<'_> {
    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }
}
