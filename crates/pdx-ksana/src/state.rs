//! The node registry as sans-IO state: the peer's three tables in memory, the node API's operations on them
//! (each returns the peer's answer and notes the rows it changed), heartbeat expiry, and the prefill/decode
//! pairs a request may go to. No sockets, no clock, no randomness of its own: the caller passes the time and
//! draws node ids.
//!
//! The operations follow the peer's `services.py` and `node.py` step by step (KsanaLLM `simple_router`),
//! including its readiness rule (a group, one inference address and role, is ready when the devices of its
//! online nodes add up to the largest `world_size` they report), its stale-node sweep on every heartbeat,
//! the `prefill__decode` comm key of every pair of opposite groups in a cluster, and how a heartbeat answer
//! hides the comm metadata of pairs whose groups are not ready. Where the peer fails with its database's
//! unique constraint (a node taking over the slot of another, a `node_id` another node holds), the latest
//! registration wins instead; see `docs/router.md` ("KsanaLLM orchestration").

use crate::time::Ts;
use crate::wire::{self, Heartbeat, RegisterCommId, RegisterNode, Reply, Role};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// A row of `node_info`: one process (rank) of an inference group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    /// Unique id (the node's, or 32 hex digits the router drew).
    pub node_id: String,
    /// Cluster.
    pub cluster_name: String,
    /// `host:port` of the group's inference server.
    pub inference_addr: String,
    /// `ip:port` of this process's coordinator (control channel).
    pub coordinator_addr: String,
    /// Role of its group.
    pub role: Role,
    /// Rank in its group.
    pub node_rank: i64,
    /// Processes (devices) of the whole group, as this node reports it.
    pub world_size: i64,
    /// Devices of this node.
    pub device_num: i64,
    /// Last registration or heartbeat.
    pub last_heartbeat: Ts,
    /// Heartbeating within the timeout (as of the last sweep).
    pub is_online: bool,
    /// Last registration.
    pub start_time: Ts,
    /// Row created.
    pub created_at: Ts,
    /// Row changed.
    pub updated_at: Ts,
}

/// A row of `comm_group_pair`: the communication metadata of one prefill group and one decode group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairRow {
    /// `<prefill inference_addr>__<decode inference_addr>` (unique).
    pub comm_key: String,
    /// Both sides ready as of the last heartbeat that looked (the peer's dispatch reads it).
    pub is_active: bool,
    /// Cluster.
    pub cluster_name: String,
    /// Prefill group's inference address.
    pub prefill_addr: String,
    /// Decode group's inference address.
    pub decode_addr: String,
    /// `control_channel_meta` as stored: `[[rank, device, coordinator_addr], …]`, prefill ranks first.
    pub control: Value,
    /// `data_channel_meta` as stored: the comm id (a JSON string; empty when none).
    pub data: Value,
    /// Row changed.
    pub updated_at: Ts,
}

impl PairRow {
    /// The registered comm id (`""` when none).
    pub fn comm_id(&self) -> &str {
        self.data.as_str().unwrap_or("")
    }
}

/// A row of `inference_group_status`: readiness of one inference address in one role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRow {
    /// Cluster.
    pub cluster_name: String,
    /// The group's inference address.
    pub inference_addr: String,
    /// Role.
    pub role: Role,
    /// Largest `world_size` its online nodes report.
    pub world_size_expected: i64,
    /// Devices of its online nodes.
    pub online_device_sum: i64,
    /// Its online nodes.
    pub online_node_count: i64,
    /// `online_device_sum == world_size_expected > 0`.
    pub is_ready: bool,
    /// Last recomputed.
    pub last_computed_at: Ts,
    /// Row changed.
    pub updated_at: Ts,
}

/// The three tables, rows in the database's id order (new rows last).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    /// `node_info`.
    pub nodes: Vec<NodeRow>,
    /// `comm_group_pair`.
    pub pairs: Vec<PairRow>,
    /// `inference_group_status`.
    pub groups: Vec<GroupRow>,
}

/// Key of a group row.
pub type GroupKey = (String, String, Role);

/// The rows an operation changed, by natural key: what a repository writes back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// `node_info` rows to insert or update, by `node_id`.
    pub nodes: BTreeSet<String>,
    /// `node_info` rows to delete, by `node_id`.
    pub deleted_nodes: BTreeSet<String>,
    /// `comm_group_pair` rows to insert or update, by `comm_key`.
    pub pairs: BTreeSet<String>,
    /// `inference_group_status` rows to insert or update.
    pub groups: BTreeSet<GroupKey>,
}

