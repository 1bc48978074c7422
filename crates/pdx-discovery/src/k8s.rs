//! Kubernetes discovery, sans-IO: which pod is which worker, and the list + watch state machine of one label
//! selector.
//!
//! A pod is a worker while it is ready: its `Ready` condition is `True`, it has a pod IP, and it is not being
//! deleted. The worker's URL is `http://<pod IP>:<port>`, the port from the annotation [`PORT_ANNOTATION`],
//! else the container port named `--k8s-port-name` (default [`DEFAULT_PORT_NAME`], as vLLM production-stack
//! names it). Its role and pool come from the selector it was found by (`--prefill-selector`,
//! `--pool-selector NAME=ROLE:SELECTOR`, …), the pool overridable by [`POOL_ANNOTATION`]; its model is the
//! annotation [`MODEL_ANNOTATION`], else the router's `--model`, else `*` (any model name). A pod that
//! publishes vLLM KV events names their ports in [`KV_EVENTS_PORT_ANNOTATION`] (and
//! [`KV_EVENTS_REPLAY_PORT_ANNOTATION`]); every router then subscribes to them itself.
//!
//! [`PodWatch`] follows the Kubernetes API's list + watch protocol ("Efficient detection of changes",
//! kubernetes.io/docs/reference/using-api/api-concepts): a list gives the pods and a `resourceVersion`; a
//! watch from it (`allowWatchBookmarks=true`) gives `ADDED`/`MODIFIED`/`DELETED` events and `BOOKMARK`s that
//! only move the resource version on; when the server has forgotten that version it answers `410 Gone`
//! (as the watch's HTTP status, or as an `ERROR` event), and the client lists again and diffs. A watch the
//! server ends (its `timeoutSeconds`) or a broken connection resumes from the last resource version.

use crate::{Change, DiscoveredWorker, DiscoveryError};
use k8s_openapi::api::core::v1::Pod;
use kube::core::WatchEvent;
use pdx_protocol::Role;
use std::collections::BTreeMap;

/// Annotation naming the worker's HTTP port (wins over the named container port).
pub const PORT_ANNOTATION: &str = "pdx.io/port";
/// Annotation naming the served model.
pub const MODEL_ANNOTATION: &str = "pdx.io/model";
/// Annotation naming the pool (wins over the selector's pool).
pub const POOL_ANNOTATION: &str = "pdx.io/pool";
/// Annotation naming the SGLang bootstrap port of a prefill worker.
pub const BOOTSTRAP_PORT_ANNOTATION: &str = "pdx.io/bootstrap-port";
/// Annotation naming the port of the worker's KV event publisher (vLLM `--kv-events-config` endpoint): the
/// router subscribes to `tcp://<pod IP>:<port>`.
pub const KV_EVENTS_PORT_ANNOTATION: &str = "pdx.io/kv-events-port";
/// Annotation naming the port of the publisher's replay socket (`replay_endpoint`).
pub const KV_EVENTS_REPLAY_PORT_ANNOTATION: &str = "pdx.io/kv-events-replay-port";
/// Default name of the container port that serves HTTP.
pub const DEFAULT_PORT_NAME: &str = "http";

/// One watched label selector: its pods are workers of `role` in `pool`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSelector {
    /// Role of its pods.
    pub role: Role,
    /// Label selector (`app=pdx,role=prefill`), as the API server takes it.
    pub selector: String,
    /// Pool of its pods (`None`: the role's name, as `pdx mock --register` does).
    pub pool: Option<String>,
}

/// How pods become workers (the same for every selector).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRules {
    /// Name of the container port that serves HTTP.
    pub port_name: String,
    /// Model of pods without [`MODEL_ANNOTATION`].
    pub default_model: String,
}

impl Default for PodRules {
    fn default() -> Self {
        Self {
            port_name: DEFAULT_PORT_NAME.into(),
            default_model: "*".into(),
        }
    }
}

/// True when the pod's `Ready` condition is `True`.
fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn annotation<'a>(pod: &'a Pod, name: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(name))
        .map(String::as_str)
}

fn port_number(s: &str, what: &str) -> Result<u16, DiscoveryError> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 && s.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(DiscoveryError::BadValue(format!(
            "{what} `{}` is not a port (1-65535)",
            s.escape_debug()
        ))),
    }
}

