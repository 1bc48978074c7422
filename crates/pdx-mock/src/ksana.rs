//! The KsanaLLM node side (`pdx mock --ksana-router URL`): a prefill or decode engine registers with a
//! KsanaLLM router (its `simple_router`, or `pdx serve --orchestration ksana`), heartbeats, and hands KV
//! from prefill to decode per request, as KsanaLLM's connector does
//! (`src/ksana_llm/connector/{coordinator,router_client,communicator}` in Tencent/KsanaLLM).
//!
//! The protocol with the router (JSON over HTTP):
//! * `POST /RegisterNode` `{inference_addr, coordinator_addr, cluster_name?, group_role, node_rank,
//!   world_size, devices: [{device_id, device_type, device_ip}], job_id}` → 201 `{node_id, is_online,
//!   last_heartbeat}`. `inference_addr` is this engine's HTTP `host:port` (where the router sends requests);
//!   `coordinator_addr` is its control channel, here the `ip:port` of its `pdx-transfer` agent.
//! * `POST /Heartbeat {node_id}` every `--ksana-heartbeat-ms` (KsanaLLM's `heartbeat_interval_ms`, 5000) →
//!   `{group_ready, comm_group_to_address: {"<prefill>__<decode>": [[node_rank, device_id,
//!   coordinator_addr], ...]}, comm_group_to_id: {"<prefill>__<decode>": "<comm id>" or ""}}`: one comm group
//!   per prefill/decode pair, prefill tuples first. A heartbeat the router refuses (unknown node: the router
//!   lost its state) makes the node register again.
//! * `POST /RegisterCommId {node_id, comm_key, comm_id}` → `{status, comm_id}`: a rank-0 prefill registers
//!   one for every comm group of its heartbeat whose id is empty, i.e. once the group's decode has
//!   heartbeated (as KsanaLLM's NCCL communicator registers a new NCCL unique id), then heartbeats at once to
//!   learn the group's addresses. The comm id is what a decode needs to reach the prefill's KV:
//!   `pdx1;<engine id>;<agent ip:port>` (KsanaLLM: a base64 NCCL unique id). The router answers every
//!   node of the group with it, and clears it while either side is not ready.
//!
//! Per request the router sends the same body to a prefill and a decode at once, with
//! `kv-comm-group-key: <prefill>__<decode>` and `kv-comm-request-id: <id>`. The prefill computes the prompt's
//! KV and its first token, keeps the blocks under `<group key>/<request id>`, and sends the decode's agent
//! (the decode's `coordinator_addr` in the group's addresses) a notification naming them ([`KvNotice`]); it
//! answers with its first token. The decode waits for that notice (at most `--ksana-kv-wait-secs`), reads the
//! blocks from the agent of the group's comm id with one READ whose notification (the hold key) frees them on
//! the prefill, verifies every byte, and generates the whole answer. Nothing from a request names an address:
//! the headers only select a comm group this node learned from the router, and a notice counts only when it
//! comes from the agent the group's comm id names.

use crate::engine::Role;
use crate::metrics::Metrics;
use crate::transport::KvEndpoint;
use crate::MockError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use pdx_protocol::ApiError;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Request header naming the comm group: `<prefill inference_addr>__<decode inference_addr>`.
pub const HEADER_GROUP_KEY: &str = "kv-comm-group-key";
/// Request header with the request's id, the same on the prefill and the decode.
pub const HEADER_REQUEST_ID: &str = "kv-comm-request-id";
/// Longest comm group key, bytes (the router's `comm_group_pair.comm_key` is a `String(256)`).
pub const MAX_GROUP_KEY_BYTES: usize = 256;
/// Longest request id, bytes (KsanaLLM's router sends a decimal 31-bit number).
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Longest router answer read, bytes.
pub const MAX_ROUTER_BODY_BYTES: usize = 1 << 20;
/// Most comm groups taken from one heartbeat answer (more: the answer is refused).
pub const MAX_GROUPS: usize = 1024;
/// Most `[rank, device, addr]` tuples per comm group.
pub const MAX_GROUP_ADDRS: usize = 1024;
/// Longest comm id, bytes.
pub const MAX_COMM_ID_BYTES: usize = 1024;
/// Longest node id, bytes (the router's `node_info.node_id` is a `String(64)`).
pub const MAX_NODE_ID_BYTES: usize = 64;
/// Most KV notices a decode keeps for requests it has not seen yet (more are dropped with a warning).
pub const MAX_PENDING_NOTICES: usize = 4096;
/// Limit on one call to the router (connect, send, read).
const ROUTER_TIMEOUT: Duration = Duration::from_secs(10);
/// First bytes of a [`KvNotice`] payload (other notifications are vLLM-style read notifications).
pub const NOTICE_PREFIX: &[u8] = b"pdx-ksana-kv/1 ";
/// First field of a comm id.
const COMM_ID_TAG: &str = "pdx1";

/// The node's settings (from `pdx mock` flags).
#[derive(Debug, Clone)]
pub struct KsanaConfig {
    /// Router base URL, `http://host:port` (a path prefix is kept).
    pub router: String,
    /// `cluster_name` sent at registration (`None`: the router's own).
    pub cluster_name: Option<String>,
    /// Prefill or decode.
    pub role: Role,
    /// Rank of this node in its group.
    pub node_rank: u32,
    /// Devices of the whole group (KsanaLLM's `world_size`).
    pub world_size: u32,
    /// Devices of this node.
    pub devices: u32,
    /// This engine's HTTP `host:port`, the group's address at the router.
    pub inference_addr: String,
    /// This engine's KV agent, `ip:port` (KsanaLLM's `coordinator_addr`).
    pub coordinator_addr: SocketAddr,
    /// This engine's KV agent name (engine id).
    pub engine_id: String,
    /// Between heartbeats (KsanaLLM's `heartbeat_interval_ms`, 5 s).
    pub heartbeat: Duration,
    /// How long a request waits for its comm group to be ready and, on a decode, for the prefill's KV.
    pub kv_wait: Duration,
}

