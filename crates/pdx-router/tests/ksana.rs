//! KsanaLLM orchestration (`--orchestration ksana`) end to end, in process: the node API against KsanaLLM's
//! own `simple_router` (a request-level diff of both routers' answers to one registration sequence; skipped,
//! saying why, when its source or venv is absent), and requests through small fake KsanaLLM nodes that record
//! the `kv-comm-*` headers and answer as KsanaLLM's serving code does (`/generate`: `\0`-delimited JSON
//! chunks). Also: a router restarted on the same SQLite file, retries on another pair, the fail-fast end of a
//! stream whose prefill node dies, and heartbeat expiry moving requests to the pairs left.

mod common;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A request on a raw connection: `(status, content type, body)`.
async fn raw_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    ctype: Option<&str>,
    body: &[u8],
) -> (u16, String, Bytes) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if let Some(c) = ctype {
        b = b.header("content-type", c);
    }
    let r = tx
        .send_request(b.body(Full::new(Bytes::copy_from_slice(body))).unwrap())
        .await
        .expect("response");
    let s = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    (
        s,
        ct,
        r.into_body().collect().await.expect("body").to_bytes(),
    )
}

fn db_path(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pdx-ksana-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d.join("router.db")
}

fn ksana_router(db: &Path, extra: &[&str]) -> pdx_router::RouterServer {
    let db = db.to_string_lossy().into_owned();
    let mut args = vec!["--orchestration", "ksana", "--ksana-db", &db];
    args.extend_from_slice(extra);
    router(&args)
}

// ---------------------------------------------------------------------------------------------------------
// The diff test against the peer.

