//! [`KvTransport`] over pdx's transfer engine (`pdx-transfer`), the way vLLM's NixlConnector
//! uses NIXL: the KV blocks live in one region allocated and registered by the engine's
//! [`Agent`] (memfd-backed host memory); the agent's listener is the metadata side channel
//! advertised as `remote_host:remote_port`; a decode engine fetches the prefill agent's
//! metadata once (`Agent::fetch_metadata` + `load_remote`, cached per engine id), takes the KV
//! region's base address from the metadata the agent vouched for (`Agent::remote_metadata`:
//! for a same-host prefill, what its Unix socket sent; NixlConnector exchanges
//! `kv_caches_base_addr` in its handshake), and posts one READ with a descriptor per block and
//! the prefill's request id as the notification, which the prefill engine picks up with
//! `take_notifications`.
//!
//! A KsanaLLM prefill tells a decode which blocks hold a request's KV with a notification sent to
//! the decode's agent by address (`notify_addr`: the decode's `coordinator_addr` from the
//! router's comm group): its metadata is fetched and loaded once per address, like a read's.
//!
//! With a shared secret (`--agent-secret-file`, or `PDX_AGENT_SECRET`), every agent connection
//! runs the mutual challenge–response of `pdx_transfer::auth` first; engines without the same
//! secret can neither read nor write this engine's KV, nor fetch its metadata.

use crate::error::MockError;
use crate::kv_cache::KvLayout;
use crate::transport::{KvEndpoint, KvTransport, Notice, TransferFuture};
use pdx_transfer::metadata::AgentMetadata;
use pdx_transfer::{
    Agent, AgentConfig, AgentSecret, RegisteredMemory, XferDescList, XferOp, XferOptions,
    XferStatus,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Limit on one remote read, including the metadata fetch.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);

/// A remote engine's KV region, from its metadata.
#[derive(Debug, Clone, Copy)]
struct RemoteRegion {
    addr: u64,
    len: u64,
}

struct Inner {
    agent: Agent,
    mem: RegisteredMemory,
    layout: KvLayout,
    num_blocks: u32,
    remotes: Mutex<HashMap<String, RemoteRegion>>,
    /// Agent names loaded for [`KvTransport::notify_addr`], by address.
    by_addr: Mutex<HashMap<String, String>>,
}

/// KV memory registered with a pdx transfer agent; see the module docs.
pub struct PdxTransport {
    inner: Arc<Inner>,
    endpoint: KvEndpoint,
}

fn terr(engine: &str, e: impl std::fmt::Display) -> MockError {
    MockError::Transfer {
        engine: engine.to_string(),
        reason: e.to_string(),
    }
}

