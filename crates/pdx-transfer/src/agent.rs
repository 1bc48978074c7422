//! The agent: registrations, remote agents, transport choice, transfer requests and notifications.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use pdx_sys::Memory;

use crate::auth::AgentSecret;
use crate::desc::XferDescList;
use crate::error::{Result, TransferError};
use crate::gpu::{self, GpuPeer, PeerMemory};
use crate::memory::{Backing, MemoryKind, Region, RegisteredMemory, Registry};
use crate::metadata::{AgentMetadata, CudaMetadata, RegionMetadata, MAX_NAME_BYTES};
use crate::peer::LocalPeer;
use crate::request::{Completion, XferOp};
use crate::server::{Limits, Listeners, Server};
use crate::tcp::{self, Notification, NotificationQueue, PeerConn};
use crate::transport::{CmaTarget, CopySeg, LocalSeg, Plan, ShmSeg, TransportKind};
use crate::wire::Ctrl;
use crate::xfer::XferRequest;

/// Configuration of an [`Agent`].
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

/// Agents of this process, by instance id: the `local` transport reaches their registrations directly.
fn process_agents() -> &'static Mutex<HashMap<u64, Weak<Inner>>> {
    static AGENTS: OnceLock<Mutex<HashMap<u64, Weak<Inner>>>> = OnceLock::new();
    AGENTS.get_or_init(Default::default)
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// State shared by an [`Agent`] handle and its connection threads.
pub(crate) struct Inner {
    pub name: String,
    pub instance_id: u64,
    pub config: AgentConfig,
    host_id: String,
    pid: u32,
    pub registry: Arc<Registry>,
    next_region_id: AtomicU64,
    remotes: RwLock<HashMap<String, Arc<RemoteAgent>>>,
    /// Held through [`Agent::load_remote`]: two threads loading the same new peer at once (the first requests
    /// of two clients) would each vouch for it over a link of their own, and the second insert would shut the
    /// first down under its transfers; serialized, the second finds the first's entry and keeps it.
    load_lock: Mutex<()>,
    pub notifications: Arc<NotificationQueue>,
    listen_addr: Option<SocketAddr>,
    advertised: Option<String>,
    shutdown: AtomicBool,
    /// The listener side: I/O thread, handler pool, watched same-host peers.
    pub server: Arc<Server>,
    #[cfg(feature = "ucx")]
    pub(crate) ucx: Option<Arc<crate::ucx::UcxAgent>>,
}

impl Inner {
    pub fn is_shut_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    pub fn local_metadata(&self) -> Result<Vec<u8>> {
        self.metadata_of(&self.registry.snapshot())
    }

    /// The metadata of the regions `live` (a registry snapshot), so the Unix socket can send exactly the memfds
    /// of the regions it describes.
    pub fn metadata_of(&self, live: &[Arc<Region>]) -> Result<Vec<u8>> {
        let regions = live
            .iter()
            .map(|r| RegionMetadata {
                id: r.id,
                kind: r.kind,
                addr: r.addr(),
                len: r.len(),
                memfd: r.host().and_then(|m| m.memfd_fd()),
            })
            .collect();
        // CUDA IPC handles of the device regions (a region whose export fails is simply not reachable by IPC).
        let ipc: Vec<_> = live
            .iter()
            .filter_map(|r| match &r.backing {
                Backing::Device(d) => d
                    .ipc_handle()
                    .inspect_err(
                        |e| tracing::warn!(region = r.id, error = %e, "cuIpcGetMemHandle failed"),
                    )
                    .ok()
                    .map(|h| (r.id, h)),
                _ => None,
            })
            .collect();
        let cuda = live
            .iter()
            .any(|r| matches!(r.kind, MemoryKind::Device(_)))
            .then_some(CudaMetadata { ipc });
        let md = AgentMetadata {
            name: self.name.clone(),
            instance_id: self.instance_id,
            host_id: self.host_id.clone(),
            pid: self.pid,
            listen_addr: self.advertised.clone(),
            transports: TransportKind::HOST.to_vec(),
            regions,
        };
        let mut md = md;
        if cuda.is_some() {
            md.transports.push(TransportKind::Cuda);
        }
        #[cfg(feature = "ucx")]
        if let Some(u) = &self.ucx {
            md.transports.push(TransportKind::Ucx);
            return md.encode_ext(Some(&u.metadata(live)), cuda.as_ref());
        }
        md.encode_ext(None, cuda.as_ref())
    }

    fn remote(&self, name: &str) -> Result<Arc<RemoteAgent>> {
        self.remotes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| TransferError::UnknownRemote(name.to_string()))
    }
}

/// Where a remote agent is relative to this one, as far as something other than its own metadata vouches for it.
pub(crate) enum Locality {
    /// An agent of this process (its instance id is registered here): its live regions are reached directly.
    SameProcess(Weak<Inner>),
    /// A process of this host that the kernel named over the agent's Unix socket ([`crate::peer`]).
    SameHost(Arc<LocalPeer>),
    /// Anything else (another host, or this host without a Unix socket to vouch for it): `tcp` (or `ucx`) only.
    /// Holds why same-host transports are not available, for errors.
    Remote(String),
}