/// KsanaLLM's simple_router, run from a copy of its source with its own config and SQLite file; killed on
/// drop.
struct Peer {
    child: std::process::Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn peer_paths() -> Result<(PathBuf, PathBuf), String> {
    let peers = std::env::var_os("PEERS_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/pdx-peers")))
        .ok_or("no HOME")?;
    let src = std::env::var_os("KSANA_ROUTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| peers.join("KsanaLLM/src/ksana_llm/python/simple_router"));
    let py = peers.join("venv-ksana/bin/python");
    if !src.join("main.py").is_file() {
        return Err(format!(
            "no KsanaLLM simple_router source at {} (see /work/shared/peers/README.md)",
            src.display()
        ));
    }
    if !py.is_file() {
        return Err(format!(
            "no venv at {} (peers/install.sh makes it)",
            py.display()
        ));
    }
    Ok((src, py))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "__pycache__") {
                copy_dir(&p, &to.join(e.file_name()));
            }
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// Starts the peer on a free loopback port with heartbeat timeout 60 s (the value it applies whatever its
/// config says: its `services.py` reads the setting before the config is loaded).
async fn start_peer(src: &Path, py: &Path, db: Option<&Path>) -> Peer {
    let dir = std::env::temp_dir().join(format!(
        "pdx-ksana-peer-{}-{}",
        std::process::id(),
        db.is_some()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(src, &dir.join("app"));
    std::fs::write(
        dir.join("config.ini"),
        format!(
            "[general]\nlog_level = WARNING\nlog_dir = {d}/log\ncluster_name = default_cluster\n\
             heartbeat_timeout_seconds = 60\n[name_service]\nname_service_provider = name_service.auto_provider\n\
             [database]\nstorage_mode = sqlite\nsqlite_path = {db}\n",
            d = dir.display(),
            db = db.map_or_else(|| dir.join("peer.db"), Path::to_path_buf).display()
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(py)
        .current_dir(dir.join("app"))
        .args([
            "main.py",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--workers",
            "1",
        ])
        .arg("--config")
        .arg(dir.join("config.ini"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python starts");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let peer = Peer { child, addr, dir };
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            let (s, _, _) = raw_call(addr, "GET", "/openapi.json", None, b"").await;
            if s == 200 {
                return peer;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the peer did not come up on {addr}");
}

const P: &str = "127.0.0.1:18001";
const D: &str = "127.0.0.1:18002";
const D2: &str = "127.0.0.1:18003";

fn reg(addr: &str, coord: &str, role: &str, rank: i64, world: i64, id: Option<&str>) -> String {
    let mut v = json!({"inference_addr": addr, "coordinator_addr": coord, "group_role": role, "node_rank": rank,
        "world_size": world, "devices": [{"device_id": 0, "device_ip": "127.0.0.1", "device_type": "gpu"}],
        "hostname": "h", "start_time": "2026-01-01T00:00:00"});
    if let Some(i) = id {
        v["node_id"] = json!(i);
    }
    v.to_string()
}

/// The registration sequence: `(method, path, content type, body)`; `$GEN` is the id the router drew for
/// the registration that brought none.
fn sequence() -> Vec<(&'static str, &'static str, Option<&'static str>, String)> {
    let j = Some("application/json");
    let post = |path, body: String| ("POST", path, j, body);
    let mut s = vec![
        post("/RegisterNode", reg(P, "127.0.0.1:19001", "prefill", 0, 2, Some("p0"))),
        post("/Heartbeat", r#"{"node_id":"p0"}"#.into()),
        post("/RegisterNode", reg(P, "127.0.0.1:19011", "prefill", 1, 2, Some("p1"))),
        post("/RegisterNode", reg(D, "127.0.0.1:19002", "decode", 0, 1, Some("d0"))),
        post("/RegisterNode", reg(D2, "127.0.0.1:19003", "decode", 0, 1, None)),
        post("/Heartbeat", r#"{"node_id":"p0"}"#.into()),
        post("/Heartbeat", r#"{"node_id":"p1","extra":1}"#.into()),
        post("/Heartbeat", r#"{"node_id":"d0"}"#.into()),
        post("/Heartbeat", r#"{"node_id":"$GEN"}"#.into()),
        post("/Heartbeat", r#"{"node_id":"p0"}"#.into()),
        // Comm ids: rank 1 and decode nodes may not; a key without `__` is a 400.
        post("/RegisterCommId", json!({"node_id": "p1", "comm_key": format!("{P}__{D}"), "comm_id": "x"}).to_string()),
        post("/RegisterCommId", json!({"node_id": "d0", "comm_key": format!("{P}__{D}"), "comm_id": "x"}).to_string()),
        post("/RegisterCommId", json!({"node_id": "p0", "comm_key": "nokey", "comm_id": "x"}).to_string()),
        post("/RegisterCommId", json!({"node_id": "p0", "comm_key": format!("{P}__{D}"), "comm_id": "COMM-D"}).to_string()),
        post("/RegisterCommId", json!({"node_id": "p0", "comm_key": format!("{P}__{D2}"), "comm_id": "COMM-D2"}).to_string()),
        post("/Heartbeat", r#"{"node_id":"d0"}"#.into()),
        post("/Heartbeat", r#"{"node_id":"p1"}"#.into()),
        post("/Heartbeat", r#"{"node_id":"$GEN"}"#.into()),
        // Unknown nodes: the peer's bare 500.
        post("/Heartbeat", r#"{"node_id":"nobody"}"#.into()),
        post("/RegisterCommId", json!({"node_id": "nobody", "comm_key": "a__b", "comm_id": "x"}).to_string()),
        // Another cluster.
        post(
            "/RegisterNode",
            json!({"inference_addr": D, "coordinator_addr": "127.0.0.1:19099", "group_role": "decode",
                   "node_rank": 0, "world_size": 1, "devices": [{"device_id": 0, "device_ip": "x"}],
                   "cluster_name": "elsewhere"})
            .to_string(),
        ),
        // Bodies FastAPI refuses.
        post("/RegisterNode", "{}".into()),
        post("/RegisterNode", "[]".into()),
        post("/RegisterNode", "nojson".into()),
        post("/RegisterNode", String::new()),
        ("POST", "/RegisterNode", Some("text/plain"), r#"{"a":1}"#.into()),
        post(
            "/RegisterNode",
            r#"{"inference_addr":"x","coordinator_addr":"127.0.0.1:9","group_role":"bad","node_rank":-1,
                "world_size":0,"devices":[{"device_id":"a"},7]}"#
                .into(),
        ),
        post(
            "/RegisterNode",
            r#"{"inference_addr":5,"cluster_name":7,"group_role":null,"node_rank":1.5,"hostname":3,
                "world_size":"x","devices":{},"job_id":1,"start_time":2,"comm_id":3,"node_id":4}"#
                .into(),
        ),
        post("/Heartbeat", "{}".into()),
        post("/Heartbeat", r#"{"node_id":5}"#.into()),
        post("/RegisterCommId", r#"{"node_id":"p0"}"#.into()),
        ("GET", "/RegisterNode", None, String::new()),
    ];
    // Every coordinator-address rule and the world size / device checks.
    for (coord, devices, world) in [
        (json!(null), 1, 1),
        (json!(""), 1, 1),
        (json!(" 127.0.0.1:9"), 1, 1),
        (json!("http://127.0.0.1:9"), 1, 1),
        (json!("127.0.0.1"), 1, 1),
        (json!("host:9001"), 1, 1),
        (json!("[::1]:9001"), 1, 1),
        (json!("127.0.0.1:x"), 1, 1),
        (json!("127.0.0.1:0"), 1, 1),
        (json!("127.0.0.1:70000"), 1, 1),
        (json!("127.0.0.1:19098"), 0, 1),
        (json!("127.0.0.1:19098"), 2, 1),
    ] {
        let devs: Vec<Value> = (0..devices)
            .map(|i| json!({"device_id": i, "device_ip": "x"}))
            .collect();
        s.push(post(
            "/RegisterNode",
            json!({"inference_addr": "127.0.0.1:18099", "coordinator_addr": coord, "group_role": "decode",
                   "node_rank": 0, "world_size": world, "devices": devs})
            .to_string(),
        ));
    }
    // Lax integers and strings.
    s.push(post(
        "/RegisterNode",
        json!({"inference_addr": "127.0.0.1:18098", "coordinator_addr": "127.0.0.1:19097", "group_role": "decode",
               "node_rank": " 0 ", "world_size": 1.0, "devices": [{"device_id": true, "device_ip": "x"}],
               "node_id": "lax", "cluster_name": ""})
        .to_string(),
    ));
    // A rank-0 prefill registering again drops its comm ids; the decode's next heartbeat shows it.
    s.push(post(
        "/RegisterNode",
        reg(P, "127.0.0.1:19001", "prefill", 0, 2, Some("ignored")),
    ));
    s.push(post("/Heartbeat", r#"{"node_id":"d0"}"#.into()));
    s.push(post("/Heartbeat", r#"{"node_id":"lax"}"#.into()));
    s
}

/// `v` with the values that differ between any two runs (times, drawn ids) replaced.
fn normalize(v: &mut Value, generated: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                match (k.as_str(), &*x) {
                    ("last_heartbeat", Value::String(t)) => {
                        assert!(t.ends_with('Z') && t.len() >= 20, "last_heartbeat {t}");
                        *x = json!("<time>");
                    }
                    ("timestamp", Value::String(t)) => {
                        assert!(!t.ends_with('Z') && t.len() >= 19, "timestamp {t}");
                        *x = json!("<time>");
                    }
                    ("node_id", Value::String(s)) if s == generated => *x = json!("<generated>"),
                    _ => normalize(x, generated),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| normalize(x, generated)),
        _ => {}
    }
}

/// A 422's JSON error: its position and Python's message are compared by kind only.
fn loosen_json_errors(v: &mut Value) {
    if let Some(list) = v.get_mut("detail").and_then(Value::as_array_mut) {
        for e in list {
            if e["type"] == "json_invalid" {
                e["loc"][1] = json!("<pos>");
                e["ctx"]["error"] = json!("<message>");
            }
        }
    }
}

async fn run_sequence(addr: SocketAddr) -> Vec<(u16, String, Value)> {
    let mut out = Vec::new();
    let mut generated = String::new();
    for (method, path, ctype, body) in sequence() {
        let body = body.replace("$GEN", &generated);
        let (s, ct, b) = raw_call(addr, method, path, ctype, body.as_bytes()).await;
        let mut v = serde_json::from_slice::<Value>(&b)
            .unwrap_or_else(|_| json!({ "text": String::from_utf8_lossy(&b) }));
        if path == "/RegisterNode" && s == 201 && !body.contains("node_id") {
            generated = v["node_id"].as_str().unwrap().to_string();
            assert_eq!(generated.len(), 32, "{v}");
        }
        normalize(&mut v, &generated);
        loosen_json_errors(&mut v);
        let ct = ct.split(';').next().unwrap_or("").to_string();
        out.push((s, ct, v));
    }
    out
}

/// The same registration sequence to KsanaLLM's router and to pdx: the same status, content type and body
/// for every request, up to times and drawn node ids (and the position and wording of a JSON syntax error).
#[tokio::test(flavor = "current_thread")]
async fn node_api_answers_as_the_peer() {
    let (src, py) = match peer_paths() {
        Ok(p) => p,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let peer = start_peer(&src, &py, None).await;
    let db = db_path("diff");
    let r = ksana_router(&db, &["--ksana-heartbeat-timeout-secs", "60"]);
    let theirs = run_sequence(peer.addr).await;
    let ours = run_sequence(r.addr).await;
    let seq = sequence();
    if std::env::var_os("PDX_KSANA_DIFF_SHOW").is_some() {
        for (i, (a, b)) in theirs.iter().zip(&ours).enumerate() {
            println!(
                "#{i} {} {}\n  peer: {a:?}\n  pdx:  {b:?}",
                seq[i].0, seq[i].1
            );
        }
    }
    let mut diffs = Vec::new();
    for (i, (a, b)) in theirs.iter().zip(&ours).enumerate() {
        if a != b {
            diffs.push(format!(
                "#{i} {} {} {}\n  peer: {a:?}\n  pdx:  {b:?}",
                seq[i].0, seq[i].1, seq[i].3
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    assert_eq!(theirs.len(), seq.len());
    println!("{} requests, same answers from the peer and pdx", seq.len());
    let _ = std::fs::remove_dir_all(db.parent().unwrap());
}

/// One SQLite file, the two routers in turn: what pdx stored the peer serves (node ids, comm metadata), and
/// what the peer stored pdx serves (its rows, times and JSON as SQLAlchemy writes them).
#[tokio::test(flavor = "current_thread")]
async fn pdx_and_the_peer_share_one_database() {
    let (src, py) = match peer_paths() {
        Ok(p) => p,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let db = db_path("shared");
    let key = format!("{P}__{D}");
    let r = ksana_router(&db, &[]);
    for body in [
        reg(P, "127.0.0.1:19001", "prefill", 0, 1, Some("p0")),
        reg(D, "127.0.0.1:19002", "decode", 0, 1, Some("d0")),
    ] {
        assert_eq!(
            raw_call(
                r.addr,
                "POST",
                "/RegisterNode",
                Some("application/json"),
                body.as_bytes()
            )
            .await
            .0,
            201
        );
    }
    for id in ["p0", "d0"] {
        beat(r.addr, id).await;
    }
    let (s, _) = post(
        r.addr,
        "/RegisterCommId",
        &json!({"node_id": "p0", "comm_key": key, "comm_id": "from-pdx"}),
    )
    .await;
    assert_eq!(s, 200);
    let ours = beat(r.addr, "d0").await;
    assert!(r.shutdown(Duration::from_secs(1)));

    let peer = start_peer(&src, &py, Some(&db)).await;
    let theirs = beat(peer.addr, "d0").await;
    assert_eq!(theirs["comm_group_to_id"], ours["comm_group_to_id"]);
    assert_eq!(
        theirs["comm_group_to_address"],
        ours["comm_group_to_address"]
    );
    assert_eq!(theirs["group_ready"], true);
    let (s, _) = post(
        peer.addr,
        "/RegisterCommId",
        &json!({"node_id": "p0", "comm_key": key, "comm_id": "from-peer"}),
    )
    .await;
    assert_eq!(s, 200);
    beat(peer.addr, "p0").await;
    drop(peer);

    let r = ksana_router(&db, &[]);
    ready(&r, 1).await;
    let v = beat(r.addr, "d0").await;
    assert_eq!(v["comm_group_to_id"][&key], "from-peer");
    let _ = std::fs::remove_dir_all(db.parent().unwrap());
}

// ---------------------------------------------------------------------------------------------------------
// Fake KsanaLLM nodes.

/// What a fake node does with its next requests.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Behave {
    /// Answers as KsanaLLM: a prefill one token, a decode two (after 50 ms, its KV's way).
    Ok,
    /// Answers this status with an error body.
    Status(u16),
    /// Sends a streamed head, then closes the connection after 100 ms without a byte more (a node killed).
    DieAfterHead,
    /// As `Ok`, but the decode's first token comes after 3 s (a decode waiting for KV that does not come).
    Slow,
}

#[derive(Clone, Debug)]
struct Seen {
    path: String,
    group_key: Option<String>,
    request_id: Option<String>,
    body: Value,
}

struct Node {
    addr: SocketAddr,
    role: &'static str,
    seen: Arc<Mutex<Vec<Seen>>>,
    behave: Arc<Mutex<Behave>>,
}

impl Node {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    fn set(&self, b: Behave) {
        *self.behave.lock().unwrap() = b;
    }
    fn inference_addr(&self) -> String {
        self.addr.to_string()
    }
}

async fn read_req(
    s: &mut tokio::net::TcpStream,
) -> Option<(String, Vec<(String, String)>, Vec<u8>)> {
    let mut buf = Vec::new();
    loop {
        let mut tmp = [0u8; 4096];
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = req.parse(&buf) {
            let hs: Vec<(String, String)> = req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let path = req.path?.to_string();
            let len: usize = hs
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < head + len {
                let n = s.read(&mut tmp).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            return Some((path, hs, buf[head..head + len].to_vec()));
        }
    }
}

async fn chunk(s: &mut tokio::net::TcpStream, data: &[u8]) -> std::io::Result<()> {
    s.write_all(format!("{:x}\r\n", data.len()).as_bytes())
        .await?;
    s.write_all(data).await?;
    s.write_all(b"\r\n").await?;
    s.flush().await
}

async fn fake_node(role: &'static str) -> Node {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let behave = Arc::new(Mutex::new(Behave::Ok));
    let (seen2, behave2) = (seen.clone(), behave.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let (seen, behave) = (seen2.clone(), behave2.clone());
            tokio::spawn(async move {
                while let Some((path, hs, body)) = read_req(&mut s).await {
                    let h = |n: &str| hs.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
                    if path == "/health" {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                            .await;
                        continue;
                    }
                    if path.starts_with("/v1/models") {
                        let m = r#"{"object":"list","data":[]}"#;
                        let _ = s
                            .write_all(
                                format!(
                                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{m}",
                                    m.len()
                                )
                                .as_bytes(),
                            )
                            .await;
                        continue;
                    }
                    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    seen.lock().unwrap().push(Seen {
                        path: path.clone(),
                        group_key: h("kv-comm-group-key"),
                        request_id: h("kv-comm-request-id"),
                        body: body.clone(),
                    });
                    let b = *behave.lock().unwrap();
                    let stream = body["stream"] == true;
                    let generate = path == "/generate";
                    match b {
                        Behave::Status(st) => {
                            let e =
                                r#"{"error":{"message":"fake","type":"X","param":null,"code":1}}"#;
                            let _ = s
                                .write_all(
                                    format!(
                                        "HTTP/1.1 {st} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{e}",
                                        e.len()
                                    )
                                    .as_bytes(),
                                )
                                .await;
                            continue;
                        }
                        Behave::DieAfterHead => {
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                                .await;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            return;
                        }
                        Behave::Ok | Behave::Slow => {}
                    }
                    let tokens: Vec<String> = if role == "prefill" {
                        vec!["p0".into()]
                    } else {
                        vec!["d1".into(), "d2".into()]
                    };
                    if !stream {
                        let v = json!({"who": role, "texts": tokens, "path": path});
                        let t = v.to_string();
                        if role == "decode" {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        let _ = s
                            .write_all(
                                format!(
                                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{t}",
                                    t.len()
                                )
                                .as_bytes(),
                            )
                            .await;
                        continue;
                    }
                    let ctype = if generate {
                        "application/octet-stream"
                    } else {
                        "text/event-stream"
                    };
                    if s
                        .write_all(
                            format!("HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\ntransfer-encoding: chunked\r\n\r\n")
                                .as_bytes(),
                        )
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if role == "decode" {
                        // Slow: far longer than the test's bound on "at once", so a loaded machine cannot blur
                        // the two.
                        let wait = if b == Behave::Slow { 30_000 } else { 50 };
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                    }
                    for t in &tokens {
                        let part = if generate {
                            format!("{{\"texts\":[\"{t}\"]}}\0")
                        } else {
                            format!("data: {{\"who\":\"{role}\",\"t\":\"{t}\"}}\n\n")
                        };
                        if chunk(&mut s, part.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    if !generate {
                        let _ = chunk(&mut s, b"data: [DONE]\n\n").await;
                    }
                    let _ = s.write_all(b"0\r\n\r\n").await;
                }
            });
        }
    });
    Node {
        addr,
        role,
        seen,
        behave,
    }
}

/// Registers `n` (rank 0, one device) at `router`, heartbeats once; returns its node id.
async fn join(router: SocketAddr, n: &Node, coord_port: u16) -> String {
    let (s, v) = post(
        router,
        "/RegisterNode",
        &json!({"inference_addr": n.inference_addr(), "coordinator_addr": format!("127.0.0.1:{coord_port}"),
                "group_role": n.role, "node_rank": 0, "world_size": 1,
                "devices": [{"device_id": 0, "device_ip": "127.0.0.1"}]}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let id = v["node_id"].as_str().unwrap().to_string();
    beat(router, &id).await;
    id
}

async fn beat(router: SocketAddr, id: &str) -> Value {
    let (s, v) = post(router, "/Heartbeat", &json!({ "node_id": id })).await;
    assert_eq!(s, 200, "{v}");
    v
}

/// The rank-0 prefill `p` registers a comm id for each comm group its heartbeat lists.
async fn pair_up(router: SocketAddr, p: &str) {
    let v = beat(router, p).await;
    for key in v["comm_group_to_id"].as_object().unwrap().keys() {
        let (s, r) = post(
            router,
            "/RegisterCommId",
            &json!({"node_id": p, "comm_key": key, "comm_id": format!("comm-{key}")}),
        )
        .await;
        assert_eq!(s, 200, "{r}");
    }
}

async fn ready(r: &pdx_router::RouterServer, pairs: usize) {
    let k = r.shared.ksana.clone().unwrap();
    assert!(
        eventually(|| k
            .pairs
            .load()
            .decodes
            .values()
            .map(|d| d.len())
            .sum::<usize>()
            == pairs)
        .await,
        "{pairs} ready pairs"
    );
}

fn gen_body(stream: bool) -> String {
    json!({"prompt": "hello", "sampling_config": {"max_new_tokens": 3}, "stream": stream})
        .to_string()
}

#[tokio::test(flavor = "current_thread")]
async fn requests_go_to_both_nodes_at_once_and_streams_are_merged() {
    let (p, d) = (fake_node("prefill").await, fake_node("decode").await);
    let db = db_path("flow");
    let r = ksana_router(&db, &[]);
    let (s, v) = post(r.addr, "/generate", &json!({"prompt": "x"})).await;
    assert_eq!(s, 503, "no pair yet: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no ready KsanaLLM"),
        "{v}"
    );
    let pid = join(r.addr, &p, 19101).await;
    join(r.addr, &d, 19102).await;
    pair_up(r.addr, &pid).await;
    ready(&r, 1).await;
    let key = format!("{}__{}", p.addr, d.addr);

    // /generate streamed: the prefill's first token, the decode's tokens, [DONE]\0.
    let (s, ct, b) = raw_call(
        r.addr,
        "POST",
        "/generate",
        Some("application/json"),
        gen_body(true).as_bytes(),
    )
    .await;
    assert_eq!((s, ct.as_str()), (200, "application/octet-stream"));
    assert_eq!(
        String::from_utf8_lossy(&b),
        "{\"texts\":[\"p0\"]}\0{\"texts\":[\"d1\"]}\0{\"texts\":[\"d2\"]}\0[DONE]\0"
    );
    let (ps, ds) = (p.seen(), d.seen());
    assert_eq!((ps.len(), ds.len()), (1, 1));
    for x in [&ps[0], &ds[0]] {
        assert_eq!(x.path, "/generate");
        assert_eq!(x.group_key.as_deref(), Some(key.as_str()));
        assert_eq!(
            x.body,
            serde_json::from_str::<Value>(&gen_body(true)).unwrap(),
            "the body as sent"
        );
    }
    let id: u64 = ps[0].request_id.as_deref().unwrap().parse().unwrap();
    assert!(id > 0 && id < 1 << 31);
    assert_eq!(ps[0].request_id, ds[0].request_id);

    // Not streamed: the decode's body.
    let (s, v) = post(
        r.addr,
        "/generate",
        &json!({"prompt": "x", "stream": false}),
    )
    .await;
    assert_eq!((s, &v["who"]), (200, &json!("decode")));
    assert_ne!(
        p.seen()[1].request_id,
        ps[0].request_id,
        "a new request id per request"
    );

    // OpenAI streams: the decode's SSE as it is (no `[DONE]\0` after it).
    let mut chat = chat(4, true);
    chat["model"] = json!("anything");
    let (s, b) = call(r.addr, "POST", "/v1/chat/completions", &chat.to_string()).await;
    assert_eq!(s, 200);
    assert_eq!(
        String::from_utf8_lossy(&b),
        "data: {\"who\":\"decode\",\"t\":\"d1\"}\n\ndata: {\"who\":\"decode\",\"t\":\"d2\"}\n\ndata: [DONE]\n\n"
    );
    assert_eq!(d.seen().last().unwrap().path, "/v1/chat/completions");
    assert_eq!(
        p.seen().last().unwrap().group_key.as_deref(),
        Some(key.as_str())
    );
    // Any other /v1 and /v2 path is proxied the same way; a body that is not JSON is a 400.
    let (s, v) = post(r.addr, "/v2/models/m/generate", &json!({"stream": false})).await;
    assert_eq!((s, &v["path"]), (200, &json!("/v2/models/m/generate")));
    let (s, _) = call(r.addr, "POST", "/v1/embeddings", "not json").await;
    assert_eq!(s, 400);
    let (s, _) = call(r.addr, "GET", "/v1/models", "").await;
    assert_eq!(s, 200, "pdx's own routes stay");
    let m = router_metrics(&r);
    assert!(
        sample(&m, "pdx_requests_total", "status=\"200\"") >= 4.0,
        "{m}"
    );
    assert!(
        sample(&m, "pdx_pool_choices_total", "pool=\"ksana-prefill\"") >= 4.0,
        "{m}"
    );
    let _ = std::fs::remove_dir_all(db.parent().unwrap());
}

#[tokio::test(flavor = "current_thread")]
async fn a_restarted_router_keeps_nodes_and_comm_ids_from_its_sqlite_file() {
    let (p, d) = (fake_node("prefill").await, fake_node("decode").await);
    let db = db_path("restart");
    let r = ksana_router(&db, &[]);
    let pid = join(r.addr, &p, 19201).await;
    let did = join(r.addr, &d, 19202).await;
    pair_up(r.addr, &pid).await;
    ready(&r, 1).await;
    assert!(r.shutdown(Duration::from_secs(1)));
    // A new router on the same file: no registration again, requests go to the pair at once.
    let r = ksana_router(&db, &[]);
    ready(&r, 1).await;
    let (s, ct, b) = raw_call(
        r.addr,
        "POST",
        "/generate",
        Some("application/json"),
        gen_body(true).as_bytes(),
    )
    .await;
    assert_eq!((s, ct.as_str()), (200, "application/octet-stream"), "{b:?}");
    assert!(b.ends_with(b"[DONE]\0"));
    let v = beat(r.addr, &did).await;
    let key = format!("{}__{}", p.addr, d.addr);
    assert_eq!(v["comm_group_to_id"][&key], format!("comm-{key}"));
    assert_eq!(beat(r.addr, &pid).await["group_ready"], true);
    let _ = std::fs::remove_dir_all(db.parent().unwrap());
}

#[tokio::test(flavor = "current_thread")]
async fn failures_retry_on_another_pair_and_a_dead_prefill_ends_its_stream_at_once() {
    let (p, d1, d2) = (
        fake_node("prefill").await,
        fake_node("decode").await,
        fake_node("decode").await,
    );
    let db = db_path("retry");
    let r = ksana_router(&db, &["--health-check-interval-secs", "0"]);
    let pid = join(r.addr, &p, 19301).await;
    join(r.addr, &d1, 19302).await;
    join(r.addr, &d2, 19303).await;
    pair_up(r.addr, &pid).await;
    ready(&r, 2).await;
    // One decode answers 503: every request still succeeds, on the other.
    d1.set(Behave::Status(503));
    for _ in 0..4 {
        let (s, v) = post(r.addr, "/generate", &json!({"prompt": "x"})).await;
        assert_eq!((s, &v["who"]), (200, &json!("decode")), "{v}");
    }
    assert!(sample(&router_metrics(&r), "pdx_retries_total", "phase=\"decode\"") >= 1.0);
    // A 4xx is the client's answer.
    d1.set(Behave::Status(400));
    d2.set(Behave::Status(400));
    let (s, _) = post(r.addr, "/generate", &json!({"prompt": "x"})).await;
    assert_eq!(s, 400);
    d1.set(Behave::Ok);
    d2.set(Behave::Ok);
    // The prefill node dies after its head, while the decode waits for the KV: the stream ends with an error
    // at once, not when the decode gives up.
    p.set(Behave::DieAfterHead);
    d1.set(Behave::Slow);
    d2.set(Behave::Slow);
    let t = std::time::Instant::now();
    let (s, _, b) = tokio::time::timeout(
        Duration::from_secs(10),
        raw_call(
            r.addr,
            "POST",
            "/generate",
            Some("application/json"),
            gen_body(true).as_bytes(),
        ),
    )
    .await
    .expect("no hang");
    assert_eq!(s, 200);
    let text = String::from_utf8_lossy(&b);
    assert!(
        text.contains("the prefill node failed") && !text.contains("[DONE]"),
        "{text}"
    );
    // Before the slow decode would have answered (30 s): the router ended the stream, not the decode.
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // On an OpenAI stream: an SSE error event.
    let (s, b) = call(
        r.addr,
        "POST",
        "/v1/chat/completions",
        &chat(4, true).to_string(),
    )
    .await;
    assert_eq!(s, 200);
    let ev = events(&b);
    assert!(
        ev.last().unwrap().contains("the prefill node failed"),
        "{ev:?}"
    );
    let _ = std::fs::remove_dir_all(db.parent().unwrap());
}

#[tokio::test(flavor = "current_thread")]
async fn heartbeat_expiry_moves_requests_to_the_pairs_left() {
    let (p1, p2, d) = (
        fake_node("prefill").await,
        fake_node("prefill").await,
        fake_node("decode").await,
    );
    let db = db_path("expiry");
    let r = ksana_router(&db, &["--ksana-heartbeat-timeout-secs", "1"]);
    let id1 = join(r.addr, &p1, 19401).await;
    let id2 = join(r.addr, &p2, 19402).await;
    let idd = join(r.addr, &d, 19403).await;
    pair_up(r.addr, &id1).await;
    pair_up(r.addr, &id2).await;
    ready(&r, 2).await;
    // Only p2 and the decode keep heartbeating.
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, addr) = (stop.clone(), r.addr);
    let beats = tokio::spawn(async move {
        while !stop2.load(Ordering::Relaxed) {
            for id in [&id2, &idd] {
                let _ = post(addr, "/Heartbeat", &json!({ "node_id": id })).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    ready(&r, 1).await;
    let before = p1.seen().len();
    for _ in 0..6 {
        let (s, _) = post(r.addr, "/generate", &json!({"prompt": "x"})).await;
        assert_eq!(s, 200);
    }
    assert_eq!(
        p1.seen().len(),
        before,
        "the expired prefill node gets nothing"
    );
    assert!(p2.seen().len() >= 6);
    // It comes back with a heartbeat: its stored comm id serves again.
    beat(r.addr, &id1).await;
    ready(&r, 2).await;
    stop.store(true, Ordering::Relaxed);
    let _ = beats.await;
    let _ = std::fs::remove_dir_all(db.parent().unwrap());
}

/// With `--worker-allow-cidr`, nodes outside it register (the node API answers as the peer) but get no
/// user traffic.
#[tokio::test(flavor = "current_thread")]
async fn nodes_outside_the_allow_list_take_no_requests() {
    let (p, d) = (fake_node("prefill").await, fake_node("decode").await);
    let db = db_path("allow");
    let r = ksana_router(&db, &["--worker-allow-cidr", "10.0.0.0/8"]);
    let pid = join(r.addr, &p, 19501).await;
    join(r.addr, &d, 19502).await;
    pair_up(r.addr, &pid).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(r
        .shared
        .ksana
        .as_ref()
        .unwrap()
        .pairs
        .load()
        .decodes
        .is_empty());
    let (s, _) = post(r.addr, "/generate", &json!({"prompt": "x"})).await;
    assert_eq!(s, 503);
    assert!(p.seen().is_empty() && d.seen().is_empty());
    let _ = std::fs::remove_dir_all(db.parent().unwrap());
}