impl PdxTransport {
    /// Starts an agent named `engine_id` listening on `listen` (`host:port`, port 0 =
    /// ephemeral), with the agent protocol's shared `secret` if any, and allocates `num_blocks`
    /// blocks of `layout` in registered memory.
    ///
    /// Errors: [`MockError::Config`] for a bad address; [`MockError::Transfer`] when the agent
    /// or the memory cannot be created.
    pub fn new(
        engine_id: &str,
        listen: &str,
        advertise_host: Option<String>,
        secret: Option<AgentSecret>,
        layout: KvLayout,
        num_blocks: u32,
    ) -> Result<Self, MockError> {
        let addr: std::net::SocketAddr = listen
            .parse()
            .map_err(|e| MockError::Config(format!("bad --kv-listen {listen}: {e}")))?;
        let mut cfg = AgentConfig::new(engine_id);
        cfg.listen = Some(addr);
        cfg.advertise_host = advertise_host.clone();
        cfg.populate = false;
        cfg.secret = secret;
        let agent = Agent::new(cfg).map_err(|e| terr(engine_id, e))?;
        let mem = agent
            .allocate(layout.block_bytes() * num_blocks as usize)
            .map_err(|e| terr(engine_id, e))?;
        let bound = agent
            .listen_addr()
            .ok_or_else(|| terr(engine_id, "agent has no listener"))?;
        let host = advertise_host.unwrap_or_else(|| {
            if bound.ip().is_unspecified() {
                "127.0.0.1".into()
            } else {
                bound.ip().to_string()
            }
        });
        Ok(Self {
            endpoint: KvEndpoint {
                engine_id: engine_id.to_string(),
                host,
                port: bound.port(),
            },
            inner: Arc::new(Inner {
                agent,
                mem,
                layout,
                num_blocks,
                remotes: Mutex::new(HashMap::new()),
                by_addr: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn offset(&self, block: u32) -> usize {
        assert!(block < self.inner.num_blocks, "block {block} out of range");
        block as usize * self.inner.layout.block_bytes()
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Inner {
    /// Blocking: loads the remote's metadata if needed, reads, notifies.
    fn read_blocking(
        &self,
        remote: &KvEndpoint,
        remote_blocks: &[u32],
        local_blocks: &[u32],
        notif: &[u8],
    ) -> Result<(), MockError> {
        let name = &remote.engine_id;
        if remote_blocks.len() != local_blocks.len() {
            return Err(terr(name, "remote and local block lists differ in length"));
        }
        let cached = self
            .remotes
            .lock()
            .expect("remotes lock")
            .get(name)
            .copied();
        let region = match cached {
            Some(r) => r,
            None => {
                let addr = format!("{}:{}", remote.host, remote.port);
                let bytes = self
                    .agent
                    .fetch_metadata(&addr)
                    .map_err(|e| terr(name, e))?;
                let md = AgentMetadata::decode(&bytes).map_err(|e| terr(name, e))?;
                if md.name != *name {
                    return Err(terr(
                        name,
                        format!("side channel {addr} belongs to engine {}", md.name),
                    ));
                }
                self.agent.load_remote(&bytes).map_err(|e| terr(name, e))?;
                // The region as the agent vouched for it (for a same-host prefill: what its Unix
                // socket sent), not as the side channel claimed it.
                let md = self
                    .agent
                    .remote_metadata(name)
                    .map_err(|e| terr(name, e))?;
                let r = md
                    .regions
                    .first()
                    .ok_or_else(|| terr(name, "remote has no registered KV memory"))?;
                let region = RemoteRegion {
                    addr: r.addr,
                    len: r.len,
                };
                self.remotes
                    .lock()
                    .expect("remotes lock")
                    .insert(name.clone(), region);
                region
            }
        };
        let bb = self.layout.block_bytes() as u64;
        if let Some(b) = remote_blocks
            .iter()
            .find(|&&b| (u64::from(b) + 1) * bb > region.len)
        {
            return Err(terr(
                name,
                format!(
                    "remote block {b} outside its KV region ({} bytes)",
                    region.len
                ),
            ));
        }
        let res = if remote_blocks.is_empty() {
            self.agent
                .notify(name, notif.to_vec())
                .map_err(|e| terr(name, e))
        } else {
            let base = self.mem.addr();
            let local = XferDescList::host_from(
                local_blocks.iter().map(|&b| (base + u64::from(b) * bb, bb)),
            );
            let rem = XferDescList::host_from(
                remote_blocks
                    .iter()
                    .map(|&b| (region.addr + u64::from(b) * bb, bb)),
            );
            let opts = XferOptions {
                notif: Some(notif.to_vec()),
                ..Default::default()
            };
            self.agent
                .create_xfer_from_descs(XferOp::Read, &local, name, &rem, opts)
                .and_then(|req| match req.post()? {
                    XferStatus::Done => Ok(()),
                    _ => req.wait(Some(TRANSFER_TIMEOUT)),
                })
                .map_err(|e| terr(name, e))
        };
        if res.is_err() {
            // The remote may have restarted: fetch its metadata again next time.
            self.remotes.lock().expect("remotes lock").remove(name);
            self.agent.invalidate_remote(name);
        }
        res
    }
}

impl Inner {
    /// Blocking: loads the agent listening on `addr` if needed, then notifies it.
    fn notify_addr_blocking(&self, addr: &str, payload: Vec<u8>) -> Result<(), MockError> {
        let cached = self
            .by_addr
            .lock()
            .expect("by_addr lock")
            .get(addr)
            .cloned();
        let name = match cached {
            Some(n) => n,
            None => {
                let name = self.agent.fetch_remote(addr).map_err(|e| terr(addr, e))?;
                self.by_addr
                    .lock()
                    .expect("by_addr lock")
                    .insert(addr.to_string(), name.clone());
                name
            }
        };
        let res = self
            .agent
            .notify(&name, payload)
            .map_err(|e| terr(&name, e));
        if res.is_err() {
            // The peer may have restarted (a new agent on the same address): load it again next time.
            self.by_addr.lock().expect("by_addr lock").remove(addr);
            self.agent.invalidate_remote(&name);
            self.remotes.lock().expect("remotes lock").remove(&name);
        }
        res
    }
}

impl KvTransport for PdxTransport {
    fn endpoint(&self) -> KvEndpoint {
        self.endpoint.clone()
    }
    fn layout(&self) -> KvLayout {
        self.inner.layout
    }
    fn write_block(&self, block: u32, f: &mut dyn FnMut(&mut [u8])) {
        let off = self.offset(block);
        SCRATCH.with_borrow_mut(|buf| {
            buf.resize(self.inner.layout.block_bytes(), 0);
            f(buf);
            self.inner
                .mem
                .write(off, buf)
                .expect("block inside registered KV memory");
        });
    }
    fn read_block(&self, block: u32, f: &mut dyn FnMut(&[u8])) {
        let off = self.offset(block);
        SCRATCH.with_borrow_mut(|buf| {
            buf.resize(self.inner.layout.block_bytes(), 0);
            self.inner
                .mem
                .read(off, buf)
                .expect("block inside registered KV memory");
            f(buf);
        });
    }
    fn read_remote<'a>(
        &'a self,
        remote: &'a KvEndpoint,
        remote_blocks: &'a [u32],
        local_blocks: &'a [u32],
        notification: &'a [u8],
    ) -> TransferFuture<'a> {
        let inner = self.inner.clone();
        let (remote, rb, lb, n) = (
            remote.clone(),
            remote_blocks.to_vec(),
            local_blocks.to_vec(),
            notification.to_vec(),
        );
        Box::pin(async move {
            let engine = remote.engine_id.clone();
            tokio::task::spawn_blocking(move || inner.read_blocking(&remote, &rb, &lb, &n))
                .await
                .map_err(|e| terr(&engine, e))?
        })
    }
    fn take_notifications(&self) -> Vec<Notice> {
        let notes = self.inner.agent.take_notifications();
        notes
            .into_iter()
            .map(|n| Notice {
                from: n.from,
                payload: n.payload,
            })
            .collect()
    }
    fn wait_notifications(&self, timeout: Duration) -> Vec<Notice> {
        let notes = self.inner.agent.wait_notifications(timeout);
        notes
            .into_iter()
            .map(|n| Notice {
                from: n.from,
                payload: n.payload,
            })
            .collect()
    }
    fn notify_addr<'a>(&'a self, addr: &'a str, payload: &'a [u8]) -> TransferFuture<'a> {
        let inner = self.inner.clone();
        let (addr, payload) = (addr.to_string(), payload.to_vec());
        Box::pin(async move {
            let a = addr.clone();
            tokio::task::spawn_blocking(move || inner.notify_addr_blocking(&a, payload))
                .await
                .map_err(|e| terr(&addr, e))?
        })
    }
}
