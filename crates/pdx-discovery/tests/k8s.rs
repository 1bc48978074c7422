//! Kubernetes discovery through `kube`'s client against a local API-server double that speaks the real
//! list + watch JSON protocol (no cluster runs here): `PodList` with `metadata.resourceVersion`, chunked
//! watch streams of `ADDED`/`MODIFIED`/`DELETED` lines, `BOOKMARK`s when `allowWatchBookmarks=true`, `410
//! Gone` (as the watch's HTTP status or as an `ERROR` event) for a forgotten version, and watch streams the
//! server ends (reconnects from the last version).

mod support;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use pdx_discovery::args::K8sSpec;
use pdx_discovery::k8s::{PodRules, PodSelector};
use pdx_discovery::k8s_driver;
use pdx_protocol::Role;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

/// How a forgotten resource version is refused.
#[derive(Clone, Copy, PartialEq)]
enum Gone {
    /// `410` as the HTTP status of the watch request.
    Status,
    /// `200` and one `ERROR` event with code 410.
    Event,
}

type Tx = tokio::sync::mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

struct Watcher {
    selector: String,
    bookmarks: bool,
    tx: Tx,
}

struct State {
    rv: u64,
    /// Events before this version are forgotten.
    oldest: u64,
    pods: BTreeMap<String, Value>,
    log: Vec<(u64, &'static str, Value)>,
    watchers: Vec<Watcher>,
    requests: Vec<String>,
    gone: Gone,
    /// Answer watches with 500 (the server is unwell).
    failing: bool,
}

/// The API-server double.
struct ApiServer {
    port: u16,
    st: Arc<Mutex<State>>,
    _rt: std::thread::JoinHandle<()>,
}

fn labels_match(selector: &str, pod: &Value) -> bool {
    selector.split(',').all(|kv| {
        let (k, v) = kv.split_once('=').unwrap();
        pod["metadata"]["labels"][k].as_str() == Some(v)
    })
}

fn query(uri: &hyper::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            let v = v.replace("%3D", "=").replace("%2C", ",");
            (k.to_string(), v)
        })
        .collect()
}

fn line(ty: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": ty, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn status_410() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "too old resource version", "reason": "Expired", "code": 410})
}

impl ApiServer {
    fn start() -> ApiServer {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let st = Arc::new(Mutex::new(State {
            rv: 100,
            oldest: 0,
            pods: BTreeMap::new(),
            log: Vec::new(),
            watchers: Vec::new(),
            requests: Vec::new(),
            gone: Gone::Status,
            failing: false,
        }));
        let st2 = st.clone();
        let rt = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                loop {
                    let (s, _) = l.accept().await.unwrap();
                    let st = st2.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let st = st.clone();
                            async move { Ok::<_, Infallible>(handle(&st, req)) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                            .await;
                    });
                }
            });
        });
        ApiServer { port, st, _rt: rt }
    }

    fn config(&self) -> kube::Config {
        let mut c = kube::Config::new(format!("http://127.0.0.1:{}", self.port).parse().unwrap());
        c.default_namespace = "ns".into();
        c
    }

    /// Sets a pod (added or modified); `quiet`: no event sent or kept (a change the watcher misses).
    fn set_pod(&self, name: &str, ip: &str, ready: bool, role: &str, quiet: bool) {
        let mut s = self.st.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let pod = json!({
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv.to_string(),
                         "labels": {"app": "pdx", "role": role}},
            "spec": {"containers": [{"name": "engine", "ports": [{"name": "http", "containerPort": 8000}]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        });
        let ty = if s.pods.contains_key(name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.pods.insert(name.into(), pod.clone());
        if !quiet {
            s.log.push((rv, ty, pod.clone()));
            s.broadcast(ty, &pod);
        }
    }

    fn delete_pod(&self, name: &str, quiet: bool) {
        let mut s = self.st.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let mut pod = s.pods.remove(name).unwrap();
        pod["metadata"]["resourceVersion"] = rv.to_string().into();
        if !quiet {
            s.log.push((rv, "DELETED", pod.clone()));
            s.broadcast("DELETED", &pod);
        }
    }

    /// A bookmark at the current version to every watcher that asked for bookmarks (as the server sends
    /// them, without advancing the version).
    fn bookmark(&self) -> u64 {
        let mut s = self.st.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let obj = json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}});
        s.watchers
            .retain(|w| !w.bookmarks || w.tx.send(Ok(Frame::data(line("BOOKMARK", &obj)))).is_ok());
        rv
    }

    /// Ends every open watch stream (the server's timeout, or a dropped connection).
    fn end_watches(&self) {
        self.st.lock().unwrap().watchers.clear();
    }

    /// Forgets the history: watches from any version up to now get 410.
    fn forget(&self, gone: Gone) {
        let mut s = self.st.lock().unwrap();
        s.oldest = s.rv;
        s.log.clear();
        s.gone = gone;
        if gone == Gone::Event {
            let e = status_410();
            for w in s.watchers.drain(..) {
                let _ = w.tx.send(Ok(Frame::data(line("ERROR", &e))));
            }
        } else {
            s.watchers.clear();
        }
    }

    fn requests(&self) -> Vec<String> {
        self.st.lock().unwrap().requests.clone()
    }

    fn lists(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| !r.contains("watch=true"))
            .count()
    }
}