impl Changes {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
            && self.deleted_nodes.is_empty()
            && self.pairs.is_empty()
            && self.groups.is_empty()
    }
}

/// What the registry is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The only cluster nodes may register in (the peer's `cluster_name`, default `default_cluster`).
    pub cluster_name: String,
    /// A node whose last heartbeat is older is offline, µs (the peer's `heartbeat_timeout_seconds`).
    pub heartbeat_timeout_us: i64,
    /// Most nodes of the cluster (pdx's bound; a registration beyond it is a 429).
    pub max_nodes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cluster_name: "default_cluster".into(),
            heartbeat_timeout_us: 60_000_000,
            max_nodes: 1024,
        }
    }
}

/// A node API route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /RegisterNode`.
    RegisterNode,
    /// `POST /Heartbeat`.
    Heartbeat,
    /// `POST /RegisterCommId`.
    RegisterCommId,
}

impl Route {
    /// The route of a request path.
    pub fn from_path(path: &str) -> Option<Route> {
        match path {
            "/RegisterNode" => Some(Route::RegisterNode),
            "/Heartbeat" => Some(Route::Heartbeat),
            "/RegisterCommId" => Some(Route::RegisterCommId),
            _ => None,
        }
    }
}

/// One `[rank, device, coordinator_addr]` of a comm group's control metadata.
pub type ControlEntry = (i64, i64, String);

/// The heartbeat answer (the peer's `SimpleRouterHeartbeatResponse`, fields in its order).
#[derive(Debug, Clone, Serialize)]
struct HeartbeatReply {
    node_id: String,
    is_online: bool,
    group_ready: bool,
    coordinator_addr: String,
    node_role: &'static str,
    timestamp: String,
    comm_group_to_address: BTreeMap<String, Vec<ControlEntry>>,
    comm_group_to_id: BTreeMap<String, String>,
}

/// A prefill group and a decode group a request may go to now.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReadyPair {
    /// The prefill group's inference address (`host:port`).
    pub prefill: String,
    /// The decode group's inference address.
    pub decode: String,
}

/// The registry: tables, the changes not yet written, settings.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// The rows.
    pub tables: Tables,
    /// Rows changed since the last [`Registry::take_changes`].
    pub changes: Changes,
    /// Settings.
    pub settings: Settings,
}

impl Registry {
    /// A registry over `tables`.
    pub fn new(settings: Settings, tables: Tables) -> Registry {
        Registry {
            tables,
            changes: Changes::default(),
            settings,
        }
    }

    /// Takes the changes to write.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Handles one node API request: the body as FastAPI reads it (`content_type`, `body`), then the route's
    /// operation at `now`. `fresh_id` draws the id of a node that brings none. Never fails: every outcome is
    /// the peer's answer.
    pub fn handle(
        &mut self,
        route: Route,
        content_type: Option<&[u8]>,
        body: &[u8],
        now: Ts,
        fresh_id: &mut dyn FnMut() -> String,
    ) -> Reply {
        let obj = match wire::body_object(content_type, body) {
            Ok(o) => o,
            Err(r) => return r,
        };
        match route {
            Route::RegisterNode => match RegisterNode::parse(&obj) {
                Ok(r) => self.register_node(&r, now, fresh_id),
                Err(e) => e,
            },
            Route::Heartbeat => match Heartbeat::parse(&obj) {
                Ok(h) => self.heartbeat(&h.node_id, now),
                Err(e) => e,
            },
            Route::RegisterCommId => match RegisterCommId::parse(&obj) {
                Ok(c) => self.register_comm_id(&c, now),
                Err(e) => e,
            },
        }
    }

    fn node_by_id(&self, node_id: &str) -> Option<usize> {
        self.tables.nodes.iter().position(|n| n.node_id == node_id)
    }

    fn group_index(&self, cluster: &str, addr: &str, role: Role) -> Option<usize> {
        self.tables
            .groups
            .iter()
            .position(|g| g.cluster_name == cluster && g.inference_addr == addr && g.role == role)
    }

    fn pair_index(&self, comm_key: &str) -> Option<usize> {
        self.tables
            .pairs
            .iter()
            .position(|p| p.comm_key == comm_key)
    }

