//! The `ucx` transport (cargo feature `ucx`): RMA put/get over UCX, through the safe wrapper of `pdx-ucx-sys`.
//!
//! - Each agent whose `AgentConfig::transports` lists `ucx` owns a UCP context and one worker, whose address
//!   travels in its metadata; every region it registers is `ucp_mem_map`ped and its packed rkey travels too.
//! - A request is a batch of `ucp_put_nbx` / `ucp_get_nbx` followed by `ucp_ep_flush_nbx`; the flush's
//!   completion finishes the request. A notification is then sent as a UCX active message (id
//!   [`NOTIF_AM_ID`], header = sender name, data = payload), so the peer sees it only after the data.
//! - Progress is caller-driven where there is a caller: [`UcxAgent::wait_driving`] (behind `XferRequest::wait`) and
//!   [`UcxAgent::progress_once`] (behind `XferRequest::status`) progress the worker themselves, as NIXL's
//!   status checks do, and the progress thread then stays out of the way (it sleeps, so a 2-core host does
//!   not run two spinning threads per process). Otherwise a dedicated progress thread per agent drives the
//!   worker: it spins while requests are outstanding and for a few milliseconds after any event (a target
//!   serves emulated RMA from its progress), and otherwise blocks on the worker's event fd
//!   (`ucp_worker_arm` + poll).
//! - Peer death: endpoints use UCX's peer error handling, and requests are also failed when the pdx TCP
//!   connection to the peer (opened at request creation when the peer listens) is lost.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use pdx_sys::Memory;
use pdx_ucx_sys::{
    Context, Endpoint, HostMemory, MemHandle, RemoteKey, Rma, RmaOp, UcxError, Worker,
};

use crate::backend::{Backend, Post, Prepare};
use crate::conn::PeerConn;
use crate::error::{Result, TransferError};
use crate::memory::Region;
use crate::metadata::UcxMetadata;
use crate::notif::{Notification, NotificationQueue};
use crate::plan::{self, Route};
use crate::request::{Completion, XferOp, XferStatus};
use crate::transport::LocalSeg;

/// How long the progress thread keeps spinning after the last event before it sleeps on the event fd.
const SPIN_AFTER_EVENT: Duration = Duration::from_millis(5);

/// How long the progress thread sleeps between looks while a caller drives the worker (it then only watches
/// peers and takes over when the caller stops).
const DRIVEN_SLEEP: Duration = Duration::from_millis(1);

/// Active-message id of transfer notifications.
pub const NOTIF_AM_ID: u16 = 0x5044; // "PD"

impl HostMemory for Region {
    fn memory(&self) -> &Memory {
        // Device regions are never mapped for UCX nor planned over it (`register`, `Agent::create_xfer`
        // sends GPU memory to `cuda` first), so every region that gets here has a host view.
        self.host()
            .unwrap_or_else(|| unreachable!("GPU region {} reached UCX", self.id))
    }
}

/// Maps a UCX error to the engine's error: peer failures are `PeerDisconnected` (retryable), the rest
/// `TransportUnavailable`.
pub(crate) fn map_err(peer: &str, e: UcxError) -> TransferError {
    match e {
        UcxError::Invalid(m) => TransferError::Invalid(m),
        e if e.is_peer_failure() => TransferError::PeerDisconnected {
            peer: peer.to_string(),
            reason: e.to_string(),
        },
        e => TransferError::TransportUnavailable {
            transport: "ucx",
            reason: e.to_string(),
        },
    }
}

/// One posted request that has not completed yet.
struct Inflight {
    once: Arc<AtomicBool>,
    completion: Arc<Completion>,
    conn: Option<Arc<PeerConn>>,
    peer: String,
}

/// A notification to send once its request's data is in place.
struct Deferred {
    ep: Endpoint,
    from: String,
    payload: Vec<u8>,
    once: Arc<AtomicBool>,
    completion: Arc<Completion>,
    peer: String,
}

/// Counts a thread in [`Shared::drivers`] while it lives.
struct Driving<'a>(&'a AtomicUsize);

