//! Faults and trust (issue 13): forged metadata cannot make an agent touch memory its peer did not register, the
//! listener serves nobody without the shared secret when one is set, idle connections cost no threads, a
//! refused WRITE allocates nothing sized by the peer's claim, and a gone peer is unmapped at once.
//!
//! Process-wide measurements (threads, peak RSS, mappings of a peer) are taken of a helper process: this test
//! binary re-executes itself (`helper_process`, run only when `PDX_TRUST_HELPER` is set).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::ffi::OsStringExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pdx_transfer::metadata::{AgentMetadata, RegionMetadata};
use pdx_transfer::wire::{decode_frame, encode_frame, Ctrl, FrameKind, HEADER_LEN};
use pdx_transfer::*;

const REGION: usize = 4 << 20;
const SEED: u64 = 21;
/// Bytes of a helper process that no agent registered.
const CANARY: &[u8] = b"pdx-canary/unregistered-memory/7f3a9c41";

/// The helper: an agent named `PDX_TRUST_HELPER` (secret from `PDX_TRUST_SECRET`) with one memfd region filled
/// with the pattern of `SEED`, plus memory no agent registered: a heap buffer and a memfd holding `CANARY`. It
/// prints `READY <listener> <region addr> <pid> <heap addr> <memfd number>` and exits when stdin closes.
#[test]
#[ignore = "helper process for the trust tests; runs only when PDX_TRUST_HELPER is set"]
fn helper_process() {
    let Some(name) = std::env::var_os("PDX_TRUST_HELPER") else {
        return;
    };
    let mut cfg = AgentConfig::new(name.to_string_lossy());
    if let Some(s) = std::env::var_os("PDX_TRUST_SECRET") {
        cfg.secret = Some(AgentSecret::new(s.into_vec()).unwrap());
    }
    let agent = Agent::new(cfg).unwrap();
    let region = agent.allocate(REGION).unwrap();
    fill_pattern(&region, SEED);
    let heap: Vec<u8> = CANARY.repeat(4096 / CANARY.len() + 1);
    let memfd = Memory::memfd("trust-unregistered", 4096, true).unwrap();
    memfd.write_at(0, &heap[..4096]).unwrap();
    println!(
        "READY {} {} {} {} {}",
        agent.listen_addr().unwrap(),
        region.addr(),
        std::process::id(),
        heap.as_ptr() as u64,
        memfd.memfd_fd().unwrap()
    );
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    std::hint::black_box((&heap, &memfd, &region));
}

struct Helper {
    child: Child,
    addr: String,
    region: u64,
    pid: u32,
    heap: u64,
    memfd: i32,
}

impl Helper {
    fn spawn(name: &str, secret: Option<&[u8]>) -> Helper {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--ignored",
            "--exact",
            "helper_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PDX_TRUST_HELPER", name)
        .env_remove("PDX_TRUST_SECRET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        if let Some(s) = secret {
            cmd.env("PDX_TRUST_SECRET", std::ffi::OsString::from_vec(s.to_vec()));
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines
            .find_map(|l| {
                l.ok()
                    .and_then(|l| l.find("READY ").map(|i| l[i..].to_string()))
            })
            .expect("helper did not start");
        std::thread::spawn(move || lines.for_each(drop));
        let f: Vec<&str> = ready.split_whitespace().collect();
        Helper {
            addr: f[1].to_string(),
            region: f[2].parse().unwrap(),
            pid: f[3].parse().unwrap(),
            heap: f[4].parse().unwrap(),
            memfd: f[5].parse().unwrap(),
            child,
        }
    }

