//! The agent: registrations, remote agents, transport choice, transfer requests and notifications.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use pdx_sys::Memory;

use crate::desc::XferDescList;
use crate::error::{Result, TransferError};
use crate::gpu::{self, GpuPeer, PeerMemory};
use crate::memory::{Backing, MemoryKind, Region, RegisteredMemory, Registry};
use crate::metadata::{AgentMetadata, CudaMetadata, RegionMetadata, MAX_NAME_BYTES};
use crate::request::{Completion, XferCompletion, XferOp, XferStatus};
use crate::tcp::{self, Notification, NotificationQueue, PeerConn};
use crate::transport::{CopySeg, LocalSeg, Plan, TransportKind};
use crate::wire::{Ctrl, FrameKind};

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
    pub notifications: Arc<NotificationQueue>,
    listen_addr: Option<SocketAddr>,
    advertised: Option<String>,
    shutdown: AtomicBool,
    server_conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn_id: AtomicU64,
    #[cfg(feature = "ucx")]
    ucx: Option<Arc<crate::ucx::UcxAgent>>,
}

impl Inner {
    pub fn is_shut_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    pub fn track_server_conn(&self, stream: &TcpStream) -> u64 {
        let id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            self.server_conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, clone);
        }
        id
    }

    pub fn untrack_server_conn(&self, id: u64) {
        self.server_conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    pub fn local_metadata(&self) -> Result<Vec<u8>> {
        let live = self.registry.snapshot();
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
            return md.encode_ext(Some(&u.metadata(&live)), cuda.as_ref());
        }
        drop(live);
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

/// Where a remote agent is relative to this one.
enum Locality {
    SameProcess(Weak<Inner>),
    SameHost,
    OtherHost,
}

/// A remote agent loaded from its metadata.
pub(crate) struct RemoteAgent {
    md: AgentMetadata,
    locality: Locality,
    /// Same-host memfd regions mapped into this process, by metadata region index.
    mapped: Vec<Option<Arc<Region>>>,
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
    fn same_host(&self) -> bool {
        !matches!(self.locality, Locality::OtherHost)
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

    fn check_alive(&self) -> Result<()> {
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
        let (listener, listen_addr) = match config.listen {
            Some(addr) => {
                let (l, a) = tcp::bind(addr)?;
                (Some(l), Some(a))
            }
            None => (None, None),
        };
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
            instance_id: random_u64(),
            config,
            host_id: pdx_sys::host_id(),
            pid: std::process::id(),
            registry: Arc::new(Registry::default()),
            next_region_id: AtomicU64::new(1),
            remotes: RwLock::new(HashMap::new()),
            notifications,
            listen_addr,
            advertised,
            shutdown: AtomicBool::new(false),
            server_conns: Mutex::new(HashMap::new()),
            next_conn_id: AtomicU64::new(1),
            #[cfg(feature = "ucx")]
            ucx,
        });
        process_agents()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(inner.instance_id, Arc::downgrade(&inner));
        if let Some(listener) = listener {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name(format!("pdx-accept-{}", inner.name))
                .spawn(move || tcp::accept_loop(listener, weak))
                .map_err(|source| TransferError::Io {
                    op: "spawning accept thread",
                    source,
                })?;
        }
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

    /// Registers a device buffer (e.g. an engine's KV cache allocated through `pdx-cuda`) as
    /// [`MemoryKind::Device`] of its GPU. The region keeps the buffer alive.
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

    /// Loads a peer's metadata and returns the peer's name. Same-host memfd regions are mapped now, once.
    ///
    /// Loading the same peer instance again is safe while transfers run: identical metadata is a no-op, and
    /// newer metadata of the same instance (more registrations) keeps the existing connection. Metadata of a
    /// new instance under the same name (a restarted peer) replaces the old entry, whose transfers then fail.
    ///
    /// Errors: [`TransferError::BadMetadata`] for malformed bytes; loading one's own metadata is refused.
    pub fn load_remote(&self, bytes: &[u8]) -> Result<String> {
        let (md, ext) = AgentMetadata::decode_ext(bytes)?;
        #[cfg_attr(not(feature = "ucx"), allow(unused_variables))]
        let (ucx_md, cuda_md) = (ext.ucx, ext.cuda);
        if md.instance_id == self.inner.instance_id {
            return Err(TransferError::BadMetadata(
                "an agent cannot load its own metadata".into(),
            ));
        }
        if let Ok(known) = self.inner.remote(&md.name) {
            #[cfg(feature = "ucx")]
            let same_ucx = known.ucx_md == ucx_md;
            #[cfg(not(feature = "ucx"))]
            let same_ucx = true;
            if known.md == md
                && same_ucx
                && known.cuda_md == cuda_md
                && !known.invalidated.load(Ordering::Acquire)
            {
                return Ok(md.name);
            }
        }
        let locality = if md.host_id != self.inner.host_id {
            Locality::OtherHost
        } else if md.pid == self.inner.pid {
            match process_agents()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&md.instance_id)
            {
                Some(w) => Locality::SameProcess(w.clone()),
                None => Locality::SameHost,
            }
        } else {
            Locality::SameHost
        };
        let mapped = md
            .regions
            .iter()
            .map(|r| match (r.memfd, &locality) {
                (Some(fd), Locality::SameHost | Locality::SameProcess(_)) => {
                    Memory::map_peer_memfd(md.pid, fd, r.len as usize, self.inner.config.populate)
                        .inspect_err(|e| tracing::debug!(peer = %md.name, error = %e, "cannot map peer memfd"))
                        .ok()
                        .map(|mem| {
                            Arc::new(Region {
                                id: r.id,
                                kind: r.kind,
                                backing: Backing::Host(mem),
                            })
                        })
                }
                _ => None,
            })
            .collect();
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
        let keep_old = same_instance.is_some();
        let remote = Arc::new(RemoteAgent {
            md,
            locality,
            mapped,
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

    /// Fetches a peer's metadata from its listener (`host:port`) and loads it; returns the peer's name.
    /// Errors: as [`tcp::fetch_metadata`] and [`Agent::load_remote`].
    pub fn fetch_remote(&self, addr: &str) -> Result<String> {
        let bytes = tcp::fetch_metadata(addr, self.inner.config.peer_timeout)?;
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
        let mut why_not = Vec::new();
        let (transport, plan) = 'plan: {
            // GPU memory moves only over `cuda`, or staged over `tcp` (host transports would dereference
            // device addresses).
            if pairs
                .iter()
                .any(|(l, r)| gpu::needs_gpu(l, rem.md.regions[r.region].kind))
            {
                // Another host (or `tcp` forced): staged through pinned memory over tcp.
                let staged = opts.transport == Some(TransportKind::Tcp)
                    || (matches!(rem.locality, Locality::OtherHost)
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
                        None => why_not.push("local: peer agent dropped"),
                    },
                    _ => why_not.push("local: peer is in another process"),
                }
            }
            if allowed(TransportKind::Shm) {
                let mapped: Option<Vec<CopySeg>> = pairs
                    .iter()
                    .map(|(l, r)| {
                        let region = rem.mapped.get(r.region)?.clone()?;
                        Some(CopySeg {
                            local: l.clone(),
                            remote: region,
                            remote_off: r.off as usize,
                        })
                    })
                    .collect();
                match mapped {
                    Some(segs) if rem.same_host() => {
                        break 'plan (TransportKind::Shm, Plan::Copy(segs))
                    }
                    _ => why_not.push("shm: remote memory is not a mapped same-host memfd"),
                }
            }
            if allowed(TransportKind::Cma) {
                if rem.same_host() {
                    break 'plan (
                        TransportKind::Cma,
                        Plan::Cma {
                            pid: rem.md.pid,
                            local: pairs.iter().map(|p| p.0.clone()).collect(),
                            remote: pairs.iter().map(|p| (p.1.addr, p.1.len as usize)).collect(),
                        },
                    );
                }
                why_not.push("cma: peer is on another host");
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
                why_not.push("tcp: peer runs no listener");
            }
            #[cfg(feature = "ucx")]
            if allowed(TransportKind::Ucx) {
                match self.ucx_plan(&rem, &pairs) {
                    Ok(plan) => break 'plan (TransportKind::Ucx, plan),
                    Err(e) if opts.transport == Some(TransportKind::Ucx) => return Err(e),
                    Err(_) => why_not.push("ucx: not available to both agents"),
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
            Locality::SameHost => PeerMemory::SameHost {
                md: &rem.md,
                cuda: rem.cuda_md.as_ref(),
                peer: &rem.gpu_peer,
                segs: pairs
                    .iter()
                    .map(|(_, r)| (r.region, r.off as usize))
                    .collect(),
                populate: self.inner.config.populate,
            },
            Locality::OtherHost => {
                return Err(gpu::unavailable(format!(
                    "agent `{}` is on another host: GPU memory across hosts moves only over the staged \
                     path (device -> pinned -> tcp); allow the `tcp` transport instead of forcing `cuda`",
                    rem.md.name
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
        for (_, s) in inner
            .server_conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        // Wake the accept loop so it sees the shutdown flag.
        if let Some(addr) = inner.listen_addr {
            let wake = if addr.ip().is_unspecified() {
                SocketAddr::from(([127, 0, 0, 1], addr.port()))
            } else {
                addr
            };
            let _ = TcpStream::connect_timeout(&wake, Duration::from_millis(200));
        }
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

/// Runs the memcpy of a `local`/`shm` plan, split by bytes across `threads` (the caller's thread included), with
/// streaming stores when `streaming`.
fn copy_segments(
    op: XferOp,
    segs: &[CopySeg],
    total: u64,
    threads: usize,
    streaming: bool,
) -> Result<()> {
    // Plans of host transports only ever hold host memory (checked when they are made).
    for s in segs {
        s.local.region.host_mem()?;
        s.remote.host_mem()?;
    }
    let copy_fn = if streaming {
        pdx_sys::copy_streaming
    } else {
        pdx_sys::copy
    };
    let copy = |s: &CopySeg, at: usize, len: usize| {
        let (Some(l), Some(r)) = (s.local.region.host(), s.remote.host()) else {
            return Err(pdx_sys::SysError::InvalidLength(len as u64));
        };
        match op {
            XferOp::Read => copy_fn(r, s.remote_off + at, l, s.local.off + at, len),
            XferOp::Write => copy_fn(l, s.local.off + at, r, s.remote_off + at, len),
        }
    };
    if threads <= 1 {
        for s in segs {
            copy(s, 0, s.local.len)?;
        }
        return Ok(());
    }
    // Cut the segments into `threads` shares of about equal bytes: (segment, offset in it, length).
    let share = total.div_ceil(threads as u64) as usize;
    let mut shares: Vec<Vec<(&CopySeg, usize, usize)>> = vec![Vec::new(); threads];
    let (mut t, mut filled) = (0, 0);
    for s in segs {
        let mut at = 0;
        while at < s.local.len {
            // The last share takes whatever is left, so the loop always advances.
            let room = if t + 1 == threads {
                usize::MAX
            } else {
                share - filled
            };
            let n = (s.local.len - at).min(room);
            shares[t].push((s, at, n));
            at += n;
            filled += n;
            if filled == share && t + 1 < threads {
                t += 1;
                filled = 0;
            }
        }
    }
    let run = |pieces: &[(&CopySeg, usize, usize)]| -> pdx_sys::Result<()> {
        pieces.iter().try_for_each(|&(s, at, n)| copy(s, at, n))
    };
    let Some((mine, others)) = shares.split_first() else {
        return Ok(());
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = others
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| scope.spawn(move || run(p)))
            .collect();
        let first = run(mine);
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(pdx_sys::SysError::Io {
                        op: "parallel copy",
                        source: std::io::Error::other("copy thread panicked"),
                    })
                })
            })
            .fold(first, |acc, r| acc.and(r))
    })?;
    Ok(())
}

/// A READ or WRITE between local and remote descriptors, with an optional notification (NIXL
/// `nixlXferReqH`). Post it with [`XferRequest::post`]; follow it with [`XferRequest::status`] (polling),
/// [`XferRequest::wait`] (blocking) or [`XferRequest::completion`] (async).
///
/// `local` and `shm` copies and `cma` calls run inside `post` on the caller's thread and are done when it
/// returns; `tcp` requests complete on the connection's thread. Dropping (or [`XferRequest::release`]) an
/// in-flight request lets it finish in the background: the memory it uses stays alive until then.
pub struct XferRequest {
    op: XferOp,
    plan: Plan,
    transport: TransportKind,
    total_bytes: u64,
    remote: Arc<RemoteAgent>,
    conn: Option<Arc<PeerConn>>,
    notif: Option<Vec<u8>>,
    tcp_ctrl: Option<Arc<[u8]>>,
    completion: Arc<Completion>,
    me: Weak<Inner>,
}

impl XferRequest {
    /// The transport chosen for this request.
    pub fn transport(&self) -> TransportKind {
        self.transport
    }

    /// Bytes moved by one post.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The direction.
    pub fn op(&self) -> XferOp {
        self.op
    }

    /// Starts (or restarts) the transfer. Returns [`XferStatus::Done`] when it completed inside the call and
    /// [`XferStatus::InProgress`] otherwise.
    ///
    /// Errors: [`TransferError::InProgress`] when the previous post has not completed; the transfer's own error
    /// when it fails inside the call (peer gone, invalidated, memory no longer mapped on the peer).
    pub fn post(&self) -> Result<XferStatus> {
        self.completion.begin()?;
        if let Plan::Staged(plan) = &self.plan {
            let result = self.run_staged(plan);
            let ret = match &result {
                Ok(()) => Ok(XferStatus::Done),
                Err(e) => Err(e.duplicate()),
            };
            self.completion.finish(result);
            return ret;
        }
        if let Plan::Tcp { local, .. } = &self.plan {
            let kind = match self.op {
                XferOp::Read => FrameKind::ReadRequest,
                XferOp::Write => FrameKind::WriteRequest,
            };
            let (Some(conn), Some(ctrl)) = (&self.conn, &self.tcp_ctrl) else {
                let e = TransferError::Invalid("tcp request without a connection".into());
                self.completion.finish(Err(e.duplicate()));
                return Err(e);
            };
            let submitted = self.remote.check_alive().and_then(|()| {
                conn.submit(kind, ctrl.clone(), local.clone(), self.completion.clone())
            });
            return match submitted {
                Ok(()) => Ok(XferStatus::InProgress),
                Err(e) => {
                    self.completion.finish(Err(e.duplicate()));
                    Err(e)
                }
            };
        }
        #[cfg(feature = "ucx")]
        if let Plan::Ucx { peer, ops } = &self.plan {
            let posted = self.remote.check_alive().and_then(|()| {
                let me = self.me.upgrade().ok_or(TransferError::Shutdown)?;
                let ucx = me.ucx.as_ref().ok_or(TransferError::Shutdown)?;
                if self.conn.as_ref().is_some_and(|c| c.is_closed()) {
                    return Err(TransferError::PeerDisconnected {
                        peer: self.remote.md.name.clone(),
                        reason: "connection to the peer was lost".into(),
                    });
                }
                ucx.post(
                    &me.name,
                    &self.remote.md.name,
                    peer,
                    self.op,
                    ops,
                    self.notif.clone(),
                    self.conn.clone(),
                    self.completion.clone(),
                )
            });
            return match posted {
                Ok(()) => Ok(XferStatus::InProgress),
                Err(e) => {
                    self.completion.finish(Err(e.duplicate()));
                    Err(e)
                }
            };
        }
        let result = self.run_inline();
        let ret = match &result {
            Ok(()) => Ok(XferStatus::Done),
            Err(e) => Err(e.duplicate()),
        };
        self.completion.finish(result);
        ret
    }

    /// The staged path, inside `post`: GPU → staging then `tcp` (WRITE), or `tcp` into staging then staging →
    /// GPU (READ). The notification rides on the `tcp` request.
    fn run_staged(&self, plan: &gpu::StagedPlan) -> Result<()> {
        self.remote.check_alive()?;
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| TransferError::Invalid("staged request without a connection".into()))?;
        let tcp = |kind| -> Result<()> {
            let done = Completion::new();
            done.begin()?;
            conn.submit(
                kind,
                plan.ctrl.clone(),
                plan.tcp_local.clone(),
                done.clone(),
            )?;
            done.wait(None)
        };
        // The GPU copies pair each local segment with its staging range, so the request's own direction applies:
        // WRITE copies local GPU memory → staging, READ copies staging → local GPU memory.
        match self.op {
            XferOp::Write => {
                gpu::run(XferOp::Write, &plan.gpu)?;
                tcp(FrameKind::WriteRequest)
            }
            XferOp::Read => {
                tcp(FrameKind::ReadRequest)?;
                gpu::run(XferOp::Read, &plan.gpu)
            }
        }
    }

    fn run_inline(&self) -> Result<()> {
        self.remote.check_alive()?;
        if let Some(c) = &self.conn {
            if c.is_closed() {
                return Err(TransferError::PeerDisconnected {
                    peer: self.remote.md.name.clone(),
                    reason: "connection to the peer was lost".into(),
                });
            }
        }
        match &self.plan {
            Plan::Copy(segs) => {
                let (threads, streaming) = self.me.upgrade().map_or((1, false), |me| {
                    let threads = if self.total_bytes >= me.config.parallel_copy_min_bytes {
                        me.config.copy_threads.max(1)
                    } else {
                        1
                    };
                    (
                        threads,
                        self.total_bytes >= me.config.streaming_copy_min_bytes,
                    )
                });
                copy_segments(self.op, segs, self.total_bytes, threads, streaming)?;
            }
            Plan::Cma { pid, local, remote } => {
                let slices = local
                    .iter()
                    .map(|s| Ok(s.region.host_mem()?.slice(s.off, s.len)?))
                    .collect::<Result<Vec<_>>>()?;
                let moved = match self.op {
                    XferOp::Read => pdx_sys::cma_read(*pid, &slices, remote),
                    XferOp::Write => pdx_sys::cma_write(*pid, &slices, remote),
                };
                moved.map_err(|e| {
                    if e.is_process_gone() {
                        TransferError::PeerDisconnected {
                            peer: self.remote.md.name.clone(),
                            reason: "process is gone".into(),
                        }
                    } else {
                        TransferError::Sys(e)
                    }
                })?;
            }
            Plan::Cuda(plan) => gpu::run(self.op, plan)?,
            Plan::Staged(_) => {
                return Err(TransferError::Invalid("staged requests run in post".into()))
            }
            Plan::Tcp { .. } => {
                return Err(TransferError::Invalid(
                    "tcp requests are posted to their connection".into(),
                ))
            }
            #[cfg(feature = "ucx")]
            Plan::Ucx { .. } => {
                return Err(TransferError::Invalid(
                    "ucx requests are posted to their endpoint".into(),
                ))
            }
        }
        if let Some(payload) = &self.notif {
            self.send_notif(payload.clone())?;
        }
        Ok(())
    }

    fn send_notif(&self, payload: Vec<u8>) -> Result<()> {
        if let Locality::SameProcess(peer) = &self.remote.locality {
            let (Some(peer), Some(me)) = (peer.upgrade(), self.me.upgrade()) else {
                return Err(TransferError::Shutdown);
            };
            peer.notifications.push(Notification {
                from: me.name.clone(),
                payload,
            });
            return Ok(());
        }
        match &self.conn {
            Some(c) => c.notify(payload),
            None => Err(TransferError::TransportUnavailable {
                transport: "tcp",
                reason: "a notification needs the peer's listener".into(),
            }),
        }
    }

    /// The state of the last post. Errors: the failure of the last post, if it failed.
    pub fn status(&self) -> Result<XferStatus> {
        #[cfg(feature = "ucx")]
        if let Some(ucx) = self.ucx_driver() {
            ucx.progress_once();
        }
        self.completion.status()
    }

    /// Blocks until the current post completes, or `timeout` passes ([`TransferError::InProgress`]). `ucx`
    /// requests are progressed on the calling thread meanwhile.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<()> {
        #[cfg(feature = "ucx")]
        if let Some(ucx) = self.ucx_driver() {
            return ucx.wait(&self.completion, timeout);
        }
        self.completion.wait(timeout)
    }

    /// This agent's UCX side when this request is a posted, unfinished `ucx` request.
    #[cfg(feature = "ucx")]
    fn ucx_driver(&self) -> Option<Arc<crate::ucx::UcxAgent>> {
        if !matches!(self.plan, Plan::Ucx { .. })
            || self.completion.status().ok() != Some(XferStatus::InProgress)
        {
            return None;
        }
        self.me.upgrade()?.ucx.clone()
    }

    /// A future resolving when the current post completes; works under any async runtime.
    pub fn completion(&self) -> XferCompletion {
        XferCompletion {
            completion: self.completion.clone(),
        }
    }

    /// Releases the request (NIXL `releaseXferReq`). An in-flight transfer finishes in the background.
    pub fn release(self) {}
}
