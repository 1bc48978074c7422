//! The registry on its database: each node API request and each expiry tick is one transaction (read the
//! rows, run the sans-IO operation, write what changed), and the pairs a request may go to are kept for
//! the router. Blocking: the router runs it on a thread of its own.

use crate::state::{ReadyPair, Registry, Route, Settings, Tables};
use crate::store::{self, Database, Repository};
use crate::time::Ts;
use crate::wire::Reply;
use crate::KsanaError;

/// The node registry with its storage.
pub struct Service {
    repo: Box<dyn Repository>,
    reg: Registry,
    ready: Vec<ReadyPair>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("db", &self.repo.describe())
            .field("nodes", &self.reg.tables.nodes.len())
            .finish()
    }
}

/// A node id as the peer draws one: a random UUID4's 32 hex digits.
pub fn new_node_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // No entropy source: the time and a counter still give distinct ids in this process.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        b[..8].copy_from_slice(&Ts::now().0.to_le_bytes());
        b[8..].copy_from_slice(&n.to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Service {
    /// Opens `db` (creating the peer's tables with `create_schema`) and reads the registry once.
    ///
    /// Errors: [`KsanaError`] when the database cannot be opened or read.
    pub fn open(
        settings: Settings,
        db: &Database,
        create_schema: bool,
    ) -> Result<Service, KsanaError> {
        Service::with_repo(settings, store::open(db, create_schema)?)
    }

    /// A service over an opened repository; reads the registry once.
    ///
    /// Errors: [`KsanaError`] when it cannot be read.
    pub fn with_repo(
        settings: Settings,
        mut repo: Box<dyn Repository>,
    ) -> Result<Service, KsanaError> {
        let tables = repo.begin()?;
        repo.rollback();
        let reg = Registry::new(settings, tables);
        let ready = reg.ready_pairs();
        Ok(Service { repo, reg, ready })
    }

    /// The database, for logs.
    pub fn describe(&self) -> String {
        self.repo.describe()
    }

    /// One transaction: read the rows, run `op`, write what it changed. The ready pairs are recomputed
    /// whatever happened (after a failure, from what was read).
    fn transact<T>(&mut self, op: impl FnOnce(&mut Registry) -> T) -> Result<T, KsanaError> {
        let r = (|| {
            self.reg.tables = self.repo.begin()?;
            self.reg.changes = Default::default();
            let out = op(&mut self.reg);
            let changes = self.reg.take_changes();
            if changes.is_empty() {
                self.repo.rollback();
            } else {
                // On failure nothing was stored: the next operation reads the database again.
                self.repo.commit(&self.reg.tables, &changes)?;
            }
            Ok(out)
        })();
        self.ready = self.reg.ready_pairs();
        r
    }

    /// Handles one node API request at `now` (see [`Registry::handle`]). A database that fails is a 500
    /// `{"detail": "database error: …"}`.
    pub fn handle(
        &mut self,
        route: Route,
        content_type: Option<&[u8]>,
        body: &[u8],
        now: Ts,
    ) -> Reply {
        self.transact(|r| r.handle(route, content_type, body, now, &mut new_node_id))
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, db = %self.repo.describe(), "ksana registry: database failed");
                Reply::detail(500, format!("database error: {e}"))
            })
    }

    /// Heartbeat expiry at `now` ([`Registry::expire`]), and a fresh read of what other writers changed.
    ///
    /// Errors: [`KsanaError`] from the database.
    pub fn tick(&mut self, now: Ts) -> Result<(), KsanaError> {
        self.transact(|r| r.expire(now))
    }

    /// The pairs a request may go to, as of the last operation or tick.
    pub fn ready_pairs(&self) -> &[ReadyPair] {
        &self.ready
    }

    /// The rows as of the last operation or tick.
    pub fn tables(&self) -> &Tables {
        &self.reg.tables
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_look_like_the_peers() {
        let a = new_node_id();
        assert_eq!(a.len(), 32);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(&a[12..13], "4");
        assert_ne!(a, new_node_id());
    }
}