    fn dirty_node(&mut self, i: usize) {
        self.changes
            .nodes
            .insert(self.tables.nodes[i].node_id.clone());
    }

    fn dirty_pair(&mut self, i: usize) {
        self.changes
            .pairs
            .insert(self.tables.pairs[i].comm_key.clone());
    }

    fn dirty_group(&mut self, i: usize) {
        let g = &self.tables.groups[i];
        self.changes
            .groups
            .insert((g.cluster_name.clone(), g.inference_addr.clone(), g.role));
    }

    /// The peer's `_reset_if_prefill_rank0`: a rank-0 prefill that (re)registers or leaves drops the comm
    /// metadata of every pair of its address in `cluster` (its comm ids belonged to the process before).
    fn reset_if_prefill_rank0(&mut self, cluster: &str, node: &NodeRow, now: Ts) {
        if node.role != Role::Prefill || node.node_rank != 0 {
            return;
        }
        for i in 0..self.tables.pairs.len() {
            let p = &mut self.tables.pairs[i];
            if p.cluster_name == cluster && p.prefill_addr == node.inference_addr {
                p.data = json!("");
                p.control = json!([]);
                p.is_active = false;
                p.updated_at = now;
                self.dirty_pair(i);
            }
        }
    }

    fn delete_node(&mut self, i: usize, now: Ts) {
        let n = self.tables.nodes.remove(i);
        tracing::warn!(node_id = %n.node_id, inference_addr = %n.inference_addr, role = n.role.as_str(),
            rank = n.node_rank, "ksana node replaced by a newer registration");
        let cluster = n.cluster_name.clone();
        self.reset_if_prefill_rank0(&cluster, &n, now);
        self.changes.nodes.remove(&n.node_id);
        self.changes.deleted_nodes.insert(n.node_id);
    }

    /// `POST /RegisterNode` (the peer's `register_node_endpoint` and `register_node`): 201 with `node_id`,
    /// `is_online`, `last_heartbeat`; 400 for another cluster or a bad coordinator address, world size or
    /// device list; 429 when the cluster has `max_nodes` nodes (pdx's bound).
    pub fn register_node(
        &mut self,
        req: &RegisterNode,
        now: Ts,
        fresh_id: &mut dyn FnMut() -> String,
    ) -> Reply {
        let ours = self.settings.cluster_name.clone();
        let cluster = match &req.cluster_name {
            Some(c) if !c.is_empty() => c.clone(),
            _ => ours.clone(),
        };
        if cluster != ours {
            return Reply::detail(
                400,
                format!("Cluster '{cluster}' is not allowed; expecting '{ours}'"),
            );
        }
        let device_count = req.devices.unwrap_or(0) as i64;
        let coordinator = match wire::check_coordinator_addr(req.coordinator_addr.as_deref()) {
            Ok(c) => c,
            Err(m) => return Reply::detail(400, m),
        };
        let world_size = match req.world_size {
            Some(w) if device_count != 0 => w,
            _ => return Reply::detail(400, "world_size or devices must be provided"),
        };
        if world_size < device_count {
            return Reply::detail(400, "World size must match the number of devices");
        }
        let slot = |n: &NodeRow| {
            n.cluster_name == cluster
                && n.inference_addr == req.inference_addr
                && n.role == req.group_role
                && n.node_rank == req.node_rank
        };
        let row = if let Some(i) = self
            .tables
            .nodes
            .iter()
            .position(|n| n.coordinator_addr == coordinator)
        {
            // The same coordinator again (a restart on the same address): the row is refreshed in place and
            // keeps its node id, as the peer does.
            let old = self.tables.nodes[i].clone();
            self.reset_if_prefill_rank0(&cluster, &old, now);
            let id = old.node_id.clone();
            if let Some(j) = self
                .tables
                .nodes
                .iter()
                .position(|n| slot(n) && n.node_id != id)
            {
                self.delete_node(j, now);
            }
            let i = self.node_by_id(&id).unwrap_or(i);
            let n = &mut self.tables.nodes[i];
            n.cluster_name = cluster.clone();
            n.inference_addr = req.inference_addr.clone();
            n.role = req.group_role;
            n.node_rank = req.node_rank;
            n.world_size = world_size;
            n.device_num = device_count;
            n.last_heartbeat = now;
            n.is_online = true;
            n.start_time = now;
            n.updated_at = now;
            tracing::info!(node_id = %n.node_id, %coordinator, "ksana node registered again");
            i
        } else {
            let node_id = req
                .node_id
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(&mut *fresh_id);
            let replaced = |n: &NodeRow| slot(n) || n.node_id == node_id;
            let staying = self
                .tables
                .nodes
                .iter()
                .filter(|n| n.cluster_name == cluster && !replaced(n))
                .count();
            if staying >= self.settings.max_nodes {
                return Reply::detail(
                    429,
                    format!("cluster '{cluster}' has {staying} nodes, the most this router keeps"),
                );
            }
            while let Some(j) = self.tables.nodes.iter().position(replaced) {
                self.delete_node(j, now);
            }
            tracing::info!(%node_id, %coordinator, inference_addr = %req.inference_addr,
                role = req.group_role.as_str(), rank = req.node_rank, "ksana node registered");
            self.tables.nodes.push(NodeRow {
                node_id,
                cluster_name: cluster.clone(),
                inference_addr: req.inference_addr.clone(),
                coordinator_addr: coordinator,
                role: req.group_role,
                node_rank: req.node_rank,
                world_size,
                device_num: device_count,
                last_heartbeat: now,
                is_online: true,
                start_time: now,
                created_at: now,
                updated_at: now,
            });
            self.tables.nodes.len() - 1
        };
        self.dirty_node(row);
        let n = &self.tables.nodes[row];
        Reply::json(
            201,
            &json!({ "node_id": n.node_id, "is_online": n.is_online, "last_heartbeat": now.iso_utc() }),
        )
    }

