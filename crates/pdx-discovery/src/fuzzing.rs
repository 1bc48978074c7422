//! The entry point of the fuzz target `discovery_source` in `fuzz/` (not a stable API): what etcd or the
//! Kubernetes API server hands a router, fed to the watch state machines; it must return without panicking,
//! whatever the input.

use crate::etcd::{EtcdWatch, EventKind, KeyValue, WatchBatch};
use crate::k8s::{pod_worker, PodRules, PodSelector, PodWatch};
use k8s_openapi::api::core::v1::Pod;
use kube::core::WatchEvent;
use pdx_protocol::Role;

/// The first byte picks the source. `0..=127`: etcd; the rest splits at the first `0xff` into a key and a
/// value, listed, then put, then put again under a second key, then deleted, then a compaction and a re-list.
/// `128..=255`: Kubernetes; the rest is a pod (JSON) turned into a worker, and a watch event (JSON) applied
/// after a list. Returns the number of changes produced.
pub fn source(data: &[u8]) -> usize {
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    if mode < 128 {
        let (key, value) = match rest.iter().position(|&b| b == 0xff) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &b""[..]),
        };
        let mut w = EtcdWatch::new("/pdx/workers/", 4);
        let kv = |key: &'static [u8], rev| KeyValue {
            key,
            value,
            mod_revision: rev,
            lease: 1,
        };
        let mut n = w
            .on_list(
                1,
                [KeyValue {
                    key,
                    value,
                    mod_revision: 1,
                    lease: i64::from(mode),
                }],
            )
            .len();
        let batch = WatchBatch {
            header_revision: 5,
            events: vec![
                (
                    EventKind::Put,
                    KeyValue {
                        key,
                        value,
                        mod_revision: 2,
                        lease: 2,
                    },
                ),
                (EventKind::Put, kv(b"/pdx/workers/m/x", 3)),
                (
                    EventKind::Delete,
                    KeyValue {
                        key,
                        value: b"",
                        mod_revision: 4,
                        lease: 0,
                    },
                ),
            ],
            ..Default::default()
        };
        n += w.on_watch(&batch).len();
        n += w
            .on_watch(&WatchBatch {
                canceled: true,
                compact_revision: 9,
                ..Default::default()
            })
            .len();
        n += w.on_list(10, [kv(b"/pdx/workers/m/y", 8)]).len();
        n
    } else {
        let (pod, event) = match rest.iter().position(|&b| b == 0xff) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &b""[..]),
        };
        let sel = PodSelector {
            role: if mode & 1 == 0 {
                Role::Prefill
            } else {
                Role::Decode
            },
            selector: "app=pdx".into(),
            pool: None,
        };
        let rules = PodRules::default();
        let mut n = 0;
        let pods: Vec<Pod> = serde_json::from_slice::<Pod>(pod).into_iter().collect();
        if let Some(p) = pods.first() {
            n += usize::from(matches!(pod_worker(p, &sel, &rules), Ok(Some(_))));
        }
        let mut w = PodWatch::new("ns", sel, rules, 4);
        n += w.on_list("1", &pods).len();
        if let Ok(ev) = serde_json::from_slice::<WatchEvent<Pod>>(event) {
            n += w.on_event(&ev).len();
        }
        n
    }
}

#[cfg(test)]
mod tests {
    /// The checked-in corpus of the fuzz target runs here too, so `cargo test` catches a seed that panics.
    #[test]
    fn the_fuzz_corpus_runs() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/corpus/discovery_source"
        );
        let mut seeds = 0;
        let mut changes = 0;
        for e in std::fs::read_dir(dir).expect("corpus") {
            let data = std::fs::read(e.unwrap().path()).unwrap();
            changes += super::source(&data);
            seeds += 1;
        }
        assert!(seeds >= 4, "{seeds} seeds");
        assert!(changes > 0, "the seeds reach the state machines' changes");
    }
}
