//! Transfer planning: which transport serves a request, and the segment lists it moves.
//!
//! Pure functions of what the initiator knows when it creates a request: where the peer is (as this process or
//! the kernel vouches for it, never as its metadata claims), the memory kinds on both sides, how the peer's
//! ranges resolve, and the options (the agent's transports, a forced one). No sockets, threads or clock: the
//! agent gathers the facts, [`choose`] decides, and the chosen backend prepares the request from the route
//! (NIXL's agent does the same split: it picks a backend per request, the backend's `prepXfer` does the rest).
//!
//! The rules, in order (docs/transfer.md, Transports):
//! 1. GPU memory on either side moves only over `cuda`, or staged through pinned memory over `tcp` (another
//!    host, or `tcp` forced); host transports would dereference device addresses.
//! 2. Then the first allowed of `local` (peer in this process), `shm` (same host, every remote range in a
//!    mapped memfd region), `cma` (same host, host memory), `tcp` (the peer listens), `ucx` (built with the
//!    feature; whether both agents serve it is known only when its backend connects).
//! 3. Nothing fits: [`TransferError::TransportUnavailable`] with why each allowed transport was not taken.

use crate::error::{Result, TransferError};
use crate::memory::MemoryKind;
use crate::transport::TransportKind;
use crate::wire::MAX_NOTIF_BYTES;

/// A descriptor validated against a remote agent's metadata: its range, the metadata region it lies in (index
/// into the peer's region list) and the offset in that region (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RemoteSeg {
    /// Start address in the peer's address space.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Index of the region in the peer's metadata.
    pub region: usize,
    /// Offset in that region, in bytes.
    pub off: u64,
}

/// Pairs `local[local_idx[i]]` with `remote[remote_idx[i]]` (NIXL `makeXferReq`'s index lists), checking the
/// request's form: equal non-zero counts, indices in range, equal lengths, a notification of at most 64 KiB.
/// `local_len` gives a local segment's length in bytes.
///
/// Errors: [`TransferError::Invalid`] naming the first fault.
pub(crate) fn pair<L: Clone>(
    local: &[L],
    local_len: impl Fn(&L) -> usize,
    local_idx: &[usize],
    remote: &[RemoteSeg],
    remote_idx: &[usize],
    notif: Option<&[u8]>,
) -> Result<Vec<(L, RemoteSeg)>> {
    if local_idx.is_empty() || local_idx.len() != remote_idx.len() {
        return Err(TransferError::Invalid(format!(
            "{} local and {} remote descriptors (need equal, non-zero counts)",
            local_idx.len(),
            remote_idx.len()
        )));
    }
    if notif.is_some_and(|n| n.len() > MAX_NOTIF_BYTES) {
        return Err(TransferError::Invalid("notification over 64 KiB".into()));
    }
    local_idx
        .iter()
        .zip(remote_idx)
        .enumerate()
        .map(|(i, (&l, &r))| {
            let (Some(ls), Some(rs)) = (local.get(l), remote.get(r)) else {
                return Err(TransferError::Invalid(format!(
                    "index pair {i} out of range"
                )));
            };
            if local_len(ls) as u64 != rs.len {
                return Err(TransferError::Invalid(format!(
                    "pair {i}: local {} bytes, remote {} bytes",
                    local_len(ls),
                    rs.len
                )));
            }
            Ok((ls.clone(), *rs))
        })
        .collect()
}

/// What a peer region that a pair's remote range resolved to is, in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// It has a host view (host or pinned memory).
    pub host: bool,
    /// It is a pdx memfd arena (what `shm` needs).
    pub memfd: bool,
}

/// Where the peer is, as far as something other than its own metadata vouches for it, with what the planner
/// needs to know of its memory there.
#[derive(Debug)]
pub(crate) enum Reach<'a> {
    /// An agent of this process: each pair's remote range resolved against its live registrations (or the error
    /// of the first that is not registered); `None` when that agent was dropped.
    SameProcess(Option<&'a Result<Vec<Resolved>>>),
    /// A process of this host the kernel named over the agent's Unix socket: per pair, the slot of its remote
    /// region among the peer's memfds mapped here (`None`: not mapped), or why nothing is mapped (the peer is
    /// gone).
    SameHost(std::result::Result<Vec<Option<usize>>, String>),
    /// Anything else: `tcp` (or `ucx`) only. Holds why same-host transports are not available.
    Remote(&'a str),
}

/// Everything [`choose`] decides from.
#[derive(Debug)]
pub(crate) struct Facts<'a> {
    /// The peer's name (for errors).
    pub peer: &'a str,
    /// `(local kind, remote kind)` of every pair, in order.
    pub kinds: &'a [(MemoryKind, MemoryKind)],
    /// Where the peer is.
    pub reach: Reach<'a>,
    /// The agent's transports, in order of preference (`AgentConfig::transports`).
    pub transports: &'a [TransportKind],
    /// A transport forced for this request (`XferOptions::transport`).
    pub forced: Option<TransportKind>,
    /// The peer's metadata names a listener.
    pub peer_listens: bool,
    /// This build has the `ucx` transport.
    pub ucx_built: bool,
}

