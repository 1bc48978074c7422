//! The registry in MySQL or MariaDB (the `mysql` crate, pure Rust, no TLS): the peer's tables with the DDL
//! SQLAlchemy emits for its `models.py` on MySQL (`ENUM('prefill','decode')`, `BOOL`, `JSON`, `DATETIME` of
//! whole seconds), rows written as its PyMySQL driver writes them (UTC wall time). A transaction reads the
//! rows `FOR UPDATE`, so two routers on one database take turns. A connection that fails is opened again
//! at the next operation.

use super::{missing_table, Repository, TABLES};
use crate::state::{Changes, GroupRow, NodeRow, PairRow, Tables};
use crate::time::Ts;
use crate::wire::Role;
use crate::KsanaError;
use mysql::prelude::Queryable;
use mysql::{Conn, Opts, OptsBuilder, Params, Value};
use std::time::Duration;

/// The peer's schema on MySQL (SQLAlchemy 2 `CreateTable` / `CreateIndex` output for `models.py`).
const DDL: [(&str, &[&str]); 3] = [
    (
        "CREATE TABLE comm_group_pair (
	id INTEGER NOT NULL AUTO_INCREMENT,
	comm_key VARCHAR(256) NOT NULL,
	is_active BOOL NOT NULL,
	cluster_name VARCHAR(128) NOT NULL,
	prefill_addr VARCHAR(128) NOT NULL,
	decode_addr VARCHAR(128) NOT NULL,
	control_channel_meta JSON NOT NULL,
	data_channel_meta JSON NOT NULL,
	updated_at DATETIME NOT NULL DEFAULT (now()),
	PRIMARY KEY (id),
	UNIQUE (comm_key)
)",
        &[
            "CREATE INDEX ix_comm_cluster_active ON comm_group_pair (cluster_name)",
            "CREATE INDEX ix_comm_decode_addr ON comm_group_pair (decode_addr)",
            "CREATE INDEX ix_comm_prefill_addr ON comm_group_pair (prefill_addr)",
        ],
    ),
    (
        "CREATE TABLE inference_group_status (
	id INTEGER NOT NULL AUTO_INCREMENT,
	cluster_name VARCHAR(128) NOT NULL,
	inference_addr VARCHAR(128) NOT NULL,
	`role` ENUM('prefill','decode') NOT NULL,
	world_size_expected INTEGER NOT NULL,
	online_device_sum INTEGER NOT NULL,
	online_node_count INTEGER NOT NULL,
	is_ready BOOL NOT NULL,
	last_computed_at DATETIME NOT NULL DEFAULT (now()),
	updated_at DATETIME NOT NULL DEFAULT (now()),
	PRIMARY KEY (id),
	CONSTRAINT uq_group_status UNIQUE (cluster_name, inference_addr, `role`)
)",
        &["CREATE INDEX ix_status_role_ready ON inference_group_status (`role`, is_ready)"],
    ),
    (
        "CREATE TABLE node_info (
	id INTEGER NOT NULL AUTO_INCREMENT,
	node_id VARCHAR(64) NOT NULL,
	cluster_name VARCHAR(128) NOT NULL,
	inference_addr VARCHAR(128) NOT NULL,
	coordinator_addr VARCHAR(128) NOT NULL,
	`role` ENUM('prefill','decode') NOT NULL,
	node_rank INTEGER NOT NULL,
	world_size INTEGER NOT NULL,
	device_num INTEGER NOT NULL,
	last_heartbeat DATETIME NOT NULL,
	is_online BOOL NOT NULL,
	start_time DATETIME NOT NULL,
	created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	CONSTRAINT uq_cluster_addr_role_rank UNIQUE (cluster_name, inference_addr, `role`, node_rank),
	UNIQUE (node_id)
)",
        &[
            "CREATE INDEX ix_node_cluster_role_online ON node_info (cluster_name, `role`, is_online)",
            "CREATE INDEX ix_node_last_heartbeat ON node_info (last_heartbeat)",
        ],
    ),
];

/// A MySQL / MariaDB database holding the registry.
pub struct MysqlRepo {
    opts: Opts,
    conn: Option<Conn>,
    name: String,
    in_tx: bool,
}

