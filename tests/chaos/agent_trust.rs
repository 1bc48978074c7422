//! KV agent trust (issue 13), end to end on real `pdx mock` processes:
//! - a forged metadata reply (a fake prefill's side channel naming another process's pid and addresses) makes
//!   the decode read nothing of that process: it fails the request, and its KV memory, which anyone can read
//!   back over its agent port, holds no byte of the other process;
//! - with a shared secret, forged READ/WRITE/metadata frames are refused and the prefill's KV stays intact, an
//!   engine without the secret gets a clear error, engines with it work;
//! - idle agent connections cost the engine no threads;
//! - a decode unmaps a prefill's KV memory as soon as that prefill is gone.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pdx_transfer::metadata::{AgentMetadata, RegionMetadata};
use pdx_transfer::wire::{encode_frame, Ctrl, FrameKind, Header, HEADER_LEN};
use pdx_transfer::{
    Agent, AgentConfig, MemoryKind, TransportKind, XferDescList, XferOp, XferOptions, XferStatus,
};

use crate::support::*;

/// Bytes of this test process that no agent registered.
const CANARY: &[u8] = b"chaos-canary/not-registered-by-any-agent/51d2";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn hello() -> Vec<u8> {
    encode_frame(
        FrameKind::Hello,
        0,
        &Ctrl::Hello {
            name: "intruder".into(),
            instance_id: 1,
        },
    )
}

/// Reads one frame's header and control body.
fn read_frame(s: &mut TcpStream) -> Option<(Header, Ctrl)> {
    let mut hdr = [0u8; HEADER_LEN];
    s.read_exact(&mut hdr).ok()?;
    let h = Header::decode(&hdr).ok()?;
    let mut body = vec![0u8; h.ctrl_len as usize];
    s.read_exact(&mut body).ok()?;
    Some((h, Ctrl::decode(&body).ok()?))
}

/// Reads a mock's whole KV region over its agent port (forced `tcp`), as any peer without a secret could.
fn read_kv_over_tcp(agent_addr: &str) -> Vec<u8> {
    let reader = Agent::new(AgentConfig::new(format!(
        "chaos-kv-reader-{}",
        std::process::id()
    )))
    .unwrap();
    let name = reader.fetch_remote(agent_addr).unwrap();
    let md =
        AgentMetadata::decode(&pdx_transfer::fetch_metadata(agent_addr, GUARD).unwrap()).unwrap();
    let r = &md.regions[0];
    let local = reader.allocate(r.len as usize).unwrap();
    let req = reader
        .create_xfer_from_descs(
            XferOp::Read,
            &XferDescList::host_from([(local.addr(), r.len)]),
            &name,
            &XferDescList::host_from([(r.addr, r.len)]),
            XferOptions {
                transport: Some(TransportKind::Tcp),
                ..Default::default()
            },
        )
        .unwrap();
    if req.post().unwrap() == XferStatus::InProgress {
        req.wait(Some(GUARD)).unwrap();
    }
    let mut out = vec![0u8; r.len as usize];
    local.read(0, &mut out).unwrap();
    out
}

/// Finding 3: a fake prefill whose metadata names this test process (pid, addresses of memory no agent
/// registered) as its own, on the decode's host. The decode must not read that memory: the request fails, and
/// the decode's KV, read back over its agent port, holds none of it.
#[test]
fn forged_prefill_metadata_cannot_disclose_another_process() {
    let decode = KvMock::start("decode", &["--engine-id", "chaos-trust-decode"]);
    let dmd =
        AgentMetadata::decode(&pdx_transfer::fetch_metadata(&decode.agent_addr(), GUARD).unwrap())
            .unwrap();
    let block_bytes = (dmd.regions[0].len / 64) as usize;
    let prompt = "tell me what the canary says";
    // How many KV blocks the prompt fills: the decode says so when the block list has the wrong length.
    let probe = |n: usize, port: u16| {
        complete(
            decode.http,
            prompt,
            2,
            serde_json::json!({"do_remote_prefill": true, "do_remote_decode": false,
                "remote_engine_id": "forged-prefill", "remote_block_ids": (0..n).collect::<Vec<_>>(),
                "remote_host": "127.0.0.1", "remote_port": port, "remote_request_id": "forged"}),
        )
    };
    let (st, v) = probe(1, 9);
    let blocks = if st == 400 {
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        msg.split("fills ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{v}"))
    } else {
        1
    };
    let canary: Vec<u8> = CANARY
        .iter()
        .copied()
        .cycle()
        .take(blocks * block_bytes)
        .collect();
    let (addr, stop) = forger(AgentMetadata {
        name: "forged-prefill".into(),
        instance_id: 0xf0f0_1234_5678,
        host_id: dmd.host_id.clone(), // "the decode's host", by its own account
        pid: std::process::id(),
        listen_addr: None, // the forger's own address
        transports: vec![TransportKind::Shm, TransportKind::Cma, TransportKind::Tcp],
        regions: vec![RegionMetadata {
            id: 1,
            kind: MemoryKind::Host,
            addr: canary.as_ptr() as u64,
            len: canary.len() as u64,
            memfd: None,
        }],
    });
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let (st, v) = probe(blocks, port);
    stop.store(true, Ordering::Release);
    assert_ne!(st, 200, "the decode took a forged prefill's KV: {v}");
    let kv = read_kv_over_tcp(&decode.agent_addr());
    assert!(
        !contains(&kv, CANARY),
        "the decode's KV holds memory of another process (answer was {st} {v})"
    );
    std::hint::black_box(&canary);
}

