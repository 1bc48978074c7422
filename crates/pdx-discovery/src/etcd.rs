//! etcd v3 discovery, sans-IO: the `etcd://` target, worker keys, and the list + watch state machine.
//!
//! Layout: one key per worker, `<prefix>/<model>/<id>` (default prefix [`DEFAULT_PREFIX`], `<id>` from
//! [`crate::worker_id`]), whose value is the registration body of `POST /v1/workers` and whose lease is kept
//! alive by the worker's heartbeats (or by the router the worker heartbeats, which writes the registration
//! through). A lease that expires deletes the key, and every router watching the prefix drops the worker.
//!
//! [`EtcdWatch`] follows etcd's list-then-watch recipe (etcd API guarantees, `docs/dev-guide/interacting_v3`;
//! what Kubernetes' reflector and Dynamo do): a range read of the prefix gives the entries and the store
//! revision R; a watch from R + 1 gives every later change exactly once, in revision order. When the watch
//! breaks, it resumes from the last revision seen + 1; when that revision has been compacted away (the
//! watch answers `canceled` with a `compact_revision`), it lists again and diffs the new list against what it
//! knew, so a router that was cut off for a while removes only the workers that really left.

use crate::{Change, DiscoveredWorker, DiscoveryError};
use std::collections::BTreeMap;

/// Default key prefix of worker registrations.
pub const DEFAULT_PREFIX: &str = "/pdx/workers";
/// etcd's client port, used when an endpoint names none.
pub const DEFAULT_PORT: u16 = 2379;
/// Most endpoints in one `etcd://` target.
pub const MAX_ENDPOINTS: usize = 16;
/// Longest key prefix, bytes.
pub const MAX_PREFIX_BYTES: usize = 256;
/// Longest key the watch tracks, bytes (longer keys under the prefix are ignored).
pub const MAX_KEY_BYTES: usize = 1024;

/// Where etcd is and which prefix holds the workers: `etcd://host[:port][,host[:port]…][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTarget {
    /// gRPC endpoints, `http://host:port` (IPv6 in brackets).
    pub endpoints: Vec<String>,
    /// Key prefix, starting with `/`, without a trailing `/`.
    pub prefix: String,
}

impl EtcdTarget {
    /// Parses `etcd://host[:port][,host[:port]…][/prefix]`. Hosts are DNS names, IPv4 addresses or bracketed
    /// IPv6 addresses; the port defaults to [`DEFAULT_PORT`] and the prefix to [`DEFAULT_PREFIX`]. No user
    /// info, query or fragment (credentials come from `PDX_ETCD_USERNAME` / `PDX_ETCD_PASSWORD`, never from a
    /// URL that lands in the process list and logs).
    ///
    /// Errors: [`DiscoveryError::BadArgs`] saying what is wrong.
    pub fn parse(s: &str) -> Result<Self, DiscoveryError> {
        let bad = |why: &str| DiscoveryError::BadArgs(format!("{why}: {}", s.escape_debug()));
        if s.len() > 4096 || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                "etcd URL must be printable ASCII without spaces (at most 4096 bytes)",
            ));
        }
        let rest = s
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("etcd URL must start with etcd://"))?;
        if rest.contains(['?', '#', '@']) {
            return Err(bad("etcd URL must have no user info, query or fragment"));
        }
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let prefix = prefix.trim_end_matches('/');
        let prefix = if prefix.is_empty() {
            DEFAULT_PREFIX.to_string()
        } else {
            if prefix.len() > MAX_PREFIX_BYTES || prefix.contains("//") {
                return Err(bad(&format!(
                    "etcd key prefix must be at most {MAX_PREFIX_BYTES} bytes without empty segments"
                )));
            }
            prefix.to_string()
        };
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            endpoints.push(endpoint(h).ok_or_else(|| {
                bad(&format!(
                    "bad etcd endpoint `{}` (host[:port], IPv6 in brackets)",
                    h.escape_debug()
                ))
            })?);
        }
        if endpoints.len() > MAX_ENDPOINTS {
            return Err(bad(&format!("at most {MAX_ENDPOINTS} etcd endpoints")));
        }
        Ok(Self { endpoints, prefix })
    }

    /// The key of a worker: `<prefix>/<model>/<id>` ([`crate::worker_id`]).
    pub fn key_for(&self, reg: &pdx_protocol::Registration) -> String {
        format!("{}/{}/{}", self.prefix, reg.model, crate::worker_id(reg))
    }

    /// What the watch ranges over: the prefix and a `/`, so `/pdx/workers` does not match `/pdx/workersX`.
    pub fn watch_prefix(&self) -> String {
        format!("{}/", self.prefix)
    }
}