/// How the chosen transport moves the request; the backend of [`Choice::transport`] prepares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// memcpy to the live regions of an agent of this process (`local`, or `shm` between agents of one process);
    /// the ranges are the ones [`Reach::SameProcess`] resolved.
    Copy,
    /// memcpy into a same-host peer's memfds mapped here: the slot of each pair's region.
    Shm {
        /// Per pair, the slot in the peer's mappings.
        slots: Vec<usize>,
    },
    /// One batched `process_vm_readv`/`writev`: on this process (an agent of it) or the peer's process.
    Cma {
        /// The peer is an agent of this process.
        this_process: bool,
    },
    /// A request frame to the peer's listener.
    Tcp,
    /// GPU copies on a stream (same process, or same host through CUDA IPC).
    Cuda,
    /// GPU memory staged through pinned host memory, then `tcp`.
    Staged,
    /// UCX RMA.
    Ucx,
}

/// Whether the request needs the TCP connection to the peer's listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Conn {
    /// No: the peer is in this process (notifications are queue pushes).
    None,
    /// Yes: the transfer goes over it; failing to connect fails the request's creation.
    Required,
    /// For notifications and to notice the peer's death, if it can be had.
    Optional,
}

/// The planner's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Choice {
    /// The transport.
    pub transport: TransportKind,
    /// What its backend prepares.
    pub route: Route,
    /// Why each transport tried before this one was not taken.
    pub rejected: Vec<String>,
    forced: Option<TransportKind>,
}

impl Choice {
    /// What the request needs of the peer connection.
    pub fn conn(&self, reach_same_process: bool) -> Conn {
        match self.transport {
            TransportKind::Local => Conn::None,
            TransportKind::Tcp => Conn::Required,
            _ if reach_same_process => Conn::None,
            _ => Conn::Optional,
        }
    }

    /// The error when the chosen route's backend cannot serve it after all (`ucx` when the agents cannot connect):
    /// its own error when the transport was forced, otherwise "no transport" with every reason.
    pub fn fell_through(&self, why: &str, err: TransferError) -> TransferError {
        if self.forced == Some(self.transport) {
            return err;
        }
        let mut rejected = self.rejected.clone();
        rejected.push(why.to_string());
        no_transport(self.forced, rejected)
    }
}

fn no_transport(forced: Option<TransportKind>, why_not: Vec<String>) -> TransferError {
    TransferError::TransportUnavailable {
        transport: forced.map_or("any", TransportKind::name),
        reason: if why_not.is_empty() {
            "transport not implemented in this build".into()
        } else {
            why_not.join("; ")
        },
    }
}

fn cuda_unavailable(reason: String) -> TransferError {
    TransferError::TransportUnavailable {
        transport: "cuda",
        reason,
    }
}

/// True when a pair needs the GPU path (either side is device memory).
pub(crate) fn needs_gpu(local: MemoryKind, remote: MemoryKind) -> bool {
    matches!(local, MemoryKind::Device(_)) || matches!(remote, MemoryKind::Device(_))
}