    /// A field of `/proc/<pid>/status`, e.g. `Threads` or `VmHWM` (kB).
    fn status(&self, field: &str) -> u64 {
        status_of(self.pid, field)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_of(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Mappings of agent `name`'s memfds in this process.
fn mappings_of(name: &str) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let tag = format!("memfd:pdx-{name} ");
    maps.lines().filter(|l| l.contains(&tag)).count()
}

/// Waits (at most 10 s: a guard against a hang, not a speed bound) until `f` holds.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

fn read_now(req: &XferRequest) -> Result<()> {
    if req.post()? == XferStatus::InProgress {
        req.wait(Some(Duration::from_secs(10)))?;
    }
    Ok(())
}

fn forced(transport: TransportKind) -> XferOptions {
    XferOptions {
        transport: Some(transport),
        ..Default::default()
    }
}

/// Finding 3: metadata naming another process's pid and addresses (or its descriptor numbers) is loaded, but
/// nothing of that process is ever read: `cma` and `shm` need the kernel's word, which a forger cannot give.
#[test]
fn forged_metadata_cannot_read_another_process() {
    let victim = Helper::spawn("trust-victim", None);
    let decode = Agent::new(AgentConfig::new("trust-decode-forged")).unwrap();
    let local = decode.allocate(1 << 20).unwrap();
    let mine = AgentMetadata::decode(&decode.local_metadata().unwrap()).unwrap();
    let far = u64::MAX - (1 << 20);
    let forged = AgentMetadata {
        name: "forger".into(),
        instance_id: 0x5eed_f0f0,
        host_id: mine.host_id.clone(), // "same host", by its own account
        pid: victim.pid,
        listen_addr: None,
        transports: vec![TransportKind::Shm, TransportKind::Cma, TransportKind::Tcp],
        regions: vec![
            RegionMetadata {
                id: 1,
                kind: MemoryKind::Host,
                addr: victim.heap,
                len: 4096,
                memfd: None,
            },
            RegionMetadata {
                id: 2,
                kind: MemoryKind::Host,
                addr: far,
                len: 4096,
                memfd: Some(victim.memfd),
            },
        ],
    };
    // Loading untrusted bytes touches nothing.
    assert_eq!(
        decode.load_remote(&forged.encode().unwrap()).unwrap(),
        "forger"
    );
    for (transport, addr) in [(TransportKind::Cma, victim.heap), (TransportKind::Shm, far)] {
        let err = decode
            .create_xfer_from_descs(
                XferOp::Read,
                &XferDescList::host_from([(local.addr(), 4096)]),
                "forger",
                &XferDescList::host_from([(addr, 4096)]),
                forced(transport),
            )
            .and_then(|req| read_now(&req))
            .expect_err("the victim's memory must not be read");
        assert!(
            matches!(err, TransferError::TransportUnavailable { .. })
                && err.to_string().contains("vouch"),
            "{transport}: {err}"
        );
    }
    // The automatic choice finds nothing either (no listener to reach over tcp).
    let err = decode
        .create_xfer_from_descs(
            XferOp::Read,
            &XferDescList::host_from([(local.addr(), 4096)]),
            "forger",
            &XferDescList::host_from([(victim.heap, 4096)]),
            XferOptions::default(),
        )
        .err()
        .expect("no transport");
    assert!(
        matches!(err, TransferError::TransportUnavailable { .. }),
        "{err}"
    );
    assert!(!contains(&read_back(&local, 0, 1 << 20), CANARY));
}

/// Finding 3, the other way round: metadata that names a real agent (its name and instance id) but claims more
/// regions than it registered reaches only what that agent registered: for a same-host agent, what its own Unix
/// socket sent; for an agent of this process, its live registrations.
#[test]
fn metadata_naming_a_real_agent_cannot_widen_what_it_reaches() {
    let real = Helper::spawn("trust-real", None);
    let decode = Agent::new(AgentConfig::new("trust-decode-widen")).unwrap();
    let local = decode.allocate(1 << 20).unwrap();
    let mut md =
        AgentMetadata::decode(&fetch_metadata(&real.addr, Duration::from_secs(5)).unwrap())
            .unwrap();
    md.regions.push(RegionMetadata {
        id: 99,
        kind: MemoryKind::Host,
        addr: real.heap,
        len: 4096,
        memfd: None,
    });
    md.regions.sort_by_key(|r| r.addr);
    decode.load_remote(&md.encode().unwrap()).unwrap();
    let err = decode
        .create_xfer_from_descs(
            XferOp::Read,
            &XferDescList::host_from([(local.addr(), 4096)]),
            "trust-real",
            &XferDescList::host_from([(real.heap, 4096)]),
            forced(TransportKind::Cma),
        )
        .and_then(|req| read_now(&req))
        .expect_err("memory the peer did not register must not be read");
    assert!(matches!(err, TransferError::NotRegistered { .. }), "{err}");
    // What it did register is still reachable, over the kernel-vouched transports.
    for transport in [TransportKind::Shm, TransportKind::Cma] {
        let req = decode
            .create_xfer_from_descs(
                XferOp::Read,
                &XferDescList::host_from([(local.addr(), 4096)]),
                "trust-real",
                &XferDescList::host_from([(real.region + 8192, 4096)]),
                forced(transport),
            )
            .unwrap();
        read_now(&req).unwrap();
        assert_eq!(read_back(&local, 0, 4096), pattern(SEED, 8192, 4096));
    }

    // An agent of this process, named by its instance id, with a region covering memory it never registered.
    let b = Agent::new(AgentConfig::new("trust-inproc-b")).unwrap();
    let _b_mem = b.allocate(4096).unwrap();
    let secret_here = CANARY.repeat(200);
    let mut md = AgentMetadata::decode(&b.local_metadata().unwrap()).unwrap();
    md.regions.push(RegionMetadata {
        id: 77,
        kind: MemoryKind::Host,
        addr: secret_here.as_ptr() as u64,
        len: 4096,
        memfd: None,
    });
    md.regions.sort_by_key(|r| r.addr);
    decode.load_remote(&md.encode().unwrap()).unwrap();
    for transport in [TransportKind::Cma, TransportKind::Local, TransportKind::Shm] {
        let r = decode
            .create_xfer_from_descs(
                XferOp::Read,
                &XferDescList::host_from([(local.addr(), 4096)]),
                "trust-inproc-b",
                &XferDescList::host_from([(secret_here.as_ptr() as u64, 4096)]),
                forced(transport),
            )
            .and_then(|req| read_now(&req));
        assert!(r.is_err(), "{transport} read unregistered memory");
    }
    assert!(!contains(&read_back(&local, 0, 1 << 20), CANARY));
}

const SECRET: &[u8] = b"trust-test-secret-0123456789";

fn agent_with(name: &str, secret: Option<&[u8]>) -> Agent {
    let mut cfg = AgentConfig::new(name);
    cfg.secret = secret.map(|s| AgentSecret::new(s.to_vec()).unwrap());
    Agent::new(cfg).unwrap()
}

/// Sends `frames` on a fresh connection and returns the frames that come back until the agent closes it.
fn exchange_raw(addr: &str, frames: &[Vec<u8>]) -> Vec<(FrameKind, Ctrl)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for f in frames {
        if s.write_all(f).is_err() {
            break; // closed already
        }
    }
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let mut out = Vec::new();
    let mut at = 0;
    while let Ok((h, c, n)) = decode_frame(&got[at..]) {
        out.push((h.kind, c));
        at += n;
    }
    out
}

/// Finding 5: with a secret, unauthenticated READ/WRITE/metadata frames are refused with a clear error and the
/// connection closes; the KV is neither read nor overwritten. The secret is mutual: an agent with one refuses
/// peers that cannot prove it, and vice versa.
#[test]
fn agent_frames_need_the_secret_and_the_secret_is_mutual() {
    let p = agent_with("trust-secret-p", Some(SECRET));
    let kv = p.allocate(65536).unwrap();
    fill_pattern(&kv, SEED);
    let addr = p.listen_addr().unwrap().to_string();
    let hello = encode_frame(
        FrameKind::Hello,
        0,
        &Ctrl::Hello {
            name: "intruder".into(),
            instance_id: 1,
        },
    );
    let segs = Ctrl::Segments {
        segs: vec![(kv.addr(), 4096)],
        notif: Some(b"forged".to_vec()),
    };
    let mut write = encode_frame(FrameKind::WriteRequest, 7, &segs);
    write.extend_from_slice(&[0xEE; 4096]);
    for frames in [
        vec![hello.clone(), write.clone()],
        vec![write],
        vec![hello, encode_frame(FrameKind::ReadRequest, 8, &segs)],
        vec![encode_frame(FrameKind::GetMetadata, 0, &Ctrl::GetMetadata)],
    ] {
        let replies = exchange_raw(&addr, &frames);
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert!(
            matches!(&replies[0], (FrameKind::AuthError, Ctrl::Error(m)) if m.contains("authentication required")),
            "{replies:?}"
        );
    }
    assert_eq!(read_back(&kv, 0, 65536), pattern(SEED, 0, 65536));
    assert!(p.take_notifications().is_empty());

    // Agents without the secret, or with another, are refused with a clear error.
    for (name, secret) in [
        ("trust-secret-none", None),
        (
            "trust-secret-wrong",
            Some(&b"another-secret-0123456789"[..]),
        ),
    ] {
        let err = agent_with(name, secret).fetch_remote(&addr).unwrap_err();
        assert!(
            matches!(err, TransferError::Unauthenticated { .. }),
            "{name}: {err}"
        );
        assert!(!err.is_retryable());
    }
    // An agent with a secret refuses a peer that has none (it cannot prove one).
    let plain = agent_with("trust-secret-plain", None);
    let err = agent_with("trust-secret-q", Some(SECRET))
        .fetch_remote(&plain.listen_addr().unwrap().to_string())
        .unwrap_err();
    assert!(
        matches!(&err, TransferError::Unauthenticated { reason, .. } if reason.contains("no secret")),
        "{err}"
    );
    // The same secret on both sides: the side channel and tcp work.
    let d = agent_with("trust-secret-d", Some(SECRET));
    let mem = d.allocate(65536).unwrap();
    assert_eq!(d.fetch_remote(&addr).unwrap(), "trust-secret-p");
    let req = d
        .create_xfer_from_descs(
            XferOp::Read,
            &XferDescList::host_from([(mem.addr(), 4096)]),
            "trust-secret-p",
            &XferDescList::host_from([(kv.addr() + 4096, 4096)]),
            XferOptions {
                transport: Some(TransportKind::Tcp),
                notif: Some(b"read".to_vec()),
            },
        )
        .unwrap();
    read_now(&req).unwrap();
    assert_eq!(read_back(&mem, 0, 4096), pattern(SEED, 4096, 4096));
    let notes = p.wait_notifications(Duration::from_secs(5));
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].from, "trust-secret-d");
}

