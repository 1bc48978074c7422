//! The agent: registrations, remote agents, transport choice, transfer requests and notifications.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use pdx_sys::Memory;

use crate::auth::AgentSecret;
use crate::backend::{Backend, Prepare};
use crate::config::{AgentConfig, Identity, XferOptions};
use crate::desc::XferDescList;
use crate::error::{Result, TransferError};
use crate::gpu::{CudaPeer, GpuPeer};
use crate::memory::{Backing, MemoryKind, Region, RegisteredMemory, Registry};
use crate::metadata::{AgentMetadata, CudaMetadata, RegionMetadata, MAX_NAME_BYTES};
use crate::notif::{Notification, NotificationQueue};
use crate::peer::LocalPeer;
use crate::plan::{self, Conn, Facts, Reach, RemoteSeg, Resolved};
use crate::remote::{InProcessAgent, Locality, RemoteAgent};
use crate::request::XferOp;
use crate::server::{Limits, Listeners, ServeContext, Server};
use crate::transport::{CopySeg, LocalSeg, TransportKind};
use crate::xfer::{Backends, Parts, PeerSlots, XferRequest};

/// Agents of this process, by instance id: the `local` transport reaches their registrations directly.
fn process_agents() -> &'static Mutex<HashMap<u64, Weak<InProcessAgent>>> {
    static AGENTS: OnceLock<Mutex<HashMap<u64, Weak<InProcessAgent>>>> = OnceLock::new();
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

/// State shared by an [`Agent`] handle and its listener (which sees it only as a [`ServeContext`]).
pub(crate) struct Inner {
    name: String,
    instance_id: u64,
    config: AgentConfig,
    host_id: String,
    pid: u32,
    registry: Arc<Registry>,
    /// This agent as the agents of this process reach it (registry and queue shared with the fields here).
    this: Arc<InProcessAgent>,
    next_region_id: AtomicU64,
    remotes: RwLock<HashMap<String, Arc<Loaded>>>,
    /// Held through [`Agent::load_remote`]: two threads loading the same new peer at once (the first requests
    /// of two clients) would each vouch for it over a link of their own, and the second insert would shut the
    /// first down under its transfers; serialized, the second finds the first's entry and keeps it.
    load_lock: Mutex<()>,
    notifications: Arc<NotificationQueue>,
    listen_addr: Option<SocketAddr>,
    advertised: Option<String>,
    shutdown: AtomicBool,
    /// The listener side: I/O thread, handler pool, watched same-host peers.
    server: Arc<Server>,
    /// One engine per transport, shared with the requests.
    backends: Arc<Backends>,
    #[cfg(feature = "ucx")]
    ucx: Option<Arc<crate::ucx::UcxAgent>>,
}

impl Inner {
    /// This agent as its own connections introduce it.
    fn identity(&self) -> Identity<'_> {
        Identity {
            config: &self.config,
            instance_id: self.instance_id,
        }
    }

    fn local_metadata(&self) -> Result<Vec<u8>> {
        self.encode_metadata(&self.registry.snapshot())
    }

    /// The metadata of the regions `live` (a registry snapshot), so the Unix socket can send exactly the memfds
    /// of the regions it describes.
    fn encode_metadata(&self, live: &[Arc<Region>]) -> Result<Vec<u8>> {
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

    fn remote(&self, name: &str) -> Result<Arc<Loaded>> {
        self.remotes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| TransferError::UnknownRemote(name.to_string()))
    }
}

/// What the listener needs of the agent (the narrow context of `server.rs`).
impl ServeContext for Inner {
    fn name(&self) -> &str {
        &self.name
    }
    fn secret(&self) -> Option<&AgentSecret> {
        self.config.secret.as_ref()
    }
    fn peer_timeout(&self) -> Duration {
        self.config.peer_timeout
    }
    fn is_shut_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }
    fn lookup(&self, addr: u64, len: u64) -> Option<(Arc<Region>, usize)> {
        self.registry.lookup(addr, len)
    }
    fn regions(&self) -> Vec<Arc<Region>> {
        self.registry.snapshot()
    }
    fn metadata_of(&self, live: &[Arc<Region>]) -> Result<Vec<u8>> {
        self.encode_metadata(live)
    }
    fn deliver(&self, n: Notification) {
        self.notifications.push(n);
    }
}

/// A loaded peer: the remote agent requests see, and what the backends with per-peer state keep of it.
struct Loaded {
    agent: Arc<RemoteAgent>,
    /// The metadata as loaded (to recognise the same bytes loaded again).
    announced: AgentMetadata,
    /// CUDA IPC handles of the peer's device regions (metadata version 3).
    cuda_md: Option<CudaMetadata>,
    /// The peer's GPU memory opened in this process (IPC mappings, pinned memfd mappings), made on first use.
    gpu_peer: GpuPeer,
    #[cfg(feature = "ucx")]
    ucx_md: Option<crate::metadata::UcxMetadata>,
    #[cfg(feature = "ucx")]
    ucx_peer: Mutex<Option<Arc<crate::ucx::UcxPeer>>>,
}

