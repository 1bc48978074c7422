//! Remote agents as requests see them: where the peer is ([`Locality`]), the metadata requests are checked
//! against, the connection to its listener, and whether it is still loaded. The per-transport state of a peer
//! (UCX endpoint, opened CUDA IPC memory) is kept beside it by the agent and handed to that transport's backend.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::config::Identity;
use crate::conn::PeerConn;
use crate::error::{Result, TransferError};
use crate::memory::Registry;
use crate::metadata::AgentMetadata;
use crate::notif::{Notification, NotificationQueue};
use crate::peer::LocalPeer;
use crate::plan::RemoteSeg;
use crate::transport::{CopySeg, LocalSeg};

/// An agent of this process as the agents of this process reach it: its name, its live registrations (the
/// `local` transport copies to them directly), and its notification queue (a notification is a push).
#[derive(Debug)]
pub(crate) struct InProcessAgent {
    /// The agent's name.
    pub name: String,
    /// Its live registrations.
    pub registry: Arc<Registry>,
    /// Where its notifications go.
    pub notifications: Arc<NotificationQueue>,
}

impl InProcessAgent {
    /// Resolves the remote ranges of `pairs` against this agent's live registrations.
    ///
    /// Errors: [`TransferError::NotRegistered`] naming the first range no live region holds.
    pub fn resolve(&self, pairs: &[(LocalSeg, RemoteSeg)]) -> Result<Vec<CopySeg>> {
        pairs
            .iter()
            .enumerate()
            .map(|(index, (l, r))| {
                let (region, off) = self.registry.lookup(r.addr, r.len).ok_or_else(|| {
                    TransferError::NotRegistered {
                        agent: self.name.clone(),
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

    /// Delivers a notification from `from`.
    pub fn deliver(&self, from: &str, payload: Vec<u8>) {
        self.notifications.push(Notification {
            from: from.to_string(),
            payload,
        });
    }
}

/// Where a remote agent is relative to this one, as far as something other than its own metadata vouches for it.
pub(crate) enum Locality {
    /// An agent of this process (its instance id is registered here): its live regions are reached directly.
    SameProcess(Weak<InProcessAgent>),
    /// A process of this host that the kernel named over the agent's Unix socket ([`crate::peer`]).
    SameHost(Arc<LocalPeer>),
    /// Anything else (another host, or this host without a Unix socket to vouch for it): `tcp` (or `ucx`) only.
    /// Holds why same-host transports are not available, for errors.
    Remote(String),
}

/// A remote agent loaded from its metadata.
pub(crate) struct RemoteAgent {
    /// The metadata requests are validated against: for a same-host peer, what it sent over its Unix socket.
    pub md: AgentMetadata,
    /// Where it is.
    pub locality: Locality,
    /// The connection to its listener, made on first use.
    pub conn: Mutex<Option<Arc<PeerConn>>>,
    /// Set when it is invalidated (or replaced, or this agent is dropped): its requests fail.
    pub invalidated: AtomicBool,
}

impl RemoteAgent {
    /// A newly loaded peer (its connection carried over from the same instance's previous entry, if any).
    pub fn new(md: AgentMetadata, locality: Locality, conn: Option<Arc<PeerConn>>) -> RemoteAgent {
        RemoteAgent {
            md,
            locality,
            conn: Mutex::new(conn),
            invalidated: AtomicBool::new(false),
        }
    }

    /// The peer's name.
    pub fn name(&self) -> &str {
        &self.md.name
    }

    /// The same-host peer the kernel vouched for, if it is one.
    pub fn local_peer(&self) -> Option<&Arc<LocalPeer>> {
        match &self.locality {
            Locality::SameHost(p) => Some(p),
            _ => None,
        }
    }

    /// The connection to the peer's listener, made on first use by `me` (notifications the peer sends on it go
    /// to `notifications`). Once lost it stays lost.
    ///
    /// Errors: [`TransferError::TransportUnavailable`] when the peer runs no listener; connection errors.
    pub fn conn(
        &self,
        me: Identity<'_>,
        notifications: &Arc<NotificationQueue>,
    ) -> Result<Arc<PeerConn>> {
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
        let c = PeerConn::connect(&self.md.name, addr, me, notifications.clone())?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// The connection if it was made and is not lost.
    pub fn live_conn(&self) -> Option<Arc<PeerConn>> {
        self.conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|c| !c.is_closed())
    }

    /// True once invalidated.
    pub fn is_invalidated(&self) -> bool {
        self.invalidated.load(Ordering::Acquire)
    }

    /// Errors: [`TransferError::UnknownRemote`] once the peer was invalidated (or replaced).
    pub fn check_alive(&self) -> Result<()> {
        if self.is_invalidated() {
            return Err(TransferError::UnknownRemote(self.md.name.clone()));
        }
        Ok(())
    }

    /// Invalidates the peer: its connection closes (outstanding transfers fail), its mappings go.
    pub fn shutdown(&self) {
        self.invalidated.store(true, Ordering::Release);
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).take() {
            c.fail_all(TransferError::UnknownRemote(self.md.name.clone()));
        }
        if let Some(p) = self.local_peer() {
            p.gone("invalidated");
        }
    }
}
