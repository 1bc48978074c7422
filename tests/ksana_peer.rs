//! `pdx mock` nodes behind KsanaLLM's own router (its Python `simple_router`, run from the copy that
//! `/work/shared/peers/install.sh` documents: `$PEERS_DIR/KsanaLLM/src/ksana_llm/python/simple_router` with the
//! venv `$PEERS_DIR/venv-ksana`; `PEERS_DIR` defaults to `~/.cache/pdx-peers`, `KSANA_ROUTER_DIR` names another
//! source folder). A prefill and a decode register, heartbeat and set up their comm group through it; streamed
//! and non-streamed `/generate` and `/v1/chat/completions` requests through it must answer what an aggregated
//! mock answers directly, with the prompt's KV read by the decode and verified byte for byte (the decode's
//! `pdx:kv_blocks_received_total`), and nothing left held on the prefill. Without the peer's source or venv
//! (CI) that test prints "skipped: why" and passes. The same nodes and requests behind `pdx serve
//! --orchestration ksana` must give the same answers (that test always runs).

#[path = "support/mod.rs"]
mod support;

use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use support::*;

/// The peer's interpreter and source folder, or why they are not there.
fn peer_paths() -> Result<(PathBuf, PathBuf), String> {
    let peers = std::env::var_os("PEERS_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/pdx-peers")))
        .ok_or("no PEERS_DIR and no HOME")?;
    let src = std::env::var_os("KSANA_ROUTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| peers.join("KsanaLLM/src/ksana_llm/python/simple_router"));
    let python = peers.join("venv-ksana/bin/python");
    if !src.join("main.py").is_file() {
        return Err(format!(
            "no KsanaLLM simple_router source at {} (see /work/shared/peers/README.md)",
            src.display()
        ));
    }
    if !python.is_file() {
        return Err(format!(
            "no venv at {} (/work/shared/peers/install.sh makes it)",
            python.display()
        ));
    }
    Ok((python, src))
}

