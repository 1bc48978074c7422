//! Worker discovery for `pdx serve`: where the workers of several routers come from when no single router
//! holds the registry.
//!
//! Two sources, each a sans-IO watch state machine with a thin tokio driver:
//! - [`etcd`]: workers (or a router, writing a registration through) put their registration body under a key
//!   prefix (`/pdx/workers/<model>/<id>`) with a lease their heartbeats keep alive; every router lists the
//!   prefix and watches it from the list's revision ([`etcd::EtcdWatch`], driven by [`etcd_driver`]). This is
//!   how Dynamo and NIXL's etcd mode share state between processes.
//! - [`k8s`]: pods chosen by label selectors (`--prefill-selector`, `--decode-selector`, …) are listed and
//!   watched through the Kubernetes API ([`k8s::PodWatch`], driven by [`k8s_driver`]); a ready pod's IP and
//!   port become a worker, as in vLLM production-stack's and SGLang router's Kubernetes service discovery.
//!
//! Both state machines turn what they are fed into [`Change`]s: a worker to add (or keep), a worker to remove.
//! The router applies them to its registry. A source that cannot be reached produces no change, so routers
//! keep serving the workers they last knew while etcd or the API server is away, and catch up (a re-list
//! diffed against what they knew) when it returns.
//!
//! Everything a source returns is untrusted input: a value is a registration body parsed as strictly as
//! `POST /v1/workers` ([`pdx_protocol::parse_registration`]), sizes and counts are bounded
//! ([`MAX_VALUE_BYTES`], the `max_entries` of each watch), and nothing from a source is ever used as a local
//! path or process id.
#![forbid(unsafe_code)]

pub mod args;
pub mod error;
pub mod etcd;
pub mod etcd_driver;
#[doc(hidden)]
pub mod fuzzing;
pub mod k8s;
pub mod k8s_driver;

pub use args::{DiscoveryArgs, DiscoverySpec};
pub use error::DiscoveryError;

use pdx_protocol::{Registration, Role};

/// Largest registration body a source may hold for one worker, bytes (the router's admin API takes at most
/// 64 KiB; a registration is a few hundred bytes).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// Default bound on the workers one watch tracks (entries beyond it are ignored with a warning): a source
/// must not grow a router without bound.
pub const DEFAULT_MAX_ENTRIES: usize = 4096;

/// A worker as a source describes it: the registration body and what was parsed from it.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveredWorker {
    /// The registration body (JSON), as `POST /v1/workers` takes it.
    pub body: Vec<u8>,
    /// The parsed registration.
    pub registration: Registration,
    /// Its role (checked).
    pub role: Role,
    /// SGLang bootstrap port, when the body names one.
    pub bootstrap_port: Option<u16>,
}

impl DiscoveredWorker {
    /// Parses a registration body strictly ([`pdx_protocol::parse_registration`]).
    ///
    /// Errors: [`DiscoveryError::BadValue`] for a body over [`MAX_VALUE_BYTES`] or one the registration API
    /// would refuse (its message).
    pub fn from_body(body: &[u8]) -> Result<Self, DiscoveryError> {
        if body.len() > MAX_VALUE_BYTES {
            return Err(DiscoveryError::BadValue(format!(
                "registration of {} bytes (at most {MAX_VALUE_BYTES})",
                body.len()
            )));
        }
        let (registration, role, bootstrap_port) = pdx_protocol::parse_registration(body)
            .map_err(|e| DiscoveryError::BadValue(e.message))?;
        Ok(Self {
            body: body.to_vec(),
            registration,
            role,
            bootstrap_port,
        })
    }

    /// What names the worker in a router: model, role, pool and URL. Two entries with the same identity are
    /// the same worker (a router counts them, and removes the worker with the last one).
    pub fn identity(&self) -> Identity {
        Identity {
            model: self.registration.model.clone(),
            role: self.role,
            pool: self.registration.pool.clone(),
            url: self.registration.url.trim_end_matches('/').to_string(),
        }
    }
}

/// What names a worker in a router's registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Served model name.
    pub model: String,
    /// Role.
    pub role: Role,
    /// Pool name.
    pub pool: String,
    /// Base URL (no trailing `/`).
    pub url: String,
}

/// What a watch state machine asks its router to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The source holds this worker (new, or its value changed): add it, or keep it.
    Upsert {
        /// The source's key of the entry (etcd key, `namespace/pod/role`), for logs.
        key: String,
        /// The worker.
        worker: DiscoveredWorker,
    },
    /// The source no longer holds this worker (key deleted, lease expired, pod gone or not ready).
    Remove {
        /// The source's key of the entry.
        key: String,
        /// The worker as it was last known.
        worker: DiscoveredWorker,
    },
}