/// The worker a pod is, found by `sel`: `Ok(None)` while it is not ready (or has no IP, or is being
/// deleted).
///
/// Errors: [`DiscoveryError::BadValue`] for a ready pod that names no usable port, a bad annotation, or a
/// registration the router would refuse.
pub fn pod_worker(
    pod: &Pod,
    sel: &PodSelector,
    rules: &PodRules,
) -> Result<Option<DiscoveredWorker>, DiscoveryError> {
    if pod.metadata.deletion_timestamp.is_some() || !ready(pod) {
        return Ok(None);
    }
    let Some(ip) = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty())
    else {
        return Ok(None);
    };
    let ip: std::net::IpAddr = ip.parse().map_err(|_| {
        DiscoveryError::BadValue(format!("pod IP `{}` is not an address", ip.escape_debug()))
    })?;
    let port = match annotation(pod, PORT_ANNOTATION) {
        Some(p) => port_number(p, PORT_ANNOTATION)?,
        None => pod
            .spec
            .as_ref()
            .into_iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(rules.port_name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                DiscoveryError::BadValue(format!(
                    "no container port named `{}` and no {PORT_ANNOTATION} annotation",
                    rules.port_name
                ))
            })?,
    };
    let host = match ip {
        std::net::IpAddr::V4(a) => a.to_string(),
        std::net::IpAddr::V6(a) => format!("[{a}]"),
    };
    let url = format!("http://{host}:{port}");
    let pool = annotation(pod, POOL_ANNOTATION)
        .map(str::to_string)
        .or_else(|| sel.pool.clone())
        .unwrap_or_else(|| sel.role.as_str().to_string());
    let model = annotation(pod, MODEL_ANNOTATION).unwrap_or(&rules.default_model);
    let mut body = serde_json::json!({
        "role": sel.role.as_str(), "pool": pool, "url": url, "model": model,
    });
    if let Some(p) = annotation(pod, BOOTSTRAP_PORT_ANNOTATION) {
        body["bootstrap_port"] = port_number(p, BOOTSTRAP_PORT_ANNOTATION)?.into();
    }
    for (ann, field) in [
        (KV_EVENTS_PORT_ANNOTATION, "kv_events_endpoint"),
        (
            KV_EVENTS_REPLAY_PORT_ANNOTATION,
            "kv_events_replay_endpoint",
        ),
    ] {
        if let Some(p) = annotation(pod, ann) {
            body[field] = format!("tcp://{host}:{}", port_number(p, ann)?).into();
        }
    }
    let body = serde_json::to_vec(&body).map_err(|e| DiscoveryError::BadValue(e.to_string()))?;
    DiscoveredWorker::from_body(&body).map(Some)
}

/// What the driver should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum K8sStep {
    /// List the selector's pods (first start, or after `410 Gone`).
    List,
    /// Watch from this resource version.
    Watch {
        /// `resourceVersion` to watch from.
        resource_version: String,
    },
}

/// The list + watch state machine of one selector; see the module docs.
#[derive(Debug)]
pub struct PodWatch {
    namespace: String,
    sel: PodSelector,
    rules: PodRules,
    max_entries: usize,
    /// Ready pods by name.
    pods: BTreeMap<String, DiscoveredWorker>,
    resource_version: Option<String>,
    rejected: u64,
}

impl PodWatch {
    /// A watch of `sel`'s pods in `namespace`, tracking at most `max_entries` ready pods.
    pub fn new(namespace: &str, sel: PodSelector, rules: PodRules, max_entries: usize) -> Self {
        Self {
            namespace: namespace.into(),
            sel,
            rules,
            max_entries,
            pods: BTreeMap::new(),
            resource_version: None,
            rejected: 0,
        }
    }

    /// Most ready pods tracked.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// What to do next.
    pub fn step(&self) -> K8sStep {
        match &self.resource_version {
            None => K8sStep::List,
            Some(rv) => K8sStep::Watch {
                resource_version: rv.clone(),
            },
        }
    }

    /// The selector watched.
    pub fn selector(&self) -> &PodSelector {
        &self.sel
    }

    /// Ready pods known (the workers).
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// True when no pod is a worker.
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Pods ignored so far (misconfigured, or over the bound).
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    fn key(&self, name: &str) -> String {
        format!(
            "k8s/{}/{}/{}",
            self.namespace,
            name.escape_debug(),
            self.sel.role.as_str()
        )
    }