/// A fake prefill side channel: answers `GetMetadata` with `md` (its listener set to the forger's own address)
/// and refuses READ/WRITE requests, until stopped.
fn forger(mut md: AgentMetadata) -> (String, Arc<AtomicBool>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    md.listen_addr = Some(addr.clone());
    let forged = md.encode().unwrap();
    l.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::spawn(move || {
        while !stopped.load(Ordering::Acquire) {
            let Ok((mut s, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let forged = forged.clone();
            std::thread::spawn(move || {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(GUARD));
                while let Some((h, _)) = read_frame(&mut s) {
                    let reply = match h.kind {
                        FrameKind::GetMetadata => {
                            encode_frame(FrameKind::Metadata, 0, &Ctrl::Metadata(forged.clone()))
                        }
                        FrameKind::ReadRequest | FrameKind::WriteRequest => encode_frame(
                            FrameKind::Error,
                            h.req_id,
                            &Ctrl::Error("the forger has no KV".into()),
                        ),
                        _ => continue,
                    };
                    if s.write_all(&reply).is_err() || h.kind == FrameKind::WriteRequest {
                        return;
                    }
                }
            });
        }
    });
    (addr, stop)
}

/// Finding 5: prefill and decode share a secret (`--agent-secret-file`). Frames from a client without it —
/// a WRITE over the prefill's KV, a READ of it, a metadata request — are refused with a clear error and the KV
/// stays intact; a decode without the secret fails the request with a clear error; the decode with it reads and
/// verifies every block.
#[test]
fn kv_agents_with_a_secret_refuse_forged_frames() {
    let dir = TempDir::new("chaos-trust");
    let secret_file = dir.0.join("agent-secret");
    let secret = b"chaos-trust-secret-0123456789abcdef";
    std::fs::write(&secret_file, [&secret[..], b"\n"].concat()).unwrap();
    let file = secret_file.to_str().unwrap();
    let p = KvMock::start(
        "prefill",
        &[
            "--engine-id",
            "chaos-secret-prefill",
            "--agent-secret-file",
            file,
        ],
    );
    let d = KvMock::start(
        "decode",
        &[
            "--engine-id",
            "chaos-secret-decode",
            "--agent-secret-file",
            file,
        ],
    );
    let outsider = KvMock::start("decode", &["--engine-id", "chaos-secret-outsider"]);
    let prompt = "a prompt whose KV only the secret holders may touch";
    let kv = prefill(&p, prompt);
    // Where the KV is (an attacker would have learnt it before the secret was set).
    let s = pdx_transfer::AgentSecret::new(secret.to_vec()).unwrap();
    let md = AgentMetadata::decode(
        &pdx_transfer::fetch_metadata_with(&p.agent_addr(), GUARD, Some(&s)).unwrap(),
    )
    .unwrap();
    let region = &md.regions[0];
    let segs = Ctrl::Segments {
        segs: vec![(region.addr, region.len)],
        notif: Some(
            kv["remote_request_id"]
                .as_str()
                .unwrap()
                .as_bytes()
                .to_vec(),
        ),
    };
    let mut overwrite = encode_frame(FrameKind::WriteRequest, 1, &segs);
    overwrite.extend(std::iter::repeat_n(0u8, region.len as usize));
    for frames in [
        [hello(), overwrite].concat(),
        [hello(), encode_frame(FrameKind::ReadRequest, 2, &segs)].concat(),
        encode_frame(FrameKind::GetMetadata, 0, &Ctrl::GetMetadata),
    ] {
        let mut c = TcpStream::connect(p.agent_addr()).unwrap();
        c.set_read_timeout(Some(GUARD)).unwrap();
        let _ = c.write_all(&frames);
        let reply = read_frame(&mut c);
        assert!(
            matches!(&reply, Some((h, Ctrl::Error(m))) if h.kind == FrameKind::AuthError && m.contains("authentication required")),
            "{reply:?}"
        );
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        assert!(rest.is_empty(), "data after the refusal");
    }
    // Without the secret, a decode cannot read the KV, and says why.
    let (st, v) = complete(outsider.http, prompt, 4, kv.clone());
    assert_eq!(st, 502, "{v}");
    assert!(v.to_string().contains("authentication"), "{v}");
    // With it, the decode reads every block and verifies it: the forged WRITE changed nothing.
    let (st, v) = complete(d.http, prompt, 4, kv);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);
}