/// `host[:port]` → `http://host:port`, or `None` when malformed.
fn endpoint(h: &str) -> Option<String> {
    let (host, port) = if let Some(v6) = h.strip_prefix('[') {
        let (addr, after) = v6.split_once(']')?;
        addr.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{addr}]"), port)
    } else {
        let (host, port) = match h.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (h, None),
        };
        let name_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !name_ok {
            return None;
        }
        (host.to_string(), port)
    };
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return None,
        },
    };
    Some(format!("http://{host}:{port}"))
}

/// A key-value pair as etcd returns it (a range read, or a watch event).
#[derive(Debug, Clone, Copy)]
pub struct KeyValue<'a> {
    /// Key bytes.
    pub key: &'a [u8],
    /// Value bytes (empty in a delete event).
    pub value: &'a [u8],
    /// Revision of the last change of the key (of the deletion, in a delete event).
    pub mod_revision: i64,
    /// Lease attached to the key (0: none).
    pub lease: i64,
}

/// The kind of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or its value replaced.
    Put,
    /// The key was deleted (or its lease expired).
    Delete,
}

/// One response of a watch stream.
#[derive(Debug, Clone, Default)]
pub struct WatchBatch<'a> {
    /// Store revision in the response header.
    pub header_revision: i64,
    /// The response that answers the watch's creation.
    pub created: bool,
    /// The watch was canceled by the server.
    pub canceled: bool,
    /// Set when the start revision was compacted away (the watch is canceled).
    pub compact_revision: i64,
    /// Events, in revision order.
    pub events: Vec<(EventKind, KeyValue<'a>)>,
}

/// What the driver should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read the whole prefix (first start, or after a compaction).
    List,
    /// Watch the prefix from this revision (inclusive).
    Watch {
        /// First revision to deliver.
        start_revision: i64,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    /// `None`: the value is not a registration the router takes (ignored).
    worker: Option<DiscoveredWorker>,
    lease: i64,
}

/// The list + watch state machine of one key prefix; see the module docs.
#[derive(Debug)]
pub struct EtcdWatch {
    prefix: Vec<u8>,
    max_entries: usize,
    entries: BTreeMap<String, Entry>,
    /// Last revision whose changes are all applied (`None`: list first).
    revision: Option<i64>,
    /// Entries ignored so far (bad key or value, over the bound).
    rejected: u64,
}

impl EtcdWatch {
    /// A watch of `prefix` (as [`EtcdTarget::watch_prefix`] gives it) tracking at most `max_entries` keys.
    pub fn new(prefix: &str, max_entries: usize) -> Self {
        Self {
            prefix: prefix.as_bytes().to_vec(),
            max_entries,
            entries: BTreeMap::new(),
            revision: None,
            rejected: 0,
        }
    }

    /// What to do next: list, or watch from the revision after the last one applied.
    pub fn step(&self) -> Step {
        match self.revision {
            None => Step::List,
            Some(r) => Step::Watch {
                start_revision: r + 1,
            },
        }
    }

    /// Last revision whose changes are applied (`None` before the first list).
    pub fn revision(&self) -> Option<i64> {
        self.revision
    }

    /// Keys tracked (valid or not).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries ignored so far (bad key or value, over the bound).
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// The lease attached to `key` as last seen (0: none), if the key is tracked.
    pub fn lease_of(&self, key: &str) -> Option<i64> {
        self.entries.get(key).map(|e| e.lease)
    }