    /// The pod's name and its worker (`None`: not a worker now).
    fn worker(&mut self, pod: &Pod) -> Option<(String, Option<DiscoveredWorker>)> {
        let name = pod.metadata.name.clone()?;
        match pod_worker(pod, &self.sel, &self.rules) {
            Ok(w) => Some((name, w)),
            Err(e) => {
                self.rejected += 1;
                tracing::warn!(pod = %name.escape_debug(), error = %e, "pod ignored");
                Some((name, None))
            }
        }
    }

    fn set(&mut self, name: String, new: Option<DiscoveredWorker>, out: &mut Vec<Change>) {
        let key = self.key(&name);
        let old = self.pods.get(&name);
        if old == new.as_ref() {
            return;
        }
        if let Some(o) = old {
            out.push(Change::Remove {
                key: key.clone(),
                worker: o.clone(),
            });
        }
        match new {
            Some(n) if self.pods.len() < self.max_entries || self.pods.contains_key(&name) => {
                out.push(Change::Upsert {
                    key,
                    worker: n.clone(),
                });
                self.pods.insert(name, n);
            }
            Some(_) => {
                self.rejected += 1;
                tracing::warn!(key, max = self.max_entries, "pod ignored: too many workers");
            }
            None => {
                self.pods.remove(&name);
            }
        }
    }

