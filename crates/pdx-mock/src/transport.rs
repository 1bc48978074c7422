//! KV block memory and movement between a prefill and a decode engine.
//!
//! The engine talks to a [`KvTransport`]: it owns the KV block memory (so a transfer engine
//! can register it), reads blocks from a remote engine with a completion notification
//! delivered to that engine (NIXL READ with `notif_msg`, as vLLM's NixlConnector does), and
//! hands back notifications received (`take_notifications`, NIXL `get_new_notifs`). A KsanaLLM
//! prefill also sends a notification of its own to a decode engine it knows only by its agent's
//! address (`notify_addr`): which blocks hold a request's KV (`crate::ksana`).
//!
//! Two implementations: [`InProcTransport`] moves blocks between engines of the same process
//! through a process-wide registry keyed by engine id (`--kv-transport inproc`: tests,
//! single-process demos), and `pdx_transport::PdxTransport` (cargo feature `pdx-transfer`, on by
//! default; `--kv-transport pdx`) moves them between processes and hosts with pdx's transfer
//! engine.

use crate::error::MockError;
use crate::kv_cache::KvLayout;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

/// Where a remote engine's KV lives: what goes into `kv_transfer_params`
/// (`remote_engine_id`, `remote_host`, `remote_port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEndpoint {
    /// Engine id (NIXL agent name).
    pub engine_id: String,
    /// Host of the metadata side channel.
    pub host: String,
    /// Port of the metadata side channel.
    pub port: u16,
}

/// A notification received from another engine's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The sending engine (agent name), as the transport knows it: for `pdx-transfer`, the name its
    /// connection announced (authenticated when the agents share a secret).
    pub from: String,
    /// The payload (at most 64 KiB).
    pub payload: Vec<u8>,
}

/// Boxed future of a transfer.
pub type TransferFuture<'a> = Pin<Box<dyn Future<Output = Result<(), MockError>> + Send + 'a>>;

/// KV memory plus block movement; see the module docs.
pub trait KvTransport: Send + Sync {
    /// This engine's endpoint, advertised to decode engines.
    fn endpoint(&self) -> KvEndpoint;
    /// Layout of every block.
    fn layout(&self) -> KvLayout;
    /// Runs `f` on the bytes of local block `block` (`layout().block_bytes()` long), mutably.
    fn write_block(&self, block: u32, f: &mut dyn FnMut(&mut [u8]));
    /// Runs `f` on the bytes of local block `block`.
    fn read_block(&self, block: u32, f: &mut dyn FnMut(&[u8]));
    /// Reads `remote_blocks[i]` of `remote` into local `local_blocks[i]`, then delivers
    /// `notification` to the remote engine (also when the lists are empty).
    ///
    /// Errors: [`MockError::Transfer`] when the remote is unknown/unreachable, block ids are
    /// out of range, or the lists differ in length.
    fn read_remote<'a>(
        &'a self,
        remote: &'a KvEndpoint,
        remote_blocks: &'a [u32],
        local_blocks: &'a [u32],
        notification: &'a [u8],
    ) -> TransferFuture<'a>;
    /// Notifications delivered to this engine since the last call.
    fn take_notifications(&self) -> Vec<Notice>;
    /// Waits up to `timeout` for a notification, then takes all of them (empty on timeout). The
    /// default polls: it sleeps `timeout` (at most 10 ms), then takes.
    fn wait_notifications(&self, timeout: std::time::Duration) -> Vec<Notice> {
        std::thread::sleep(timeout.min(std::time::Duration::from_millis(10)));
        self.take_notifications()
    }
    /// Sends `payload` as a notification to the engine whose agent listens on `addr`
    /// (`ip:port`, its metadata side channel).
    ///
    /// Errors: [`MockError::Transfer`] when nothing answers there, or the transport cannot send
    /// notifications by address (the default).
    fn notify_addr<'a>(&'a self, addr: &'a str, payload: &'a [u8]) -> TransferFuture<'a> {
        let _ = payload;
        Box::pin(async move {
            Err(MockError::Transfer {
                engine: addr.to_string(),
                reason: "this KV transport cannot notify an engine by address".into(),
            })
        })
    }
}

struct Shared {
    layout: KvLayout,
    num_blocks: u32,
    memory: RwLock<Vec<u8>>,
    notifications: Mutex<Vec<Notice>>,
    /// `host:port` of the endpoint, for [`KvTransport::notify_addr`].
    addr: String,
}

fn registry() -> &'static Mutex<HashMap<String, Weak<Shared>>> {
    static R: OnceLock<Mutex<HashMap<String, Weak<Shared>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// In-process transport: block memory is a `Vec<u8>` (`num_blocks * block_bytes`, zeroed
/// lazily by the OS); remote engines are found by engine id in a process-wide registry.
pub struct InProcTransport {
    endpoint: KvEndpoint,
    shared: Arc<Shared>,
}

