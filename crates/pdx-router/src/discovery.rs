//! The glue between `pdx-discovery` and the registry: `--discovery etcd://…` or `--discovery k8s` start a
//! watcher thread whose changes land here ([`Applier`]), and the registration API writes through to etcd
//! ([`Shared::write_through`](crate::api::Shared)).
//!
//! Workers from a source have no heartbeat TTL in the router: they leave when the source drops them (an
//! etcd lease expires or the key is deleted; a pod is deleted or goes not ready), by draining (no new
//! request at once, removed when idle). A source that cannot be reached changes nothing, so the router keeps
//! its last known workers (active health checks still take dead ones out of rotation).

use crate::registry::Registry;
use crate::RouterError;
use pdx_discovery::{etcd_driver, k8s_driver, Change, DiscoverySpec, Identity};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Applies a source's changes to the registry. Entries are counted per worker identity (model, role, pool,
/// URL), so a worker two keys name leaves with the last of them.
#[derive(Debug)]
pub struct Applier {
    registry: Arc<Registry>,
    held: Mutex<HashMap<Identity, usize>>,
}

impl Applier {
    /// An applier onto `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            registry,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// Applies `changes` in order. A worker the registry refuses (URL outside `--worker-allow-cidr`,
    /// `--max-workers` reached) is logged and skipped.
    pub fn apply(&self, changes: Vec<Change>) {
        let Ok(mut held) = self.held.lock() else {
            return;
        };
        for c in changes {
            match c {
                Change::Upsert { key, worker } => {
                    *held.entry(worker.identity()).or_insert(0) += 1;
                    if let Err(e) = self
                        .registry
                        .upsert_discovered(&worker.registration, worker.bootstrap_port)
                    {
                        tracing::warn!(key, error = %e, "discovered worker refused");
                    }
                }
                Change::Remove { key, worker } => {
                    let id = worker.identity();
                    let last = match held.get_mut(&id) {
                        Some(n) if *n > 1 => {
                            *n -= 1;
                            false
                        }
                        Some(_) => {
                            held.remove(&id);
                            true
                        }
                        None => true,
                    };
                    if last {
                        tracing::debug!(key, "discovery entry removed");
                        self.registry.retire(&id.model, id.role, &id.pool, &id.url);
                    }
                }
            }
        }
    }
}

/// A running discovery watcher (stops when dropped).
#[derive(Debug)]
pub enum Running {
    /// etcd.
    Etcd(etcd_driver::EtcdDiscovery),
    /// Kubernetes.
    K8s(k8s_driver::K8sDiscovery),
}

/// The write-through of `spec` (etcd only).
pub fn write_through(spec: Option<&DiscoverySpec>) -> Option<etcd_driver::WriteThrough> {
    match spec? {
        DiscoverySpec::Etcd(t) => Some(etcd_driver::WriteThrough::new(t)),
        DiscoverySpec::K8s(_) => None,
    }
}

