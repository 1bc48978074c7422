//! Same-host peers the kernel vouches for.
//!
//! Metadata is untrusted bytes (it arrives over the network, through whatever `remote_host:remote_port` a
//! request named), so nothing in it ever selects local memory to touch: not a pid, not a `/proc` path, not a
//! descriptor number. A peer on this host is reached with `shm` or `cma` only through its Unix socket:
//! - every agent listens on the abstract Unix socket `pdx-agent-<instance id, 16 hex digits>`, a name it
//!   chose itself when it started (it picks another instance id if the name is taken);
//! - an initiator that loads metadata from its own host (same boot and namespaces) connects there; the kernel
//!   names the process at the other end (`SO_PEERCRED`, and `SO_PEERPIDFD` where available), which is then held
//!   by a pidfd ([`pdx_sys::ipc::PeerProcess`]); with a secret configured, both sides prove it first;
//! - the peer sends its metadata over that socket (the regions `cma` may reach, in its own address space) and
//!   its memfds with `SCM_RIGHTS` (only sealed memfds are mapped, see [`pdx_sys::Memory::map_memfd`]); this
//!   metadata must name the agent (name and instance id) that was loaded, or the peer is not vouched for;
//! - the socket stays open: when the peer exits, the agent's I/O thread sees it close and unmaps everything of
//!   that peer at once ([`LocalPeer::gone`]), as [`crate::Agent::invalidate_remote`] and loading a new instance
//!   under the same name do. Requests hold no mapping of their own, so none outlives that.
//!
//! If any step fails (another host, another network namespace, no socket, another agent behind it), the peer
//! is reached over `tcp` only.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pdx_sys::ipc::PeerProcess;
use pdx_sys::Memory;

use crate::config::Identity;
use crate::conn::{self, read_frame_rest, read_reply, StallClock, STALL_TICK};
use crate::error::{Result, TransferError};
use crate::memory::{Backing, MemoryKind, Region};
use crate::metadata::{AgentMetadata, Extensions, MAX_REGIONS};
use crate::server::{LinkWatcher, Server};
use crate::wire::{encode_frame, Ctrl, FrameKind, HEADER_LEN, MAX_FDS_PER_FRAME};

/// The abstract Unix socket name of the agent with this instance id.
pub(crate) fn socket_name(instance_id: u64) -> String {
    format!("pdx-agent-{instance_id:016x}")
}

fn abstract_addr(instance_id: u64) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(socket_name(instance_id).as_bytes())
}