    /// A list answered at `resource_version`: replaces what is known and returns the difference.
    pub fn on_list(&mut self, resource_version: &str, pods: &[Pod]) -> Vec<Change> {
        let mut fresh: BTreeMap<String, Option<DiscoveredWorker>> = BTreeMap::new();
        for p in pods {
            if let Some((name, w)) = self.worker(p) {
                fresh.insert(name, w);
            }
        }
        let mut out = Vec::new();
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|n| fresh.get(*n).is_none_or(Option::is_none))
            .cloned()
            .collect();
        for name in gone {
            self.set(name, None, &mut out);
        }
        for (name, w) in fresh {
            if w.is_some() {
                self.set(name, w, &mut out);
            }
        }
        self.resource_version = Some(resource_version.to_string());
        out
    }

    /// One watch event: the changes it makes. `ERROR` with code 410 (the version is gone) makes the next
    /// step a list; another `ERROR` changes nothing (the driver reconnects from the same version).
    pub fn on_event(&mut self, ev: &WatchEvent<Pod>) -> Vec<Change> {
        let mut out = Vec::new();
        let rv = |p: &Pod| p.metadata.resource_version.clone();
        match ev {
            WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                if let Some((name, w)) = self.worker(p) {
                    self.set(name, w, &mut out);
                }
                if let Some(v) = rv(p) {
                    self.resource_version = Some(v);
                }
            }
            WatchEvent::Deleted(p) => {
                if let Some(name) = p.metadata.name.clone() {
                    self.set(name, None, &mut out);
                }
                if let Some(v) = rv(p) {
                    self.resource_version = Some(v);
                }
            }
            WatchEvent::Bookmark(b) => {
                self.resource_version = Some(b.metadata.resource_version.clone());
            }
            WatchEvent::Error(e) if e.code == 410 => self.on_gone(),
            WatchEvent::Error(e) => {
                tracing::warn!(code = e.code, message = %e.message, "watch error event");
            }
        }
        out
    }

    /// The server no longer has the resource version (`410 Gone`): list again.
    pub fn on_gone(&mut self) {
        tracing::info!(selector = %self.sel.selector, "resource version gone (410): listing again");
        self.resource_version = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str, ready: bool, rv: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "resourceVersion": rv},
            "spec": {"containers": [{"name": "engine", "ports": [
                {"name": "metrics", "containerPort": 9090},
                {"name": "http", "containerPort": 8000}
            ]}]},
            "status": {"podIP": ip, "conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }}
            ]}
        }))
        .unwrap()
    }

    fn sel(role: Role) -> PodSelector {
        PodSelector {
            role,
            selector: "app=pdx".into(),
            pool: None,
        }
    }

    fn urls(cs: &[Change]) -> Vec<String> {
        cs.iter()
            .map(|c| match c {
                Change::Upsert { worker, .. } => format!("+{}", worker.registration.url),
                Change::Remove { worker, .. } => format!("-{}", worker.registration.url),
            })
            .collect()
    }

    #[test]
    fn a_ready_pod_is_a_worker_at_its_named_port_or_annotated_port() {
        let rules = PodRules::default();
        let w = pod_worker(
            &pod("p0", "10.1.0.5", true, "1"),
            &sel(Role::Prefill),
            &rules,
        )
        .unwrap()
        .unwrap();
        assert_eq!(w.registration.url, "http://10.1.0.5:8000");
        assert_eq!(
            (
                w.role,
                w.registration.pool.as_str(),
                w.registration.model.as_str()
            ),
            (Role::Prefill, "prefill", "*")
        );
        let mut p = pod("p1", "fd00::7", true, "1");
        p.metadata.annotations = Some(
            [
                (PORT_ANNOTATION, "8100"),
                (MODEL_ANNOTATION, "Qwen/Qwen3-0.6B"),
                (POOL_ANNOTATION, "prefill_pool_1"),
                (BOOTSTRAP_PORT_ANNOTATION, "8998"),
                (KV_EVENTS_PORT_ANNOTATION, "5557"),
                (KV_EVENTS_REPLAY_PORT_ANNOTATION, "5558"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        );
        let w = pod_worker(&p, &sel(Role::Prefill), &rules)
            .unwrap()
            .unwrap();
        assert_eq!(w.registration.url, "http://[fd00::7]:8100");
        assert_eq!(w.registration.pool, "prefill_pool_1");
        assert_eq!(w.registration.model, "Qwen/Qwen3-0.6B");
        assert_eq!(w.bootstrap_port, Some(8998));
        assert_eq!(
            w.registration.kv_events_endpoint.as_deref(),
            Some("tcp://[fd00::7]:5557")
        );
        assert_eq!(
            w.registration.kv_events_replay_endpoint.as_deref(),
            Some("tcp://[fd00::7]:5558")
        );
        // A replay socket without a publisher is refused, as the registration API refuses it.
        let mut r = pod("p", "10.1.0.5", true, "1");
        r.metadata.annotations = Some(
            [(
                KV_EVENTS_REPLAY_PORT_ANNOTATION.to_string(),
                "5558".to_string(),
            )]
            .into(),
        );
        assert!(pod_worker(&r, &sel(Role::Decode), &rules).is_err());
        // Not ready, no IP, terminating: not a worker (yet, or any more).
        assert!(pod_worker(
            &pod("p", "10.1.0.5", false, "1"),
            &sel(Role::Decode),
            &rules
        )
        .unwrap()
        .is_none());
        assert!(
            pod_worker(&pod("p", "", true, "1"), &sel(Role::Decode), &rules)
                .unwrap()
                .is_none()
        );
        let mut t = pod("p", "10.1.0.5", true, "1");
        t.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Default::default(),
        ));
        assert!(pod_worker(&t, &sel(Role::Decode), &rules)
            .unwrap()
            .is_none());
        // Misconfigured pods are errors (logged and ignored by the watch).
        let other = PodRules {
            port_name: "grpc".into(),
            ..PodRules::default()
        };
        assert!(pod_worker(&pod("p", "10.1.0.5", true, "1"), &sel(Role::Decode), &other).is_err());
        for bad in ["0", "70000", "+80", "x"] {
            let mut p = pod("p", "10.1.0.5", true, "1");
            p.metadata.annotations = Some([(PORT_ANNOTATION.to_string(), bad.to_string())].into());
            assert!(pod_worker(&p, &sel(Role::Decode), &rules).is_err(), "{bad}");
        }
        let mut p = pod("p", "10.1.0.5", true, "1");
        p.metadata.annotations = Some([(POOL_ANNOTATION.to_string(), "a\nb".to_string())].into());
        assert!(pod_worker(&p, &sel(Role::Decode), &rules).is_err());
        assert!(pod_worker(
            &pod("p", "not-an-ip", true, "1"),
            &sel(Role::Decode),
            &rules
        )
        .is_err());
    }

    #[test]
    fn readiness_changes_and_deletions_add_and_remove_workers_at_once() {
        let mut w = PodWatch::new("ns", sel(Role::Decode), PodRules::default(), 100);
        assert_eq!(w.step(), K8sStep::List);
        let cs = w.on_list(
            "100",
            &[
                pod("d0", "10.0.0.1", true, "90"),
                pod("d1", "10.0.0.2", false, "91"),
            ],
        );
        assert_eq!(urls(&cs), ["+http://10.0.0.1:8000"]);
        assert_eq!(
            w.step(),
            K8sStep::Watch {
                resource_version: "100".into()
            }
        );
        // d1 becomes ready, d0 goes not-ready, d1 is modified without a change (no event out).
        let cs = w.on_event(&WatchEvent::Modified(pod("d1", "10.0.0.2", true, "101")));
        assert_eq!(urls(&cs), ["+http://10.0.0.2:8000"]);
        let cs = w.on_event(&WatchEvent::Modified(pod("d0", "10.0.0.1", false, "102")));
        assert_eq!(urls(&cs), ["-http://10.0.0.1:8000"]);
        assert!(w
            .on_event(&WatchEvent::Modified(pod("d1", "10.0.0.2", true, "103")))
            .is_empty());
        let cs = w.on_event(&WatchEvent::Deleted(pod("d1", "10.0.0.2", true, "104")));
        assert_eq!(urls(&cs), ["-http://10.0.0.2:8000"]);
        assert!(w.is_empty());
        assert_eq!(
            w.step(),
            K8sStep::Watch {
                resource_version: "104".into()
            }
        );
        // A pod that restarts with a new IP: the old worker goes, the new one comes.
        w.on_event(&WatchEvent::Added(pod("d2", "10.0.0.3", true, "105")));
        let cs = w.on_event(&WatchEvent::Modified(pod("d2", "10.0.0.9", true, "106")));
        assert_eq!(
            urls(&cs),
            ["-http://10.0.0.3:8000", "+http://10.0.0.9:8000"]
        );
    }

    #[test]
    fn bookmarks_move_the_version_and_410_lists_again_with_a_diff() {
        let mut w = PodWatch::new("ns", sel(Role::Prefill), PodRules::default(), 100);
        w.on_list(
            "10",
            &[
                pod("a", "10.0.0.1", true, "1"),
                pod("b", "10.0.0.2", true, "2"),
            ],
        );
        let bm: WatchEvent<Pod> = serde_json::from_value(serde_json::json!({
            "type": "BOOKMARK",
            "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "55"}}
        }))
        .unwrap();
        assert!(w.on_event(&bm).is_empty());
        assert_eq!(
            w.step(),
            K8sStep::Watch {
                resource_version: "55".into()
            }
        );
        let gone: WatchEvent<Pod> = serde_json::from_value(serde_json::json!({
            "type": "ERROR",
            "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "message": "too old resource version: 55 (60)", "reason": "Expired", "code": 410}
        }))
        .unwrap();
        assert!(w.on_event(&gone).is_empty());
        assert_eq!(w.step(), K8sStep::List);
        assert_eq!(w.len(), 2, "known until the list says otherwise");
        let cs = w.on_list(
            "70",
            &[
                pod("b", "10.0.0.2", true, "2"),
                pod("c", "10.0.0.3", true, "65"),
            ],
        );
        assert_eq!(
            urls(&cs),
            ["-http://10.0.0.1:8000", "+http://10.0.0.3:8000"]
        );
        // Another error event changes nothing.
        let other: WatchEvent<Pod> = serde_json::from_value(serde_json::json!({
            "type": "ERROR",
            "object": {"status": "Failure", "message": "internal", "reason": "InternalError", "code": 500}
        }))
        .unwrap();
        assert!(w.on_event(&other).is_empty());
        assert_eq!(
            w.step(),
            K8sStep::Watch {
                resource_version: "70".into()
            }
        );
    }

    #[test]
    fn the_number_of_workers_is_bounded() {
        let mut w = PodWatch::new("ns", sel(Role::Decode), PodRules::default(), 1);
        let cs = w.on_list(
            "1",
            &[
                pod("a", "10.0.0.1", true, "1"),
                pod("b", "10.0.0.2", true, "1"),
            ],
        );
        assert_eq!(cs.len(), 1);
        assert_eq!(w.rejected(), 1);
        assert!(w
            .on_event(&WatchEvent::Added(pod("c", "10.0.0.3", true, "2")))
            .is_empty());
        assert_eq!(w.len(), 1);
    }
}