/// The Unix socket hands a same-host peer its memfds only after the same handshake: a peer without the secret
/// is not vouched for (no `shm`/`cma`), one with it is.
#[test]
fn unix_socket_needs_the_secret_too() {
    let p = Helper::spawn("trust-unix-secret", Some(SECRET));
    let d = agent_with("trust-unix-d", Some(SECRET));
    let bytes = d.fetch_metadata(&p.addr).unwrap();
    let mem = d.allocate(65536).unwrap();
    d.load_remote(&bytes).unwrap();
    let req = d
        .create_xfer_from_descs(
            XferOp::Read,
            &XferDescList::host_from([(mem.addr(), 4096)]),
            "trust-unix-secret",
            &XferDescList::host_from([(p.region, 4096)]),
            forced(TransportKind::Shm),
        )
        .unwrap();
    read_now(&req).unwrap();
    assert_eq!(read_back(&mem, 0, 4096), pattern(SEED, 0, 4096));

    let anon = agent_with("trust-unix-anon", None);
    let anon_mem = anon.allocate(4096).unwrap();
    anon.load_remote(&bytes).unwrap();
    for transport in [TransportKind::Shm, TransportKind::Cma] {
        let err = anon
            .create_xfer_from_descs(
                XferOp::Read,
                &XferDescList::host_from([(anon_mem.addr(), 4096)]),
                "trust-unix-secret",
                &XferDescList::host_from([(p.region, 4096)]),
                forced(transport),
            )
            .err()
            .expect("no memfds without the secret");
        assert!(
            matches!(&err, TransferError::TransportUnavailable { reason, .. } if reason.contains("authentication")),
            "{transport}: {err}"
        );
    }
}

