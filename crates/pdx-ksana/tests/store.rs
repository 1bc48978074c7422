//! The registry on a real database: SQLite files (a restart keeps every node and comm id; the schema is the
//! peer's) and MySQL/MariaDB when `PDX_TEST_MYSQL_URL` names a server (`.ci/run` starts one; the test says
//! it is skipped otherwise).

use pdx_ksana::state::{Route, Settings};
use pdx_ksana::store::{self, Database};
use pdx_ksana::{Service, Ts};
use serde_json::{json, Value};

const S: i64 = 1_000_000;
const KEY: &str = "127.0.0.1:8001__127.0.0.1:8002";

fn settings() -> Settings {
    Settings {
        heartbeat_timeout_us: 10 * S,
        ..Settings::default()
    }
}

fn call(s: &mut Service, route: Route, body: Value, now: Ts) -> (u16, Value) {
    let r = s.handle(
        route,
        Some(b"application/json"),
        body.to_string().as_bytes(),
        now,
    );
    (r.status, r.value().unwrap_or(Value::Null))
}

fn register(s: &mut Service, role: &str, addr: &str, coord: &str, now: Ts) -> String {
    let (st, v) = call(
        s,
        Route::RegisterNode,
        json!({"inference_addr": addr, "coordinator_addr": coord, "group_role": role, "node_rank": 0,
               "world_size": 1, "devices": [{"device_id": 0, "device_ip": "127.0.0.1"}]}),
        now,
    );
    assert_eq!(st, 201, "{v}");
    v["node_id"].as_str().unwrap().to_string()
}

/// A 1P1D cluster registered, heartbeating and paired through `db`; then the service is dropped (a router
/// killed) and opened again on the same database: every node, group and comm id is there, and the pair is
/// ready at once. Returns the node ids.
fn restart_keeps_everything(db: &Database) -> (String, String) {
    let t0 = Ts::now();
    let (p, d) = {
        let mut s = Service::open(settings(), db, true).expect("open");
        let p = register(&mut s, "prefill", "127.0.0.1:8001", "127.0.0.1:9001", t0);
        let d = register(&mut s, "decode", "127.0.0.1:8002", "127.0.0.1:9002", t0);
        for id in [&p, &d] {
            assert_eq!(
                call(&mut s, Route::Heartbeat, json!({"node_id": id}), t0).0,
                200
            );
        }
        let (st, _) = call(
            &mut s,
            Route::RegisterCommId,
            json!({"node_id": p, "comm_key": KEY, "comm_id": "comm-ünïcode-✓"}),
            t0,
        );
        assert_eq!(st, 200);
        assert_eq!(s.ready_pairs().len(), 1);
        (p, d)
    };
    let mut s = Service::open(settings(), db, true).expect("reopen");
    assert_eq!(s.ready_pairs().len(), 1, "{:?}", s.tables());
    let t = s.tables().clone();
    assert_eq!(t.nodes.len(), 2);
    assert_eq!(t.nodes[0].node_id, p);
    assert_eq!(t.nodes[1].node_id, d);
    assert!(t.nodes.iter().all(|n| n.is_online));
    // Stored whole seconds at least (MySQL DATETIME), microseconds in SQLite.
    assert!(
        (t.nodes[0].last_heartbeat.0 - t0.0).abs() <= S,
        "{:?} vs {t0:?}",
        t.nodes[0].last_heartbeat
    );
    assert_eq!(t.pairs[0].comm_id(), "comm-ünïcode-✓");
    assert_eq!(
        t.pairs[0].control,
        json!([[0, 0, "127.0.0.1:9001"], [0, 0, "127.0.0.1:9002"]])
    );
    assert_eq!(t.groups.len(), 2);
    // The heartbeat after the restart: same comm metadata.
    let (st, v) = call(
        &mut s,
        Route::Heartbeat,
        json!({"node_id": d}),
        Ts(t0.0 + S),
    );
    assert_eq!(st, 200);
    assert_eq!(v["comm_group_to_id"][KEY], "comm-ünïcode-✓");
    // Expiry through the database: 11 s later nothing heartbeat.
    s.tick(Ts(t0.0 + 12 * S)).expect("tick");
    assert!(s.ready_pairs().is_empty());
    let s2 = Service::open(settings(), db, true).expect("reopen");
    assert!(s2.tables().nodes.iter().all(|n| !n.is_online));
    assert!(s2.tables().pairs.iter().all(|p| !p.is_active));
    // A newer registration in the slot of another replaces it in the database too.
    let mut s = s2;
    let p2 = register(
        &mut s,
        "prefill",
        "127.0.0.1:8001",
        "127.0.0.1:9101",
        Ts(t0.0 + 13 * S),
    );
    let s3 = Service::open(settings(), db, true).expect("reopen");
    let ids: Vec<&str> = s3
        .tables()
        .nodes
        .iter()
        .map(|n| n.node_id.as_str())
        .collect();
    assert_eq!(ids, [d.as_str(), p2.as_str()]);
    (p, d)
}

fn temp_db(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pdx-ksana-store-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("sub").join("router.db")
}

#[test]
fn sqlite_restart_keeps_nodes_and_comm_ids() {
    let path = temp_db("restart");
    restart_keeps_everything(&Database::Sqlite(path.clone()));
    let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
}