impl InProcTransport {
    /// Creates the memory and registers `endpoint.engine_id`.
    ///
    /// Errors: [`MockError::Config`] if the engine id is already registered.
    pub fn new(endpoint: KvEndpoint, layout: KvLayout, num_blocks: u32) -> Result<Self, MockError> {
        let shared = Arc::new(Shared {
            layout,
            num_blocks,
            memory: RwLock::new(vec![0u8; layout.block_bytes() * num_blocks as usize]),
            notifications: Mutex::new(Vec::new()),
            addr: format!("{}:{}", endpoint.host, endpoint.port),
        });
        let mut reg = registry().lock().expect("registry lock");
        reg.retain(|_, w| w.strong_count() > 0);
        if reg.contains_key(&endpoint.engine_id) {
            return Err(MockError::Config(format!(
                "engine id {} already in use",
                endpoint.engine_id
            )));
        }
        reg.insert(endpoint.engine_id.clone(), Arc::downgrade(&shared));
        Ok(Self { endpoint, shared })
    }

    fn range(&self, block: u32) -> std::ops::Range<usize> {
        let n = self.shared.layout.block_bytes();
        assert!(block < self.shared.num_blocks, "block {block} out of range");
        block as usize * n..(block as usize + 1) * n
    }
}

impl KvTransport for InProcTransport {
    fn endpoint(&self) -> KvEndpoint {
        self.endpoint.clone()
    }
    fn layout(&self) -> KvLayout {
        self.shared.layout
    }
    fn write_block(&self, block: u32, f: &mut dyn FnMut(&mut [u8])) {
        let r = self.range(block);
        let mut m = self.shared.memory.write().expect("kv memory lock");
        f(&mut m[r]);
    }
    fn read_block(&self, block: u32, f: &mut dyn FnMut(&[u8])) {
        let r = self.range(block);
        let m = self.shared.memory.read().expect("kv memory lock");
        f(&m[r]);
    }
    fn read_remote<'a>(
        &'a self,
        remote: &'a KvEndpoint,
        remote_blocks: &'a [u32],
        local_blocks: &'a [u32],
        notification: &'a [u8],
    ) -> TransferFuture<'a> {
        Box::pin(async move {
            let err = |reason: String| MockError::Transfer {
                engine: remote.engine_id.clone(),
                reason,
            };
            let peer = registry()
                .lock()
                .expect("registry lock")
                .get(&remote.engine_id)
                .and_then(Weak::upgrade)
                .ok_or_else(|| err("unknown engine (not running in this process)".into()))?;
            if Arc::ptr_eq(&peer, &self.shared) {
                return Err(err("cannot read from self".into()));
            }
            if remote_blocks.len() != local_blocks.len() {
                return Err(err(format!(
                    "{} remote blocks for {} local blocks",
                    remote_blocks.len(),
                    local_blocks.len()
                )));
            }
            if peer.layout != self.shared.layout {
                return Err(err(format!(
                    "KV layout mismatch: {:?} vs {:?}",
                    peer.layout, self.shared.layout
                )));
            }
            if let Some(b) = remote_blocks.iter().find(|&&b| b >= peer.num_blocks) {
                return Err(err(format!(
                    "remote block {b} out of range ({} blocks)",
                    peer.num_blocks
                )));
            }
            let n = self.shared.layout.block_bytes();
            {
                let src = peer.memory.read().expect("kv memory lock");
                let mut dst = self.shared.memory.write().expect("kv memory lock");
                for (&r, &l) in remote_blocks.iter().zip(local_blocks) {
                    let (r, l) = (r as usize * n, l as usize * n);
                    dst[l..l + n].copy_from_slice(&src[r..r + n]);
                }
            }
            peer.notifications.lock().expect("notif lock").push(Notice {
                from: self.endpoint.engine_id.clone(),
                payload: notification.to_vec(),
            });
            Ok(())
        })
    }
    fn take_notifications(&self) -> Vec<Notice> {
        std::mem::take(&mut *self.shared.notifications.lock().expect("notif lock"))
    }
    fn notify_addr<'a>(&'a self, addr: &'a str, payload: &'a [u8]) -> TransferFuture<'a> {
        Box::pin(async move {
            let peer = registry()
                .lock()
                .expect("registry lock")
                .values()
                .filter_map(Weak::upgrade)
                .find(|p| p.addr == addr)
                .ok_or_else(|| MockError::Transfer {
                    engine: addr.to_string(),
                    reason: "no engine of this process has that address".into(),
                })?;
            peer.notifications.lock().expect("notif lock").push(Notice {
                from: self.endpoint.engine_id.clone(),
                payload: payload.to_vec(),
            });
            Ok(())
        })
    }
}

impl Drop for InProcTransport {
    fn drop(&mut self) {
        if let Ok(mut reg) = registry().lock() {
            reg.remove(&self.endpoint.engine_id);
        }
    }
}