    /// The peer's `_get_stale_nodes` and `_update_inference_group_status`: every node of `cluster` whose last
    /// heartbeat is older than the timeout is offline, and every group of its address (either role) not
    /// ready. Returns the stale nodes' addresses.
    fn sweep_stale(&mut self, cluster: &str, now: Ts) -> BTreeSet<String> {
        let threshold = now.minus_us(self.settings.heartbeat_timeout_us);
        let mut addrs = BTreeSet::new();
        for i in 0..self.tables.nodes.len() {
            let n = &mut self.tables.nodes[i];
            if n.cluster_name == cluster && n.last_heartbeat < threshold {
                addrs.insert(n.inference_addr.clone());
                if n.is_online {
                    tracing::warn!(node_id = %n.node_id, inference_addr = %n.inference_addr,
                        "ksana node missed its heartbeats: offline");
                    n.is_online = false;
                    n.updated_at = now;
                    self.dirty_node(i);
                }
            }
        }
        for i in 0..self.tables.groups.len() {
            let g = &mut self.tables.groups[i];
            if g.cluster_name == cluster && addrs.contains(&g.inference_addr) && g.is_ready {
                g.is_ready = false;
                g.updated_at = now;
                self.dirty_group(i);
            }
        }
        addrs
    }

    /// The peer's readiness of node `i`'s group, recomputed from its online nodes.
    fn recompute_group(&mut self, i: usize, now: Ts) {
        let n = self.tables.nodes[i].clone();
        let (mut sum, mut max_ws, mut count) = (0i64, 0i64, 0i64);
        for m in &self.tables.nodes {
            if m.cluster_name == n.cluster_name
                && m.inference_addr == n.inference_addr
                && m.role == n.role
                && m.is_online
            {
                sum += m.device_num;
                max_ws = max_ws.max(m.world_size);
                count += 1;
            }
        }
        let g = match self.group_index(&n.cluster_name, &n.inference_addr, n.role) {
            Some(g) => g,
            None => {
                self.tables.groups.push(GroupRow {
                    cluster_name: n.cluster_name.clone(),
                    inference_addr: n.inference_addr.clone(),
                    role: n.role,
                    world_size_expected: 0,
                    online_device_sum: 0,
                    online_node_count: 0,
                    is_ready: false,
                    last_computed_at: now,
                    updated_at: now,
                });
                self.tables.groups.len() - 1
            }
        };
        let row = &mut self.tables.groups[g];
        row.world_size_expected = max_ws;
        row.online_device_sum = sum;
        row.online_node_count = count;
        row.is_ready = max_ws > 0 && sum == max_ws;
        row.last_computed_at = now;
        row.updated_at = now;
        self.dirty_group(g);
    }