/// A remote agent loaded from its metadata.
pub(crate) struct RemoteAgent {
    /// The metadata requests are validated against: for a same-host peer, what it sent over its Unix socket.
    pub(crate) md: AgentMetadata,
    /// The metadata as loaded (to recognise the same bytes loaded again).
    announced: AgentMetadata,
    pub(crate) locality: Locality,
    conn: Mutex<Option<Arc<PeerConn>>>,
    invalidated: AtomicBool,
    /// CUDA IPC handles of the peer's device regions (metadata version 3).
    cuda_md: Option<CudaMetadata>,
    /// The peer's GPU memory opened in this process (IPC mappings, pinned memfd mappings), made on first use.
    gpu_peer: GpuPeer,
    #[cfg(feature = "ucx")]
    ucx_md: Option<crate::metadata::UcxMetadata>,
    #[cfg(feature = "ucx")]
    ucx_peer: Mutex<Option<Arc<crate::ucx::UcxPeer>>>,
}

impl RemoteAgent {
    fn local_peer(&self) -> Option<&Arc<LocalPeer>> {
        match &self.locality {
            Locality::SameHost(p) => Some(p),
            _ => None,
        }
    }

    /// The connection to the peer's listener, made on first use. Once lost it stays lost.
    fn conn(&self, me: &Inner) -> Result<Arc<PeerConn>> {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let addr =
            self.md
                .listen_addr
                .as_deref()
                .ok_or_else(|| TransferError::TransportUnavailable {
                    transport: "tcp",
                    reason: format!("agent `{}` runs no listener", self.md.name),
                })?;
        let c = PeerConn::connect(&self.md.name, addr, me, me.config.peer_timeout)?;
        *guard = Some(c.clone());
        Ok(c)
    }

    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.invalidated.load(Ordering::Acquire) {
            return Err(TransferError::UnknownRemote(self.md.name.clone()));
        }
        Ok(())
    }

    fn shutdown(&self) {
        self.invalidated.store(true, Ordering::Release);
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).take() {
            c.fail_all(TransferError::UnknownRemote(self.md.name.clone()));
        }
        if let Some(p) = self.local_peer() {
            p.gone("invalidated");
        }
    }
}

/// A local descriptor list validated against this agent's registrations ([`Agent::prep_local`]).
#[derive(Debug, Clone)]
pub struct PreparedLocal {
    segs: Vec<LocalSeg>,
}

impl PreparedLocal {
    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.segs.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }
}

#[derive(Debug, Clone, Copy)]
struct RemoteSeg {
    addr: u64,
    len: u64,
    region: usize,
    off: u64,
}

/// A remote descriptor list validated against a remote agent's metadata ([`Agent::prep_remote`]).
pub struct PreparedRemote {
    remote: Arc<RemoteAgent>,
    segs: Vec<RemoteSeg>,
}

impl PreparedRemote {
    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.segs.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }
    /// The remote agent's name.
    pub fn agent(&self) -> &str {
        &self.remote.md.name
    }
}

/// A KV-transfer agent (NIXL's `nixlAgent`): registers memory, publishes metadata, loads peers' metadata and
/// moves bytes between its registered memory and theirs with READ/WRITE transfer requests.
///
/// Dropping the agent stops its listener and connections; transfers in flight fail.
pub struct Agent {
    inner: Arc<Inner>,
}