impl Loaded {
    /// The per-peer state of the backends that keep some.
    fn slots(&self) -> PeerSlots<'_> {
        PeerSlots {
            cuda: CudaPeer {
                cuda: self.cuda_md.as_ref(),
                opened: &self.gpu_peer,
            },
            #[cfg(feature = "ucx")]
            ucx: crate::ucx::UcxPeerSlot {
                md: self.ucx_md.as_ref(),
                endpoint: &self.ucx_peer,
            },
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

/// A remote descriptor list validated against a remote agent's metadata ([`Agent::prep_remote`]).
pub struct PreparedRemote {
    remote: Arc<Loaded>,
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
        self.remote.agent.name()
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
        if config.name.contains('\0') {
            return Err(TransferError::Invalid(
                "the agent name contains a NUL byte".into(),
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
                    .map_err(crate::conn::io_err("binding agent listener"))?;
                let a = l
                    .local_addr()
                    .map_err(crate::conn::io_err("listener address"))?;
                l.set_nonblocking(true)
                    .map_err(crate::conn::io_err("configuring agent listener"))?;
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
        let registry = Arc::new(Registry::default());
        let this = Arc::new(InProcessAgent {
            name: config.name.clone(),
            registry: registry.clone(),
            notifications: notifications.clone(),
        });
        let backends = Arc::new(Backends::new(
            &config,
            #[cfg(feature = "ucx")]
            ucx.clone(),
        ));
        let inner = Arc::new(Inner {
            name: config.name.clone(),
            instance_id,
            config,
            host_id: pdx_sys::host_id(),
            pid: std::process::id(),
            registry,
            this,
            next_region_id: AtomicU64::new(1),
            remotes: RwLock::new(HashMap::new()),
            load_lock: Mutex::new(()),
            notifications,
            listen_addr,
            advertised,
            shutdown: AtomicBool::new(false),
            server: server.clone(),
            backends,
            #[cfg(feature = "ucx")]
            ucx,
        });
        process_agents()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(inner.instance_id, Arc::downgrade(&inner.this));
        let served: Weak<dyn ServeContext> = {
            let w: Weak<Inner> = Arc::downgrade(&inner);
            w
        };
        server.spawn(
            poll,
            Listeners {
                tcp: listener,
                unix,
            },
            served,
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
            let alive = known.agent.local_peer().is_none_or(|p| p.is_alive());
            if known.announced == wire
                && same_ucx
                && (known.cuda_md == ext.cuda || known.agent.local_peer().is_some())
                && !known.agent.is_invalidated()
                && alive
            {
                return Ok(wire.name);
            }
        }
        let same_instance = old
            .map(|o| o.agent.clone())
            .filter(|o| o.md.instance_id == wire.instance_id && !o.is_invalidated());
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
            let (me, server) = (self.inner.identity(), &self.inner.server);
            let vouched = match reuse {
                Some(p) => p
                    .refresh(me, server, wire.instance_id)
                    .map(|(md, ext)| (p, md, ext)),
                None => LocalPeer::connect(me, server, &wire),
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
            old.agent.md.instance_id == md.instance_id && !old.agent.is_invalidated()
        });
        let keep_old = same_instance.is_some_and(|old| match (&old.agent.locality, &locality) {
            (Locality::SameHost(a), Locality::SameHost(b)) => Arc::ptr_eq(a, b),
            (Locality::SameHost(_), _) => false,
            _ => true,
        });
        // The same peer, seen again and kept: its connection (and the transfers on it) carry over. One that is
        // shut down below takes its connection with it, so the new entry must not inherit that connection.
        let conn = same_instance
            .filter(|_| keep_old)
            .and_then(|old| old.agent.live_conn());
        let remote = Arc::new(Loaded {
            agent: Arc::new(RemoteAgent::new(md, locality, conn)),
            announced: wire,
            cuda_md,
            gpu_peer: GpuPeer::default(),
            #[cfg(feature = "ucx")]
            ucx_md,
            #[cfg(feature = "ucx")]
            ucx_peer: Mutex::new(None),
        });
        if let Some(old) = remotes.insert(name.clone(), remote) {
            if !keep_old {
                old.agent.shutdown();
            }
        }
        Ok(name)
    }

    /// The metadata of a loaded remote agent, as this agent uses it: for a same-host peer, the metadata its Unix
    /// socket sent (so region addresses taken from it are ones the kernel-vouched peer registered).
    /// Errors: [`TransferError::UnknownRemote`].
    pub fn remote_metadata(&self, name: &str) -> Result<AgentMetadata> {
        let r = self.inner.remote(name)?;
        r.agent.check_alive()?;
        Ok(r.agent.md.clone())
    }

    /// Fetches a peer's metadata from its listener (`host:port`) without loading it, authenticating with this
    /// agent's secret when it has one. Errors: as [`crate::fetch_metadata_with`].
    pub fn fetch_metadata(&self, addr: &str) -> Result<Vec<u8>> {
        crate::conn::fetch_metadata_with(
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
    /// Errors: as [`crate::fetch_metadata`] and [`Agent::load_remote`].
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
        old.inspect(|r| r.agent.shutdown()).is_some()
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
                let (region, off) =
                    remote.agent.md.find_region(d.addr, d.len).ok_or_else(|| {
                        TransferError::NotRegistered {
                            agent: agent.to_string(),
                            index,
                            addr: d.addr,
                            len: d.len,
                        }
                    })?;
                if remote.agent.md.regions[region].kind != list.kind {
                    return Err(TransferError::Invalid(format!(
                        "descriptor {index} names {:?} memory but the remote region is {:?}",
                        list.kind, remote.agent.md.regions[region].kind
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
    /// (same host and every remote range in a mapped memfd region), `cma` (same host), `tcp` (peer listens),
    /// `ucx`; GPU memory moves over `cuda`, or staged over `tcp` (the rules: `plan.rs`).
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
        let pairs = plan::pair(
            &local.segs,
            |s| s.len,
            local_idx,
            &remote.segs,
            remote_idx,
            opts.notif.as_deref(),
        )?;
        let loaded = &remote.remote;
        let rem = loaded.agent.clone();
        rem.check_alive()?;
        // The facts the planner decides from: where the peer is, and what its memory is as seen from here.
        let kinds: Vec<(MemoryKind, MemoryKind)> = pairs
            .iter()
            .map(|(l, r)| (l.region.kind, rem.md.regions[r.region].kind))
            .collect();
        let in_process = match &rem.locality {
            Locality::SameProcess(peer) => Some(peer.upgrade()),
            _ => None,
        };
        let resolved: Option<Result<Vec<CopySeg>>> = in_process
            .as_ref()
            .and_then(|p| p.as_ref())
            .map(|p| p.resolve(&pairs));
        let resolved_facts = resolved.as_ref().map(|r| match r {
            Ok(segs) => Ok(segs
                .iter()
                .map(|c| Resolved {
                    host: c.remote.host().is_some(),
                    memfd: c.remote.host().is_some_and(|m| m.memfd_fd().is_some()),
                })
                .collect()),
            Err(e) => Err(e.duplicate()),
        });
        let reach = match &rem.locality {
            Locality::SameProcess(_) => Reach::SameProcess(resolved_facts.as_ref()),
            Locality::SameHost(peer) => Reach::SameHost(match peer.maps() {
                Some(map) => Ok(pairs
                    .iter()
                    .map(|(_, r)| map.slot(rem.md.regions[r.region].id))
                    .collect()),
                None => Err(peer.gone_error().to_string()),
            }),
            Locality::Remote(why) => Reach::Remote(why),
        };
        let choice = plan::choose(&Facts {
            peer: rem.name(),
            kinds: &kinds,
            reach,
            transports: &self.inner.config.transports,
            forced: opts.transport,
            peer_listens: rem.md.listen_addr.is_some(),
            ucx_built: cfg!(feature = "ucx"),
        })?;
        let x = Prepare {
            pairs: &pairs,
            remote: &rem,
            route: &choice.route,
            notif: opts.notif.as_deref(),
            resolved: resolved
                .as_ref()
                .and_then(|r| r.as_ref().ok())
                .map(Vec::as_slice),
        };
        let prepared = self
            .inner
            .backends
            .prepare(choice.transport, &x, loaded.slots())
            .map_err(|e| match choice.transport {
                // UCX is the last resort of the automatic choice: that the agents cannot connect over it is one
                // more reason, not the error.
                TransportKind::Ucx => choice.fell_through("ucx: not available to both agents", e),
                _ => e,
            })?;
        // Copies to another process notify (and detect peer death) over the peer connection; TCP needs it.
        let me = self.inner.identity();
        let conn = match choice.conn(in_process.is_some()) {
            Conn::None => None,
            Conn::Required => Some(rem.conn(me, &self.inner.notifications)?),
            Conn::Optional => rem.conn(me, &self.inner.notifications).ok(),
        };
        Ok(XferRequest::new(Parts {
            op,
            transport: choice.transport,
            total_bytes: pairs.iter().map(|p| p.1.len).sum(),
            prepared,
            backends: self.inner.backends.clone(),
            remote: rem,
            conn,
            notif: opts.notif,
        }))
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
        let remote = self.inner.remote(agent)?.agent.clone();
        remote.check_alive()?;
        let backends = &self.inner.backends;
        let me = &self.inner.name;
        if let Locality::SameProcess(peer) = &remote.locality {
            if peer.strong_count() > 0 {
                return backends.local.notify(me, &remote, None, payload);
            }
        }
        let conn = remote.conn(self.inner.identity(), &self.inner.notifications)?;
        backends.tcp.notify(me, &remote, Some(&conn), payload)
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
            remote.1.agent.shutdown();
        }
        // Closes idle connections and the listeners; handlers serving a connection notice within a tick.
        inner.server.shutdown();
    }
}