    /// `POST /Heartbeat` (the peer's `node_heartbeat`): the node is online again; stale nodes of its cluster
    /// go offline; its group's readiness is recomputed; the answer lists, for every group of the opposite
    /// role in the cluster, the comm key and its control metadata and comm id (hidden while a side is not
    /// ready). An unknown node is the peer's bare 500.
    pub fn heartbeat(&mut self, node_id: &str, now: Ts) -> Reply {
        let Some(i) = self.node_by_id(node_id) else {
            return Reply::internal_error();
        };
        {
            let n = &mut self.tables.nodes[i];
            n.last_heartbeat = now;
            n.is_online = true;
            n.updated_at = now;
        }
        self.dirty_node(i);
        let cluster = self.tables.nodes[i].cluster_name.clone();
        self.sweep_stale(&cluster, now);
        self.recompute_group(i, now);
        let n = self.tables.nodes[i].clone();
        let group_ready = self
            .group_index(&cluster, &n.inference_addr, n.role)
            .is_some_and(|g| self.tables.groups[g].is_ready);
        let mut reply = HeartbeatReply {
            node_id: n.node_id.clone(),
            is_online: n.is_online,
            group_ready,
            coordinator_addr: n.coordinator_addr.clone(),
            node_role: n.role.as_str(),
            timestamp: now.iso_local(),
            comm_group_to_address: BTreeMap::new(),
            comm_group_to_id: BTreeMap::new(),
        };
        // The peer's `collect_comm_keys`: one key per group row of the opposite role, ready or not.
        let keys: BTreeSet<String> = self
            .tables
            .groups
            .iter()
            .filter(|g| g.cluster_name == cluster && g.role == n.role.opposite())
            .map(|g| match n.role {
                Role::Prefill => format!("{}__{}", n.inference_addr, g.inference_addr),
                Role::Decode => format!("{}__{}", g.inference_addr, n.inference_addr),
            })
            .collect();
        if !keys.is_empty() {
            let (mut control, mut data) = self.comm_metadata(&n, &keys, now);
            self.hide_unready(&n, &mut control, &mut data, now);
            reply.comm_group_to_address = control;
            reply.comm_group_to_id = data;
        }
        Reply::json(200, &reply)
    }

    /// The peer's `get_comm_metadata`: the stored control metadata and comm id of each key (a missing pair
    /// is created empty), entries sorted prefill first, then by rank, device and address.
    fn comm_metadata(
        &mut self,
        node: &NodeRow,
        keys: &BTreeSet<String>,
        now: Ts,
    ) -> (
        BTreeMap<String, Vec<ControlEntry>>,
        BTreeMap<String, String>,
    ) {
        let cluster = &node.cluster_name;
        let mut control = BTreeMap::new();
        let mut data = BTreeMap::new();
        let mut legacy: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
        for key in keys {
            let Some(p) = self
                .tables
                .pairs
                .iter()
                .find(|p| &p.comm_key == key && &p.cluster_name == cluster)
            else {
                control.insert(key.clone(), Vec::new());
                data.insert(key.clone(), String::new());
                self.create_empty_pair(cluster, key, now);
                continue;
            };
            data.insert(key.clone(), p.comm_id().to_string());
            match parse_control(&p.control) {
                Control::Entries(e) => {
                    control.insert(key.clone(), e);
                }
                Control::Legacy(groups) => {
                    legacy.insert(key.clone(), groups);
                }
            }
        }
        if !legacy.is_empty() {
            // Old rows list coordinator addresses only: expanded to one entry per device of the node found there.
            let by_coord: HashMap<&str, &NodeRow> = self
                .tables
                .nodes
                .iter()
                .map(|n| (n.coordinator_addr.as_str(), n))
                .collect();
            for (key, groups) in legacy {
                let mut entries = Vec::new();
                for addr in groups.iter().flatten() {
                    match by_coord.get(addr.as_str()) {
                        Some(n) => entries.extend(
                            (0..n.device_num.max(1)).map(|d| (n.node_rank, d, addr.clone())),
                        ),
                        None => entries.push((0, 0, addr.clone())),
                    }
                }
                control.insert(key, entries);
            }
        }
        let role_of: HashMap<&str, Role> = self
            .tables
            .nodes
            .iter()
            .filter(|n| &n.cluster_name == cluster)
            .map(|n| (n.coordinator_addr.as_str(), n.role))
            .collect();
        for entries in control.values_mut() {
            entries.sort_by(|a, b| {
                let w =
                    |e: &ControlEntry| u8::from(role_of.get(e.2.as_str()) != Some(&Role::Prefill));
                (w(a), a.0, a.1, &a.2).cmp(&(w(b), b.0, b.1, &b.2))
            });
        }
        (control, data)
    }

