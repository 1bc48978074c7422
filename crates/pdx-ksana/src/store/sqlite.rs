//! The registry in a SQLite file (rusqlite, SQLite bundled): the peer's tables with the DDL SQLAlchemy emits
//! for its `models.py` on SQLite, rows written as SQLAlchemy writes them (times as UTC text
//! `YYYY-MM-DD HH:MM:SS.ffffff`, booleans 0/1, JSON as text). The file is in WAL mode (a router killed
//! mid-write loses nothing committed) and waits up to 5 s for another writer's lock (the peer, sharing it).

use super::{missing_table, Repository, TABLES};
use crate::state::{Changes, GroupRow, NodeRow, PairRow, Tables};
use crate::time::Ts;
use crate::wire::Role;
use crate::KsanaError;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, Row};
use std::path::{Path, PathBuf};

/// The peer's schema on SQLite (SQLAlchemy 2 `CreateTable` / `CreateIndex` output for `models.py`).
const DDL: [(&str, &[&str]); 3] = [
    (
        "CREATE TABLE comm_group_pair (
	id INTEGER NOT NULL, 
	comm_key VARCHAR(256) NOT NULL, 
	is_active BOOLEAN NOT NULL, 
	cluster_name VARCHAR(128) NOT NULL, 
	prefill_addr VARCHAR(128) NOT NULL, 
	decode_addr VARCHAR(128) NOT NULL, 
	control_channel_meta JSON NOT NULL, 
	data_channel_meta JSON NOT NULL, 
	updated_at DATETIME DEFAULT CURRENT_TIMESTAMP NOT NULL, 
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
	id INTEGER NOT NULL, 
	cluster_name VARCHAR(128) NOT NULL, 
	inference_addr VARCHAR(128) NOT NULL, 
	role VARCHAR(7) NOT NULL, 
	world_size_expected INTEGER NOT NULL, 
	online_device_sum INTEGER NOT NULL, 
	online_node_count INTEGER NOT NULL, 
	is_ready BOOLEAN NOT NULL, 
	last_computed_at DATETIME DEFAULT CURRENT_TIMESTAMP NOT NULL, 
	updated_at DATETIME DEFAULT CURRENT_TIMESTAMP NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_group_status UNIQUE (cluster_name, inference_addr, role)
)",
        &["CREATE INDEX ix_status_role_ready ON inference_group_status (role, is_ready)"],
    ),
    (
        "CREATE TABLE node_info (
	id INTEGER NOT NULL, 
	node_id VARCHAR(64) NOT NULL, 
	cluster_name VARCHAR(128) NOT NULL, 
	inference_addr VARCHAR(128) NOT NULL, 
	coordinator_addr VARCHAR(128) NOT NULL, 
	role VARCHAR(7) NOT NULL, 
	node_rank INTEGER NOT NULL, 
	world_size INTEGER NOT NULL, 
	device_num INTEGER NOT NULL, 
	last_heartbeat DATETIME NOT NULL, 
	is_online BOOLEAN NOT NULL, 
	start_time DATETIME NOT NULL, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_cluster_addr_role_rank UNIQUE (cluster_name, inference_addr, role, node_rank), 
	UNIQUE (node_id)
)",
        &[
            "CREATE INDEX ix_node_cluster_role_online ON node_info (cluster_name, role, is_online)",
            "CREATE INDEX ix_node_last_heartbeat ON node_info (last_heartbeat)",
        ],
    ),
];

/// A SQLite file holding the registry.
pub struct SqliteRepo {
    conn: Connection,
    path: PathBuf,
    in_tx: bool,
}