/// Where a driver sends the changes it gets (called on the driver's thread, in order).
pub type Sink = std::sync::Arc<dyn Fn(Vec<Change>) + Send + Sync>;

/// A registration body in one canonical form (compact JSON, keys sorted), so the same registration written
/// by a worker and by any router is the same value, and a re-put of it is no change.
///
/// Errors: [`DiscoveryError::BadValue`] when the body is not a JSON object.
pub fn canonical_body(body: &[u8]) -> Result<Vec<u8>, DiscoveryError> {
    // A BTreeMap, not serde_json's Map: that one keeps insertion order when any crate of the build turns on
    // serde_json's `preserve_order`.
    let v: std::collections::BTreeMap<String, serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| DiscoveryError::BadValue(format!("not a JSON object: {e}")))?;
    serde_json::to_vec(&v).map_err(|e| DiscoveryError::BadValue(e.to_string()))
}

/// The stable id of a worker within its model: 16 hex digits of XXH3-64 over role, pool and URL, so the same
/// worker written by itself or by any router lands under the same key.
pub fn worker_id(reg: &Registration) -> String {
    let mut buf = Vec::with_capacity(reg.role.len() + reg.pool.len() + reg.url.len() + 2);
    buf.extend_from_slice(reg.role.as_bytes());
    buf.push(0);
    buf.extend_from_slice(reg.pool.as_bytes());
    buf.push(0);
    buf.extend_from_slice(reg.url.trim_end_matches('/').as_bytes());
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&buf))
}

/// Delay before the `attempt`-th retry of a broken source: 100 ms doubling to at most 2 s, so a source that
/// returns is caught up with within about 2 s.
pub fn backoff(attempt: u32) -> std::time::Duration {
    std::time::Duration::from_millis(100u64.saturating_mul(1 << attempt.min(5)).min(2000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(url: &str) -> Registration {
        Registration {
            role: "decode".into(),
            pool: "d".into(),
            url: url.into(),
            model: "m".into(),
            api_key: None,
            kv_events_endpoint: None,
            kv_events_replay_endpoint: None,
        }
    }

    #[test]
    fn the_worker_id_depends_on_role_pool_and_url_only() {
        let a = worker_id(&reg("http://10.0.0.1:8000"));
        assert_eq!(a.len(), 16);
        assert_eq!(a, worker_id(&reg("http://10.0.0.1:8000/")));
        assert_ne!(a, worker_id(&reg("http://10.0.0.1:8001")));
        let mut other_model = reg("http://10.0.0.1:8000");
        other_model.model = "n".into();
        assert_eq!(a, worker_id(&other_model), "the model is in the key's path");
        let mut other_pool = reg("http://10.0.0.1:8000");
        other_pool.pool = "e".into();
        assert_ne!(a, worker_id(&other_pool));
    }

    #[test]
    fn bodies_are_parsed_as_strictly_as_the_registration_api() {
        let ok = br#"{"role":"prefill","pool":"p","url":"http://10.0.0.1:8000","model":"m","bootstrap_port":9000}"#;
        let w = DiscoveredWorker::from_body(ok).unwrap();
        assert_eq!((w.role, w.bootstrap_port), (Role::Prefill, Some(9000)));
        assert_eq!(w.identity().url, "http://10.0.0.1:8000");
        for bad in [
            &b"{"[..],
            br#"{"role":"prefill","pool":"p","url":"http://h:1","model":"m","extra":1}"#,
            br#"{"role":"boss","pool":"p","url":"http://h:1","model":"m"}"#,
        ] {
            assert!(matches!(
                DiscoveredWorker::from_body(bad),
                Err(DiscoveryError::BadValue(_))
            ));
        }
        let huge = vec![b' '; MAX_VALUE_BYTES + 1];
        assert!(DiscoveredWorker::from_body(&huge).is_err());
    }

    #[test]
    fn backoff_doubles_to_two_seconds() {
        assert_eq!(backoff(0).as_millis(), 100);
        assert_eq!(backoff(1).as_millis(), 200);
        assert_eq!(backoff(4).as_millis(), 1600);
        assert_eq!(backoff(5).as_millis(), 2000);
        assert_eq!(backoff(40).as_millis(), 2000);
    }
}