impl MysqlRepo {
    /// Connects to `url` (`mysql://user:password@host:port/database`).
    ///
    /// Errors: [`KsanaError`] for a bad URL, a server that does not answer, or a missing table without
    /// `create_schema`.
    pub fn open(url: &str, create_schema: bool) -> Result<MysqlRepo, KsanaError> {
        let opts =
            Opts::from_url(url).map_err(|e| KsanaError::Config(format!("database URL: {e}")))?;
        let name = format!(
            "mysql {}@{}:{}/{}",
            opts.get_user().unwrap_or(""),
            opts.get_ip_or_hostname(),
            opts.get_tcp_port(),
            opts.get_db_name().unwrap_or("")
        );
        if opts.get_db_name().is_none_or(str::is_empty) {
            return Err(KsanaError::Config(format!(
                "{name}: the URL names no database"
            )));
        }
        let opts: Opts = OptsBuilder::from_opts(opts)
            .tcp_connect_timeout(Some(Duration::from_secs(5)))
            .read_timeout(Some(Duration::from_secs(30)))
            .write_timeout(Some(Duration::from_secs(30)))
            .init(vec!["SET NAMES utf8mb4", "SET time_zone = '+00:00'"])
            .into();
        let mut repo = MysqlRepo {
            opts,
            conn: None,
            name,
            in_tx: false,
        };
        let name = repo.name.clone();
        let conn = repo.conn()?;
        for (table, (ddl, indexes)) in TABLES.iter().zip(DDL) {
            let n: Option<i64> = conn.exec_first(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = ?",
                (table,),
            )?;
            if n.unwrap_or(0) > 0 {
                continue;
            }
            if !create_schema {
                return Err(missing_table(table, &name));
            }
            conn.query_drop(ddl)?;
            for ix in indexes {
                conn.query_drop(ix)?;
            }
        }
        Ok(repo)
    }

    fn conn(&mut self) -> Result<&mut Conn, KsanaError> {
        if self.conn.is_none() {
            self.conn = Some(Conn::new(self.opts.clone())?);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| KsanaError::Config("no connection".into()))
    }

    fn read(&mut self) -> Result<Tables, KsanaError> {
        let c = self.conn()?;
        let mut t = Tables::default();
        let rows: Vec<mysql::Row> = c.query(
            "SELECT node_id, cluster_name, inference_addr, coordinator_addr, `role`, node_rank, world_size, \
             device_num, last_heartbeat, is_online, start_time, created_at, updated_at FROM node_info \
             ORDER BY id FOR UPDATE",
        )?;
        for r in rows {
            let v = r.unwrap();
            let Some(role) = Role::parse(&text(&v[4])) else {
                continue;
            };
            t.nodes.push(NodeRow {
                node_id: text(&v[0]),
                cluster_name: text(&v[1]),
                inference_addr: text(&v[2]),
                coordinator_addr: text(&v[3]),
                role,
                node_rank: int(&v[5]),
                world_size: int(&v[6]),
                device_num: int(&v[7]),
                last_heartbeat: time(&v[8]),
                is_online: int(&v[9]) != 0,
                start_time: time(&v[10]),
                created_at: time(&v[11]),
                updated_at: time(&v[12]),
            });
        }
        let rows: Vec<mysql::Row> = c.query(
            "SELECT comm_key, is_active, cluster_name, prefill_addr, decode_addr, control_channel_meta, \
             data_channel_meta, updated_at FROM comm_group_pair ORDER BY id FOR UPDATE",
        )?;
        for r in rows {
            let v = r.unwrap();
            t.pairs.push(PairRow {
                comm_key: text(&v[0]),
                is_active: int(&v[1]) != 0,
                cluster_name: text(&v[2]),
                prefill_addr: text(&v[3]),
                decode_addr: text(&v[4]),
                control: serde_json::from_str(&text(&v[5])).unwrap_or_default(),
                data: serde_json::from_str(&text(&v[6])).unwrap_or_default(),
                updated_at: time(&v[7]),
            });
        }
        let rows: Vec<mysql::Row> = c.query(
            "SELECT cluster_name, inference_addr, `role`, world_size_expected, online_device_sum, \
             online_node_count, is_ready, last_computed_at, updated_at FROM inference_group_status \
             ORDER BY id FOR UPDATE",
        )?;
        for r in rows {
            let v = r.unwrap();
            let Some(role) = Role::parse(&text(&v[2])) else {
                continue;
            };
            t.groups.push(GroupRow {
                cluster_name: text(&v[0]),
                inference_addr: text(&v[1]),
                role,
                world_size_expected: int(&v[3]),
                online_device_sum: int(&v[4]),
                online_node_count: int(&v[5]),
                is_ready: int(&v[6]) != 0,
                last_computed_at: time(&v[7]),
                updated_at: time(&v[8]),
            });
        }
        Ok(t)
    }