impl KsanaConfig {
    /// Checks the settings. Errors: [`MockError::Config`] naming the flag.
    pub fn validate(&self) -> Result<(), MockError> {
        let bad = |m: String| Err(MockError::Config(m));
        if self.role == Role::Aggregated {
            return bad("--ksana-router needs --role prefill or --role decode".into());
        }
        split_url(&self.router).map_err(MockError::Config)?;
        if self.world_size == 0 || self.devices == 0 || self.devices > self.world_size {
            return bad(format!(
                "--world-size ({}) must be at least --ksana-devices ({}) and both > 0",
                self.world_size, self.devices
            ));
        }
        if self.world_size > 4096 {
            return bad("--world-size is at most 4096".into());
        }
        if self.inference_addr.contains("__")
            || !valid_addr_text(&self.inference_addr)
            || self.inference_addr.len() > 128
        {
            return bad(format!(
                "the inference address `{}` must be host:port (at most 128 bytes, no `__`)",
                self.inference_addr.escape_debug()
            ));
        }
        if let Some(c) = &self.cluster_name {
            if c.is_empty() || c.len() > 128 || !c.bytes().all(|b| b.is_ascii_graphic()) {
                return bad("--ksana-cluster-name: 1 to 128 printable ASCII bytes".into());
            }
        }
        if self.coordinator_addr.ip().is_unspecified() {
            return bad("the KV agent's address must be a concrete IP (--advertise-host)".into());
        }
        Ok(())
    }

    /// The comm id this node registers as a rank-0 prefill: `pdx1;<engine id>;<agent ip:port>`.
    pub fn comm_id(&self) -> String {
        CommId {
            engine_id: self.engine_id.clone(),
            agent: self.coordinator_addr,
        }
        .encode()
    }
}

/// `host:port` text: printable ASCII without `/`, a non-empty host and a numeric port.
fn valid_addr_text(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
        && s.rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}

/// Splits `http://authority[/prefix]` into the authority and the path prefix (without trailing `/`).
fn split_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--ksana-router: only http:// URLs are supported, got {url}"))?;
    let (authority, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.is_empty() || !authority.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("--ksana-router: bad host in {url}"));
    }
    Ok((authority.to_string(), prefix.to_string()))
}

/// One request's comm group and id, from its `kv-comm-*` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvComm {
    /// `<prefill>__<decode>`.
    pub group_key: String,
    /// The router's id of the request.
    pub request_id: String,
}

impl KvComm {
    /// The name the prefill keeps the request's KV under, and the decode's read notification:
    /// `<group key>/<request id>`.
    pub fn hold_key(&self) -> String {
        format!("{}/{}", self.group_key, self.request_id)
    }

    /// The `kv-comm-*` headers of a request: `None` without both; 400 when only one is there or either is
    /// malformed (a key not `<host:port>__<host:port>` of at most [`MAX_GROUP_KEY_BYTES`], an id not 1 to
    /// [`MAX_REQUEST_ID_BYTES`] of `[A-Za-z0-9._:-]`).
    pub fn from_headers(h: &hyper::HeaderMap) -> Result<Option<KvComm>, ApiError> {
        let get = |name: &str| -> Result<Option<&str>, ApiError> {
            match h.get(name) {
                None => Ok(None),
                Some(v) => v.to_str().map(Some).map_err(|_| {
                    ApiError::bad_request(format!("header {name} must be printable ASCII"))
                }),
            }
        };
        let (key, id) = match (get(HEADER_GROUP_KEY)?, get(HEADER_REQUEST_ID)?) {
            (None, None) => return Ok(None),
            (Some(k), Some(i)) => (k.trim(), i.trim()),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "headers {HEADER_GROUP_KEY} and {HEADER_REQUEST_ID} come together"
                )))
            }
        };
        check_group_key(key).map_err(ApiError::bad_request)?;
        check_request_id(id).map_err(ApiError::bad_request)?;
        Ok(Some(KvComm {
            group_key: key.to_string(),
            request_id: id.to_string(),
        }))
    }
}

/// A request id is 1 to [`MAX_REQUEST_ID_BYTES`] bytes of `[A-Za-z0-9._:-]`.
fn check_request_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "header {HEADER_REQUEST_ID} must be 1 to {MAX_REQUEST_ID_BYTES} bytes of [A-Za-z0-9._:-]"
        ))
    }
}

/// A comm group key is `<prefill host:port>__<decode host:port>` of at most [`MAX_GROUP_KEY_BYTES`].
fn check_group_key(key: &str) -> Result<(), String> {
    let ok = key.len() <= MAX_GROUP_KEY_BYTES
        && key
            .split_once("__")
            .is_some_and(|(p, d)| valid_addr_text(p) && valid_addr_text(d) && !d.contains("__"));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "comm group key `{}` is not <prefill host:port>__<decode host:port> of at most {MAX_GROUP_KEY_BYTES} bytes",
            key.chars().take(80).collect::<String>().escape_debug()
        ))
    }
}

/// What a rank-0 prefill registers as its groups' comm id: the agent a decode reads the KV from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommId {
    /// The prefill's agent name (engine id).
    pub engine_id: String,
    /// Its agent's metadata side channel.
    pub agent: SocketAddr,
}