/// Binds the agent's Unix socket for `instance_id`. Errors: the OS error (`AddrInUse` when the name is taken).
pub(crate) fn bind_listener(instance_id: u64) -> std::io::Result<UnixListener> {
    let l = UnixListener::bind_addr(&abstract_addr(instance_id)?)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// One of the peer's memfd regions, mapped here.
pub(crate) struct Mapped {
    pub id: u64,
    pub region: Arc<Region>,
    /// The descriptor, kept for GPU pinning of the same memory (`crate::gpu`).
    pub fd: OwnedFd,
}

/// The peer's memfd regions mapped here. Append-only across refreshes, so a request's slot index stays valid.
pub(crate) struct PeerMap {
    pub regions: Vec<Mapped>,
}

impl PeerMap {
    /// The slot of region `id`, if mapped.
    pub fn slot(&self, id: u64) -> Option<usize> {
        self.regions.iter().position(|m| m.id == id)
    }
}

/// A same-host peer whose identity the kernel vouched for; see the module docs.
pub(crate) struct LocalPeer {
    name: String,
    process: PeerProcess,
    /// The Unix connection to the peer, kept open as its liveness signal.
    link: Mutex<UnixStream>,
    /// Bumped when the link is replaced by a refresh, so the old link's closing is not taken for the peer's.
    generation: AtomicU64,
    /// `None` once the peer is gone: its mappings are dropped then.
    maps: Mutex<Option<Arc<PeerMap>>>,
    alive: AtomicBool,
}

/// What one exchange over the peer's Unix socket brings.
struct Exchange {
    md: AgentMetadata,
    ext: Extensions,
    fds: Vec<(u64, OwnedFd)>,
    link: UnixStream,
    process: PeerProcess,
}

fn not_vouched(peer: &str, reason: impl std::fmt::Display) -> TransferError {
    TransferError::TransportUnavailable {
        transport: "shm/cma",
        reason: format!("the kernel does not vouch for agent `{peer}`: {reason}"),
    }
}

/// Connects to the Unix socket of agent `name` (`instance_id`), authenticates, and takes its metadata and memfds.
fn exchange(me: Identity<'_>, name: &str, instance_id: u64) -> Result<Exchange> {
    let timeout = me.config.peer_timeout;
    let addr = abstract_addr(instance_id).map_err(|e| not_vouched(name, e))?;
    let link = UnixStream::connect_addr(&addr)
        .map_err(|e| not_vouched(name, format!("its Unix socket is unreachable ({e})")))?;
    link.set_read_timeout(Some(STALL_TICK))
        .and_then(|()| link.set_write_timeout(Some(STALL_TICK)))
        .map_err(conn::io_err("configuring a Unix socket"))?;
    let (process, _cred) = PeerProcess::of_unix_peer(&link).map_err(|e| not_vouched(name, e))?;
    let mut request = Vec::new();
    match &me.config.secret {
        Some(secret) => {
            conn::authenticate(&link, secret, me.name(), me.instance_id, name, timeout)?
        }
        None => {
            request = encode_frame(
                FrameKind::Hello,
                0,
                &Ctrl::Hello {
                    name: me.name().to_string(),
                    instance_id: me.instance_id,
                },
            )
        }
    }
    request.extend_from_slice(&encode_frame(FrameKind::ShareMemory, 0, &Ctrl::Empty));
    // One write: a peer that refuses the Hello (it wants a secret) answers before it closes, and that answer,
    // not a broken pipe, is the error.
    let written = (&link)
        .write_all(&request)
        .map_err(conn::io_err("writing to a Unix socket"));
    let reply = read_reply(&link, name, timeout);
    written.or_else(|e| match &reply {
        Err(TransferError::Unauthenticated { .. }) => Ok(()),
        _ => Err(e),
    })?;
    let (metadata, count) = match reply? {
        (_, Ctrl::SharedMemory { metadata, memfds }) => (metadata, memfds as usize),
        (h, _) => {
            return Err(TransferError::Protocol {
                peer: name.to_string(),
                reason: format!("expected shared memory, got {:?}", h.kind),
            })
        }
    };
    let (md, ext) = AgentMetadata::decode_ext(&metadata)?;
    if md.name != name || md.instance_id != instance_id {
        return Err(not_vouched(
            name,
            format!(
                "the agent behind its Unix socket is `{}` (instance {:#x})",
                md.name, md.instance_id
            ),
        ));
    }
    if count > md.regions.len().min(MAX_REGIONS) {
        return Err(TransferError::Protocol {
            peer: name.to_string(),
            reason: format!("{count} memfds for {} regions", md.regions.len()),
        });
    }
    let mut fds = Vec::with_capacity(count);
    while fds.len() < count {
        let (ids, got) = read_memfds(&link, name, timeout)?;
        if fds.len() + ids.len() > count {
            return Err(TransferError::Protocol {
                peer: name.to_string(),
                reason: "more memfds than announced".into(),
            });
        }
        fds.extend(ids.into_iter().zip(got));
    }
    Ok(Exchange {
        md,
        ext,
        fds,
        link,
        process,
    })
}

/// Reads one `Memfds` frame and the descriptors attached to its first bytes.
fn read_memfds(
    link: &UnixStream,
    peer: &str,
    timeout: std::time::Duration,
) -> Result<(Vec<u64>, Vec<OwnedFd>)> {
    let protocol = |reason: String| TransferError::Protocol {
        peer: peer.to_string(),
        reason,
    };
    let mut clock = StallClock::new(timeout);
    let mut hdr = [0u8; HEADER_LEN];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < HEADER_LEN {
        match pdx_sys::ipc::recv_with_fds(link, &mut hdr[got..], MAX_FDS_PER_FRAME, &mut fds) {
            Ok(0) => {
                return Err(TransferError::PeerDisconnected {
                    peer: peer.to_string(),
                    reason: "Unix socket closed".into(),
                })
            }
            Ok(n) => {
                got += n;
                clock.tick(true);
            }
            Err(e) if e.is_retryable() && clock.tick(false) => {}
            Err(e) => return Err(protocol(format!("receiving memfds: {e}"))),
        }
    }
    let (header, ctrl) =
        read_frame_rest(link, &hdr, &mut |p| clock.tick(p)).map_err(|e| protocol(e.to_string()))?;
    match ctrl {
        Ctrl::Memfds { region_ids }
            if header.kind == FrameKind::Memfds && region_ids.len() == fds.len() =>
        {
            Ok((region_ids, fds))
        }
        _ => Err(protocol(format!(
            "expected a Memfds frame with its descriptors, got {:?} with {} descriptors",
            header.kind,
            fds.len()
        ))),
    }
}

/// Maps the received memfds of `md`'s regions, reusing what `old` already maps. A descriptor that is not a
/// sealed memfd of a host region of the right length is skipped (that region is then reached with `cma`).
fn map_regions(
    peer: &str,
    md: &AgentMetadata,
    fds: Vec<(u64, OwnedFd)>,
    old: Option<&PeerMap>,
    populate: bool,
) -> PeerMap {
    let mut regions: Vec<Mapped> = Vec::new();
    let mut known: HashMap<u64, ()> = HashMap::new();
    if let Some(old) = old {
        for m in &old.regions {
            if let Ok(fd) = m.fd.try_clone() {
                known.insert(m.id, ());
                regions.push(Mapped {
                    id: m.id,
                    region: m.region.clone(),
                    fd,
                });
            }
        }
    }
    for (id, fd) in fds {
        if known.contains_key(&id) {
            continue;
        }
        let Some(r) = md.regions.iter().find(|r| r.id == id && r.memfd.is_some()) else {
            tracing::debug!(%peer, region = id, "memfd for a region the metadata does not share");
            continue;
        };
        if matches!(r.kind, MemoryKind::Device(_)) {
            continue;
        }
        match Memory::map_memfd(fd.as_fd(), r.len as usize, populate) {
            Ok(mem) => {
                known.insert(id, ());
                regions.push(Mapped {
                    id,
                    region: Arc::new(Region {
                        id,
                        kind: r.kind,
                        backing: Backing::Host(mem),
                    }),
                    fd,
                });
            }
            Err(e) => tracing::debug!(%peer, region = id, error = %e, "cannot map a peer memfd"),
        }
    }
    PeerMap { regions }
}

impl LocalPeer {
    /// Vouches for the agent `wire` names, on this host: connects to its Unix socket and maps its memfds; the
    /// agent's I/O thread (`server`) then watches the link. Returns the peer and the metadata and extensions it
    /// sent over that socket (the ones to use from now on).
    ///
    /// Errors: [`TransferError::TransportUnavailable`] when the kernel cannot vouch for it (no socket, another
    /// agent behind it); [`TransferError::Unauthenticated`] for a secret mismatch; connection errors.
    pub(crate) fn connect(
        me: Identity<'_>,
        server: &Server,
        wire: &AgentMetadata,
    ) -> Result<(Arc<LocalPeer>, AgentMetadata, Extensions)> {
        let ex = exchange(me, &wire.name, wire.instance_id)?;
        let map = map_regions(&wire.name, &ex.md, ex.fds, None, me.config.populate);
        let peer = Arc::new(LocalPeer {
            name: wire.name.clone(),
            process: ex.process,
            link: Mutex::new(ex.link),
            generation: AtomicU64::new(0),
            maps: Mutex::new(Some(Arc::new(map))),
            alive: AtomicBool::new(true),
        });
        let link = peer.link.lock().unwrap_or_else(|e| e.into_inner());
        server.watch(&link, peer.watcher(), 0)?;
        drop(link);
        Ok((peer, ex.md, ex.ext))
    }

    /// Takes fresh metadata and memfds from the same peer (newer registrations) over a new link, keeping what is
    /// mapped. Errors: as [`LocalPeer::connect`]; [`TransferError::PeerDisconnected`] when the peer is gone or
    /// another process answers.
    pub(crate) fn refresh(
        self: &Arc<Self>,
        me: Identity<'_>,
        server: &Server,
        instance_id: u64,
    ) -> Result<(AgentMetadata, Extensions)> {
        let ex = exchange(me, &self.name, instance_id)?;
        let gone = |reason: &str| TransferError::PeerDisconnected {
            peer: self.name.clone(),
            reason: reason.to_string(),
        };
        if ex.process.pid() != self.process.pid() {
            return Err(gone("another process answers on its Unix socket"));
        }
        {
            let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
            let old = maps.as_ref().ok_or_else(|| gone("the peer is gone"))?;
            let new = map_regions(&self.name, &ex.md, ex.fds, Some(old), me.config.populate);
            *maps = Some(Arc::new(new));
        }
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let mut link = self.link.lock().unwrap_or_else(|e| e.into_inner());
        let old = std::mem::replace(&mut *link, ex.link);
        let _ = old.shutdown(std::net::Shutdown::Both);
        server.watch(&link, self.watcher(), generation)?;
        Ok((ex.md, ex.ext))
    }

    /// The peer's process, as the kernel named it.
    pub(crate) fn process(&self) -> &PeerProcess {
        &self.process
    }

    /// False once the peer is gone (its link closed, or it was invalidated).
    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// The peer's mapped memfds, while it is alive.
    pub(crate) fn maps(&self) -> Option<Arc<PeerMap>> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The error a transfer to a gone peer fails with.
    pub(crate) fn gone_error(&self) -> TransferError {
        TransferError::PeerDisconnected {
            peer: self.name.clone(),
            reason: "the peer's Unix socket closed (process gone) or it was invalidated".into(),
        }
    }

    /// The peer is gone: unmap its memory now (copies in flight keep their mapping until they finish) and close
    /// the link.
    pub(crate) fn gone(&self, why: &str) {
        if self.alive.swap(false, Ordering::AcqRel) {
            tracing::debug!(peer = %self.name, why, "same-host peer gone; unmapping its memory");
        }
        drop(self.maps.lock().unwrap_or_else(|e| e.into_inner()).take());
        let _ = self
            .link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown(std::net::Shutdown::Both);
    }
}

impl LocalPeer {
    fn watcher(self: &Arc<Self>) -> std::sync::Weak<dyn LinkWatcher> {
        let w: std::sync::Weak<LocalPeer> = Arc::downgrade(self);
        w
    }
}

impl LinkWatcher for LocalPeer {
    /// The I/O thread saw link `generation` close.
    fn link_lost(&self, generation: u64) {
        if generation == self.generation.load(Ordering::Acquire) {
            self.gone("its Unix socket closed");
        }
    }
}

impl std::fmt::Debug for LocalPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPeer")
            .field("name", &self.name)
            .field("pid", &self.process.pid())
            .field("alive", &self.is_alive())
            .finish()
    }
}

impl Drop for LocalPeer {
    fn drop(&mut self) {
        let _ = self
            .link
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown(std::net::Shutdown::Both);
    }
}