fn hello(name: &str) -> Vec<u8> {
    encode_frame(
        FrameKind::Hello,
        0,
        &Ctrl::Hello {
            name: name.into(),
            instance_id: 3,
        },
    )
}

/// True when the agent closed `s` (EOF or reset); false while it stays open (nothing to read now).
fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 256];
    let closed = loop {
        match s.read(&mut b) {
            Ok(0) => break true,
            Ok(_) => continue, // an error frame before the close
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    closed
}

/// Finding 5: idle connections wait in epoll, not on threads. 300 idle connections (past their handshake) add
/// no thread per connection to the agent's process, stay open, and the agent keeps serving transfers meanwhile.
#[test]
fn idle_connections_cost_no_threads() {
    let target = Helper::spawn("trust-idle", None);
    std::thread::sleep(Duration::from_millis(200));
    let before = target.status("Threads");
    let mut conns: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut s = TcpStream::connect(&target.addr).unwrap();
            s.write_all(&hello("idler")).unwrap();
            s
        })
        .collect();
    // Let the agent accept and read them all (a handler serves each Hello, then hands it back).
    std::thread::sleep(Duration::from_millis(1500));
    let during = target.status("Threads");
    // The handlers that served the burst of Hellos may still be there (they leave after 10 s without work);
    // a thread per connection would be 300 more.
    assert!(
        during <= before + 16,
        "{before} threads before, {during} with 300 idle connections"
    );
    assert!(conns.iter_mut().all(|s| !closed_by_peer(s)));
    // Still serving.
    let d = Agent::new(AgentConfig::new("trust-idle-d")).unwrap();
    let mem = d.allocate(65536).unwrap();
    d.fetch_remote(&target.addr).unwrap();
    let req = d
        .create_xfer_from_descs(
            XferOp::Read,
            &XferDescList::host_from([(mem.addr(), 65536)]),
            "trust-idle",
            &XferDescList::host_from([(target.region, 65536)]),
            forced(TransportKind::Tcp),
        )
        .unwrap();
    read_now(&req).unwrap();
    assert_eq!(read_back(&mem, 0, 65536), pattern(SEED, 0, 65536));
}

