//! KV block memory and movement between a prefill and a decode engine.
//!
//! The engine talks to a [`KvTransport`]: it owns the KV block memory (so a transfer engine
//! can register it), reads blocks from a remote engine with a completion notification
//! delivered to that engine (NIXL READ with `notif_msg`, as vLLM's NixlConnector does), and
//! hands back notifications received (`take_notifications`, NIXL `get_new_notifs`).
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
    fn take_notifications(&self) -> Vec<Vec<u8>>;
}

struct Shared {
    layout: KvLayout,
    num_blocks: u32,
    memory: RwLock<Vec<u8>>,
    notifications: Mutex<Vec<Vec<u8>>>,
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
            peer.notifications
                .lock()
                .expect("notif lock")
                .push(notification.to_vec());
            Ok(())
        })
    }
    fn take_notifications(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.shared.notifications.lock().expect("notif lock"))
    }
}

impl Drop for InProcTransport {
    fn drop(&mut self) {
        if let Ok(mut reg) = registry().lock() {
            reg.remove(&self.endpoint.engine_id);
        }
    }
}