    /// The workers the prefix holds now, by key.
    pub fn workers(&self) -> impl Iterator<Item = (&str, &DiscoveredWorker)> {
        self.entries
            .iter()
            .filter_map(|(k, e)| e.worker.as_ref().map(|w| (k.as_str(), w)))
    }

    /// The key as a string, when it is under the prefix, UTF-8 without control characters (a model name may
    /// hold spaces and any script, as the registration API allows) and short enough.
    fn key(&mut self, key: &[u8]) -> Option<String> {
        let ok = key.starts_with(&self.prefix) && key.len() <= MAX_KEY_BYTES;
        match std::str::from_utf8(key) {
            Ok(k) if ok && !k.chars().any(char::is_control) => Some(k.to_string()),
            _ => {
                self.rejected += 1;
                tracing::warn!(
                    key = %String::from_utf8_lossy(&key[..key.len().min(128)]).escape_debug(),
                    "etcd key ignored: not a UTF-8 key without control characters under the prefix, of at \
                     most {MAX_KEY_BYTES} bytes"
                );
                None
            }
        }
    }

    fn parse(&mut self, key: &str, value: &[u8]) -> Option<DiscoveredWorker> {
        match DiscoveredWorker::from_body(value) {
            Ok(w) => Some(w),
            Err(e) => {
                self.rejected += 1;
                tracing::warn!(key, error = %e, "etcd value ignored: not a worker registration");
                None
            }
        }
    }

    /// The changes that take `old` to `new` for one key.
    fn diff(
        key: &str,
        old: Option<&DiscoveredWorker>,
        new: Option<&DiscoveredWorker>,
        out: &mut Vec<Change>,
    ) {
        match (old, new) {
            (Some(o), Some(n)) if o == n => {}
            (o, n) => {
                if let Some(o) = o {
                    out.push(Change::Remove {
                        key: key.to_string(),
                        worker: o.clone(),
                    });
                }
                if let Some(n) = n {
                    out.push(Change::Upsert {
                        key: key.to_string(),
                        worker: n.clone(),
                    });
                }
            }
        }
    }