/// Finding 5: connections over `max_connections` are closed as they arrive; closing some makes room again.
#[test]
fn connections_over_the_limit_are_closed_early() {
    let mut cfg = AgentConfig::new("trust-limit");
    cfg.max_connections = 8;
    let a = Agent::new(cfg).unwrap();
    let addr = a.listen_addr().unwrap();
    let mut conns: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(&hello("crowd"));
            s
        })
        .collect();
    assert!(
        eventually(|| a.connection_stats() == (8, 12)),
        "{:?}",
        a.connection_stats()
    );
    let open = conns
        .iter_mut()
        .map(closed_by_peer)
        .filter(|closed| !closed)
        .count();
    assert_eq!(open, 8);
    drop(conns);
    assert!(eventually(|| a.connection_stats().0 == 0));
    let c = Agent::new(AgentConfig::new("trust-limit-c")).unwrap();
    assert_eq!(c.fetch_remote(&addr.to_string()).unwrap(), "trust-limit");
}

/// Finding 5: a connection that never completes its handshake, or goes idle, is closed.
#[test]
fn silent_and_idle_connections_are_closed() {
    let mut cfg = AgentConfig::new("trust-timeouts");
    cfg.handshake_timeout = Duration::from_millis(300);
    cfg.idle_timeout = Duration::from_secs(1);
    cfg.secret = Some(AgentSecret::new(SECRET.to_vec()).unwrap());
    let a = Agent::new(cfg).unwrap();
    let addr = a.listen_addr().unwrap();
    let mut silent = TcpStream::connect(addr).unwrap();
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(&encode_frame(
        FrameKind::AuthHello,
        0,
        &Ctrl::AuthHello {
            name: "half".into(),
            instance_id: 5,
            nonce: [9; 32],
        },
    ))
    .unwrap();
    assert!(eventually(|| closed_by_peer(&mut silent)));
    assert!(eventually(|| closed_by_peer(&mut half)));
    // An authenticated peer that goes quiet is closed after the idle timeout (real peers send keepalives).
    let mut plain_cfg = AgentConfig::new("trust-timeouts-plain");
    plain_cfg.idle_timeout = Duration::from_secs(3);
    let b = Agent::new(plain_cfg).unwrap();
    let mut quiet = TcpStream::connect(b.listen_addr().unwrap()).unwrap();
    quiet.write_all(&hello("quiet")).unwrap();
    std::thread::sleep(Duration::from_millis(400)); // past the handshake timeout, well within the idle timeout
    assert!(
        !closed_by_peer(&mut quiet),
        "closed before the idle timeout"
    );
    assert!(eventually(|| closed_by_peer(&mut quiet)));
    assert!(eventually(
        || a.connection_stats().0 == 0 && b.connection_stats().0 == 0
    ));
}

/// Finding 5: a WRITE to memory the agent did not register is drained through a fixed buffer: the peer's claimed
/// size (192 MiB here) allocates nothing, the connection stays in sync, and the writer gets an error.
#[test]
fn refused_write_allocates_nothing_the_peer_claims() {
    let target = Helper::spawn("trust-drain", None);
    const CLAIM: usize = 192 << 20;
    let hwm_before = target.status("VmHWM");
    let mut s = TcpStream::connect(&target.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello("drainer")).unwrap();
    s.write_all(&encode_frame(
        FrameKind::WriteRequest,
        11,
        &Ctrl::Segments {
            segs: vec![(0x1000, CLAIM as u64)],
            notif: None,
        },
    ))
    .unwrap();
    let chunk = vec![0x5Au8; 1 << 20];
    for _ in 0..CLAIM / chunk.len() {
        s.write_all(&chunk).unwrap();
    }
    let mut hdr = [0u8; HEADER_LEN];
    s.read_exact(&mut hdr).unwrap();
    let h = pdx_transfer::wire::Header::decode(&hdr).unwrap();
    assert_eq!((h.kind, h.req_id), (FrameKind::Error, 11));
    let mut body = vec![0u8; h.ctrl_len as usize];
    s.read_exact(&mut body).unwrap();
    // In sync: the next request is answered.
    s.write_all(&encode_frame(FrameKind::GetMetadata, 0, &Ctrl::GetMetadata))
        .unwrap();
    s.read_exact(&mut hdr).unwrap();
    assert_eq!(
        pdx_transfer::wire::Header::decode(&hdr).unwrap().kind,
        FrameKind::Metadata
    );
    let grown_kib = target.status("VmHWM").saturating_sub(hwm_before);
    assert!(
        grown_kib < 32 << 10,
        "peak RSS grew by {grown_kib} KiB draining a refused {CLAIM}-byte WRITE"
    );
}