/// The peer router, killed and reaped when dropped (also when the test fails).
struct Peer {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type().unwrap().is_dir() {
            if e.file_name() != "__pycache__" {
                copy_dir(&src, &dst);
            }
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// Starts the peer on a free loopback port with a fresh SQLite file, from a copy of its source (it imports
/// its modules by bare name), as `/work/shared/peers/ksana.sh` does; waits until it answers.
fn start_peer(python: &std::path::Path, src: &std::path::Path) -> Peer {
    let dir = TempDir::new("ksana-peer");
    let app = dir.0.join("app");
    copy_dir(src, &app);
    let cfg = dir.0.join("config.ini");
    std::fs::write(
        &cfg,
        format!(
            "[general]\nlog_level = WARNING\nlog_dir = {d}/log\ncluster_name = default_cluster\n\
             heartbeat_timeout_seconds = 60\n[name_service]\nname_service_provider = name_service.auto_provider\n\
             [database]\nstorage_mode = sqlite\nsqlite_path = {d}/router.db\n",
            d = dir.0.display()
        ),
    )
    .unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.0.join("stdout.log")).unwrap();
    let child = Command::new(python)
        .args([
            "main.py",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .args(["--workers", "1", "--config"])
        .arg(&cfg)
        .current_dir(&app)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("the peer starts");
    let mut peer = Peer {
        child,
        port,
        _dir: dir,
    };
    let up = wait_until(GUARD, || {
        if let Ok(Some(st)) = peer.child.try_wait() {
            let out = std::fs::read_to_string(peer._dir.0.join("stdout.log")).unwrap_or_default();
            panic!("the peer exited ({st}):\n{out}");
        }
        get_status(port, "/docs") == Some(200)
    });
    assert!(up, "the peer did not answer within {GUARD:?}");
    peer
}

/// The `\0`-delimited parts of a `/generate` stream.
fn parts(body: &str) -> Vec<&str> {
    body.split('\0').filter(|p| !p.is_empty()).collect()
}

/// The text of an OpenAI SSE chat stream (lines `data: {...}`; anything after the events is ignored).
fn sse_text(body: &str) -> String {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

fn post(port: u16, path: &str, body: &Value) -> Resp {
    http(port, "POST", path, &[], &body.to_string(), GUARD).expect("an answer")
}

/// One request of each kind through the router on `router`: each answer must be the aggregated engine's.
/// Returns the prompt blocks the decode had to read for them.
fn check_router(router: u16, agg: u16, tag: u64) -> f64 {
    // /generate, not streamed: the decode's body.
    let gen = json!({"prompt": synthetic(100, tag), "sampling_config": {"max_new_tokens": 9, "temperature": 0.0,
        "topk": 1, "topp": 0.0, "stop_token_ids": []}, "stream": false});
    let want = post(agg, "/generate", &gen).json();
    let got = post(router, "/generate", &gen);
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.json(), want);
    assert_eq!(want["output_token_ids"][0].as_array().unwrap().len(), 9);

    // /generate, streamed: the prefill's first chunk, then the decode's (each the whole output so far), then
    // `[DONE]\0`.
    let mut sgen = gen.clone();
    sgen["stream"] = json!(true);
    sgen["prompt"] = json!(synthetic(40, tag + 1));
    let mut agen = sgen.clone();
    agen["stream"] = json!(false);
    let want = post(agg, "/generate", &agen).json();
    let got = post(router, "/generate", &sgen);
    assert_eq!(got.status, 200, "{}", got.body);
    assert!(got.body.ends_with("[DONE]\0"), "{:?}", got.body);
    let ps = parts(&got.body);
    assert_eq!(ps.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = ps[..ps.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap_or_else(|e| panic!("{e}: {p:?}")))
        .collect();
    assert!(!chunks.is_empty());
    assert_eq!(chunks.last().unwrap(), &want, "{:?}", got.body);
    assert_eq!(
        chunks[0]["output_token_ids"][0][0],
        want["output_token_ids"][0][0]
    );

    // OpenAI chat, not streamed and streamed: the decode's answer.
    let chat = json!({"model": "mock", "messages": [{"role": "user", "content": synthetic(60, tag + 2)}],
        "max_tokens": 6});
    let want = post(agg, "/v1/chat/completions", &chat).json();
    let got = post(router, "/v1/chat/completions", &chat);
    assert_eq!(got.status, 200, "{}", got.body);
    let v = got.json();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        want["choices"][0]["message"]["content"]
    );
    assert_eq!(v["usage"]["completion_tokens"], 6);
    let mut schat = chat.clone();
    schat["stream"] = json!(true);
    schat["messages"][0]["content"] = json!(synthetic(61, tag + 3));
    let mut achat = schat.clone();
    achat["stream"] = json!(false);
    let want = post(agg, "/v1/chat/completions", &achat).json();
    let got = post(router, "/v1/chat/completions", &schat);
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(
        json!(sse_text(&got.body)),
        want["choices"][0]["message"]["content"],
        "{:?}",
        got.body
    );
    // 100, 40, 60 and 61 prompt tokens (the chat template adds 2) in blocks of 16.
    (7 + 3 + 4 + 4) as f64
}

fn synthetic(n: usize, seed: u64) -> String {
    pdx_mock::synthetic_prompt(n, seed)
}

/// A prefill and a decode `pdx mock` registered with the KsanaLLM router at `router` (URL), their comm group
/// usable on both, and an aggregated mock for the expected answers: their ports.
fn nodes(router: &str) -> (Proc, Proc, Proc, [u16; 3]) {
    let node = [
        "--ksana-router",
        router,
        "--ksana-heartbeat-ms",
        "200",
        "--num-blocks",
        "256",
        "--kv-scale-down",
        "64",
        "--kv-listen",
        "127.0.0.1:0",
    ];
    let (pp, dp, ap) = (free_port(), free_port(), free_port());
    let p = mock(pp, &[&["--role", "prefill"][..], &node].concat());
    let d = mock(dp, &[&["--role", "decode"][..], &node].concat());
    let a = mock(ap, &[]);
    let ready = |port| metric(port, "pdx:ksana_comm_groups_ready") == Some(1.0);
    assert!(
        wait_until(GUARD, || ready(pp) && ready(dp)),
        "the comm group did not become ready behind {router}: prefill {:?}, decode {:?}",
        metric(pp, "pdx:ksana_comm_groups_ready"),
        metric(dp, "pdx:ksana_comm_groups_ready")
    );
    (p, d, a, [pp, dp, ap])
}

/// Every request kind through the router on `port`, then the KV accounting of the nodes.
fn serve_and_check(port: u16, [pp, dp, ap]: [u16; 3]) {
    let blocks = check_router(port, ap, 11);
    assert_eq!(metric(dp, "pdx:kv_blocks_received_total"), Some(blocks));
    assert_eq!(metric(pp, "pdx:ksana_kv_handoffs_total"), Some(4.0));
    assert_eq!(metric(dp, "pdx:kv_transfer_errors_total"), Some(0.0));
    assert!(
        wait_until(GUARD, || metric(pp, "pdx:kv_blocks_held") == Some(0.0)),
        "the prefill still holds KV"
    );
}

#[test]
fn mock_nodes_serve_through_the_ksana_simple_router() {
    let (python, src) = match peer_paths() {
        Ok(p) => p,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let peer = start_peer(&python, &src);
    let (_p, _d, _a, ports) = nodes(&url(peer.port));
    serve_and_check(peer.port, ports);
}

/// The same nodes and requests behind `pdx serve --orchestration ksana`: the same answers (each equal to the
/// aggregated engine's, as through the peer).
#[test]
fn mock_nodes_serve_through_pdx_serve_ksana() {
    let dir = TempDir::new("ksana-pdx-router");
    let db = dir.0.join("router.db");
    let rp = free_port();
    let mut r = router(
        rp,
        &[
            "--orchestration",
            "ksana",
            "--ksana-db",
            db.to_str().unwrap(),
        ],
    );
    wait_healthy(&mut r, rp);
    let (_p, _d, _a, ports) = nodes(&url(rp));
    serve_and_check(rp, ports);
}