impl<'a> Driving<'a> {
    fn new(drivers: &'a AtomicUsize) -> Self {
        drivers.fetch_add(1, Ordering::AcqRel);
        Driving(drivers)
    }
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Shared {
    worker: Worker,
    outstanding: AtomicUsize,
    /// Callers posting to or progressing the worker ([`UcxAgent::post_batch`], [`UcxAgent::wait_driving`]); while any does, the
    /// progress thread sleeps.
    drivers: AtomicUsize,
    /// True while the progress thread blocks on the event fd: only then does a post need to wake it.
    asleep: AtomicBool,
    inflight: Mutex<Vec<Inflight>>,
    deferred: Mutex<VecDeque<Deferred>>,
    stop: AtomicBool,
}

impl Shared {
    fn complete(&self, once: &AtomicBool, completion: &Completion, r: Result<()>) {
        if !once.swap(true, Ordering::AcqRel) {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            completion.finish(r);
        }
    }

    fn progress_loop(self: Arc<Self>) {
        let fd = match self.worker.event_fd() {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(error = %e, "UCX worker has no event fd; polling");
                None
            }
        };
        let mut last_check = Instant::now();
        let mut last_event = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            if self.drivers.load(Ordering::Acquire) > 0 {
                // A caller is driving the worker: stay off the CPU and the worker lock, but keep watching peers.
                if last_check.elapsed() >= Duration::from_millis(20) {
                    last_check = Instant::now();
                    self.check_peers();
                }
                std::thread::sleep(DRIVEN_SLEEP);
                last_event = Instant::now();
                continue;
            }
            match self.worker.progress() {
                Ok(0) => {}
                Ok(_) => last_event = Instant::now(),
                Err(e) => tracing::warn!(error = %e, "UCX progress failed"),
            }
            self.send_deferred();
            if last_check.elapsed() >= Duration::from_millis(20) {
                last_check = Instant::now();
                self.check_peers();
            }
            // Spin while requests are outstanding, and briefly after any event: a target serves emulated RMA (UCX
            // over shared memory or TCP) from its progress, and sleeping between messages of a batch would stall it.
            if self.outstanding.load(Ordering::Acquire) > 0
                || last_event.elapsed() < SPIN_AFTER_EVENT
            {
                std::thread::yield_now();
                continue;
            }
            match (fd, self.worker.arm()) {
                (Some(fd), Ok(true)) => {
                    // SeqCst pairs with `post`: it counts the request, then reads `asleep`; this thread sets `asleep`,
                    // then reads the count. One of the two sees the other, so a request is never left unsignalled.
                    self.asleep.store(true, Ordering::SeqCst);
                    if self.outstanding.load(Ordering::SeqCst) == 0
                        && self.drivers.load(Ordering::SeqCst) == 0
                    {
                        self.worker.wait_event(fd, Duration::from_millis(100));
                    }
                    self.asleep.store(false, Ordering::SeqCst);
                }
                (_, Ok(false)) => {}
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        // Fail whatever is left: the agent is gone.
        let left = std::mem::take(&mut *self.inflight.lock().unwrap_or_else(|e| e.into_inner()));
        for f in left {
            self.complete(&f.once, &f.completion, Err(TransferError::Shutdown));
        }
    }

    fn send_deferred(self: &Arc<Self>) {
        loop {
            let Some(d) = self
                .deferred
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front()
            else {
                return;
            };
            let me = self.clone();
            let (once, completion, peer) = (d.once.clone(), d.completion.clone(), d.peer.clone());
            let sent = d.ep.am_send(
                NOTIF_AM_ID,
                d.from.into_bytes(),
                d.payload,
                Box::new(move |r| {
                    me.complete(&once, &completion, r.map_err(|e| map_err(&peer, e)))
                }),
            );
            if let Err(e) = sent {
                self.complete(&d.once, &d.completion, Err(map_err(&d.peer, e)));
            }
        }
    }