/// Finding 6: when a same-host peer exits, its memfds are unmapped at once, without a transfer having to fail
/// first, even while requests made for it still exist; they then fail as retryable.
#[test]
fn gone_peer_is_unmapped_at_once() {
    let mut target = Helper::spawn("trust-unmap-dead", None);
    let d = Agent::new(AgentConfig::new("trust-unmap-d1")).unwrap();
    let mem = d.allocate(65536).unwrap();
    d.fetch_remote(&target.addr).unwrap();
    let req = d
        .create_xfer_from_descs(
            XferOp::Read,
            &XferDescList::host_from([(mem.addr(), 4096)]),
            "trust-unmap-dead",
            &XferDescList::host_from([(target.region, 4096)]),
            forced(TransportKind::Shm),
        )
        .unwrap();
    read_now(&req).unwrap();
    assert!(mappings_of("trust-unmap-dead") >= 1);
    target.child.kill().unwrap();
    target.child.wait().unwrap();
    assert!(
        eventually(|| mappings_of("trust-unmap-dead") == 0),
        "the dead peer's memfd is still mapped"
    );
    let err = read_now(&req).unwrap_err();
    assert!(
        matches!(err, TransferError::PeerDisconnected { .. }) && err.is_retryable(),
        "{err}"
    );
}

/// Finding 6: invalidating a peer unmaps it at once, even while requests made for it still exist.
#[test]
fn invalidated_peer_is_unmapped_at_once() {
    let target = Helper::spawn("trust-unmap-inval", None);
    let d = Agent::new(AgentConfig::new("trust-unmap-d2")).unwrap();
    let mem = d.allocate(65536).unwrap();
    d.fetch_remote(&target.addr).unwrap();
    let req = d
        .create_xfer_from_descs(
            XferOp::Read,
            &XferDescList::host_from([(mem.addr(), 4096)]),
            "trust-unmap-inval",
            &XferDescList::host_from([(target.region, 4096)]),
            forced(TransportKind::Shm),
        )
        .unwrap();
    read_now(&req).unwrap();
    assert!(mappings_of("trust-unmap-inval") >= 1);
    assert!(d.invalidate_remote("trust-unmap-inval"));
    assert_eq!(mappings_of("trust-unmap-inval"), 0);
    assert!(read_now(&req).is_err());
    // Loading it again maps it again.
    d.fetch_remote(&target.addr).unwrap();
    assert!(mappings_of("trust-unmap-inval") >= 1);
}

/// Two requests that load the same new same-host peer at once (the first requests of two clients on a decode)
/// must not shut each other's link down: every read after the loads succeeds.
#[test]
fn concurrent_loads_of_a_new_peer_keep_one_link() {
    let target = Helper::spawn("trust-concurrent-load", None);
    let d = Arc::new(Agent::new(AgentConfig::new("trust-concurrent-d")).unwrap());
    // The metadata is fetched once, so the loads start together (as two requests carrying the same
    // `kv_transfer_params` do).
    let md = Arc::new(d.fetch_metadata(&target.addr).unwrap());
    let start = Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (d, start, md, region) = (d.clone(), start.clone(), md.clone(), target.region);
            std::thread::spawn(move || -> Result<()> {
                let mem = d.allocate(65536)?;
                start.wait();
                d.load_remote(&md)?;
                let req = d.create_xfer_from_descs(
                    XferOp::Read,
                    &XferDescList::host_from([(mem.addr(), 4096)]),
                    "trust-concurrent-load",
                    &XferDescList::host_from([(region, 4096)]),
                    forced(TransportKind::Shm),
                )?;
                for _ in 0..20 {
                    read_now(&req)?;
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
}
