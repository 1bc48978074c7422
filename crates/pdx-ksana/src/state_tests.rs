//! Unit tests of the sans-IO registry (`state.rs`).

use super::*;

const S: i64 = 1_000_000;

struct T {
    r: Registry,
    now: Ts,
    ids: u32,
}

impl T {
    fn new() -> T {
        T::with(Settings {
            heartbeat_timeout_us: 10 * S,
            ..Settings::default()
        })
    }

    fn with(settings: Settings) -> T {
        T {
            r: Registry::new(settings, Tables::default()),
            now: Ts(1_800_000_000 * S),
            ids: 0,
        }
    }

    fn call(&mut self, route: Route, body: Value) -> (u16, Value) {
        let ids = &mut self.ids;
        let mut fresh = || {
            *ids += 1;
            format!("id{ids}")
        };
        let r = self.r.handle(
            route,
            Some(b"application/json"),
            body.to_string().as_bytes(),
            self.now,
            &mut fresh,
        );
        (r.status, r.value().unwrap_or(Value::Null))
    }

    /// Registers a node with one device per rank; returns its id.
    fn node(&mut self, role: &str, addr: &str, coord: &str, rank: i64, world: i64) -> String {
        let (s, v) = self.call(
            Route::RegisterNode,
            json!({"inference_addr": addr, "coordinator_addr": coord, "group_role": role, "node_rank": rank,
                   "world_size": world, "devices": [{"device_id": 0, "device_ip": "127.0.0.1"}]}),
        );
        assert_eq!(s, 201, "{v}");
        v["node_id"].as_str().unwrap().to_string()
    }

    fn beat(&mut self, id: &str) -> Value {
        let (s, v) = self.call(Route::Heartbeat, json!({ "node_id": id }));
        assert_eq!(s, 200, "{v}");
        v
    }

    fn comm_id(&mut self, id: &str, key: &str, comm: &str) -> (u16, Value) {
        self.call(
            Route::RegisterCommId,
            json!({"node_id": id, "comm_key": key, "comm_id": comm}),
        )
    }

    fn pairs(&self) -> Vec<(String, String)> {
        self.r
            .ready_pairs()
            .into_iter()
            .map(|p| (p.prefill, p.decode))
            .collect()
    }
}

const P: &str = "127.0.0.1:8001";
const D: &str = "127.0.0.1:8002";
const KEY: &str = "127.0.0.1:8001__127.0.0.1:8002";

#[test]
fn one_prefill_one_decode_become_a_ready_pair() {
    let mut t = T::new();
    let p = t.node("prefill", P, "127.0.0.1:9001", 0, 1);
    let d = t.node("decode", D, "127.0.0.1:9002", 0, 1);
    assert_eq!((p.as_str(), d.as_str()), ("id1", "id2"));
    // The prefill's first heartbeat: its group is ready; no decode group has a status row yet.
    let v = t.beat(&p);
    assert_eq!(v["group_ready"], true);
    assert_eq!(v["node_role"], "prefill");
    assert_eq!(v["comm_group_to_id"], json!({}));
    // The decode's: one comm key, empty metadata (the pair row is created empty).
    let v = t.beat(&d);
    assert_eq!(v["comm_group_to_address"], json!({ KEY: [] }));
    assert_eq!(v["comm_group_to_id"], json!({ KEY: "" }));
    assert!(t.pairs().is_empty(), "no comm id yet");
    let (s, v) = t.comm_id(&p, KEY, "COMM");
    assert_eq!((s, v), (200, json!({"status": "OK", "comm_id": "COMM"})));
    let v = t.beat(&d);
    assert_eq!(
        v["comm_group_to_address"],
        json!({ KEY: [[0, 0, "127.0.0.1:9001"], [0, 0, "127.0.0.1:9002"]] })
    );
    assert_eq!(v["comm_group_to_id"], json!({ KEY: "COMM" }));
    assert_eq!(t.pairs(), [(P.to_string(), D.to_string())]);
    // Field set of the answer, in the peer's order.
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 8);
    assert!(
        v["timestamp"].as_str().unwrap().starts_with("2027-01-1"),
        "{v}"
    );
}