    fn check_peers(&self) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        inflight.retain(|f| {
            if f.once.load(Ordering::Acquire) {
                return false;
            }
            if f.conn.as_ref().is_some_and(|c| c.is_closed()) {
                self.complete(
                    &f.once,
                    &f.completion,
                    Err(TransferError::PeerDisconnected {
                        peer: f.peer.clone(),
                        reason: "connection to the peer was lost".into(),
                    }),
                );
                return false;
            }
            true
        });
    }
}

/// The UCX side of one agent: context, worker, progress thread and memory registrations.
pub(crate) struct UcxAgent {
    /// The agent's name (the sender of its notifications).
    name: String,
    ctx: Context,
    shared: Arc<Shared>,
    address: Vec<u8>,
    memh: Mutex<HashMap<u64, Arc<MemHandle>>>,
    /// Allocations made by [`UcxAgent::allocate`] and not registered yet, by address: their registration reuses
    /// the allocation's handle.
    allocated: Mutex<HashMap<u64, Weak<MemHandle>>>,
}

impl UcxAgent {
    /// Creates the context and worker, installs the notification handler and starts the progress thread.
    pub fn new(name: &str, notifications: Arc<NotificationQueue>) -> Result<Arc<UcxAgent>> {
        let unavailable = |e: UcxError| TransferError::TransportUnavailable {
            transport: "ucx",
            reason: e.to_string(),
        };
        let ctx = Context::new().map_err(unavailable)?;
        let worker = Worker::new(&ctx).map_err(unavailable)?;
        worker
            .set_am_handler(
                NOTIF_AM_ID,
                Box::new(move |from, payload| {
                    notifications.push(Notification {
                        from: String::from_utf8_lossy(from).into_owned(),
                        payload: payload.to_vec(),
                    })
                }),
            )
            .map_err(unavailable)?;
        let address = worker.address().map_err(unavailable)?;
        let shared = Arc::new(Shared {
            worker,
            outstanding: AtomicUsize::new(0),
            drivers: AtomicUsize::new(0),
            asleep: AtomicBool::new(false),
            inflight: Mutex::new(Vec::new()),
            deferred: Mutex::new(VecDeque::new()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name(format!("pdx-ucx-{name}"))
            .spawn(move || s.progress_loop())
            .map_err(|source| TransferError::Io {
                op: "spawning UCX progress thread",
                source,
            })?;
        Ok(Arc::new(UcxAgent {
            name: name.to_string(),
            ctx,
            shared,
            address,
            memh: Mutex::new(HashMap::new()),
            allocated: Mutex::new(HashMap::new()),
        }))
    }

    /// `ucp_mem_map`s a newly registered region; on failure the region is simply not reachable over UCX.
    pub fn register(&self, region: &Arc<Region>, live: &[Arc<Region>]) {
        let mut memh = self.memh.lock().unwrap_or_else(|e| e.into_inner());
        // Unmap regions deregistered since.
        memh.retain(|id, _| live.iter().any(|r| r.id == *id));
        let allocated = self
            .allocated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&region.addr())
            .and_then(|h| h.upgrade());
        if let Some(h) = allocated {
            memh.insert(region.id, h);
            return;
        }
        let Some(mem) = region.host() else {
            return; // GPU memory: reached over `cuda`, not UCX
        };
        match self.ctx.mem_map(mem) {
            Ok(h) => {
                memh.insert(region.id, Arc::new(h));
            }
            Err(e) => tracing::warn!(region = region.id, error = %e, "ucp_mem_map failed"),
        }
    }

    /// Allocates host memory through UCX ([`Context::allocate`]); registering it (next) reuses that mapping.
    pub fn allocate(&self, len: usize) -> Result<Memory> {
        let (mem, handle) = self.ctx.allocate(len).map_err(|e| map_err("local", e))?;
        let mut allocated = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        allocated.retain(|_, h| h.strong_count() > 0);
        allocated.insert(mem.addr(), Arc::downgrade(&handle));
        Ok(mem)
    }

    /// The worker address and the packed rkeys of the live regions, for the agent's metadata.
    pub fn metadata(&self, live: &[Arc<Region>]) -> UcxMetadata {
        let mut memh = self.memh.lock().unwrap_or_else(|e| e.into_inner());
        memh.retain(|id, _| live.iter().any(|r| r.id == *id));
        let mut rkeys: Vec<(u64, Vec<u8>)> = memh
            .iter()
            .map(|(id, h)| (*id, h.rkey().to_vec()))
            .collect();
        rkeys.sort_by_key(|r| r.0);
        UcxMetadata {
            worker_address: self.address.clone(),
            rkeys,
        }
    }

    /// Connects to a peer and unpacks its keys, by the peer metadata's region index.
    pub fn connect(
        &self,
        peer: &str,
        md: &UcxMetadata,
        region_ids: &[u64],
    ) -> Result<Arc<UcxPeer>> {
        let ep = self
            .shared
            .worker
            .connect(&md.worker_address)
            .map_err(|e| map_err(peer, e))?;
        let rkeys = region_ids
            .iter()
            .map(|id| {
                md.rkeys
                    .iter()
                    .find(|(rid, _)| rid == id)
                    .and_then(|(_, packed)| ep.unpack_rkey(packed).ok())
            })
            .collect();
        Ok(Arc::new(UcxPeer {
            ep,
            rkeys,
            checked_mapping: AtomicBool::new(false),
        }))
    }

    /// Posts one request: the RMA batch, then (from the progress thread) the notification.
    #[allow(clippy::too_many_arguments)]
    pub fn post_batch(
        &self,
        me: &str,
        peer_name: &str,
        peer: &Arc<UcxPeer>,
        op: XferOp,
        ops: &[(LocalSeg, u64, usize)],
        notif: Option<Vec<u8>>,
        conn: Option<Arc<PeerConn>>,
        completion: Arc<Completion>,
    ) -> Result<()> {
        if let Some(e) = peer.ep.failure() {
            return Err(map_err(peer_name, e));
        }
        // A posting thread uses the worker itself: the progress thread stays off the worker lock meanwhile
        // (over shared memory the whole transfer runs inside this post, and contending for the lock made small
        // batches measurably slower).
        let _driving = Driving::new(&self.shared.drivers);
        // The distinct local regions (usually one), which the operations borrow (the endpoint keeps them alive
        // until the flush): per-block reference counting would cost more than the post itself for 64 KiB
        // blocks over shared memory.
        let mut locals: Vec<Arc<dyn HostMemory>> = Vec::new();
        let mut local_index = Vec::with_capacity(ops.len());
        for (l, _, _) in ops {
            let same =
                |r: &Arc<dyn HostMemory>| std::ptr::addr_eq(Arc::as_ptr(r), Arc::as_ptr(&l.region));
            let i = match locals.iter().position(same) {
                Some(i) => i,
                None => {
                    locals.push(l.region.clone() as Arc<dyn HostMemory>);
                    locals.len() - 1
                }
            };
            local_index.push(i);
        }
        let rma: Vec<RmaOp<'_>> = ops
            .iter()
            .zip(&local_index)
            .map(|((l, raddr, region), &i)| {
                let local = &locals[i];
                let rkey: &RemoteKey = peer
                    .rkeys
                    .get(*region)
                    .and_then(Option::as_ref)
                    .ok_or_else(|| TransferError::TransportUnavailable {
                        transport: "ucx",
                        reason: format!(
                            "peer `{peer_name}` published no UCX key for region {region}"
                        ),
                    })?;
                Ok(RmaOp {
                    local,
                    local_off: l.off,
                    len: l.len,
                    remote_addr: *raddr,
                    rkey,
                })
            })
            .collect::<Result<_>>()?;
        // A load first: after the first post this is a read of a shared line, not a write on every post.
        if !peer.checked_mapping.load(Ordering::Relaxed)
            && !peer.checked_mapping.swap(true, Ordering::Relaxed)
        {
            // Once per peer: say so when UCX cannot map the peer's memory (UCX 1.13 then emulates put/get over
            // shared memory and TCP; docs/benchmarks.md, "UCX over foreign memory").
            if let Some(op) = rma.first().filter(|op| !op.rkey.maps(op.remote_addr)) {
                tracing::info!(
                    peer = peer_name,
                    remote_addr = op.remote_addr,
                    "UCX cannot map this peer's memory (not allocated by UCX): over UCX 1.13 shared memory or TCP its put/get \
                     are emulated with active messages, two copies and the peer's progress (docs/benchmarks.md, 'UCX \
                     over foreign memory'); same-host caller memory can go over cma (the automatic choice), memory \
                     the peer allocates with Agent::allocate_ucx gets direct RMA"
                );
            }
        }
        let once = Arc::new(AtomicBool::new(false));
        self.shared.outstanding.fetch_add(1, Ordering::SeqCst);
        self.shared
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Inflight {
                once: once.clone(),
                completion: completion.clone(),
                conn,
                peer: peer_name.to_string(),
            });
        let shared: Weak<Shared> = Arc::downgrade(&self.shared);
        let (ep, from, peer_s) = (peer.ep.clone(), me.to_string(), peer_name.to_string());
        let (once2, completion2) = (once.clone(), completion.clone());
        let done = Box::new(move |r: pdx_ucx_sys::Result<()>| {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            match (r, notif) {
                (Ok(()), Some(payload)) => shared
                    .deferred
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_back(Deferred {
                        ep,
                        from,
                        payload,
                        once: once2,
                        completion: completion2,
                        peer: peer_s,
                    }),
                (r, _) => shared.complete(&once2, &completion2, r.map_err(|e| map_err(&peer_s, e))),
            }
        });
        let kind = match op {
            XferOp::Read => Rma::Get,
            XferOp::Write => Rma::Put,
        };
        let posted = peer.ep.rma_batch(kind, &rma, done);
        if let Err(e) = posted {
            let e = map_err(peer_name, e);
            self.shared.complete(&once, &completion, Err(e.duplicate()));
            return Err(e);
        }
        // Wake the progress thread only when it sleeps and the request did not complete inside the post (UCX's
        // shared memory finishes direct RMA at once): a signal is a syscall and a context switch.
        if self.shared.asleep.load(Ordering::SeqCst) && !once.load(Ordering::Acquire) {
            let _ = self.shared.worker.signal();
        }
        Ok(())
    }

    /// Waits for `completion` (a request of this agent) while progressing the worker on the calling thread; the
    /// progress thread sleeps meanwhile. Returns the request's outcome, or [`TransferError::InProgress`] when
    /// `timeout` passes first.
    pub fn wait_driving(&self, completion: &Completion, timeout: Option<Duration>) -> Result<()> {
        // A caller's timeout (from C or Python) can be huge: one past what `Instant` holds means no deadline.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let shared = &self.shared;
        let driving = Driving::new(&shared.drivers);
        loop {
            if let Some(r) = completion.try_outcome() {
                return r;
            }
            if shared.stop.load(Ordering::Acquire) {
                // Shutting down: the progress thread fails what is left.
                drop(driving);
                return completion
                    .wait(deadline.map(|d| d.saturating_duration_since(Instant::now())));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(TransferError::InProgress);
            }
            // Another thread holding the worker (a post, another waiter) makes the progress: just look again.
            match shared.worker.try_progress() {
                Ok(Some(n)) if n > 0 => {}
                Ok(_) => std::thread::yield_now(),
                Err(e) => {
                    // Called from inside a UCX callback: only the other threads can progress.
                    tracing::debug!(error = %e, "cannot progress UCX here; waiting");
                    drop(driving);
                    return completion
                        .wait(deadline.map(|d| d.saturating_duration_since(Instant::now())));
                }
            }
            shared.send_deferred();
        }
    }

    /// Progresses the worker once from the calling thread, unless another thread is using it (polling callers
    /// of `XferRequest::status` drive progress this way, as NIXL's `getXferStatus` does).
    pub fn progress_once(&self) {
        if let Ok(Some(_)) = self.shared.worker.try_progress() {
            self.shared.send_deferred();
        }
    }

    /// Stops the progress thread (outstanding requests fail with `Shutdown`).
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.worker.signal();
    }
}