impl State {
    fn broadcast(&mut self, ty: &str, pod: &Value) {
        self.watchers.retain(|w| {
            !labels_match(&w.selector, pod) || w.tx.send(Ok(Frame::data(line(ty, pod)))).is_ok()
        });
    }
}

fn respond(status: u16, body: Value) -> hyper::Response<BoxBody<Bytes, Infallible>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn handle(
    st: &Mutex<State>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<BoxBody<Bytes, Infallible>> {
    let mut s = st.lock().unwrap();
    let uri = req.uri().clone();
    s.requests.push(uri.to_string());
    assert_eq!(uri.path(), "/api/v1/namespaces/ns/pods", "{uri}");
    let q = query(&uri);
    let selector = q.get("labelSelector").cloned().unwrap_or_default();
    if q.get("watch").map(String::as_str) != Some("true") {
        let items: Vec<Value> = s
            .pods
            .values()
            .filter(|p| labels_match(&selector, p))
            .cloned()
            .collect();
        return respond(
            200,
            json!({"kind": "PodList", "apiVersion": "v1",
                   "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
        );
    }
    if s.failing {
        return respond(
            500,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "unwell",
                   "reason": "InternalError", "code": 500}),
        );
    }
    let from: u64 = q["resourceVersion"].parse().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    if from < s.oldest {
        if s.gone == Gone::Status {
            return respond(410, status_410());
        }
        let _ = tx.send(Ok(Frame::data(line("ERROR", &status_410()))));
        drop(tx);
    } else {
        for (rv, ty, pod) in &s.log {
            if *rv > from && labels_match(&selector, pod) {
                let _ = tx.send(Ok(Frame::data(line(ty, pod))));
            }
        }
        s.watchers.push(Watcher {
            selector,
            bookmarks: q.get("allowWatchBookmarks").map(String::as_str) == Some("true"),
            tx,
        });
    }
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    hyper::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

fn spec(selectors: &[(Role, &str)]) -> K8sSpec {
    K8sSpec {
        namespace: Some("ns".into()),
        selectors: selectors
            .iter()
            .map(|(role, s)| PodSelector {
                role: *role,
                selector: s.to_string(),
                pool: None,
            })
            .collect(),
        port_name: "http".into(),
        default_model: "m".into(),
    }
}

fn start(api: &ApiServer, selectors: &[(Role, &str)]) -> (k8s_driver::K8sDiscovery, RecorderOut) {
    let (sink, seen) = recorder();
    let d = k8s_driver::spawn(
        spec(selectors),
        PodRules::default(),
        100,
        Some(api.config()),
        sink,
    )
    .unwrap();
    (d, seen)
}

type RecorderOut = Arc<Mutex<Vec<pdx_discovery::Change>>>;

fn seen_now(seen: &RecorderOut) -> Vec<String> {
    summary(&seen.lock().unwrap())
}

fn wait_seen(seen: &RecorderOut, n: usize) -> Vec<String> {
    assert!(
        wait_until(GUARD, || seen.lock().unwrap().len() >= n),
        "{:?}",
        seen_now(seen)
    );
    // Nothing more arrives right after.
    std::thread::sleep(Duration::from_millis(200));
    seen_now(seen)
}

#[test]
fn pods_are_listed_then_watched_and_bookmarks_carry_the_resumed_watch() {
    let api = ApiServer::start();
    api.set_pod("d0", "10.0.0.1", true, "decode", false);
    api.set_pod("p0", "10.0.1.1", true, "prefill", false);
    let (_d, seen) = start(&api, &[(Role::Decode, "app=pdx,role=decode")]);
    assert_eq!(wait_seen(&seen, 1), ["+http://10.0.0.1:8000"]);
    // Not ready: not a worker; ready: a worker; not ready again or deleted: gone at once.
    assert!(wait_until(GUARD, || api
        .requests()
        .iter()
        .any(|r| r.contains("watch=true"))));
    api.set_pod("d1", "10.0.0.2", false, "decode", false);
    api.set_pod("d1", "10.0.0.2", true, "decode", false);
    assert_eq!(wait_seen(&seen, 2)[1], "+http://10.0.0.2:8000");
    api.set_pod("d0", "10.0.0.1", false, "decode", false);
    assert_eq!(wait_seen(&seen, 3)[2], "-http://10.0.0.1:8000");
    api.delete_pod("d1", false);
    assert_eq!(wait_seen(&seen, 4)[3], "-http://10.0.0.2:8000");
    // A prefill pod outside the selector changes nothing.
    api.set_pod("p1", "10.0.1.2", true, "prefill", false);
    // A bookmark, then the server ends the watch: the client resumes from the bookmark's version, without
    // listing again.
    let bm = api.bookmark();
    std::thread::sleep(Duration::from_millis(200));
    api.end_watches();
    let resumed = format!("resourceVersion={bm}");
    assert!(
        wait_until(GUARD, || api
            .requests()
            .iter()
            .any(|r| r.contains(&resumed))),
        "{:?}",
        api.requests()
    );
    let watches: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.contains("watch=true"))
        .collect();
    assert!(
        watches
            .iter()
            .all(|r| r.contains("allowWatchBookmarks=true")),
        "{watches:?}"
    );
    assert_eq!(api.lists(), 1, "{:?}", api.requests());
    api.set_pod("d2", "10.0.0.3", true, "decode", false);
    assert_eq!(wait_seen(&seen, 5)[4], "+http://10.0.0.3:8000");
    assert_eq!(seen.lock().unwrap().len(), 5);
}

fn gone_lists_again(gone: Gone) {
    let api = ApiServer::start();
    api.set_pod("a", "10.0.0.1", true, "decode", false);
    api.set_pod("b", "10.0.0.2", true, "decode", false);
    let (_d, seen) = start(&api, &[(Role::Decode, "app=pdx,role=decode")]);
    assert_eq!(wait_seen(&seen, 2).len(), 2);
    assert!(wait_until(GUARD, || api
        .requests()
        .iter()
        .any(|r| r.contains("watch=true"))));
    // Changes the watch misses, then the history is forgotten: the resumed watch gets 410.
    api.delete_pod("a", true);
    api.set_pod("c", "10.0.0.3", true, "decode", true);
    api.forget(gone);
    let s = wait_seen(&seen, 4);
    assert_eq!(s[2..], ["-http://10.0.0.1:8000", "+http://10.0.0.3:8000"]);
    assert_eq!(api.lists(), 2, "{:?}", api.requests());
}

#[test]
fn a_410_gone_status_lists_again_and_changes_only_the_difference() {
    gone_lists_again(Gone::Status);
}

#[test]
fn a_410_error_event_lists_again_and_changes_only_the_difference() {
    gone_lists_again(Gone::Event);
}

#[test]
fn a_failing_api_server_keeps_the_workers_and_the_watch_resumes() {
    let api = ApiServer::start();
    api.set_pod("a", "10.0.0.1", true, "decode", false);
    api.set_pod("p", "10.0.1.1", true, "prefill", false);
    let (_d, seen) = start(
        &api,
        &[
            (Role::Decode, "app=pdx,role=decode"),
            (Role::Prefill, "app=pdx,role=prefill"),
        ],
    );
    let mut s = wait_seen(&seen, 2);
    s.sort();
    assert_eq!(s, ["+http://10.0.0.1:8000", "+http://10.0.1.1:8000"]);
    api.st.lock().unwrap().failing = true;
    api.end_watches();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(seen.lock().unwrap().len(), 2, "API server away: no change");
    api.st.lock().unwrap().failing = false;
    // Missed nothing: the events after the last version are replayed on the resumed watch.
    api.set_pod("b", "10.0.0.2", true, "decode", false);
    assert_eq!(wait_seen(&seen, 3)[2], "+http://10.0.0.2:8000");
    assert_eq!(
        api.lists(),
        2,
        "one list per selector: {:?}",
        api.requests()
    );
}