impl CommId {
    /// `pdx1;<engine id>;<ip:port>`.
    pub fn encode(&self) -> String {
        format!("{COMM_ID_TAG};{};{}", self.engine_id, self.agent)
    }

    /// Parses [`CommId::encode`]'s text. Errors: what is wrong, for a log line.
    pub fn parse(s: &str) -> Result<CommId, String> {
        if s.len() > MAX_COMM_ID_BYTES {
            return Err(format!("comm id over {MAX_COMM_ID_BYTES} bytes"));
        }
        let mut it = s.split(';');
        let (tag, id, addr) = (it.next(), it.next(), it.next());
        if tag != Some(COMM_ID_TAG) || it.next().is_some() {
            return Err(format!(
                "comm id `{}` is not a pdx one ({COMM_ID_TAG};engine;ip:port)",
                s.chars().take(64).collect::<String>().escape_debug()
            ));
        }
        let id = id.unwrap_or_default();
        if id.is_empty() || id.len() > 256 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("comm id: bad engine id".into());
        }
        let agent: SocketAddr = addr
            .unwrap_or_default()
            .parse()
            .map_err(|e| format!("comm id: bad agent address: {e}"))?;
        if agent.ip().is_unspecified() || agent.port() == 0 {
            return Err("comm id: the agent address must be a concrete ip:port".into());
        }
        Ok(CommId {
            engine_id: id.to_string(),
            agent,
        })
    }
}

/// The prefill's notification to a decode: the blocks that hold the KV of a request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvNotice {
    /// Comm group key.
    pub key: String,
    /// Request id.
    pub rid: String,
    /// Prompt tokens whose KV the blocks hold.
    pub tokens: u32,
    /// The prefill's block ids, in prompt order.
    pub blocks: Vec<u32>,
}

impl KvNotice {
    /// [`NOTICE_PREFIX`] then the JSON of the notice.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = NOTICE_PREFIX.to_vec();
        serde_json::to_writer(&mut v, self).expect("notice serializes");
        v
    }

    /// Parses [`KvNotice::encode`]'s bytes (without the prefix check: the caller dispatched on it),
    /// checking the key, the id and that it names at most `max_blocks` blocks.
    pub fn decode(payload: &[u8], max_blocks: usize) -> Result<KvNotice, String> {
        let body = payload
            .strip_prefix(NOTICE_PREFIX)
            .ok_or("not a KV notice")?;
        let n: KvNotice =
            serde_json::from_slice(body).map_err(|e| format!("bad KV notice: {e}"))?;
        check_group_key(&n.key)?;
        check_request_id(&n.rid)?;
        if n.blocks.len() > max_blocks {
            return Err(format!(
                "KV notice names {} blocks, more than the cache has",
                n.blocks.len()
            ));
        }
        Ok(n)
    }
}

/// What this node knows of one comm group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Group {
    /// The group's comm id (empty at the router: `None`).
    comm_id: Option<CommId>,
    /// Prefill: the agent of the group's rank-0 decode (its `coordinator_addr`).
    decode_agent: Option<SocketAddr>,
}

#[derive(Debug, Default)]
struct State {
    node_id: Option<String>,
    group_ready: bool,
    groups: HashMap<String, Group>,
}

enum Slot {
    /// The notice came before the decode's request.
    Ready {
        from: String,
        notice: KvNotice,
        at: Instant,
    },
    /// The request waits for its notice.
    Waiting(tokio::sync::oneshot::Sender<(String, KvNotice)>),
}

/// A KsanaLLM node: registration, heartbeat, comm groups, and the decode's table of KV notices.
pub struct KsanaNode {
    cfg: KsanaConfig,
    state: Mutex<State>,
    /// Bumped whenever the comm groups change, so requests waiting for a group wake.
    version: tokio::sync::watch::Sender<u64>,
    slots: Mutex<HashMap<String, Slot>>,
    max_blocks: usize,
    last_sweep: Mutex<Instant>,
}

impl std::fmt::Debug for KsanaNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KsanaNode")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Router JSON: the answer to `/RegisterNode`.
#[derive(Debug, serde::Deserialize)]
struct Registered {
    node_id: String,
}

/// Router JSON: the answer to `/Heartbeat`. Unknown fields (`timestamp`, `node_role`, ...) are ignored.
#[derive(Debug, serde::Deserialize)]
struct HeartbeatReply {
    #[serde(default)]
    group_ready: bool,
    #[serde(default)]
    comm_group_to_address: HashMap<String, Vec<(i64, i64, String)>>,
    #[serde(default)]
    comm_group_to_id: HashMap<String, Option<String>>,
}