impl SqliteRepo {
    /// Opens (creating) the file at `path`, its directory too.
    ///
    /// Errors: [`KsanaError`] when the file cannot be opened, or a table is missing without `create_schema`.
    pub fn open(path: &Path, create_schema: bool) -> Result<SqliteRepo, KsanaError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| KsanaError::Config(format!("{}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL: readers (the peer) do not block the writer; NORMAL sync loses nothing when the process dies.
        conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))?;
        conn.execute_batch("PRAGMA synchronous=NORMAL")?;
        for (table, (ddl, indexes)) in TABLES.iter().zip(DDL) {
            let exists: bool = conn.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get::<_, i64>(0).map(|n| n > 0),
            )?;
            if exists {
                continue;
            }
            if !create_schema {
                return Err(missing_table(table, &path.display().to_string()));
            }
            conn.execute_batch("BEGIN")?;
            let made = conn
                .execute_batch(ddl)
                .and_then(|()| indexes.iter().try_for_each(|ix| conn.execute_batch(ix)));
            match made {
                Ok(()) => conn.execute_batch("COMMIT")?,
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK");
                    return Err(e.into());
                }
            }
        }
        Ok(SqliteRepo {
            conn,
            path: path.to_path_buf(),
            in_tx: false,
        })
    }

    fn read(&self) -> Result<Tables, KsanaError> {
        let mut t = Tables::default();
        let mut s = self.conn.prepare(
            "SELECT node_id, cluster_name, inference_addr, coordinator_addr, role, node_rank, world_size, \
             device_num, last_heartbeat, is_online, start_time, created_at, updated_at FROM node_info ORDER BY id",
        )?;
        let mut rows = s.query([])?;
        while let Some(r) = rows.next()? {
            let Some(role) = Role::parse(&text(r, 4)) else {
                tracing::warn!(node_id = %text(r, 0), "node_info row with an unknown role skipped");
                continue;
            };
            t.nodes.push(NodeRow {
                node_id: text(r, 0),
                cluster_name: text(r, 1),
                inference_addr: text(r, 2),
                coordinator_addr: text(r, 3),
                role,
                node_rank: int(r, 5),
                world_size: int(r, 6),
                device_num: int(r, 7),
                last_heartbeat: time(r, 8),
                is_online: int(r, 9) != 0,
                start_time: time(r, 10),
                created_at: time(r, 11),
                updated_at: time(r, 12),
            });
        }
        let mut s = self.conn.prepare(
            "SELECT comm_key, is_active, cluster_name, prefill_addr, decode_addr, control_channel_meta, \
             data_channel_meta, updated_at FROM comm_group_pair ORDER BY id",
        )?;
        let mut rows = s.query([])?;
        while let Some(r) = rows.next()? {
            t.pairs.push(PairRow {
                comm_key: text(r, 0),
                is_active: int(r, 1) != 0,
                cluster_name: text(r, 2),
                prefill_addr: text(r, 3),
                decode_addr: text(r, 4),
                control: json(&text(r, 5)),
                data: json(&text(r, 6)),
                updated_at: time(r, 7),
            });
        }
        let mut s = self.conn.prepare(
            "SELECT cluster_name, inference_addr, role, world_size_expected, online_device_sum, \
             online_node_count, is_ready, last_computed_at, updated_at FROM inference_group_status ORDER BY id",
        )?;
        let mut rows = s.query([])?;
        while let Some(r) = rows.next()? {
            let Some(role) = Role::parse(&text(r, 2)) else {
                continue;
            };
            t.groups.push(GroupRow {
                cluster_name: text(r, 0),
                inference_addr: text(r, 1),
                role,
                world_size_expected: int(r, 3),
                online_device_sum: int(r, 4),
                online_node_count: int(r, 5),
                is_ready: int(r, 6) != 0,
                last_computed_at: time(r, 7),
                updated_at: time(r, 8),
            });
        }
        Ok(t)
    }

    fn write(&self, t: &Tables, c: &Changes) -> Result<(), KsanaError> {
        for id in &c.deleted_nodes {
            self.conn
                .execute("DELETE FROM node_info WHERE node_id = ?1", [id])?;
        }
        let mut s = self.conn.prepare_cached(
            "INSERT INTO node_info (node_id, cluster_name, inference_addr, coordinator_addr, role, node_rank, \
             world_size, device_num, last_heartbeat, is_online, start_time, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
             ON CONFLICT(node_id) DO UPDATE SET cluster_name = excluded.cluster_name, \
             inference_addr = excluded.inference_addr, coordinator_addr = excluded.coordinator_addr, \
             role = excluded.role, node_rank = excluded.node_rank, world_size = excluded.world_size, \
             device_num = excluded.device_num, last_heartbeat = excluded.last_heartbeat, \
             is_online = excluded.is_online, start_time = excluded.start_time, updated_at = excluded.updated_at",
        )?;
        for n in t.nodes.iter().filter(|n| c.nodes.contains(&n.node_id)) {
            s.execute(params![
                n.node_id,
                n.cluster_name,
                n.inference_addr,
                n.coordinator_addr,
                n.role.as_str(),
                n.node_rank,
                n.world_size,
                n.device_num,
                n.last_heartbeat.to_db(),
                n.is_online,
                n.start_time.to_db(),
                n.created_at.to_db(),
                n.updated_at.to_db(),
            ])?;
        }
        let mut s = self.conn.prepare_cached(
            "INSERT INTO comm_group_pair (comm_key, is_active, cluster_name, prefill_addr, decode_addr, \
             control_channel_meta, data_channel_meta, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
             ON CONFLICT(comm_key) DO UPDATE SET is_active = excluded.is_active, \
             cluster_name = excluded.cluster_name, prefill_addr = excluded.prefill_addr, \
             decode_addr = excluded.decode_addr, control_channel_meta = excluded.control_channel_meta, \
             data_channel_meta = excluded.data_channel_meta, updated_at = excluded.updated_at",
        )?;
        for p in t.pairs.iter().filter(|p| c.pairs.contains(&p.comm_key)) {
            s.execute(params![
                p.comm_key,
                p.is_active,
                p.cluster_name,
                p.prefill_addr,
                p.decode_addr,
                p.control.to_string(),
                p.data.to_string(),
                p.updated_at.to_db(),
            ])?;
        }
        let mut s = self.conn.prepare_cached(
            "INSERT INTO inference_group_status (cluster_name, inference_addr, role, world_size_expected, \
             online_device_sum, online_node_count, is_ready, last_computed_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
             ON CONFLICT(cluster_name, inference_addr, role) DO UPDATE SET \
             world_size_expected = excluded.world_size_expected, online_device_sum = excluded.online_device_sum, \
             online_node_count = excluded.online_node_count, is_ready = excluded.is_ready, \
             last_computed_at = excluded.last_computed_at, updated_at = excluded.updated_at",
        )?;
        for g in &t.groups {
            if !c
                .groups
                .contains(&(g.cluster_name.clone(), g.inference_addr.clone(), g.role))
            {
                continue;
            }
            s.execute(params![
                g.cluster_name,
                g.inference_addr,
                g.role.as_str(),
                g.world_size_expected,
                g.online_device_sum,
                g.online_node_count,
                g.is_ready,
                g.last_computed_at.to_db(),
                g.updated_at.to_db(),
            ])?;
        }
        Ok(())
    }
}