/// Starts the watcher of `spec`, applying its changes to `registry`; with etcd, it also performs `writes`.
/// `max_entries` bounds the workers one watch tracks.
///
/// Errors: [`RouterError::Config`] when the watcher cannot start (no Kubernetes client configuration, a
/// thread that cannot start).
pub fn start(
    spec: &DiscoverySpec,
    registry: Arc<Registry>,
    writes: Option<etcd_driver::WriteThrough>,
    max_entries: usize,
) -> Result<Running, RouterError> {
    let applier = Arc::new(Applier::new(registry));
    let sink: pdx_discovery::Sink = Arc::new(move |changes| applier.apply(changes));
    match spec {
        DiscoverySpec::Etcd(target) => {
            let opts = etcd_driver::EtcdOptions {
                max_entries,
                ..etcd_driver::EtcdOptions::from_env()
            };
            tracing::info!(endpoints = ?target.endpoints, prefix = %target.prefix, "etcd discovery");
            etcd_driver::spawn(target.clone(), opts, sink, writes)
                .map(Running::Etcd)
                .map_err(|e| RouterError::Config(format!("etcd discovery: {e}")))
        }
        DiscoverySpec::K8s(k) => {
            let rules = pdx_discovery::k8s::PodRules {
                port_name: k.port_name.clone(),
                default_model: k.default_model.clone(),
            };
            k8s_driver::spawn(k.clone(), rules, max_entries, None, sink)
                .map(Running::K8s)
                .map_err(|e| RouterError::Config(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use clap::Parser;
    use pdx_discovery::DiscoveredWorker;
    use std::sync::atomic::Ordering;

    fn registry(flags: &[&str]) -> Arc<Registry> {
        let args = crate::ServeArgs::try_parse_from(
            std::iter::once("pdx-serve").chain(flags.iter().copied()),
        )
        .expect("flags");
        Registry::new(&Config::from_args(&args).expect("config")).expect("registry")
    }

    fn found(url: &str) -> DiscoveredWorker {
        DiscoveredWorker::from_body(
            format!(r#"{{"role":"decode","pool":"decode","url":"{url}","model":"m"}}"#).as_bytes(),
        )
        .unwrap()
    }

    fn up(key: &str, url: &str) -> Change {
        Change::Upsert {
            key: key.into(),
            worker: found(url),
        }
    }

    fn down(key: &str, url: &str) -> Change {
        Change::Remove {
            key: key.into(),
            worker: found(url),
        }
    }

    fn state(r: &Registry, url: &str) -> Option<&'static str> {
        let now = r.now_us();
        r.workers()
            .iter()
            .find(|w| w.url == url)
            .map(|w| w.state(now))
    }

    #[test]
    fn discovered_workers_outlive_the_heartbeat_ttl_and_leave_when_the_source_drops_them() {
        let r = registry(&["--heartbeat-ttl-secs", "0.05"]);
        let a = Applier::new(r.clone());
        a.apply(vec![up("k1", "http://10.0.0.1:1")]);
        std::thread::sleep(std::time::Duration::from_millis(120));
        r.sweep();
        assert_eq!(state(&r, "http://10.0.0.1:1"), Some("unknown"), "no TTL");
        a.apply(vec![down("k1", "http://10.0.0.1:1")]);
        assert_eq!(state(&r, "http://10.0.0.1:1"), Some("draining"));
        r.sweep();
        assert_eq!(state(&r, "http://10.0.0.1:1"), None, "idle: removed");
    }

    #[test]
    fn a_worker_named_by_two_keys_leaves_with_the_last() {
        let r = registry(&[]);
        let a = Applier::new(r.clone());
        a.apply(vec![
            up("k1", "http://10.0.0.1:1"),
            up("k2", "http://10.0.0.1:1"),
        ]);
        assert_eq!(r.workers().len(), 1);
        a.apply(vec![down("k1", "http://10.0.0.1:1")]);
        assert_eq!(state(&r, "http://10.0.0.1:1"), Some("unknown"));
        a.apply(vec![down("k2", "http://10.0.0.1:1")]);
        assert_eq!(state(&r, "http://10.0.0.1:1"), Some("draining"));
        // Back in the source before the sweep: taken back.
        a.apply(vec![up("k1", "http://10.0.0.1:1")]);
        assert_eq!(state(&r, "http://10.0.0.1:1"), Some("unknown"));
    }

    #[test]
    fn a_registered_worker_confirmed_by_the_source_follows_the_source_and_static_ones_stay() {
        let r = registry(&[
            "--heartbeat-ttl-secs",
            "0.05",
            "--decode",
            "http://10.0.0.9:1",
        ]);
        let reg = found("http://10.0.0.2:1").registration;
        r.register(&reg).unwrap();
        let a = Applier::new(r.clone());
        a.apply(vec![up("k", "http://10.0.0.2:1")]);
        std::thread::sleep(std::time::Duration::from_millis(120));
        r.sweep();
        assert_eq!(
            state(&r, "http://10.0.0.2:1"),
            Some("unknown"),
            "the source's lease decides now, not the heartbeat TTL"
        );
        // A static worker is never retired by a source (it is not the source's).
        let mut s = found("http://10.0.0.9:1");
        s.registration.model = "*".into();
        a.apply(vec![
            Change::Upsert {
                key: "s".into(),
                worker: s.clone(),
            },
            Change::Remove {
                key: "s".into(),
                worker: s,
            },
        ]);
        let ws: Vec<_> = r
            .workers()
            .into_iter()
            .filter(|w| w.url == "http://10.0.0.9:1")
            .collect();
        assert_eq!(ws.len(), 1, "the same worker, not a second one");
        let w = &ws[0];
        assert!(!w.draining.load(Ordering::Relaxed));
        assert!(!w.discovered.load(Ordering::Relaxed));
    }

    #[test]
    fn discovered_workers_count_toward_max_workers() {
        let r = registry(&["--max-workers", "1"]);
        let a = Applier::new(r.clone());
        a.apply(vec![
            up("k1", "http://10.0.0.1:1"),
            up("k2", "http://10.0.0.2:1"),
        ]);
        assert_eq!(r.workers().len(), 1);
        let reg = found("http://10.0.0.3:1").registration;
        assert!(matches!(
            r.register(&reg),
            Err(RouterError::RegistryFull { .. })
        ));
    }

    #[test]
    fn the_source_respects_the_allow_list() {
        let r = registry(&["--worker-allow-cidr", "10.1.0.0/16"]);
        let a = Applier::new(r.clone());
        a.apply(vec![
            up("k1", "http://10.0.0.1:1"),
            up("k2", "http://10.1.0.2:1"),
        ]);
        let urls: Vec<String> = r.workers().iter().map(|w| w.url.to_string()).collect();
        assert_eq!(urls, ["http://10.1.0.2:1"]);
    }
}