impl KsanaNode {
    /// A node with `cfg` (validated), whose KV cache has `max_blocks` blocks.
    ///
    /// Errors: [`MockError::Config`] from [`KsanaConfig::validate`].
    pub fn new(cfg: KsanaConfig, max_blocks: usize) -> Result<Self, MockError> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            state: Mutex::default(),
            version: tokio::sync::watch::channel(0).0,
            slots: Mutex::default(),
            max_blocks,
            last_sweep: Mutex::new(Instant::now()),
        })
    }

    /// The settings.
    pub fn config(&self) -> &KsanaConfig {
        &self.cfg
    }

    /// The id the router gave this node, once registered.
    pub fn node_id(&self) -> Option<String> {
        self.state.lock().expect("state lock").node_id.clone()
    }

    /// Whether the router last said this node's group is ready (all its ranks online).
    pub fn group_ready(&self) -> bool {
        self.state.lock().expect("state lock").group_ready
    }

    /// Comm groups this node can serve requests of now: a prefill's with its comm id registered and the
    /// decode's agent known, a decode's with the prefill's comm id known.
    pub fn ready_groups(&self) -> usize {
        let s = self.state.lock().expect("state lock");
        s.groups.values().filter(|g| self.usable(g)).count()
    }

    fn usable(&self, g: &Group) -> bool {
        match self.cfg.role {
            Role::Prefill => g.comm_id.is_some() && g.decode_agent.is_some(),
            _ => g.comm_id.is_some(),
        }
    }

    /// Checks that a request's comm group is one this node is part of (400 otherwise): a prefill's key starts
    /// with its inference address, a decode's ends with it; only rank 0 serves requests.
    pub fn check(&self, comm: &KvComm) -> Result<(), ApiError> {
        let me = &self.cfg.inference_addr;
        let (p, d) = comm
            .group_key
            .split_once("__")
            .ok_or_else(|| ApiError::bad_request("bad comm group key"))?;
        let mine = match self.cfg.role {
            Role::Prefill => p == me,
            _ => d == me,
        };
        if !mine {
            return Err(ApiError::bad_request(format!(
                "comm group `{}` does not have this {} ({me}) in it",
                comm.group_key,
                self.cfg.role.as_str()
            )));
        }
        if self.cfg.node_rank != 0 {
            return Err(ApiError::bad_request(format!(
                "this node is rank {} of its group; requests go to rank 0",
                self.cfg.node_rank
            )));
        }
        Ok(())
    }

    /// Waits (until `deadline`) for comm group `key` to be usable ([`KsanaNode::ready_groups`]) and returns
    /// it. Errors: 503 when it is not by then.
    async fn group(&self, key: &str, deadline: Instant) -> Result<Group, ApiError> {
        let mut rx = self.version.subscribe();
        loop {
            rx.borrow_and_update();
            if let Some(g) = self
                .state
                .lock()
                .expect("state lock")
                .groups
                .get(key)
                .filter(|g| self.usable(g))
            {
                return Ok(g.clone());
            }
            let wait = tokio::time::timeout_at(deadline.into(), rx.changed()).await;
            if !matches!(wait, Ok(Ok(()))) {
                return Err(ApiError::unavailable(format!(
                    "comm group {key} is not ready on this {} (no comm id or peer address from the router yet)",
                    self.cfg.role.as_str()
                )));
            }
        }
    }

    /// Prefill: the agent of the decode of comm group `key`, once known (until `deadline`; 503 after).
    pub async fn decode_agent(&self, key: &str, deadline: Instant) -> Result<SocketAddr, ApiError> {
        let g = self.group(key, deadline).await?;
        Ok(g.decode_agent
            .expect("usable prefill group has a decode agent"))
    }

    /// Decode: waits (until `deadline`) for the group's comm id and for the prefill's notice of request `comm`,
    /// and returns the prefill's KV endpoint and the notice.
    ///
    /// Errors: 504 when no notice comes in time (the prefill failed, or was never sent the request); 503 when
    /// the comm group is not ready; 502 `KVTransferError` when the notice came from another agent than the
    /// group's comm id names.
    pub async fn await_kv(
        &self,
        comm: &KvComm,
        deadline: Instant,
    ) -> Result<(KvEndpoint, KvNotice), ApiError> {
        // The group first: a request for a group the router never made ready fails as not ready (503), and a
        // notice that comes meanwhile waits in the table.
        let g = self.group(&comm.group_key, deadline).await?;
        let id = g.comm_id.expect("usable decode group has a comm id");
        let hold = comm.hold_key();
        let rx = {
            let mut slots = self.slots.lock().expect("slots lock");
            match slots.remove(&hold) {
                Some(Slot::Ready { from, notice, .. }) => Ok((from, notice)),
                _ => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    slots.insert(hold.clone(), Slot::Waiting(tx));
                    Err(rx)
                }
            }
        };
        let (from, notice) = match rx {
            Ok(got) => got,
            Err(rx) => {
                // Removes the waiting slot when the request ends first (timeout, client gone).
                let _guard = WaitGuard {
                    node: self,
                    key: &hold,
                };
                match tokio::time::timeout_at(deadline.into(), rx).await {
                    Ok(Ok(got)) => got,
                    _ => {
                        return Err(ApiError::new(
                            504,
                            "KVTransferError",
                            format!(
                            "no KV from the prefill of comm group {} for request {} within {:.1} s",
                            comm.group_key,
                            comm.request_id,
                            self.cfg.kv_wait.as_secs_f64()
                        ),
                        ))
                    }
                }
            }
        };
        if from != id.engine_id {
            return Err(ApiError::new(
                502,
                "KVTransferError",
                format!(
                    "the KV notice of request {} came from agent `{from}`, not from `{}` of comm group {}",
                    comm.request_id, id.engine_id, comm.group_key
                ),
            ));
        }
        Ok((
            KvEndpoint {
                engine_id: id.engine_id,
                host: id.agent.ip().to_string(),
                port: id.agent.port(),
            },
            notice,
        ))
    }

    /// Takes a KV notice received from agent `from` (decode role): hands it to the request waiting for it, or
    /// keeps it for the request to come (at most [`MAX_PENDING_NOTICES`]; kept for `--ksana-kv-wait-secs`).
    /// Malformed notices, and ones for groups without this node, are dropped with a warning.
    pub fn on_notice(&self, from: &str, payload: &[u8]) {
        let notice = match KvNotice::decode(payload, self.max_blocks) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(from, error = %e, "KV notice dropped");
                return;
            }
        };
        let comm = KvComm {
            group_key: notice.key.clone(),
            request_id: notice.rid.clone(),
        };
        if self.cfg.role != Role::Decode || self.check(&comm).is_err() {
            tracing::warn!(from, key = %notice.key, "KV notice for a comm group without this node dropped");
            return;
        }
        let hold = comm.hold_key();
        let mut slots = self.slots.lock().expect("slots lock");
        let got = (from.to_string(), notice);
        let got = match slots.remove(&hold) {
            Some(Slot::Waiting(tx)) => match tx.send(got) {
                Ok(()) => return,
                Err(got) => got,
            },
            _ => got,
        };
        if slots.len() >= MAX_PENDING_NOTICES {
            tracing::warn!(
                from,
                request = %got.1.rid,
                "{MAX_PENDING_NOTICES} KV notices wait for their requests; this one is dropped"
            );
            return;
        }
        slots.insert(
            hold,
            Slot::Ready {
                from: got.0,
                notice: got.1,
                at: Instant::now(),
            },
        );
    }

    /// Removes the notices no request took within `--ksana-kv-wait-secs` (checked at most once a second) and
    /// returns their hold keys with the prefill agent to release each at (when its group's comm id is known).
    pub fn sweep(&self, now: Instant) -> Vec<(String, KvEndpoint)> {
        {
            let mut last = self.last_sweep.lock().expect("sweep lock");
            if now.duration_since(*last) < Duration::from_secs(1) {
                return Vec::new();
            }
            *last = now;
        }
        let wait = self.cfg.kv_wait;
        let expired: Vec<(String, String)> = {
            let mut slots = self.slots.lock().expect("slots lock");
            let keys: Vec<(String, String)> = slots
                .iter()
                .filter_map(|(k, s)| match s {
                    Slot::Ready { at, notice, .. } if now.duration_since(*at) >= wait => {
                        Some((k.clone(), notice.key.clone()))
                    }
                    _ => None,
                })
                .collect();
            for (k, _) in &keys {
                slots.remove(k);
            }
            keys
        };
        let state = self.state.lock().expect("state lock");
        expired
            .into_iter()
            .filter_map(|(hold, group)| {
                tracing::warn!(request = %hold, "no request came for a KV notice; releasing the prefill's blocks");
                let id = state.groups.get(&group)?.comm_id.clone()?;
                Some((
                    hold,
                    KvEndpoint {
                        engine_id: id.engine_id,
                        host: id.agent.ip().to_string(),
                        port: id.agent.port(),
                    },
                ))
            })
            .collect()
    }

    /// Registers, then heartbeats every `--ksana-heartbeat-ms` until `shutdown`; a rank-0 prefill registers
    /// the comm ids its heartbeats ask for. Failures are logged and retried at the next heartbeat.
    pub async fn run(self: std::sync::Arc<Self>, engine: std::sync::Arc<crate::Engine>) {
        let mut shutdown = engine.shutdown.subscribe();
        let metrics = &engine.metrics;
        let client = match RouterClient::new(&self.cfg.router) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "KsanaLLM router URL");
                return;
            }
        };
        // Registers at once (as KsanaLLM's coordinator does at start), then beats on the interval.
        let mut again = true;
        loop {
            if !again {
                tokio::select! {
                    _ = tokio::time::sleep(self.cfg.heartbeat) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
            again = self.beat(&client, metrics).await;
        }
    }

    /// One round: register when not registered, else heartbeat (and register comm ids). Returns whether to go
    /// again at once (just registered, or registered a comm id: the next answer tells more).
    async fn beat(&self, client: &RouterClient, metrics: &Metrics) -> bool {
        let node_id = self.node_id();
        let Some(node_id) = node_id else {
            let ok = self.register(client).await;
            metrics.ksana_registered.set(i64::from(ok));
            if ok {
                metrics.ksana_registrations.inc();
            }
            return ok;
        };
        let reply = match client
            .post("/Heartbeat", &serde_json::json!({"node_id": node_id}))
            .await
        {
            Ok((200, body)) => body,
            Ok((status, body)) => {
                // The router no longer knows this node (lost its state, or timed the node out): register again.
                tracing::warn!(
                    status,
                    body = %String::from_utf8_lossy(&body[..body.len().min(200)]),
                    "KsanaLLM heartbeat refused; registering again"
                );
                self.forget(metrics);
                return false;
            }
            Err(e) => {
                tracing::warn!(error = %e, "KsanaLLM heartbeat failed");
                return false;
            }
        };
        let to_register = match self.apply_heartbeat(&reply) {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(error = %e, "KsanaLLM heartbeat answer refused");
                return false;
            }
        };
        metrics.ksana_groups_ready.set(self.ready_groups() as i64);
        let mut registered = false;
        for key in to_register {
            let body = serde_json::json!({"node_id": node_id, "comm_key": key, "comm_id": self.cfg.comm_id()});
            match client.post("/RegisterCommId", &body).await {
                Ok((200, b)) => {
                    let echoed = serde_json::from_slice::<serde_json::Value>(&b)
                        .ok()
                        .and_then(|v| v.get("comm_id")?.as_str().map(str::to_string));
                    if echoed.as_deref() == Some(self.cfg.comm_id().as_str()) {
                        tracing::info!(comm_key = %key, "KsanaLLM comm id registered");
                        registered = true;
                    } else {
                        tracing::warn!(comm_key = %key, "KsanaLLM router answered another comm id");
                    }
                }
                Ok((status, b)) => tracing::warn!(
                    comm_key = %key,
                    status,
                    body = %String::from_utf8_lossy(&b[..b.len().min(200)]),
                    "KsanaLLM comm id refused"
                ),
                Err(e) => {
                    tracing::warn!(comm_key = %key, error = %e, "KsanaLLM comm id not registered")
                }
            }
        }
        registered
    }

    fn forget(&self, metrics: &Metrics) {
        let mut s = self.state.lock().expect("state lock");
        *s = State::default();
        drop(s);
        metrics.ksana_registered.set(0);
        metrics.ksana_groups_ready.set(0);
        self.version.send_modify(|v| *v += 1);
    }

    async fn register(&self, client: &RouterClient) -> bool {
        let c = &self.cfg;
        let device_ip = c.coordinator_addr.ip().to_string();
        let devices: Vec<serde_json::Value> = (0..c.devices)
            .map(|i| serde_json::json!({"device_id": i, "device_type": "pdx-mock", "device_ip": device_ip}))
            .collect();
        let mut body = serde_json::json!({
            "inference_addr": c.inference_addr,
            "coordinator_addr": c.coordinator_addr.to_string(),
            "group_role": c.role.as_str(),
            "node_rank": c.node_rank,
            "world_size": c.world_size,
            "devices": devices,
            "job_id": c.engine_id,
        });
        if let Some(name) = &c.cluster_name {
            body["cluster_name"] = name.clone().into();
        }
        match client.post("/RegisterNode", &body).await {
            Ok((200 | 201, b)) => match serde_json::from_slice::<Registered>(&b) {
                Ok(r)
                    if !r.node_id.is_empty()
                        && r.node_id.len() <= MAX_NODE_ID_BYTES
                        && r.node_id.bytes().all(|b| b.is_ascii_graphic()) =>
                {
                    tracing::info!(node_id = %r.node_id, router = %c.router, "registered as a KsanaLLM node");
                    self.state.lock().expect("state lock").node_id = Some(r.node_id);
                    true
                }
                _ => {
                    tracing::warn!("KsanaLLM router's registration answer has no usable node_id");
                    false
                }
            },
            Ok((status, b)) => {
                tracing::warn!(
                    status,
                    body = %String::from_utf8_lossy(&b[..b.len().min(300)]),
                    "KsanaLLM registration refused"
                );
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, router = %c.router, "KsanaLLM registration failed");
                false
            }
        }
    }

    /// Takes a heartbeat answer: the groups of this node (checked and bounded; others ignored) replace the
    /// known ones. Returns the comm groups a rank-0 prefill must register its comm id for.
    ///
    /// Errors: a malformed answer, or one with more than [`MAX_GROUPS`] groups or [`MAX_GROUP_ADDRS`] tuples
    /// in a group; nothing is changed then.
    pub fn apply_heartbeat(&self, body: &[u8]) -> Result<Vec<String>, String> {
        let r: HeartbeatReply =
            serde_json::from_slice(body).map_err(|e| format!("bad heartbeat answer: {e}"))?;
        if r.comm_group_to_id.len() > MAX_GROUPS || r.comm_group_to_address.len() > MAX_GROUPS {
            return Err(format!("more than {MAX_GROUPS} comm groups"));
        }
        if r.comm_group_to_address
            .values()
            .any(|v| v.len() > MAX_GROUP_ADDRS)
        {
            return Err(format!(
                "more than {MAX_GROUP_ADDRS} addresses in a comm group"
            ));
        }
        let c = &self.cfg;
        let own_id = c.comm_id();
        let mut groups = HashMap::new();
        let mut to_register = Vec::new();
        for (key, id) in &r.comm_group_to_id {
            if check_group_key(key).is_err() {
                continue;
            }
            let (p, d) = key.split_once("__").expect("checked key");
            let mine = match c.role {
                Role::Prefill => p == c.inference_addr,
                _ => d == c.inference_addr,
            };
            if !mine {
                continue;
            }
            let id = id.as_deref().unwrap_or("");
            let comm_id = if id.is_empty() {
                None
            } else {
                match CommId::parse(id) {
                    Ok(i) => Some(i),
                    Err(e) => {
                        tracing::warn!(comm_key = %key, error = %e, "comm id ignored");
                        None
                    }
                }
            };
            if c.role == Role::Prefill && c.node_rank == 0 && id != own_id {
                to_register.push(key.clone());
            }
            // The group's tuples: the prefill's `world_size` devices first, then the decode's (the router sorts
            // them by role, rank and device; KsanaLLM's communicators index them the same way).
            let decode_agent = r.comm_group_to_address.get(key).and_then(|t| {
                let (rank, _, addr) = t.get(c.world_size as usize)?;
                let a: SocketAddr = addr.parse().ok()?;
                (*rank == 0 && !a.ip().is_unspecified()).then_some(a)
            });
            let g = Group {
                // Only our own id counts for a prefill: another is a stale one the router will replace.
                comm_id: comm_id.filter(|i| c.role != Role::Prefill || i.encode() == own_id),
                decode_agent,
            };
            groups.insert(key.clone(), g);
        }
        let changed = {
            let mut s = self.state.lock().expect("state lock");
            s.group_ready = r.group_ready;
            let changed = s.groups != groups;
            s.groups = groups;
            changed
        };
        if changed {
            self.version.send_modify(|v| *v += 1);
        }
        to_register.sort();
        Ok(to_register)
    }
}