impl Agent {
    /// Creates an agent and starts its listener (when `config.listen` is set).
    ///
    /// Errors: [`TransferError::Invalid`] for a bad name or an empty transport list; [`TransferError::Io`]
    /// when the listener cannot bind.
    pub fn new(config: AgentConfig) -> Result<Agent> {
        if config.name.is_empty() || config.name.len() > MAX_NAME_BYTES {
            return Err(TransferError::Invalid(
                "agent name must be 1..=256 bytes".into(),
            ));
        }
        if config.transports.is_empty() {
            return Err(TransferError::Invalid("no transport enabled".into()));
        }
        if config.max_connections == 0
            || config.max_handler_threads == 0
            || config.idle_timeout.is_zero()
            || config.handshake_timeout.is_zero()
        {
            return Err(TransferError::Invalid(
                "max_connections, max_handler_threads, idle_timeout and handshake_timeout must be > 0".into(),
            ));
        }
        let (listener, listen_addr) = match config.listen {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .map_err(tcp::io_err("binding agent listener"))?;
                let a = l.local_addr().map_err(tcp::io_err("listener address"))?;
                l.set_nonblocking(true)
                    .map_err(tcp::io_err("configuring agent listener"))?;
                (Some(l), Some(a))
            }
            None => (None, None),
        };
        // The Unix socket that same-host peers reach this agent through is named after the instance id, so the id
        // is one whose name this agent could take.
        let mut instance_id = random_u64();
        let mut unix = None;
        for _ in 0..4 {
            match crate::peer::bind_listener(instance_id) {
                Ok(l) => {
                    unix = Some(l);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => instance_id = random_u64(),
                Err(e) => {
                    tracing::warn!(agent = %config.name, error = %e,
                        "no Unix socket: same-host peers will reach this agent over tcp only");
                    break;
                }
            }
        }
        let limits = Limits {
            max_connections: config.max_connections,
            max_handlers: config.max_handler_threads,
            idle_timeout: config.idle_timeout,
            handshake_timeout: config.handshake_timeout,
        };
        let (server, poll) = Server::new(&config.name, limits)?;
        let advertised = listen_addr.map(|a| match &config.advertise_host {
            Some(h) => format!("{h}:{}", a.port()),
            None => a.to_string(),
        });
        let notifications = Arc::new(NotificationQueue::default());
        #[cfg(feature = "ucx")]
        let ucx = if config.transports.contains(&TransportKind::Ucx) {
            crate::ucx::UcxAgent::new(&config.name, notifications.clone())
                .inspect_err(
                    |e| tracing::warn!(error = %e, "UCX unavailable; continuing without it"),
                )
                .ok()
        } else {
            None
        };
        let inner = Arc::new(Inner {
            name: config.name.clone(),
            instance_id,
            config,
            host_id: pdx_sys::host_id(),
            pid: std::process::id(),
            registry: Arc::new(Registry::default()),
            next_region_id: AtomicU64::new(1),
            remotes: RwLock::new(HashMap::new()),
            load_lock: Mutex::new(()),
            notifications,
            listen_addr,
            advertised,
            shutdown: AtomicBool::new(false),
            server: server.clone(),
            #[cfg(feature = "ucx")]
            ucx,
        });
        process_agents()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(inner.instance_id, Arc::downgrade(&inner));
        server.spawn(
            poll,
            Listeners {
                tcp: listener,
                unix,
            },
            Arc::downgrade(&inner),
        )?;
        Ok(Agent { inner })
    }

    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The listener's bound address (the side channel, TCP transport and notification endpoint).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.inner.listen_addr
    }

    fn add_region(&self, kind: MemoryKind, backing: Backing) -> RegisteredMemory {
        let region = Arc::new(Region {
            id: self.inner.next_region_id.fetch_add(1, Ordering::Relaxed),
            kind,
            backing,
        });
        self.inner.registry.insert(region.clone());
        #[cfg(feature = "ucx")]
        if let Some(u) = &self.inner.ucx {
            u.register(&region, &self.inner.registry.snapshot());
        }
        RegisteredMemory {
            region,
            registry: self.inner.registry.clone(),
        }
    }

    /// Allocates and registers `len` bytes of host memory in a memfd arena, zero-filled, that same-host peers
    /// map once and then reach with plain memcpy (`shm` transport).
    ///
    /// Errors: [`TransferError::Sys`] when the allocation fails or `len` is 0.
    pub fn allocate(&self, len: usize) -> Result<RegisteredMemory> {
        let name = format!("pdx-{}", self.inner.name);
        let mem = Memory::memfd(&name, len, self.inner.config.populate)?;
        Ok(self.add_region(MemoryKind::Host, Backing::Host(mem)))
    }

    /// Allocates and registers `len` bytes of host memory through UCX (`ucp_mem_map` with
    /// `UCP_MEM_MAP_ALLOCATE`, SysV or POSIX shared memory first), zero-filled. Use it for memory that peers
    /// reach over `ucx` on the same host: UCX 1.13's shared-memory transports do RMA directly (one copy, no work
    /// on this side) only on memory they allocated, and emulate it through their message queue otherwise. Same-host
    /// pdx peers reach it with `cma` (not `shm`: it is no memfd), others with `tcp`.
    ///
    /// Errors: [`TransferError::TransportUnavailable`] when this agent has no UCX context, or UCX fails to
    /// allocate; [`TransferError::Invalid`] for 0 bytes.
    #[cfg(feature = "ucx")]
    pub fn allocate_ucx(&self, len: usize) -> Result<RegisteredMemory> {
        let ucx = self
            .inner
            .ucx
            .as_ref()
            .ok_or_else(|| TransferError::TransportUnavailable {
                transport: "ucx",
                reason: "this agent has no UCX context".into(),
            })?;
        let mem = ucx.allocate(len)?;
        Ok(self.add_region(MemoryKind::Host, Backing::Host(mem)))
    }

    /// Allocates and registers memory of `kind`: host memory as [`Agent::allocate`]; pinned host memory (a
    /// memfd arena page-locked through GPU 0, reachable by host transports and by `cuda`); or `len` bytes of
    /// GPU `n` (`cuMemAlloc`, zero-filled, exported to same-host peers by CUDA IPC).
    ///
    /// Errors: [`TransferError::Cuda`] with `CudaError::Unavailable` on a machine without CUDA (or without
    /// GPU `n`), out-of-memory and other CUDA errors; [`TransferError::Sys`] for host allocation failures.
    pub fn allocate_kind(&self, kind: MemoryKind, len: usize) -> Result<RegisteredMemory> {
        match kind {
            MemoryKind::Host => self.allocate(len),
            MemoryKind::PinnedHost => {
                let device = pdx_cuda::Device::new(0)?;
                let buf = pdx_cuda::PinnedHostBuffer::new(&device, len)?;
                Ok(self.add_region(kind, Backing::Pinned(buf)))
            }
            MemoryKind::Device(n) => {
                let device = pdx_cuda::Device::new(n as usize)?;
                let buf = pdx_cuda::DeviceBuffer::new(&device, len)?;
                let s = pdx_cuda::Stream::new(&device)?;
                s.memset(&buf, 0, len, 0)?;
                s.synchronize()?;
                Ok(self.add_region(kind, Backing::Device(buf)))
            }
        }
    }

    /// Registers a device buffer as [`MemoryKind::Device`] of its GPU: one pdx allocated
    /// (`pdx_cuda::DeviceBuffer::new`), or the engine's own KV cache by pointer (`pdx_cuda::DeviceBuffer::from_raw`,
    /// whose `unsafe` contract is the caller's promise that the memory outlives the buffer). The region keeps the
    /// buffer alive; same-host peers reach it through the CUDA IPC handle of its allocation plus its offset.
    pub fn register_device(&self, buf: pdx_cuda::DeviceBuffer) -> RegisteredMemory {
        let n = pdx_cuda::GpuMemory::device(&buf).ordinal() as u32;
        self.add_region(MemoryKind::Device(n), Backing::Device(buf))
    }

    /// Registers a pinned host buffer as [`MemoryKind::PinnedHost`].
    pub fn register_pinned(&self, buf: pdx_cuda::PinnedHostBuffer) -> RegisteredMemory {
        self.add_region(MemoryKind::PinnedHost, Backing::Pinned(buf))
    }

    /// Registers caller memory as it is (host memory: an owned `Vec` via [`Memory::from_vec`], or an engine's
    /// buffer via the `unsafe` [`Memory::from_raw_parts`]). Same-host peers reach it with `cma`, others with
    /// `tcp`. Errors: [`TransferError::Unavailable`] for kinds other than host (register GPU memory with
    /// [`Agent::register_device`] / [`Agent::register_pinned`]).
    pub fn register(&self, mem: Memory, kind: MemoryKind) -> Result<RegisteredMemory> {
        match kind {
            MemoryKind::Host => Ok(self.add_region(kind, Backing::Host(mem))),
            MemoryKind::PinnedHost => Err(TransferError::Unavailable("pinned host")),
            MemoryKind::Device(_) => Err(TransferError::Unavailable("device")),
        }
    }

    /// Registers an owned buffer (shorthand for [`Agent::register`] with [`Memory::from_vec`]).
    pub fn register_vec(&self, buf: Vec<u8>) -> Result<RegisteredMemory> {
        self.register(Memory::from_vec(buf)?, MemoryKind::Host)
    }

    /// This agent's metadata in the versioned wire format ([`AgentMetadata`]); at most 1 MiB.
    pub fn local_metadata(&self) -> Result<Vec<u8>> {
        self.inner.local_metadata()
    }

    /// Loads a peer's metadata and returns the peer's name.
    ///
    /// The bytes are untrusted: they never select local memory to touch. A peer in this process is recognised by
    /// its instance id (its live registrations are then used); a peer on this host only through its Unix socket,
    /// where the kernel names the process and the peer passes its memfds and the metadata that `shm`/`cma`
    /// requests are then checked against (see docs/transfer.md, Trust model). Otherwise the peer is reached over `tcp` (or `ucx`),
    /// whose target checks every request against its own registrations.
    ///
    /// Loading the same peer instance again is safe while transfers run: identical metadata is a no-op, and
    /// newer metadata of the same instance (more registrations) keeps the existing connection and mappings. Metadata
    /// of a new instance under the same name (a restarted peer) replaces the old entry, whose transfers then fail
    /// and whose memory is unmapped.
    ///
    /// Errors: [`TransferError::BadMetadata`] for malformed bytes; loading one's own metadata is refused.
    pub fn load_remote(&self, bytes: &[u8]) -> Result<String> {
        let (wire, ext) = AgentMetadata::decode_ext(bytes)?;
        if wire.instance_id == self.inner.instance_id {
            return Err(TransferError::BadMetadata(
                "an agent cannot load its own metadata".into(),
            ));
        }
        let _loading = self
            .inner
            .load_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let old = self.inner.remote(&wire.name).ok();
        if let Some(known) = &old {
            #[cfg(feature = "ucx")]
            let same_ucx = known.ucx_md == ext.ucx;
            #[cfg(not(feature = "ucx"))]
            let same_ucx = true;
            let alive = known.local_peer().is_none_or(|p| p.is_alive());
            if known.announced == wire
                && same_ucx
                && (known.cuda_md == ext.cuda || known.local_peer().is_some())
                && !known.invalidated.load(Ordering::Acquire)
                && alive
            {
                return Ok(wire.name);
            }
        }
        let same_instance = old.filter(|o| {
            o.md.instance_id == wire.instance_id && !o.invalidated.load(Ordering::Acquire)
        });
        let in_process = process_agents()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&wire.instance_id)
            .filter(|w| w.upgrade().is_some_and(|p| p.name == wire.name))
            .cloned();
        let (locality, md, ext) = if let Some(peer) = in_process {
            (Locality::SameProcess(peer), wire.clone(), ext)
        } else if wire.host_id != self.inner.host_id {
            (
                Locality::Remote(format!("agent `{}` is on another host", wire.name)),
                wire.clone(),
                ext,
            )
        } else {
            // Same host by its own account: only its Unix socket can vouch for it. A peer already vouched for
            // (the same instance, loaded again) keeps its link and mappings and adds the new ones.
            let reuse = same_instance
                .as_ref()
                .and_then(|o| o.local_peer().cloned())
                .filter(|p| p.is_alive());
            let vouched = match reuse {
                Some(p) => p
                    .refresh(&self.inner, wire.instance_id)
                    .map(|(md, ext)| (p, md, ext)),
                None => LocalPeer::connect(&self.inner, &wire),
            };
            match vouched {
                Ok((p, md, ext)) => (Locality::SameHost(p), md, ext),
                Err(e) => {
                    tracing::debug!(peer = %wire.name, error = %e, "same-host peer not vouched for; tcp only");
                    let why = match e {
                        TransferError::TransportUnavailable { reason, .. } => reason,
                        e => format!("the kernel does not vouch for agent `{}`: {e}", wire.name),
                    };
                    (Locality::Remote(why), wire.clone(), ext)
                }
            }
        };
        #[cfg_attr(not(feature = "ucx"), allow(unused_variables))]
        let (ucx_md, cuda_md) = (ext.ucx, ext.cuda);
        let name = md.name.clone();
        let mut remotes = self
            .inner
            .remotes
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let same_instance = remotes.get(&name).filter(|old| {
            old.md.instance_id == md.instance_id && !old.invalidated.load(Ordering::Acquire)
        });
        // The same peer, seen again: its connection (and the transfers on it) carry over.
        let conn = same_instance
            .and_then(|old| old.conn.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .filter(|c| !c.is_closed());
        let keep_old = same_instance.is_some_and(|old| match (&old.locality, &locality) {
            (Locality::SameHost(a), Locality::SameHost(b)) => Arc::ptr_eq(a, b),
            (Locality::SameHost(_), _) => false,
            _ => true,
        });
        let remote = Arc::new(RemoteAgent {
            md,
            announced: wire,
            locality,
            conn: Mutex::new(conn),
            invalidated: AtomicBool::new(false),
            cuda_md,
            gpu_peer: GpuPeer::default(),
            #[cfg(feature = "ucx")]
            ucx_md,
            #[cfg(feature = "ucx")]
            ucx_peer: Mutex::new(None),
        });
        if let Some(old) = remotes.insert(name.clone(), remote) {
            if !keep_old {
                old.shutdown();
            }
        }
        Ok(name)
    }

    /// The metadata of a loaded remote agent, as this agent uses it: for a same-host peer, the metadata its Unix
    /// socket sent (so region addresses taken from it are ones the kernel-vouched peer registered).
    /// Errors: [`TransferError::UnknownRemote`].
    pub fn remote_metadata(&self, name: &str) -> Result<AgentMetadata> {
        let r = self.inner.remote(name)?;
        r.check_alive()?;
        Ok(r.md.clone())
    }

    /// Fetches a peer's metadata from its listener (`host:port`) without loading it, authenticating with this
    /// agent's secret when it has one. Errors: as [`tcp::fetch_metadata_with`].
    pub fn fetch_metadata(&self, addr: &str) -> Result<Vec<u8>> {
        tcp::fetch_metadata_with(
            addr,
            self.inner.config.peer_timeout,
            self.inner.config.secret.as_ref(),
        )
    }

    /// Incoming connections open now, and connections refused so far because
    /// [`AgentConfig::max_connections`] were open.
    pub fn connection_stats(&self) -> (usize, u64) {
        (
            self.inner.server.live_connections(),
            self.inner.server.refused_connections(),
        )
    }

    /// Fetches a peer's metadata from its listener (`host:port`) and loads it; returns the peer's name.
    /// Errors: as [`tcp::fetch_metadata`] and [`Agent::load_remote`].
    pub fn fetch_remote(&self, addr: &str) -> Result<String> {
        let bytes = self.fetch_metadata(addr)?;
        self.load_remote(&bytes)
    }

    /// Forgets a remote agent: its connection closes, its outstanding transfers fail, requests made for it
    /// fail on post. Returns whether it was loaded.
    pub fn invalidate_remote(&self, name: &str) -> bool {
        let old = self
            .inner
            .remotes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        old.inspect(|r| r.shutdown()).is_some()
    }

    /// Validates a local descriptor list against this agent's registrations.
    ///
    /// Errors: [`TransferError::NotRegistered`] naming the first descriptor outside every registered region;
    /// [`TransferError::Invalid`] for zero lengths or a kind/device mismatch.
    pub fn prep_local(&self, list: &XferDescList) -> Result<PreparedLocal> {
        let segs = list
            .descs
            .iter()
            .enumerate()
            .map(|(index, d)| {
                if d.len == 0 {
                    return Err(TransferError::Invalid(format!(
                        "descriptor {index} is empty"
                    )));
                }
                let (region, off) = self.inner.registry.lookup(d.addr, d.len).ok_or_else(|| {
                    TransferError::NotRegistered {
                        agent: self.inner.name.clone(),
                        index,
                        addr: d.addr,
                        len: d.len,
                    }
                })?;
                if region.kind != list.kind || region.kind.dev_id() != d.dev_id {
                    return Err(TransferError::Invalid(format!(
                        "descriptor {index} names {:?} memory but the region is {:?}",
                        list.kind, region.kind
                    )));
                }
                Ok(LocalSeg {
                    region,
                    off,
                    len: d.len as usize,
                })
            })
            .collect::<Result<_>>()?;
        Ok(PreparedLocal { segs })
    }

    /// Validates a descriptor list against a loaded remote agent's metadata.
    ///
    /// Errors: [`TransferError::UnknownRemote`]; [`TransferError::NotRegistered`] for a descriptor outside the
    /// remote's registered regions; [`TransferError::Invalid`] for zero lengths or a kind mismatch.
    pub fn prep_remote(&self, agent: &str, list: &XferDescList) -> Result<PreparedRemote> {
        let remote = self.inner.remote(agent)?;
        let segs = list
            .descs
            .iter()
            .enumerate()
            .map(|(index, d)| {
                if d.len == 0 {
                    return Err(TransferError::Invalid(format!(
                        "descriptor {index} is empty"
                    )));
                }
                let (region, off) = remote.md.find_region(d.addr, d.len).ok_or_else(|| {
                    TransferError::NotRegistered {
                        agent: agent.to_string(),
                        index,
                        addr: d.addr,
                        len: d.len,
                    }
                })?;
                if remote.md.regions[region].kind != list.kind {
                    return Err(TransferError::Invalid(format!(
                        "descriptor {index} names {:?} memory but the remote region is {:?}",
                        list.kind, remote.md.regions[region].kind
                    )));
                }
                Ok(RemoteSeg {
                    addr: d.addr,
                    len: d.len,
                    region,
                    off,
                })
            })
            .collect::<Result<_>>()?;
        Ok(PreparedRemote { remote, segs })
    }

    /// Creates a transfer request moving `local[local_idx[i]]` ↔ `remote[remote_idx[i]]` for every `i`
    /// (NIXL `makeXferReq`). The transport is chosen now (or forced by `opts.transport`) and the request can
    /// be posted any number of times without re-validation.
    ///
    /// Transport choice, in order, among `AgentConfig::transports`: `local` (peer in this process), `shm`
    /// (same host and every remote range in a mapped memfd region), `cma` (same host), `tcp` (peer listens).
    ///
    /// Errors: [`TransferError::Invalid`] for empty or mismatched index lists, out-of-range indices, unequal
    /// lengths or an oversized notification; [`TransferError::TransportUnavailable`] when no allowed transport
    /// can serve it; connection errors when the `tcp` connection cannot be made.
    pub fn create_xfer(
        &self,
        op: XferOp,
        local: &PreparedLocal,
        local_idx: &[usize],
        remote: &PreparedRemote,
        remote_idx: &[usize],
        opts: XferOptions,
    ) -> Result<XferRequest> {
        if local_idx.is_empty() || local_idx.len() != remote_idx.len() {
            return Err(TransferError::Invalid(format!(
                "{} local and {} remote descriptors (need equal, non-zero counts)",
                local_idx.len(),
                remote_idx.len()
            )));
        }
        if opts
            .notif
            .as_ref()
            .is_some_and(|n| n.len() > crate::wire::MAX_NOTIF_BYTES)
        {
            return Err(TransferError::Invalid("notification over 64 KiB".into()));
        }
        let pairs = local_idx
            .iter()
            .zip(remote_idx)
            .enumerate()
            .map(|(i, (&l, &r))| {
                let (Some(ls), Some(rs)) = (local.segs.get(l), remote.segs.get(r)) else {
                    return Err(TransferError::Invalid(format!(
                        "index pair {i} out of range"
                    )));
                };
                if ls.len as u64 != rs.len {
                    return Err(TransferError::Invalid(format!(
                        "pair {i}: local {} bytes, remote {} bytes",
                        ls.len, rs.len
                    )));
                }
                Ok((ls.clone(), *rs))
            })
            .collect::<Result<Vec<_>>>()?;
        let rem = remote.remote.clone();
        rem.check_alive()?;
        let allowed = |t: TransportKind| match opts.transport {
            Some(forced) => forced == t,
            None => self.inner.config.transports.contains(&t),
        };
        let mut why_not: Vec<String> = Vec::new();
        let (transport, plan) = 'plan: {
            // GPU memory moves only over `cuda`, or staged over `tcp` (host transports would dereference
            // device addresses).
            if pairs
                .iter()
                .any(|(l, r)| gpu::needs_gpu(l, rem.md.regions[r.region].kind))
            {
                // Another host (or `tcp` forced): staged through pinned memory over tcp.
                let staged = opts.transport == Some(TransportKind::Tcp)
                    || (matches!(rem.locality, Locality::Remote(_))
                        && opts.transport.is_none()
                        && allowed(TransportKind::Tcp));
                if staged {
                    if rem.md.listen_addr.is_none() {
                        return Err(gpu::unavailable(format!(
                            "agent `{}` runs no listener",
                            rem.md.name
                        )));
                    }
                    let locals: Vec<(LocalSeg, MemoryKind)> = pairs
                        .iter()
                        .map(|(l, r)| (l.clone(), rem.md.regions[r.region].kind))
                        .collect();
                    let ctrl: Arc<[u8]> = Ctrl::Segments {
                        segs: pairs.iter().map(|p| (p.1.addr, p.1.len)).collect(),
                        notif: opts.notif.clone(),
                    }
                    .encode()
                    .into();
                    break 'plan (
                        TransportKind::Tcp,
                        Plan::Staged(gpu::staged_plan(&locals, ctrl)?),
                    );
                }
                if !allowed(TransportKind::Cuda) {
                    return Err(TransferError::TransportUnavailable {
                        transport: opts.transport.map_or("any", TransportKind::name),
                        reason:
                            "GPU memory moves only over the cuda transport (or staged over tcp)"
                                .into(),
                    });
                }
                break 'plan (
                    TransportKind::Cuda,
                    Plan::Cuda(self.cuda_plan(&rem, &pairs)?),
                );
            }
            if allowed(TransportKind::Local) {
                match &rem.locality {
                    Locality::SameProcess(peer) => match peer.upgrade() {
                        Some(peer) => {
                            break 'plan (
                                TransportKind::Local,
                                Plan::Copy(local_copy_plan(&peer, &pairs)?),
                            )
                        }
                        None => why_not.push("local: peer agent dropped".into()),
                    },
                    _ => why_not.push("local: peer is in another process".into()),
                }
            }
            if allowed(TransportKind::Shm) {
                match self.shm_plan(&rem, &pairs) {
                    Ok(plan) => break 'plan (TransportKind::Shm, plan),
                    Err(why) => why_not.push(why),
                }
            }
            if allowed(TransportKind::Cma) {
                match self.cma_plan(&rem, &pairs) {
                    Ok(plan) => break 'plan (TransportKind::Cma, plan),
                    Err(why) => why_not.push(why),
                }
            }
            if allowed(TransportKind::Tcp) {
                if rem.md.listen_addr.is_some() {
                    break 'plan (
                        TransportKind::Tcp,
                        Plan::Tcp {
                            local: pairs.iter().map(|p| p.0.clone()).collect(),
                            remote: pairs.iter().map(|p| (p.1.addr, p.1.len)).collect(),
                        },
                    );
                }
                why_not.push("tcp: peer runs no listener".into());
            }
            #[cfg(feature = "ucx")]
            if allowed(TransportKind::Ucx) {
                match self.ucx_plan(&rem, &pairs) {
                    Ok(plan) => break 'plan (TransportKind::Ucx, plan),
                    Err(e) if opts.transport == Some(TransportKind::Ucx) => return Err(e),
                    Err(_) => why_not.push("ucx: not available to both agents".into()),
                }
            }
            return Err(TransferError::TransportUnavailable {
                transport: opts.transport.map_or("any", TransportKind::name),
                reason: if why_not.is_empty() {
                    "transport not implemented in this build".into()
                } else {
                    why_not.join("; ")
                },
            });
        };
        // Copies to another process notify (and detect peer death) over the peer connection; TCP needs it.
        let conn = match transport {
            TransportKind::Local => None,
            TransportKind::Tcp => Some(rem.conn(&self.inner)?),
            _ if matches!(rem.locality, Locality::SameProcess(_)) => None,
            _ => rem.conn(&self.inner).ok(),
        };
        let tcp_ctrl = match &plan {
            Plan::Tcp { remote, .. } => Some(
                Ctrl::Segments {
                    segs: remote.to_vec(),
                    notif: opts.notif.clone(),
                }
                .encode()
                .into(),
            ),
            _ => None,
        };
        Ok(XferRequest {
            op,
            transport,
            total_bytes: pairs.iter().map(|p| p.1.len).sum(),
            plan,
            remote: rem,
            conn,
            notif: opts.notif,
            tcp_ctrl,
            completion: Completion::new(),
            me: Arc::downgrade(&self.inner),
        })
    }

    /// The `shm` plan of `pairs`: memcpy into the peer's memfds, live regions for an agent of this process,
    /// regions mapped from the descriptors its Unix socket passed for a same-host peer. Errors: why not.
    fn shm_plan(
        &self,
        rem: &RemoteAgent,
        pairs: &[(LocalSeg, RemoteSeg)],
    ) -> std::result::Result<Plan, String> {
        let not_memfd = "shm: remote memory is not a pdx-allocated (memfd) region".to_string();
        match &rem.locality {
            Locality::SameProcess(peer) => {
                let peer = peer.upgrade().ok_or("shm: peer agent dropped")?;
                let segs = local_copy_plan(&peer, pairs).map_err(|e| format!("shm: {e}"))?;
                if segs
                    .iter()
                    .any(|c| c.remote.host().is_none_or(|m| m.memfd_fd().is_none()))
                {
                    return Err(not_memfd);
                }
                Ok(Plan::Copy(segs))
            }
            Locality::SameHost(peer) => {
                let map = peer
                    .maps()
                    .ok_or_else(|| format!("shm: {}", peer.gone_error()))?;
                let segs = pairs
                    .iter()
                    .map(|(l, r)| {
                        let slot = map.slot(rem.md.regions[r.region].id)?;
                        Some(ShmSeg {
                            local: l.clone(),
                            slot,
                            off: r.off as usize,
                        })
                    })
                    .collect::<Option<Vec<_>>>()
                    .ok_or(not_memfd)?;
                Ok(Plan::Shm {
                    peer: peer.clone(),
                    segs,
                })
            }
            Locality::Remote(why) => Err(format!("shm: {why}")),
        }
    }

    /// The `cma` plan of `pairs`: this process (ranges resolved against the peer agent's live registrations, which
    /// the plan keeps alive), or the same-host process the kernel named (ranges checked against the metadata that
    /// process sent). Errors: why not.
    fn cma_plan(
        &self,
        rem: &RemoteAgent,
        pairs: &[(LocalSeg, RemoteSeg)],
    ) -> std::result::Result<Plan, String> {
        let local = pairs.iter().map(|p| p.0.clone()).collect();
        let remote = pairs.iter().map(|p| (p.1.addr, p.1.len as usize)).collect();
        match &rem.locality {
            Locality::SameProcess(peer) => {
                let peer = peer.upgrade().ok_or("cma: peer agent dropped")?;
                let segs = local_copy_plan(&peer, pairs).map_err(|e| format!("cma: {e}"))?;
                if segs.iter().any(|c| c.remote.host().is_none()) {
                    return Err("cma: remote memory is not host memory".into());
                }
                Ok(Plan::Cma {
                    target: CmaTarget::ThisProcess(
                        pdx_sys::ipc::PeerProcess::this_process(),
                        segs.into_iter().map(|c| c.remote).collect(),
                    ),
                    local,
                    remote,
                })
            }
            Locality::SameHost(peer) => Ok(Plan::Cma {
                target: CmaTarget::Peer(peer.clone()),
                local,
                remote,
            }),
            Locality::Remote(why) => Err(format!("cma: {why}")),
        }
    }

    /// The `cuda` plan of `pairs` with `rem` (see [`crate::gpu`]).
    fn cuda_plan(
        &self,
        rem: &RemoteAgent,
        pairs: &[(LocalSeg, RemoteSeg)],
    ) -> Result<gpu::GpuPlan> {
        let locals: Vec<(LocalSeg, MemoryKind)> = pairs
            .iter()
            .map(|(l, r)| (l.clone(), rem.md.regions[r.region].kind))
            .collect();
        let peer = match &rem.locality {
            Locality::SameProcess(p) => {
                let p = p
                    .upgrade()
                    .ok_or_else(|| gpu::unavailable("peer agent dropped".into()))?;
                PeerMemory::SameProcess(
                    local_copy_plan(&p, pairs)?
                        .into_iter()
                        .map(|c| (c.remote, c.remote_off))
                        .collect(),
                )
            }
            Locality::SameHost(local) => PeerMemory::SameHost {
                md: &rem.md,
                cuda: rem.cuda_md.as_ref(),
                local,
                peer: &rem.gpu_peer,
                segs: pairs
                    .iter()
                    .map(|(_, r)| (r.region, r.off as usize))
                    .collect(),
                populate: self.inner.config.populate,
            },
            Locality::Remote(why) => {
                return Err(gpu::unavailable(format!(
                    "{why}: GPU memory of another host (or of a peer the kernel does not vouch for) needs the \
                     staged path (device -> pinned -> tcp), which is not implemented for the peer's device memory"
                )))
            }
        };
        gpu::plan(&locals, peer)
    }

    #[cfg(feature = "ucx")]
    fn ucx_plan(&self, rem: &Arc<RemoteAgent>, pairs: &[(LocalSeg, RemoteSeg)]) -> Result<Plan> {
        let unavailable = |reason: String| TransferError::TransportUnavailable {
            transport: "ucx",
            reason,
        };
        let me = self.inner.ucx.as_ref().ok_or_else(|| {
            unavailable("this agent has no UCX worker (UCX failed to start)".into())
        })?;
        let peer_md = rem
            .ucx_md
            .as_ref()
            .ok_or_else(|| unavailable(format!("agent `{}` does not serve UCX", rem.md.name)))?;
        let peer = {
            let mut guard = rem.ucx_peer.lock().unwrap_or_else(|e| e.into_inner());
            match guard.as_ref() {
                Some(p) => p.clone(),
                None => {
                    let ids: Vec<u64> = rem.md.regions.iter().map(|r| r.id).collect();
                    let p = me.connect(&rem.md.name, peer_md, &ids)?;
                    *guard = Some(p.clone());
                    p
                }
            }
        };
        Ok(Plan::Ucx {
            peer,
            ops: pairs
                .iter()
                .map(|(l, r)| (l.clone(), r.addr, r.region))
                .collect(),
        })
    }

    /// Shorthand for NIXL's `createXferReq`: prepares both lists and pairs them in order.
    pub fn create_xfer_from_descs(
        &self,
        op: XferOp,
        local: &XferDescList,
        remote_agent: &str,
        remote: &XferDescList,
        opts: XferOptions,
    ) -> Result<XferRequest> {
        let l = self.prep_local(local)?;
        let r = self.prep_remote(remote_agent, remote)?;
        let idx: Vec<usize> = (0..l.len()).collect();
        let ridx: Vec<usize> = (0..r.len()).collect();
        self.create_xfer(op, &l, &idx, &r, &ridx, opts)
    }

    /// Sends a notification to a loaded remote agent (NIXL `genNotif`).
    /// Errors: [`TransferError::UnknownRemote`]; connection errors; [`TransferError::Invalid`] over 64 KiB.
    pub fn notify(&self, agent: &str, payload: Vec<u8>) -> Result<()> {
        if payload.len() > crate::wire::MAX_NOTIF_BYTES {
            return Err(TransferError::Invalid("notification over 64 KiB".into()));
        }
        let remote = self.inner.remote(agent)?;
        remote.check_alive()?;
        if let Locality::SameProcess(peer) = &remote.locality {
            if let Some(peer) = peer.upgrade() {
                peer.notifications.push(Notification {
                    from: self.inner.name.clone(),
                    payload,
                });
                return Ok(());
            }
        }
        remote.conn(&self.inner)?.notify(payload)
    }

    /// Takes every notification received so far, oldest first (NIXL `getNotifs`).
    pub fn take_notifications(&self) -> Vec<Notification> {
        self.inner.notifications.take()
    }

    /// Waits up to `timeout` for at least one notification, then takes all of them (empty on timeout).
    pub fn wait_notifications(&self, timeout: Duration) -> Vec<Notification> {
        self.inner.notifications.wait(timeout)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let inner = &self.inner;
        inner.shutdown.store(true, Ordering::Release);
        #[cfg(feature = "ucx")]
        if let Some(u) = &inner.ucx {
            u.shutdown();
        }
        process_agents()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&inner.instance_id);
        for remote in inner
            .remotes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            remote.1.shutdown();
        }
        // Closes idle connections and the listeners; handlers serving a connection notice within a tick.
        inner.server.shutdown();
    }
}

/// Resolves remote ranges of an agent in this process against its live registrations.
fn local_copy_plan(peer: &Inner, pairs: &[(LocalSeg, RemoteSeg)]) -> Result<Vec<CopySeg>> {
    pairs
        .iter()
        .enumerate()
        .map(|(index, (l, r))| {
            let (region, off) = peer.registry.lookup(r.addr, r.len).ok_or_else(|| {
                TransferError::NotRegistered {
                    agent: peer.name.clone(),
                    index,
                    addr: r.addr,
                    len: r.len,
                }
            })?;
            Ok(CopySeg {
                local: l.clone(),
                remote: region,
                remote_off: off,
            })
        })
        .collect()
}