    fn write(&mut self, t: &Tables, ch: &Changes) -> Result<(), KsanaError> {
        let c = self.conn()?;
        for id in &ch.deleted_nodes {
            c.exec_drop("DELETE FROM node_info WHERE node_id = ?", (id,))?;
        }
        for n in t.nodes.iter().filter(|n| ch.nodes.contains(&n.node_id)) {
            c.exec_drop(
                "INSERT INTO node_info (node_id, cluster_name, inference_addr, coordinator_addr, `role`, \
                 node_rank, world_size, device_num, last_heartbeat, is_online, start_time, created_at, updated_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE \
                 cluster_name = VALUES(cluster_name), inference_addr = VALUES(inference_addr), \
                 coordinator_addr = VALUES(coordinator_addr), `role` = VALUES(`role`), \
                 node_rank = VALUES(node_rank), world_size = VALUES(world_size), device_num = VALUES(device_num), \
                 last_heartbeat = VALUES(last_heartbeat), is_online = VALUES(is_online), \
                 start_time = VALUES(start_time), updated_at = VALUES(updated_at)",
                Params::Positional(vec![
                    n.node_id.clone().into(),
                    n.cluster_name.clone().into(),
                    n.inference_addr.clone().into(),
                    n.coordinator_addr.clone().into(),
                    n.role.as_str().into(),
                    n.node_rank.into(),
                    n.world_size.into(),
                    n.device_num.into(),
                    n.last_heartbeat.to_db().into(),
                    n.is_online.into(),
                    n.start_time.to_db().into(),
                    n.created_at.to_db().into(),
                    n.updated_at.to_db().into(),
                ]),
            )?;
        }
        for p in t.pairs.iter().filter(|p| ch.pairs.contains(&p.comm_key)) {
            c.exec_drop(
                "INSERT INTO comm_group_pair (comm_key, is_active, cluster_name, prefill_addr, decode_addr, \
                 control_channel_meta, data_channel_meta, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
                 ON DUPLICATE KEY UPDATE is_active = VALUES(is_active), cluster_name = VALUES(cluster_name), \
                 prefill_addr = VALUES(prefill_addr), decode_addr = VALUES(decode_addr), \
                 control_channel_meta = VALUES(control_channel_meta), \
                 data_channel_meta = VALUES(data_channel_meta), updated_at = VALUES(updated_at)",
                Params::Positional(vec![
                    p.comm_key.clone().into(),
                    p.is_active.into(),
                    p.cluster_name.clone().into(),
                    p.prefill_addr.clone().into(),
                    p.decode_addr.clone().into(),
                    p.control.to_string().into(),
                    p.data.to_string().into(),
                    p.updated_at.to_db().into(),
                ]),
            )?;
        }
        for g in &t.groups {
            if !ch
                .groups
                .contains(&(g.cluster_name.clone(), g.inference_addr.clone(), g.role))
            {
                continue;
            }
            c.exec_drop(
                "INSERT INTO inference_group_status (cluster_name, inference_addr, `role`, world_size_expected, \
                 online_device_sum, online_node_count, is_ready, last_computed_at, updated_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE \
                 world_size_expected = VALUES(world_size_expected), online_device_sum = VALUES(online_device_sum), \
                 online_node_count = VALUES(online_node_count), is_ready = VALUES(is_ready), \
                 last_computed_at = VALUES(last_computed_at), updated_at = VALUES(updated_at)",
                Params::Positional(vec![
                    g.cluster_name.clone().into(),
                    g.inference_addr.clone().into(),
                    g.role.as_str().into(),
                    g.world_size_expected.into(),
                    g.online_device_sum.into(),
                    g.online_node_count.into(),
                    g.is_ready.into(),
                    g.last_computed_at.to_db().into(),
                    g.updated_at.to_db().into(),
                ]),
            )?;
        }
        Ok(())
    }

    /// Ends a failed transaction; a connection that failed is dropped (a new one is made next time).
    fn fail(&mut self) {
        if let Some(c) = self.conn.as_mut() {
            if c.query_drop("ROLLBACK").is_err() {
                self.conn = None;
            }
        }
        self.in_tx = false;
    }
}

impl Repository for MysqlRepo {
    fn begin(&mut self) -> Result<Tables, KsanaError> {
        if self.in_tx {
            self.rollback();
        }
        let started = self
            .conn()
            .and_then(|c| c.query_drop("START TRANSACTION").map_err(Into::into));
        if let Err(e) = started {
            // A connection the server closed (restart, idle timeout): one more try on a new one.
            tracing::debug!(error = %e, "mysql: reconnecting");
            self.conn = None;
            self.conn()?.query_drop("START TRANSACTION")?;
        }
        self.in_tx = true;
        match self.read() {
            Ok(t) => Ok(t),
            Err(e) => {
                self.fail();
                Err(e)
            }
        }
    }

    fn commit(&mut self, tables: &Tables, changes: &Changes) -> Result<(), KsanaError> {
        let r = self
            .write(tables, changes)
            .and_then(|()| self.conn()?.query_drop("COMMIT").map_err(Into::into));
        match r {
            Ok(()) => self.in_tx = false,
            Err(_) => self.fail(),
        }
        r
    }

    fn rollback(&mut self) {
        if self.in_tx {
            self.fail();
        }
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Int(n) => n.to_string(),
        Value::UInt(n) => n.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Double(f) => f.to_string(),
        Value::Date(y, mo, d, h, mi, s, us) => {
            format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}")
        }
        _ => String::new(),
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(n) => *n,
        Value::UInt(n) => i64::try_from(*n).unwrap_or(i64::MAX),
        other => text(other).trim().parse().unwrap_or(0),
    }
}

fn time(v: &Value) -> Ts {
    Ts::from_db(&text(v)).unwrap_or_default()
}