/// A connected peer: the endpoint and its unpacked keys, by the peer metadata's region index.
pub(crate) struct UcxPeer {
    ep: Endpoint,
    rkeys: Vec<Option<RemoteKey>>,
    /// Set after the first post checked whether UCX maps the peer's memory ([`RemoteKey::maps`]).
    checked_mapping: AtomicBool,
}

impl std::fmt::Debug for UcxPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UcxPeer")
            .field("keys", &self.rkeys.len())
            .finish()
    }
}

/// What the `ucx` backend keeps of a peer: its UCX metadata (worker address, rkeys) and the endpoint, connected
/// on first use.
pub(crate) struct UcxPeerSlot<'a> {
    /// The peer's UCX metadata, if it serves UCX.
    pub md: Option<&'a UcxMetadata>,
    /// The endpoint to it, once connected.
    pub endpoint: &'a Mutex<Option<Arc<UcxPeer>>>,
}

/// A prepared `ucx` request: the endpoint and `(local, remote address, remote region index)` per pair.
#[derive(Debug)]
pub(crate) struct UcxReq {
    peer: Arc<UcxPeer>,
    ops: Vec<(LocalSeg, u64, usize)>,
}

/// The `ucx` backend (`backend.rs`): the agent's UCX context, worker and progress thread.
impl Backend for UcxAgent {
    type Peer<'a> = UcxPeerSlot<'a>;
    type Req = UcxReq;

