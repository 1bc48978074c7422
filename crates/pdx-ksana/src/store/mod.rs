//! Where the registry lives between requests and across restarts: the peer's own three tables
//! (`node_info`, `comm_group_pair`, `inference_group_status`, as its `models.py` defines them), in SQLite
//! ([`sqlite`], the default, one file) or MySQL / MariaDB ([`mysql`], a `mysql://` URL), so that pdx and
//! the peer can run on one database.
//!
//! Every operation is one write transaction: read every row, apply the operation to the sans-IO registry,
//! write back the rows it changed. The database stays the truth, as in the peer: another router on the
//! same database sees each change at its next operation.

pub mod mysql;
pub mod sqlite;

use crate::state::{Changes, Tables};
use crate::KsanaError;
use std::path::PathBuf;

/// The storage behind the registry.
pub trait Repository: Send {
    /// Starts a write transaction and reads every row (in id order).
    ///
    /// Errors: [`KsanaError`] from the database.
    fn begin(&mut self) -> Result<Tables, KsanaError>;
    /// Writes the rows of `tables` named in `changes` (deletes first, then inserts or updates by natural key)
    /// and commits.
    ///
    /// Errors: [`KsanaError`] from the database (the transaction is rolled back).
    fn commit(&mut self, tables: &Tables, changes: &Changes) -> Result<(), KsanaError>;
    /// Ends the transaction without writing.
    fn rollback(&mut self);
    /// The database, for logs (no password).
    fn describe(&self) -> String;
}

/// Which database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file (created with its directory when missing).
    Sqlite(PathBuf),
    /// `mysql://user:password@host:port/database`.
    Mysql(String),
}

impl Database {
    /// `mysql://…` is MySQL; `sqlite://PATH`, `sqlite:PATH` or a bare path is a SQLite file.
    ///
    /// Errors: [`KsanaError::Config`] for an empty path or `:memory:` (state must survive a restart; the
    /// peer refuses it too).
    pub fn parse(s: &str) -> Result<Database, KsanaError> {
        if s.starts_with("mysql://") {
            return Ok(Database::Mysql(s.to_string()));
        }
        let path = s
            .strip_prefix("sqlite://")
            .or_else(|| s.strip_prefix("sqlite:"))
            .unwrap_or(s);
        if path.is_empty() || path == ":memory:" {
            return Err(KsanaError::Config(format!(
                "`{s}`: the node registry needs a database file or a mysql:// URL (an in-memory one would not survive a restart)"
            )));
        }
        Ok(Database::Sqlite(PathBuf::from(path)))
    }
}

/// Opens `db`; with `create_schema`, creates the peer's tables (and their indexes) that are missing, as
/// SQLAlchemy's `create_all` does; without, checks that they exist.
///
/// Errors: [`KsanaError`] when the database cannot be opened or lacks a table.
pub fn open(db: &Database, create_schema: bool) -> Result<Box<dyn Repository>, KsanaError> {
    Ok(match db {
        Database::Sqlite(p) => Box::new(sqlite::SqliteRepo::open(p, create_schema)?),
        Database::Mysql(u) => Box::new(mysql::MysqlRepo::open(u, create_schema)?),
    })
}

/// The tables, in the order they are created.
pub const TABLES: [&str; 3] = ["comm_group_pair", "inference_group_status", "node_info"];

/// The error of a table that is missing while schema creation is off.
pub(crate) fn missing_table(table: &str, db: &str) -> KsanaError {
    KsanaError::Schema(format!(
        "{db} has no table `{table}` and schema creation is off: create the tables (the peer's \
         create_table.sql or its first start) or let pdx create them"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names() {
        assert_eq!(
            Database::parse("mysql://u:p@127.0.0.1/db").unwrap(),
            Database::Mysql("mysql://u:p@127.0.0.1/db".into())
        );
        for s in ["/tmp/x.db", "sqlite:///tmp/x.db", "sqlite:/tmp/x.db"] {
            assert_eq!(
                Database::parse(s).unwrap(),
                Database::Sqlite("/tmp/x.db".into()),
                "{s}"
            );
        }
        assert_eq!(
            Database::parse("r.db").unwrap(),
            Database::Sqlite("r.db".into())
        );
        for bad in ["", ":memory:", "sqlite::memory:", "sqlite://"] {
            assert!(Database::parse(bad).is_err(), "{bad}");
        }
    }
}