impl Repository for SqliteRepo {
    fn begin(&mut self) -> Result<Tables, KsanaError> {
        if self.in_tx {
            self.rollback();
        }
        // IMMEDIATE: the write lock is taken before the rows are read, so no other writer changes them between.
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        self.in_tx = true;
        match self.read() {
            Ok(t) => Ok(t),
            Err(e) => {
                self.rollback();
                Err(e)
            }
        }
    }

    fn commit(&mut self, tables: &Tables, changes: &Changes) -> Result<(), KsanaError> {
        let r = self
            .write(tables, changes)
            .and_then(|()| self.conn.execute_batch("COMMIT").map_err(Into::into));
        if r.is_ok() {
            self.in_tx = false;
        } else {
            self.rollback();
        }
        r
    }

    fn rollback(&mut self) {
        if self.in_tx {
            let _ = self.conn.execute_batch("ROLLBACK");
            self.in_tx = false;
        }
    }

    fn describe(&self) -> String {
        format!("sqlite {}", self.path.display())
    }
}

fn text(r: &Row<'_>, i: usize) -> String {
    match r.get_ref(i) {
        Ok(ValueRef::Text(b)) | Ok(ValueRef::Blob(b)) => String::from_utf8_lossy(b).into_owned(),
        Ok(ValueRef::Integer(n)) => n.to_string(),
        Ok(ValueRef::Real(f)) => f.to_string(),
        _ => String::new(),
    }
}

fn int(r: &Row<'_>, i: usize) -> i64 {
    match r.get_ref(i) {
        Ok(ValueRef::Integer(n)) => n,
        Ok(ValueRef::Real(f)) => f as i64,
        Ok(ValueRef::Text(b)) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn time(r: &Row<'_>, i: usize) -> Ts {
    Ts::from_db(&text(r, i)).unwrap_or_default()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or(serde_json::Value::Null)
}