#[test]
fn sqlite_schema_is_the_peers() {
    let path = temp_db("schema");
    drop(store::open(&Database::Sqlite(path.clone()), true).expect("open"));
    let c = sqlite_schema(&path);
    for want in [
        "CONSTRAINT uq_cluster_addr_role_rank UNIQUE (cluster_name, inference_addr, role, node_rank)",
        "CONSTRAINT uq_group_status UNIQUE (cluster_name, inference_addr, role)",
        "control_channel_meta JSON NOT NULL",
        "CREATE INDEX ix_node_last_heartbeat ON node_info (last_heartbeat)",
        "CREATE INDEX ix_status_role_ready ON inference_group_status (role, is_ready)",
    ] {
        assert!(c.contains(want), "{want} not in\n{c}");
    }
    // Without schema creation a database without the tables is refused with a clear error.
    let other = temp_db("noschema");
    let e = match store::open(&Database::Sqlite(other.clone()), false) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("opened without tables"),
    };
    assert!(
        e.contains("no table") && e.contains("schema creation is off"),
        "{e}"
    );
    for p in [path, other] {
        let _ = std::fs::remove_dir_all(p.parent().unwrap().parent().unwrap());
    }
}

/// The schema text SQLite keeps for the file (`sqlite_master`).
fn sqlite_schema(path: &std::path::Path) -> String {
    let c = rusqlite::Connection::open(path).expect("open");
    let mut s = c
        .prepare("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL")
        .unwrap();
    let rows: Vec<String> = s
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .filter_map(Result::ok)
        .collect();
    rows.join(";\n")
}

/// A database of its own on the server `PDX_TEST_MYSQL_URL` names, dropped at the end.
struct MysqlDb {
    admin: String,
    name: String,
}

impl Drop for MysqlDb {
    fn drop(&mut self) {
        use mysql::prelude::Queryable;
        if let Ok(mut c) = mysql::Conn::new(mysql::Opts::from_url(&self.admin).unwrap()) {
            let _ = c.query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.name));
        }
    }
}

fn mysql_db(tag: &str) -> Option<(MysqlDb, String)> {
    use mysql::prelude::Queryable;
    let Ok(url) = std::env::var("PDX_TEST_MYSQL_URL") else {
        println!("skipped: PDX_TEST_MYSQL_URL is not set (.ci/run starts a MariaDB and sets it)");
        return None;
    };
    let name = format!("pdx_ksana_{tag}_{}", std::process::id());
    let mut c = mysql::Conn::new(mysql::Opts::from_url(&url).expect("PDX_TEST_MYSQL_URL"))
        .expect("connect");
    c.query_drop(format!("CREATE DATABASE `{name}`"))
        .expect("create database");
    // The same server and credentials, the new database.
    let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
    let db_url = format!("{base}/{name}");
    Some((MysqlDb { admin: url, name }, db_url))
}

#[test]
fn mysql_restart_keeps_nodes_and_comm_ids() {
    let Some((_guard, url)) = mysql_db("restart") else {
        return;
    };
    restart_keeps_everything(&Database::Mysql(url));
}

#[test]
fn mysql_schema_is_the_peers_and_is_shared_by_two_routers() {
    use mysql::prelude::Queryable;
    let Some((guard, url)) = mysql_db("schema") else {
        return;
    };
    let e = match Service::open(settings(), &Database::Mysql(url.clone()), false) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("opened without tables"),
    };
    assert!(e.contains("no table"), "{e}");
    let mut a = Service::open(settings(), &Database::Mysql(url.clone()), true).expect("open a");
    let mut b = Service::open(settings(), &Database::Mysql(url.clone()), true).expect("open b");
    let mut c = mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).unwrap();
    let cols: Vec<(String, String)> = c
        .query(format!(
            "SELECT column_name, column_type FROM information_schema.columns WHERE table_schema = '{}' \
             AND table_name = 'node_info' ORDER BY ordinal_position",
            guard.name
        ))
        .unwrap();
    let types: Vec<String> = cols.iter().map(|(n, t)| format!("{n} {t}")).collect();
    assert!(
        types.contains(&"role enum('prefill','decode')".to_string()),
        "{types:?}"
    );
    assert!(
        types.contains(&"node_id varchar(64)".to_string()),
        "{types:?}"
    );
    assert!(
        types.iter().any(|t| t.starts_with("is_online tinyint(1)")),
        "{types:?}"
    );
    // Router a registers, router b (same database) sees it at its next operation.
    let t0 = Ts::now();
    let p = register(&mut a, "prefill", "127.0.0.1:8001", "127.0.0.1:9001", t0);
    let d = register(&mut b, "decode", "127.0.0.1:8002", "127.0.0.1:9002", t0);
    assert_eq!(
        call(&mut b, Route::Heartbeat, json!({"node_id": p}), t0).0,
        200
    );
    assert_eq!(
        call(&mut a, Route::Heartbeat, json!({"node_id": d}), t0).0,
        200
    );
    assert_eq!(
        call(
            &mut a,
            Route::RegisterCommId,
            json!({"node_id": p, "comm_key": KEY, "comm_id": "C"}),
            t0
        )
        .0,
        200
    );
    b.tick(t0).unwrap();
    assert_eq!(b.ready_pairs().len(), 1);
}
