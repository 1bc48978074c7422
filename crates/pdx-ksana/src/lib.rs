//! KsanaLLM's `simple_router` protocol, router side: the node API (`POST /RegisterNode`, `/Heartbeat`,
//! `/RegisterCommId`) answered field for field and status for status as the peer (KsanaLLM's own FastAPI
//! router) answers it, the node registry behind it, and the prefill/decode pairs requests may go to.
//!
//! * [`wire`]: bodies read and validated as FastAPI and pydantic do, answers in their shapes (`{"detail":…}`,
//!   422 error lists).
//! * [`state`]: the registry as sans-IO state over the peer's three tables: registration, heartbeats, comm
//!   ids, group readiness across ranks, heartbeat expiry, `prefill__decode` comm groups.
//! * [`store`]: the tables in SQLite (default) or MySQL, exactly as the peer's `models.py` defines them, so
//!   pdx and the peer can share a database and state survives a restart.
//! * [`service`]: one transaction per request or expiry tick (blocking; the router gives it a thread).
//!
//! `pdx serve --orchestration ksana` (crate `pdx-router`) serves this API and sends each request to a
//! ready pair with the `kv-comm-group-key` and `kv-comm-request-id` headers. See `docs/router.md`,
//! "KsanaLLM orchestration".
#![forbid(unsafe_code)]

pub mod service;
pub mod state;
pub mod store;
pub mod time;
pub mod wire;

pub use service::Service;
pub use state::{ReadyPair, Registry, Route, Settings};
pub use store::{Database, Repository};
pub use time::Ts;
pub use wire::{Reply, Role};

/// Errors of the registry's storage and configuration.
#[derive(Debug, thiserror::Error)]
pub enum KsanaError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// MySQL failed (connect, query).
    #[error("mysql: {0}")]
    Mysql(#[from] mysql::Error),
    /// A database that lacks a table while schema creation is off.
    #[error("schema: {0}")]
    Schema(String),
    /// A bad database name or path.
    #[error("{0}")]
    Config(String),
    /// An operation the database refused (its message).
    #[error("database: {0}")]
    Database(String),
}