/// Chooses the transport and route of a request (the rules in the module docs).
///
/// Errors: [`TransferError::TransportUnavailable`] when no allowed transport can serve it (with every reason);
/// for GPU memory, the reason it cannot move; for `local`, the peer's [`TransferError::NotRegistered`].
pub(crate) fn choose(f: &Facts<'_>) -> Result<Choice> {
    let allowed = |t: TransportKind| match f.forced {
        Some(forced) => forced == t,
        None => f.transports.contains(&t),
    };
    let choice = |transport, route, rejected| {
        Ok(Choice {
            transport,
            route,
            rejected,
            forced: f.forced,
        })
    };
    if f.kinds.iter().any(|&(l, r)| needs_gpu(l, r)) {
        let staged = f.forced == Some(TransportKind::Tcp)
            || (matches!(f.reach, Reach::Remote(_))
                && f.forced.is_none()
                && allowed(TransportKind::Tcp));
        if staged {
            if !f.peer_listens {
                return Err(cuda_unavailable(format!(
                    "agent `{}` runs no listener",
                    f.peer
                )));
            }
            return choice(TransportKind::Tcp, Route::Staged, Vec::new());
        }
        if !allowed(TransportKind::Cuda) {
            return Err(TransferError::TransportUnavailable {
                transport: f.forced.map_or("any", TransportKind::name),
                reason: "GPU memory moves only over the cuda transport (or staged over tcp)".into(),
            });
        }
        return match &f.reach {
            Reach::SameProcess(None) => Err(cuda_unavailable("peer agent dropped".into())),
            Reach::SameProcess(Some(Err(e))) => Err(e.duplicate()),
            Reach::SameProcess(Some(Ok(_))) | Reach::SameHost(_) => {
                choice(TransportKind::Cuda, Route::Cuda, Vec::new())
            }
            Reach::Remote(why) => Err(cuda_unavailable(format!(
                "{why}: GPU memory of another host (or of a peer the kernel does not vouch for) needs the \
                 staged path (device -> pinned -> tcp), which is not implemented for the peer's device memory"
            ))),
        };
    }
    let mut why_not: Vec<String> = Vec::new();
    if allowed(TransportKind::Local) {
        match &f.reach {
            Reach::SameProcess(Some(Ok(_))) => {
                return choice(TransportKind::Local, Route::Copy, why_not)
            }
            Reach::SameProcess(Some(Err(e))) => return Err(e.duplicate()),
            Reach::SameProcess(None) => why_not.push("local: peer agent dropped".into()),
            _ => why_not.push("local: peer is in another process".into()),
        }
    }
    if allowed(TransportKind::Shm) {
        let not_memfd = "shm: remote memory is not a pdx-allocated (memfd) region";
        match &f.reach {
            Reach::SameProcess(None) => why_not.push("shm: peer agent dropped".into()),
            Reach::SameProcess(Some(Err(e))) => why_not.push(format!("shm: {e}")),
            Reach::SameProcess(Some(Ok(mem))) => {
                if mem.iter().all(|m| m.memfd) {
                    return choice(TransportKind::Shm, Route::Copy, why_not);
                }
                why_not.push(not_memfd.into());
            }
            Reach::SameHost(Err(gone)) => why_not.push(format!("shm: {gone}")),
            Reach::SameHost(Ok(slots)) => match slots.iter().copied().collect::<Option<Vec<_>>>() {
                Some(slots) => return choice(TransportKind::Shm, Route::Shm { slots }, why_not),
                None => why_not.push(not_memfd.into()),
            },
            Reach::Remote(why) => why_not.push(format!("shm: {why}")),
        }
    }
    if allowed(TransportKind::Cma) {
        match &f.reach {
            Reach::SameProcess(None) => why_not.push("cma: peer agent dropped".into()),
            Reach::SameProcess(Some(Err(e))) => why_not.push(format!("cma: {e}")),
            Reach::SameProcess(Some(Ok(mem))) => {
                if mem.iter().all(|m| m.host) {
                    let route = Route::Cma { this_process: true };
                    return choice(TransportKind::Cma, route, why_not);
                }
                why_not.push("cma: remote memory is not host memory".into());
            }
            Reach::SameHost(_) => {
                let route = Route::Cma {
                    this_process: false,
                };
                return choice(TransportKind::Cma, route, why_not);
            }
            Reach::Remote(why) => why_not.push(format!("cma: {why}")),
        }
    }
    if allowed(TransportKind::Tcp) {
        if f.peer_listens {
            return choice(TransportKind::Tcp, Route::Tcp, why_not);
        }
        why_not.push("tcp: peer runs no listener".into());
    }
    if f.ucx_built && allowed(TransportKind::Ucx) {
        return choice(TransportKind::Ucx, Route::Ucx, why_not);
    }
    Err(no_transport(f.forced, why_not))
}

/// The remote side of a `tcp` request (and of a staged one): `(address, length)` per pair, in order.
pub(crate) fn tcp_segments<L>(pairs: &[(L, RemoteSeg)]) -> Vec<(u64, u64)> {
    pairs.iter().map(|(_, r)| (r.addr, r.len)).collect()
}

/// The remote iovecs of a `cma` request: `(address, length)` per pair, in order.
pub(crate) fn cma_iovecs<L>(pairs: &[(L, RemoteSeg)]) -> Vec<(u64, usize)> {
    pairs
        .iter()
        .map(|(_, r)| (r.addr, r.len as usize))
        .collect()
}

/// The copies of a `shm` request to a same-host peer: `(local, slot of the remote region, offset in it)`.
pub(crate) fn shm_segments<L: Clone>(
    pairs: &[(L, RemoteSeg)],
    slots: &[usize],
) -> Vec<(L, usize, usize)> {
    pairs
        .iter()
        .zip(slots)
        .map(|((l, r), &slot)| (l.clone(), slot, r.off as usize))
        .collect()
}

/// The operations of a `ucx` request: `(local, remote address, remote region index)`.
#[cfg_attr(not(feature = "ucx"), allow(dead_code))]
pub(crate) fn ucx_ops<L: Clone>(pairs: &[(L, RemoteSeg)]) -> Vec<(L, u64, usize)> {
    pairs
        .iter()
        .map(|(l, r)| (l.clone(), r.addr, r.region))
        .collect()
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