    fn prepare(&self, x: &Prepare<'_>, slot: UcxPeerSlot<'_>) -> Result<UcxReq> {
        if *x.route != Route::Ucx {
            return Err(x.wrong_route("ucx"));
        }
        let md = &x.remote.md;
        let peer_md = slot.md.ok_or_else(|| TransferError::TransportUnavailable {
            transport: "ucx",
            reason: format!("agent `{}` does not serve UCX", md.name),
        })?;
        let peer = {
            let mut guard = slot.endpoint.lock().unwrap_or_else(|e| e.into_inner());
            match guard.as_ref() {
                Some(p) => p.clone(),
                None => {
                    let ids: Vec<u64> = md.regions.iter().map(|r| r.id).collect();
                    let p = self.connect(&md.name, peer_md, &ids)?;
                    *guard = Some(p.clone());
                    p
                }
            }
        };
        Ok(UcxReq {
            peer,
            ops: plan::ucx_ops(x.pairs),
        })
    }

    fn post(&self, req: &UcxReq, x: &Post<'_>) -> Result<XferStatus> {
        x.remote.check_alive()?;
        if self.shared.stop.load(Ordering::Acquire) {
            return Err(TransferError::Shutdown);
        }
        if x.conn.is_some_and(|c| c.is_closed()) {
            return Err(TransferError::PeerDisconnected {
                peer: x.remote.name().to_string(),
                reason: "connection to the peer was lost".into(),
            });
        }
        self.post_batch(
            &self.name,
            x.remote.name(),
            &req.peer,
            x.op,
            &req.ops,
            x.notif.map(<[u8]>::to_vec),
            x.conn.cloned(),
            x.completion.clone(),
        )?;
        Ok(XferStatus::InProgress)
    }

    /// Progresses the worker once while the request is in flight (as NIXL's `getXferStatus` does).
    fn check(&self, _req: &UcxReq, done: &Completion) -> Result<XferStatus> {
        if done.status().ok() == Some(XferStatus::InProgress) {
            self.progress_once();
        }
        done.status()
    }

    /// Progresses the worker on the calling thread until the request completes.
    fn wait(&self, _req: &UcxReq, done: &Completion, timeout: Option<Duration>) -> Result<()> {
        if done.status().ok() == Some(XferStatus::InProgress) {
            return self.wait_driving(done, timeout);
        }
        done.wait(timeout)
    }
}