    fn create_empty_pair(&mut self, cluster: &str, key: &str, now: Ts) {
        let Some((p, d)) = key.split_once("__") else {
            return;
        };
        if self.pair_index(key).is_some() {
            // Held by another cluster sharing the database (the peer fails on the unique key here).
            return;
        }
        self.tables.pairs.push(PairRow {
            comm_key: key.to_string(),
            is_active: false,
            cluster_name: cluster.to_string(),
            prefill_addr: p.to_string(),
            decode_addr: d.to_string(),
            control: json!([]),
            data: json!(""),
            updated_at: now,
        });
        let i = self.tables.pairs.len() - 1;
        self.dirty_pair(i);
    }

    /// The peer's `check_and_filter_metadata`: a decode group that is not ready hides every pair it is in; a
    /// prefill group that is not ready hides its pairs from every caller but a rank-0 node (which must still
    /// see them to register comm ids). Hidden pairs are inactive, the others active.
    fn hide_unready(
        &mut self,
        node: &NodeRow,
        control: &mut BTreeMap<String, Vec<ControlEntry>>,
        data: &mut BTreeMap<String, String>,
        now: Ts,
    ) {
        let mut addrs = HashSet::new();
        for k in data.keys() {
            if let Some((p, d)) = k.split_once("__") {
                addrs.insert(p.to_string());
                addrs.insert(d.to_string());
            }
        }
        if addrs.is_empty() {
            return;
        }
        let mut hidden = BTreeSet::new();
        for g in &self.tables.groups {
            if g.cluster_name != node.cluster_name
                || !addrs.contains(&g.inference_addr)
                || g.is_ready
            {
                continue;
            }
            if g.role == Role::Decode {
                let tail = format!("__{}", g.inference_addr);
                hidden.extend(control.keys().filter(|k| k.ends_with(&tail)).cloned());
            } else if node.node_rank != 0 {
                let head = format!("{}__", g.inference_addr);
                hidden.extend(control.keys().filter(|k| k.starts_with(&head)).cloned());
            }
        }
        for k in &hidden {
            control.insert(k.clone(), Vec::new());
            data.insert(k.clone(), String::new());
        }
        for i in 0..self.tables.pairs.len() {
            let p = &self.tables.pairs[i];
            if p.cluster_name != node.cluster_name || !control.contains_key(&p.comm_key) {
                continue;
            }
            let active = !hidden.contains(&p.comm_key);
            if p.is_active != active {
                let p = &mut self.tables.pairs[i];
                p.is_active = active;
                p.updated_at = now;
                self.dirty_pair(i);
            }
        }
    }

    /// `POST /RegisterCommId` (the peer's `register_comm_id_endpoint` and `register_comm_group`): a rank-0
    /// prefill node stores the comm id of one of its pairs; the pair's control metadata is rebuilt from the
    /// nodes of both addresses. 200 `{"status":"OK","comm_id"}`; 403 for any other node; 400 for a key
    /// without `__`; 409 for a key another cluster holds (pdx; the peer fails on its unique key); the peer's
    /// bare 500 for an unknown node.
    pub fn register_comm_id(&mut self, req: &RegisterCommId, now: Ts) -> Reply {
        let Some(i) = self.node_by_id(&req.node_id) else {
            return Reply::internal_error();
        };
        let n = self.tables.nodes[i].clone();
        if n.role != Role::Prefill || n.node_rank != 0 {
            return Reply::detail(403, "Only prefill rank-0 nodes may register comm ids");
        }
        let Some((p, d)) = req.comm_key.split_once("__") else {
            return Reply::detail(400, "comm_key must follow 'prefill__decode' format");
        };
        let control = self.rebuild_control(&n.cluster_name, p, d);
        let j = match self.pair_index(&req.comm_key) {
            Some(j) if self.tables.pairs[j].cluster_name != n.cluster_name => {
                return Reply::detail(
                    409,
                    format!("comm_key '{}' belongs to another cluster", req.comm_key),
                );
            }
            Some(j) => {
                let pair = &mut self.tables.pairs[j];
                pair.control = control;
                pair.data = json!(req.comm_id);
                pair.updated_at = now;
                j
            }
            None => {
                self.tables.pairs.push(PairRow {
                    comm_key: req.comm_key.clone(),
                    is_active: true,
                    cluster_name: n.cluster_name.clone(),
                    prefill_addr: p.to_string(),
                    decode_addr: d.to_string(),
                    control,
                    data: json!(req.comm_id),
                    updated_at: now,
                });
                self.tables.pairs.len() - 1
            }
        };
        self.dirty_pair(j);
        tracing::info!(comm_key = %req.comm_key, node_id = %n.node_id, "ksana comm id registered");
        Reply::json(200, &json!({ "status": "OK", "comm_id": req.comm_id }))
    }