struct WaitGuard<'a> {
    node: &'a KsanaNode,
    key: &'a str,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut slots = self.node.slots.lock().expect("slots lock");
        if matches!(slots.get(self.key), Some(Slot::Waiting(_))) {
            slots.remove(self.key);
        }
    }
}

/// The router's HTTP/1.1 client: one connection per call, bounded in time and in answer size.
struct RouterClient {
    authority: String,
    prefix: String,
}

impl RouterClient {
    fn new(url: &str) -> Result<Self, String> {
        let (authority, prefix) = split_url(url)?;
        Ok(Self { authority, prefix })
    }

    /// POSTs `body` to `path`; the status and the body (at most [`MAX_ROUTER_BODY_BYTES`]).
    async fn post(&self, path: &str, body: &serde_json::Value) -> Result<(u16, Bytes), String> {
        let call = async {
            let stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .map_err(|e| format!("connect {}: {e}", self.authority))?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let req = hyper::Request::post(format!("{}{path}", self.prefix))
                .header(hyper::header::HOST, &self.authority)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header(hyper::header::ACCEPT, "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .map_err(|e| e.to_string())?;
            let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_ROUTER_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(ROUTER_TIMEOUT, call)
            .await
            .map_err(|_| format!("no answer within {ROUTER_TIMEOUT:?}"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(role: Role) -> KsanaConfig {
        KsanaConfig {
            router: "http://127.0.0.1:9".into(),
            cluster_name: None,
            role,
            node_rank: 0,
            world_size: 1,
            devices: 1,
            inference_addr: match role {
                Role::Prefill => "127.0.0.1:1000".into(),
                _ => "127.0.0.1:2000".into(),
            },
            coordinator_addr: match role {
                Role::Prefill => "127.0.0.1:1001".parse().unwrap(),
                _ => "127.0.0.1:2001".parse().unwrap(),
            },
            engine_id: format!("e-{}", role.as_str()),
            heartbeat: Duration::from_millis(50),
            kv_wait: Duration::from_millis(300),
        }
    }

    const KEY: &str = "127.0.0.1:1000__127.0.0.1:2000";

    fn headers(k: Option<&str>, i: Option<&str>) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        if let Some(k) = k {
            h.insert(HEADER_GROUP_KEY, k.parse().unwrap());
        }
        if let Some(i) = i {
            h.insert(HEADER_REQUEST_ID, i.parse().unwrap());
        }
        h
    }

    #[test]
    fn comm_headers_are_parsed_strictly() {
        assert_eq!(KvComm::from_headers(&headers(None, None)).unwrap(), None);
        let c = KvComm::from_headers(&headers(Some(KEY), Some("1234")))
            .unwrap()
            .unwrap();
        assert_eq!(c.hold_key(), format!("{KEY}/1234"));
        for (k, i) in [
            (Some(KEY), None),
            (None, Some("1")),
            (Some("nokey"), Some("1")),
            (Some("a:1__"), Some("1")),
            (Some("a:1__b:x"), Some("1")),
            (Some("a/b:1__c:2"), Some("1")),
            (Some(KEY), Some("a/b")),
            (Some(KEY), Some("")),
        ] {
            let e = KvComm::from_headers(&headers(k, i)).unwrap_err();
            assert_eq!(e.status, 400, "{k:?} {i:?}");
        }
        let long = format!("{KEY}{}", "0".repeat(300));
        assert_eq!(
            KvComm::from_headers(&headers(Some(&long), Some("1")))
                .unwrap_err()
                .status,
            400
        );
        let long_id = "1".repeat(MAX_REQUEST_ID_BYTES + 1);
        assert!(KvComm::from_headers(&headers(Some(KEY), Some(&long_id))).is_err());
    }

    #[test]
    fn comm_ids_round_trip_and_bad_ones_are_refused() {
        let c = cfg(Role::Prefill);
        let id = CommId::parse(&c.comm_id()).unwrap();
        assert_eq!(id.engine_id, "e-prefill");
        assert_eq!(id.agent, c.coordinator_addr);
        for bad in [
            "",
            "AAAA",
            "pdx1;e",
            "pdx1;e;127.0.0.1",
            "pdx1;e;0.0.0.0:5",
            "pdx1;e;127.0.0.1:5;x",
            "pdx2;e;127.0.0.1:5",
            "pdx1;;127.0.0.1:5",
        ] {
            assert!(CommId::parse(bad).is_err(), "{bad}");
        }
        assert!(CommId::parse(&format!("pdx1;{};127.0.0.1:5", "e".repeat(2000))).is_err());
    }

    #[test]
    fn notices_round_trip_and_are_bounded() {
        let n = KvNotice {
            key: KEY.into(),
            rid: "7".into(),
            tokens: 40,
            blocks: vec![3, 4, 5],
        };
        assert_eq!(KvNotice::decode(&n.encode(), 8).unwrap(), n);
        assert!(KvNotice::decode(&n.encode(), 2).is_err());
        let mut bad = NOTICE_PREFIX.to_vec();
        bad.extend_from_slice(br#"{"key":"x","rid":"7","tokens":1,"blocks":[]}"#);
        assert!(KvNotice::decode(&bad, 8).is_err());
        let mut extra = NOTICE_PREFIX.to_vec();
        extra.extend_from_slice(
            br#"{"key":"127.0.0.1:1000__127.0.0.1:2000","rid":"7","tokens":1,"blocks":[],"x":1}"#,
        );
        assert!(KvNotice::decode(&extra, 8).is_err());
        assert!(KvNotice::decode(b"chatcmpl-1", 8).is_err());
    }

    #[test]
    fn config_is_checked() {
        assert!(cfg(Role::Prefill).validate().is_ok());
        let mut c = cfg(Role::Aggregated);
        c.role = Role::Aggregated;
        assert!(c.validate().is_err());
        let mut c = cfg(Role::Decode);
        c.router = "https://x".into();
        assert!(c.validate().is_err());
        let mut c = cfg(Role::Decode);
        c.devices = 2;
        assert!(c.validate().is_err());
        let mut c = cfg(Role::Decode);
        c.inference_addr = "a__b:1".into();
        assert!(c.validate().is_err());
        let mut c = cfg(Role::Decode);
        c.coordinator_addr = "0.0.0.0:5".parse().unwrap();
        assert!(c.validate().is_err());
    }

    fn reply(id: &str, addrs: serde_json::Value) -> Vec<u8> {
        serde_json::json!({
            "node_id": "n", "is_online": true, "group_ready": true, "coordinator_addr": "127.0.0.1:1001",
            "node_role": "prefill", "timestamp": "2025-01-01T00:00:00",
            "comm_group_to_address": {KEY: addrs, "127.0.0.1:1__127.0.0.1:2": []},
            "comm_group_to_id": {KEY: id, "127.0.0.1:1__127.0.0.1:2": "", "bad key": ""},
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn a_prefill_registers_its_comm_id_and_learns_the_decode_agent() {
        let node = KsanaNode::new(cfg(Role::Prefill), 64).unwrap();
        // The decode has heartbeated: the group is there, without an id or addresses.
        let todo = node
            .apply_heartbeat(&reply("", serde_json::json!([])))
            .unwrap();
        assert_eq!(todo, vec![KEY.to_string()]);
        assert_eq!(node.ready_groups(), 0);
        // After registration the router answers the id and both nodes' tuples, prefill first.
        let own = node.cfg.comm_id();
        let addrs = serde_json::json!([[0, 0, "127.0.0.1:1001"], [0, 0, "127.0.0.1:2001"]]);
        assert!(node
            .apply_heartbeat(&reply(&own, addrs))
            .unwrap()
            .is_empty());
        assert_eq!(node.ready_groups(), 1);
        assert!(node.group_ready());
        // Another id (a stale one) is replaced.
        let other = "pdx1;someone;127.0.0.1:9";
        assert_eq!(
            node.apply_heartbeat(&reply(other, serde_json::json!([])))
                .unwrap(),
            vec![KEY.to_string()]
        );
        assert_eq!(node.ready_groups(), 0);
        // Malformed or oversized answers change nothing.
        assert!(node.apply_heartbeat(b"{").is_err());
        let many: serde_json::Map<String, serde_json::Value> = (0..MAX_GROUPS + 1)
            .map(|i| (format!("127.0.0.1:1000__127.0.0.1:{i}"), "".into()))
            .collect();
        let big = serde_json::json!({"comm_group_to_id": many}).to_string();
        assert!(node.apply_heartbeat(big.as_bytes()).is_err());
    }

    #[test]
    fn a_decode_takes_the_comm_id_and_rank_nonzero_prefills_register_nothing() {
        let node = KsanaNode::new(cfg(Role::Decode), 64).unwrap();
        let pid = cfg(Role::Prefill).comm_id();
        assert!(node
            .apply_heartbeat(&reply(&pid, serde_json::json!([])))
            .unwrap()
            .is_empty());
        assert_eq!(node.ready_groups(), 1);
        assert!(node
            .apply_heartbeat(&reply("garbage", serde_json::json!([])))
            .unwrap()
            .is_empty());
        assert_eq!(node.ready_groups(), 0);
        let mut c = cfg(Role::Prefill);
        c.node_rank = 1;
        c.world_size = 2;
        let n1 = KsanaNode::new(c, 64).unwrap();
        assert!(n1
            .apply_heartbeat(&reply("", serde_json::json!([])))
            .unwrap()
            .is_empty());
        let comm = KvComm {
            group_key: KEY.into(),
            request_id: "1".into(),
        };
        assert_eq!(n1.check(&comm).unwrap_err().status, 400);
    }

    #[tokio::test]
    async fn a_decode_matches_notices_with_requests_in_either_order() {
        let node = KsanaNode::new(cfg(Role::Decode), 64).unwrap();
        let prefill = cfg(Role::Prefill);
        node.apply_heartbeat(&reply(&prefill.comm_id(), serde_json::json!([])))
            .unwrap();
        let notice = |rid: &str| KvNotice {
            key: KEY.into(),
            rid: rid.into(),
            tokens: 20,
            blocks: vec![1, 2],
        };
        let comm = |rid: &str| KvComm {
            group_key: KEY.into(),
            request_id: rid.into(),
        };
        let soon = || Instant::now() + Duration::from_secs(5);
        // Notice first.
        node.on_notice("e-prefill", &notice("1").encode());
        let (ep, n) = node.await_kv(&comm("1"), soon()).await.unwrap();
        assert_eq!(ep.engine_id, "e-prefill");
        assert_eq!(ep.port, 1001);
        assert_eq!(n, notice("1"));
        // Request first.
        let c2 = comm("2");
        let waiting = node.await_kv(&c2, soon());
        let deliver = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            node.on_notice("e-prefill", &notice("2").encode());
        };
        let (r, ()) = tokio::join!(waiting, deliver);
        assert_eq!(r.unwrap().1.rid, "2");
        // From another agent: refused.
        node.on_notice("intruder", &notice("3").encode());
        assert_eq!(
            node.await_kv(&comm("3"), soon()).await.unwrap_err().status,
            502
        );
        // Never: a timeout, and the waiting slot is gone.
        let t0 = Instant::now();
        let e = node
            .await_kv(&comm("4"), Instant::now() + Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(e.status, 504);
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(node.slots.lock().unwrap().is_empty());
        // A notice nobody takes is swept after kv_wait, with the prefill to release it at.
        node.on_notice("e-prefill", &notice("5").encode());
        let later = Instant::now() + Duration::from_secs(2);
        let swept = node.sweep(later);
        assert_eq!(swept.len(), 1);
        assert_eq!(swept[0].0, format!("{KEY}/5"));
        assert_eq!(swept[0].1.engine_id, "e-prefill");
        // Notices for other nodes' groups are dropped.
        let mut other = notice("6");
        other.key = "127.0.0.1:1000__127.0.0.1:3000".into();
        node.on_notice("e-prefill", &other.encode());
        assert!(node.slots.lock().unwrap().is_empty());
    }
}