/// Finding 5: idle connections to an engine's KV agent wait in epoll, not on threads: 400 of them (each past its
/// handshake) leave the engine's thread count nearly unchanged, and stay open.
#[test]
fn idle_agent_connections_cost_no_threads() {
    let p = KvMock::start("prefill", &["--engine-id", "chaos-idle-prefill"]);
    std::thread::sleep(Duration::from_millis(300));
    let before = status_of(p.pid(), "Threads");
    let mut conns: Vec<TcpStream> = (0..400)
        .map(|_| {
            let mut s = TcpStream::connect(p.agent_addr()).unwrap();
            s.write_all(&hello()).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let during = status_of(p.pid(), "Threads");
    // Handlers that served the burst of Hellos may linger 10 s; a thread per connection would be 400 more.
    assert!(
        during <= before + 16,
        "{before} threads before, {during} with 400 idle agent connections"
    );
    let open = conns
        .iter_mut()
        .map(|s| {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 16];
            matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .filter(|open| *open)
        .count();
    assert_eq!(open, 400);
    // Still serving its side channel.
    assert!(pdx_transfer::fetch_metadata(&p.agent_addr(), GUARD).is_ok());
}

/// Finding 6: a decode maps a same-host prefill's KV memory to read it, and unmaps it as soon as that prefill
/// is gone, without waiting for a transfer to fail.
#[test]
fn decode_unmaps_a_dead_prefill_at_once() {
    let p = KvMock::start("prefill", &["--engine-id", "chaos-unmap-prefill"]);
    let d = KvMock::start("decode", &["--engine-id", "chaos-unmap-decode"]);
    let prompt = "blocks that move by shared memory";
    let kv = prefill(&p, prompt);
    let (st, v) = complete(d.http, prompt, 2, kv);
    assert_eq!(st, 200, "{v}");
    let mapped = || mappings_of(d.pid(), "chaos-unmap-prefill");
    assert!(
        mapped() >= 1,
        "the decode read the prefill's KV without mapping it"
    );
    drop(p);
    assert!(
        wait_until(Duration::from_secs(10), || mapped() == 0),
        "the decode still maps the dead prefill's KV memory"
    );
}

/// Decode requests that reach a new prefill at the same moment (the first requests of several clients) each load
/// its metadata; one such load used to vouch for the prefill over a link of its own and shut the other's down
/// under its KV read (`pdx demo` saw KV transfer errors in half its runs). Every read must succeed.
#[test]
fn concurrent_first_reads_from_a_new_prefill_all_succeed() {
    let p = KvMock::start("prefill", &["--engine-id", "chaos-first-reads-prefill"]);
    let d = KvMock::start("decode", &["--engine-id", "chaos-first-reads-decode"]);
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("request {i} of a burst that reaches a new prefill"))
        .collect();
    let kvs: Vec<serde_json::Value> = prompts.iter().map(|q| prefill(&p, q)).collect();
    let start = Arc::new(std::sync::Barrier::new(prompts.len()));
    let decode = d.http;
    let readers: Vec<_> = prompts
        .into_iter()
        .zip(kvs)
        .map(|(q, kv)| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                complete(decode, &q, 2, kv)
            })
        })
        .collect();
    for r in readers {
        let (st, v) = r.join().unwrap();
        assert_eq!(st, 200, "{v}");
    }
    assert_eq!(
        metric(d.http, "pdx:kv_transfer_errors_total"),
        Some(0.0),
        "no KV read failed"
    );
}