#[test]
fn a_group_is_ready_when_its_online_devices_reach_its_world_size() {
    let mut t = T::new();
    let p0 = t.node("prefill", P, "127.0.0.1:9001", 0, 2);
    assert_eq!(t.beat(&p0)["group_ready"], false, "1 of 2 devices");
    let p1 = t.node("prefill", P, "127.0.0.1:9011", 1, 2);
    assert_eq!(t.beat(&p1)["group_ready"], true);
    let g = &t.r.tables.groups[0];
    assert_eq!(
        (
            g.world_size_expected,
            g.online_device_sum,
            g.online_node_count
        ),
        (2, 2, 2)
    );
    // Rank 1 may not register comm ids; rank 0 may, for any key of the form.
    let d = t.node("decode", D, "127.0.0.1:9002", 0, 1);
    t.beat(&d);
    assert_eq!(t.comm_id(&p1, KEY, "X").0, 403);
    assert_eq!(t.comm_id(&d, KEY, "X").0, 403);
    let (s, v) = t.comm_id(&p0, "nokey", "X");
    assert_eq!(
        (s, v["detail"].as_str()),
        (400, Some("comm_key must follow 'prefill__decode' format"))
    );
    assert_eq!(t.comm_id(&p0, KEY, "X").0, 200);
    // Control metadata: every device of both groups, prefill ranks first.
    let v = t.beat(&d);
    assert_eq!(
        v["comm_group_to_address"][KEY],
        json!([
            [0, 0, "127.0.0.1:9001"],
            [1, 0, "127.0.0.1:9011"],
            [0, 0, "127.0.0.1:9002"]
        ])
    );
}

#[test]
fn unknown_nodes_and_foreign_clusters_get_the_peers_answers() {
    let mut t = T::new();
    let (s, _) = t.call(Route::Heartbeat, json!({"node_id": "nope"}));
    assert_eq!(s, 500);
    let r = t.r.heartbeat("nope", t.now);
    assert_eq!(
        (r.content_type, &r.body[..]),
        ("text/plain; charset=utf-8", &b"Internal Server Error"[..])
    );
    assert_eq!(t.comm_id("nope", KEY, "X").0, 500);
    let (s, v) = t.call(
        Route::RegisterNode,
        json!({"inference_addr": P, "coordinator_addr": "127.0.0.1:9", "group_role": "prefill", "node_rank": 0,
               "world_size": 1, "devices": [{"device_id": 0, "device_ip": "x"}], "cluster_name": "other"}),
    );
    assert_eq!(
        (s, v),
        (
            400,
            json!({"detail": "Cluster 'other' is not allowed; expecting 'default_cluster'"})
        )
    );
    for (devices, world, msg) in [
        (
            json!([]),
            json!(1),
            "world_size or devices must be provided",
        ),
        (
            json!(null),
            json!(1),
            "world_size or devices must be provided",
        ),
        (
            json!([{"device_id": 0, "device_ip": "x"}]),
            json!(null),
            "world_size or devices must be provided",
        ),
        (
            json!([{"device_id": 0, "device_ip": "x"}, {"device_id": 1, "device_ip": "x"}]),
            json!(1),
            "World size must match the number of devices",
        ),
    ] {
        let (s, v) = t.call(
            Route::RegisterNode,
            json!({"inference_addr": P, "coordinator_addr": "127.0.0.1:9", "group_role": "prefill",
                   "node_rank": 0, "world_size": world, "devices": devices}),
        );
        assert_eq!((s, v["detail"].as_str().unwrap()), (400, msg));
    }
    assert!(t.r.tables.nodes.is_empty());
    assert!(t.r.changes.is_empty(), "refused requests change nothing");
}

#[test]
fn expiry_takes_nodes_offline_and_hides_their_pairs() {
    let mut t = T::new();
    let p = t.node("prefill", P, "127.0.0.1:9001", 0, 1);
    let d = t.node("decode", D, "127.0.0.1:9002", 0, 1);
    t.beat(&p);
    t.beat(&d);
    assert_eq!(t.comm_id(&p, KEY, "C").0, 200);
    t.beat(&d);
    assert_eq!(t.pairs().len(), 1);
    t.r.take_changes();
    // The decode keeps beating, the prefill goes silent for longer than the timeout.
    t.now = Ts(t.now.0 + 6 * S);
    t.beat(&d);
    t.now = Ts(t.now.0 + 6 * S);
    t.r.take_changes();
    t.r.expire(t.now);
    let c = t.r.take_changes();
    assert!(c.nodes.contains(&p) && c.pairs.contains(KEY), "{c:?}");
    assert!(!t.r.tables.nodes[0].is_online);
    assert!(!t.r.tables.pairs[0].is_active);
    assert!(t.pairs().is_empty());
    // A second sweep changes nothing.
    t.r.expire(t.now);
    assert!(t.r.take_changes().is_empty());
    // The decode's heartbeat still lists the key, its metadata hidden (the prefill group is not ready and the
    // decode is... rank 0: the peer hides a prefill group only from non-rank-0 callers).
    let v = t.beat(&d);
    assert_eq!(v["comm_group_to_id"][KEY], "C");
    // A non-rank-0 decode caller does not see it.
    let d1 = t.node("decode", D, "127.0.0.1:9012", 1, 2);
    let v = t.beat(&d1);
    assert_eq!(v["comm_group_to_id"][KEY], "");
    assert_eq!(v["comm_group_to_address"][KEY], json!([]));
    // The decode group now wants 2 devices; the prefill's comm id is still stored: it serves again as soon as
    // both groups are ready (no new comm id needed after a partition).
    let p_back = t.beat(&p);
    assert_eq!(p_back["group_ready"], true);
    t.beat(&d1);
    assert_eq!(t.pairs().len(), 1);
}