    /// A range read of the prefix answered at store revision `revision`: replaces what is known and returns
    /// the difference (workers gone, workers new or changed; nothing for workers that did not change).
    pub fn on_list<'a>(
        &mut self,
        revision: i64,
        kvs: impl IntoIterator<Item = KeyValue<'a>>,
    ) -> Vec<Change> {
        let mut fresh = BTreeMap::new();
        for kv in kvs {
            let Some(key) = self.key(kv.key) else {
                continue;
            };
            if fresh.len() >= self.max_entries {
                self.rejected += 1;
                tracing::warn!(
                    key,
                    max = self.max_entries,
                    "etcd key ignored: too many workers"
                );
                continue;
            }
            let worker = self.parse(&key, kv.value);
            fresh.insert(
                key,
                Entry {
                    worker,
                    lease: kv.lease,
                },
            );
        }
        let mut out = Vec::new();
        for (k, old) in &self.entries {
            if !fresh.contains_key(k) {
                Self::diff(k, old.worker.as_ref(), None, &mut out);
            }
        }
        for (k, new) in &fresh {
            let old = self.entries.get(k).and_then(|e| e.worker.as_ref());
            Self::diff(k, old, new.worker.as_ref(), &mut out);
        }
        self.entries = fresh;
        self.revision = Some(revision);
        out
    }

    /// One watch response: applies its events in order and returns the changes. A watch canceled because its
    /// start revision was compacted makes the next [`EtcdWatch::step`] a list; one canceled for another reason
    /// keeps the resume revision (the driver backs off and watches again); a progress notification (no events)
    /// moves the resume revision on.
    pub fn on_watch(&mut self, batch: &WatchBatch<'_>) -> Vec<Change> {
        let mut out = Vec::new();
        if batch.compact_revision > 0 {
            tracing::info!(
                compact_revision = batch.compact_revision,
                "etcd watch canceled (revision compacted): listing again"
            );
            self.revision = None;
            return out;
        }
        if batch.canceled {
            return out;
        }
        let Some(mut rev) = self.revision else {
            // Events before any list cannot be applied (the driver lists first); list.
            return out;
        };
        for (kind, kv) in &batch.events {
            if kv.mod_revision <= rev {
                // Already applied (a resumed watch can repeat the revision it resumed at).
                continue;
            }
            // Past this event whether it is applied or refused, so a resumed watch does not send it again.
            rev = rev.max(kv.mod_revision);
            let Some(key) = self.key(kv.key) else {
                continue;
            };
            match kind {
                EventKind::Put => {
                    if !self.entries.contains_key(&key) && self.entries.len() >= self.max_entries {
                        self.rejected += 1;
                        tracing::warn!(
                            key,
                            max = self.max_entries,
                            "etcd key ignored: too many workers"
                        );
                    } else {
                        let worker = self.parse(&key, kv.value);
                        let old = self.entries.insert(
                            key.clone(),
                            Entry {
                                worker: worker.clone(),
                                lease: kv.lease,
                            },
                        );
                        Self::diff(
                            &key,
                            old.as_ref().and_then(|e| e.worker.as_ref()),
                            worker.as_ref(),
                            &mut out,
                        );
                    }
                }
                EventKind::Delete => {
                    if let Some(old) = self.entries.remove(&key) {
                        Self::diff(&key, old.worker.as_ref(), None, &mut out);
                    }
                }
            }
        }
        if batch.events.is_empty() && !batch.created {
            // A progress notification: every change up to the header revision has been sent.
            rev = rev.max(batch.header_revision);
        }
        self.revision = Some(rev);
        out
    }

    /// The watch stream broke (etcd went away, a network error): nothing changes, and the next step watches
    /// from where it stopped. The workers known stay known: a router keeps serving them.
    pub fn on_broken(&mut self) {
        tracing::debug!(revision = ?self.revision, "etcd watch broken: resuming");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/pdx/workers/";

    fn body(url: &str) -> Vec<u8> {
        format!(r#"{{"role":"decode","pool":"decode","url":"{url}","model":"m"}}"#).into_bytes()
    }

    fn kv<'a>(key: &'a str, value: &'a [u8], rev: i64) -> KeyValue<'a> {
        KeyValue {
            key: key.as_bytes(),
            value,
            mod_revision: rev,
            lease: 7,
        }
    }

    fn summary(cs: &[Change]) -> Vec<String> {
        cs.iter()
            .map(|c| match c {
                Change::Upsert { key, worker } => format!("+{key} {}", worker.registration.url),
                Change::Remove { key, worker } => format!("-{key} {}", worker.registration.url),
            })
            .collect()
    }

    #[test]
    fn targets_parse_strictly() {
        let t = EtcdTarget::parse("etcd://127.0.0.1:2379").unwrap();
        assert_eq!(t.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(t.prefix, DEFAULT_PREFIX);
        assert_eq!(t.watch_prefix(), "/pdx/workers/");
        let t = EtcdTarget::parse("etcd://a.example,[::1]:2381,10.0.0.2:1/team/pdx/").unwrap();
        assert_eq!(
            t.endpoints,
            [
                "http://a.example:2379",
                "http://[::1]:2381",
                "http://10.0.0.2:1"
            ]
        );
        assert_eq!(t.prefix, "/team/pdx");
        for bad in [
            "http://127.0.0.1:2379",
            "etcd://",
            "etcd://h:0",
            "etcd://h:99999",
            "etcd://h:+1",
            "etcd://u:p@h:2379",
            "etcd://h:1?x=1",
            "etcd://h:1,",
            "etcd://[zz]:1",
            "etcd://h_1:1",
            "etcd://h:1//a",
            "etcd://h:1/a b",
        ] {
            assert!(EtcdTarget::parse(bad).is_err(), "{bad}");
        }
        let reg = pdx_protocol::Registration {
            role: "decode".into(),
            pool: "d".into(),
            url: "http://10.0.0.1:1".into(),
            model: "org/model".into(),
            api_key: None,
            kv_events_endpoint: None,
            kv_events_replay_endpoint: None,
        };
        let k = EtcdTarget::parse("etcd://h/x").unwrap().key_for(&reg);
        assert_eq!(k, format!("/x/org/model/{}", crate::worker_id(&reg)));
    }

    #[test]
    fn a_list_then_watch_events_give_adds_changes_and_removals() {
        let mut w = EtcdWatch::new(P, 100);
        assert_eq!(w.step(), Step::List);
        let (a, b) = (body("http://10.0.0.1:1"), body("http://10.0.0.2:1"));
        let cs = w.on_list(
            10,
            [kv("/pdx/workers/m/a", &a, 5), kv("/pdx/workers/m/b", &b, 6)],
        );
        assert_eq!(
            summary(&cs),
            [
                "+/pdx/workers/m/a http://10.0.0.1:1",
                "+/pdx/workers/m/b http://10.0.0.2:1"
            ]
        );
        assert_eq!(w.step(), Step::Watch { start_revision: 11 });
        // The creation response changes nothing; a put of the same value (a re-put by a heartbeat) is no
        // change either.
        let created = WatchBatch {
            header_revision: 10,
            created: true,
            ..Default::default()
        };
        assert!(w.on_watch(&created).is_empty());
        let same = WatchBatch {
            header_revision: 11,
            events: vec![(EventKind::Put, kv("/pdx/workers/m/a", &a, 11))],
            ..Default::default()
        };
        assert!(w.on_watch(&same).is_empty());
        // A new value: the old worker goes, the new one comes.
        let c = body("http://10.0.0.3:1");
        let cs = w.on_watch(&WatchBatch {
            header_revision: 13,
            events: vec![
                (EventKind::Put, kv("/pdx/workers/m/a", &c, 12)),
                (EventKind::Delete, kv("/pdx/workers/m/b", b"", 13)),
            ],
            ..Default::default()
        });
        assert_eq!(
            summary(&cs),
            [
                "-/pdx/workers/m/a http://10.0.0.1:1",
                "+/pdx/workers/m/a http://10.0.0.3:1",
                "-/pdx/workers/m/b http://10.0.0.2:1"
            ]
        );
        assert_eq!(w.step(), Step::Watch { start_revision: 14 });
        // A delete of an unknown key, and events at revisions already applied, change nothing.
        let cs = w.on_watch(&WatchBatch {
            events: vec![
                (EventKind::Delete, kv("/pdx/workers/m/zz", b"", 14)),
                (EventKind::Put, kv("/pdx/workers/m/old", &a, 3)),
            ],
            ..Default::default()
        });
        assert!(cs.is_empty());
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn a_broken_stream_keeps_the_workers_and_resumes_after_the_last_revision() {
        let mut w = EtcdWatch::new(P, 100);
        let a = body("http://10.0.0.1:1");
        w.on_list(20, [kv("/pdx/workers/m/a", &a, 5)]);
        w.on_broken();
        assert_eq!(w.workers().count(), 1, "etcd away: no mass removal");
        assert_eq!(w.step(), Step::Watch { start_revision: 21 });
        // A progress notification moves the resume point on, so a later resume is not compacted away.
        assert!(w
            .on_watch(&WatchBatch {
                header_revision: 90,
                ..Default::default()
            })
            .is_empty());
        assert_eq!(w.step(), Step::Watch { start_revision: 91 });
    }

    #[test]
    fn a_compaction_lists_again_and_only_the_difference_changes() {
        let mut w = EtcdWatch::new(P, 100);
        let (a, b, c) = (
            body("http://10.0.0.1:1"),
            body("http://10.0.0.2:1"),
            body("http://10.0.0.3:1"),
        );
        w.on_list(
            20,
            [kv("/pdx/workers/m/a", &a, 5), kv("/pdx/workers/m/b", &b, 6)],
        );
        let cs = w.on_watch(&WatchBatch {
            canceled: true,
            compact_revision: 50,
            ..Default::default()
        });
        assert!(cs.is_empty());
        assert_eq!(w.step(), Step::List);
        assert_eq!(
            w.workers().count(),
            2,
            "known until the list says otherwise"
        );
        // While away: b left, c came, a stayed.
        let cs = w.on_list(
            60,
            [
                kv("/pdx/workers/m/a", &a, 5),
                kv("/pdx/workers/m/c", &c, 55),
            ],
        );
        assert_eq!(
            summary(&cs),
            [
                "-/pdx/workers/m/b http://10.0.0.2:1",
                "+/pdx/workers/m/c http://10.0.0.3:1"
            ]
        );
        assert_eq!(w.step(), Step::Watch { start_revision: 61 });
    }

    #[test]
    fn a_cancel_that_is_not_a_compaction_keeps_the_resume_revision() {
        // e.g. "required revision is a future revision": listing again at once would loop without backoff.
        let mut w = EtcdWatch::new(P, 100);
        w.on_list(20, [kv("/pdx/workers/m/a", &body("http://10.0.0.1:1"), 5)]);
        let cs = w.on_watch(&WatchBatch {
            canceled: true,
            ..Default::default()
        });
        assert!(cs.is_empty());
        assert_eq!(w.step(), Step::Watch { start_revision: 21 });
        assert_eq!(w.workers().count(), 1);
    }

    #[test]
    fn refused_keys_still_move_the_resume_revision_on() {
        let mut w = EtcdWatch::new(P, 100);
        w.on_list(20, []);
        let cs = w.on_watch(&WatchBatch {
            events: vec![(EventKind::Put, kv("/elsewhere/x", b"{}", 30))],
            ..Default::default()
        });
        assert!(cs.is_empty());
        assert_eq!(w.step(), Step::Watch { start_revision: 31 });
    }

    #[test]
    fn bad_keys_and_values_are_ignored_and_a_bad_value_retires_the_worker_it_replaces() {
        let mut w = EtcdWatch::new(P, 100);
        let a = body("http://10.0.0.1:1");
        let cs = w.on_list(
            10,
            [
                kv("/pdx/workers/m/a", &a, 5),
                kv("/pdx/workers/m/junk", b"not json", 6),
                kv("/elsewhere/x", &a, 7),
                kv("/pdx/workers/m/\u{1}", &a, 8),
                KeyValue {
                    key: b"/pdx/workers/m/\xff",
                    value: &a,
                    mod_revision: 9,
                    lease: 0,
                },
                kv("/pdx/workers/Qwen 3 \u{6a21}\u{578b}/b", &a, 9),
            ],
        );
        assert_eq!(
            cs.len(),
            2,
            "a model name with a space and CJK is a fine key"
        );
        assert_eq!(w.rejected(), 4);
        let bad = br#"{"role":"decode","pool":"d","url":"http://h:1","model":"m","extra":true}"#;
        let cs = w.on_watch(&WatchBatch {
            events: vec![(EventKind::Put, kv("/pdx/workers/m/a", bad, 11))],
            ..Default::default()
        });
        assert_eq!(summary(&cs), ["-/pdx/workers/m/a http://10.0.0.1:1"]);
        assert_eq!(
            w.workers().count(),
            1,
            "the other key still holds its worker"
        );
        // The key is still tracked, so a later good value is an add.
        let cs = w.on_watch(&WatchBatch {
            events: vec![(EventKind::Put, kv("/pdx/workers/m/a", &a, 12))],
            ..Default::default()
        });
        assert_eq!(summary(&cs), ["+/pdx/workers/m/a http://10.0.0.1:1"]);
        assert_eq!(w.lease_of("/pdx/workers/m/a"), Some(7));
    }

    #[test]
    fn the_number_of_keys_is_bounded() {
        let mut w = EtcdWatch::new(P, 2);
        let bodies: Vec<(String, Vec<u8>)> = (0..4)
            .map(|i| {
                (
                    format!("/pdx/workers/m/{i}"),
                    body(&format!("http://10.0.0.{i}:1")),
                )
            })
            .collect();
        let cs = w.on_list(
            10,
            bodies.iter().map(|(k, v)| kv(k, v, 1)).collect::<Vec<_>>(),
        );
        assert_eq!(cs.len(), 2);
        let cs = w.on_watch(&WatchBatch {
            events: vec![(EventKind::Put, kv("/pdx/workers/m/9", &bodies[3].1, 11))],
            ..Default::default()
        });
        assert!(cs.is_empty());
        assert_eq!(w.len(), 2);
        assert_eq!(w.rejected(), 3);
    }
}