    /// The peer's `_rebuild_comm_group_control_meta`: one entry per device of every node at either address,
    /// prefill nodes first, each side by rank and device.
    fn rebuild_control(&self, cluster: &str, prefill: &str, decode: &str) -> Value {
        let mut sides: [Vec<ControlEntry>; 2] = [Vec::new(), Vec::new()];
        for n in &self.tables.nodes {
            if n.cluster_name == cluster
                && (n.inference_addr == prefill || n.inference_addr == decode)
            {
                let side = usize::from(n.role == Role::Decode);
                sides[side].extend(
                    (0..n.device_num.max(1)).map(|d| (n.node_rank, d, n.coordinator_addr.clone())),
                );
            }
        }
        for s in &mut sides {
            s.sort_by_key(|e| (e.0, e.1));
        }
        let [p, d] = sides;
        json!(p.into_iter().chain(d).collect::<Vec<_>>())
    }

    /// Heartbeat expiry, run by the router's control loop (the peer only sweeps when some node heartbeats,
    /// so a cluster whose nodes all died stays online there): stale nodes of the router's cluster go
    /// offline and their groups not ready, as in a heartbeat, and the pairs of their addresses inactive.
    pub fn expire(&mut self, now: Ts) {
        let cluster = self.settings.cluster_name.clone();
        let addrs = self.sweep_stale(&cluster, now);
        for i in 0..self.tables.pairs.len() {
            let p = &self.tables.pairs[i];
            if p.cluster_name == cluster
                && p.is_active
                && (addrs.contains(&p.prefill_addr) || addrs.contains(&p.decode_addr))
            {
                let p = &mut self.tables.pairs[i];
                p.is_active = false;
                p.updated_at = now;
                self.dirty_pair(i);
            }
        }
    }

    /// The pairs a request may go to in the router's cluster: a comm id is registered, both groups are
    /// ready, and both rank-0 nodes (the ones that serve requests) are online. Sorted.
    pub fn ready_pairs(&self) -> Vec<ReadyPair> {
        let cluster = &self.settings.cluster_name;
        let ready = |addr: &str, role: Role| {
            self.tables.groups.iter().any(|g| {
                &g.cluster_name == cluster
                    && g.inference_addr == addr
                    && g.role == role
                    && g.is_ready
            }) && self.tables.nodes.iter().any(|n| {
                &n.cluster_name == cluster
                    && n.inference_addr == addr
                    && n.role == role
                    && n.node_rank == 0
                    && n.is_online
            })
        };
        let mut out: Vec<ReadyPair> = self
            .tables
            .pairs
            .iter()
            .filter(|p| {
                &p.cluster_name == cluster
                    && !p.comm_id().is_empty()
                    && ready(&p.prefill_addr, Role::Prefill)
                    && ready(&p.decode_addr, Role::Decode)
            })
            .map(|p| ReadyPair {
                prefill: p.prefill_addr.clone(),
                decode: p.decode_addr.clone(),
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

enum Control {
    Entries(Vec<ControlEntry>),
    Legacy(Vec<Vec<String>>),
}

/// Stored control metadata: `[[rank, device, addr], …]`, or the legacy `[[addr, …], [addr, …]]`.
fn parse_control(v: &Value) -> Control {
    let Some(items) = v.as_array() else {
        return Control::Entries(Vec::new());
    };
    let triple = |x: &Value| x.as_array().is_some_and(|a| a.len() == 3);
    if !items.is_empty() && items.iter().all(triple) {
        let int = |x: &Value| match x {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => None,
        };
        let entries = items
            .iter()
            .filter_map(|x| {
                let a = x.as_array()?;
                let addr = match &a[2] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                Some((int(&a[0])?, int(&a[1])?, addr))
            })
            .collect();
        return Control::Entries(entries);
    }
    Control::Legacy(
        items
            .iter()
            .map(|g| {
                g.as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect(),
    )
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