#[test]
fn a_restarted_rank0_prefill_drops_its_comm_ids() {
    let mut t = T::new();
    let p = t.node("prefill", P, "127.0.0.1:9001", 0, 1);
    let d = t.node("decode", D, "127.0.0.1:9002", 0, 1);
    t.beat(&p);
    t.beat(&d);
    t.comm_id(&p, KEY, "OLD");
    t.beat(&d);
    assert_eq!(t.pairs().len(), 1);
    // Same coordinator: the same row and node id again, comm metadata cleared.
    assert_eq!(t.node("prefill", P, "127.0.0.1:9001", 0, 1), p);
    assert_eq!(t.r.tables.pairs[0].comm_id(), "");
    assert_eq!(t.r.tables.pairs[0].control, json!([]));
    assert!(t.pairs().is_empty());
    t.comm_id(&p, KEY, "NEW");
    assert_eq!(t.pairs().len(), 1);
    // A decode restart keeps the prefill's comm ids.
    assert_eq!(t.node("decode", D, "127.0.0.1:9002", 0, 1), d);
    assert_eq!(t.r.tables.pairs[0].comm_id(), "NEW");
    // A new process in the same slot with another coordinator port takes the slot over (the peer answers 500
    // from its unique constraint): the old row goes, and with it its comm ids.
    let p2 = t.node("prefill", P, "127.0.0.1:9101", 0, 1);
    assert_ne!(p2, p);
    assert_eq!(
        t.r.tables
            .nodes
            .iter()
            .filter(|n| n.role == Role::Prefill)
            .count(),
        1
    );
    assert_eq!(t.r.tables.pairs[0].comm_id(), "");
    let c = t.r.take_changes();
    assert!(
        c.deleted_nodes.contains(&p) && c.nodes.contains(&p2),
        "{c:?}"
    );
    assert_eq!(t.call(Route::Heartbeat, json!({"node_id": p})).0, 500);
}

#[test]
fn a_node_id_is_taken_by_the_latest_registration_and_nodes_are_bounded() {
    let mut t = T::with(Settings {
        max_nodes: 2,
        ..Settings::default()
    });
    let body = |addr: &str, coord: &str, id: Option<&str>| {
        json!({"inference_addr": addr, "coordinator_addr": coord, "group_role": "decode", "node_rank": 0,
               "world_size": 1, "devices": [{"device_id": 0, "device_ip": "x"}], "node_id": id})
    };
    let (s, v) = t.call(
        Route::RegisterNode,
        body("127.0.0.1:1", "127.0.0.1:11", Some("dec")),
    );
    assert_eq!((s, v["node_id"].as_str()), (201, Some("dec")));
    let (s, v) = t.call(
        Route::RegisterNode,
        body("127.0.0.1:2", "127.0.0.1:12", Some("dec")),
    );
    assert_eq!((s, v["node_id"].as_str()), (201, Some("dec")));
    assert_eq!(t.r.tables.nodes.len(), 1);
    assert_eq!(t.r.tables.nodes[0].inference_addr, "127.0.0.1:2");
    assert_eq!(
        t.call(
            Route::RegisterNode,
            body("127.0.0.1:3", "127.0.0.1:13", None)
        )
        .0,
        201
    );
    let (s, v) = t.call(
        Route::RegisterNode,
        body("127.0.0.1:4", "127.0.0.1:14", None),
    );
    assert_eq!(s, 429, "{v}");
    // Re-registration of a known node is not a new node.
    assert_eq!(
        t.call(
            Route::RegisterNode,
            body("127.0.0.1:3", "127.0.0.1:13", None)
        )
        .0,
        201
    );
}

#[test]
fn legacy_control_metadata_is_expanded_per_device() {
    let mut t = T::new();
    let p = t.node("prefill", P, "127.0.0.1:9001", 0, 1);
    let d = t.node("decode", D, "127.0.0.1:9002", 0, 1);
    t.beat(&p);
    t.beat(&d);
    // An older writer stored coordinator addresses per side.
    let i =
        t.r.tables
            .pairs
            .iter()
            .position(|x| x.comm_key == KEY)
            .unwrap();
    t.r.tables.pairs[i].control = json!([["127.0.0.1:9002"], ["127.0.0.1:9001", "10.0.0.9:1"]]);
    let v = t.beat(&d);
    assert_eq!(
        v["comm_group_to_address"][KEY],
        json!([
            [0, 0, "127.0.0.1:9001"],
            [0, 0, "10.0.0.9:1"],
            [0, 0, "127.0.0.1:9002"]
        ])
    );
}
