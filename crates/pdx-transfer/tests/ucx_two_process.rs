//! Two-process tests of the `ucx` transport (feature `ucx`). Each `ucx_*` test re-executes this binary as a
//! driver (`driver_process`) with a given `UCX_TLS`, so UCX's environment is fixed before any context exists;
//! the driver starts the target agent (`target_process`) the same way, moves random blocks both ways verified
//! byte for byte, checks notifications (the target echoes them back), and kills the target to see transfers
//! fail rather than hang. The target's region is heap memory, or (`PDX_UCX_TARGET_MEMORY=ucx`) memory allocated
//! through UCX, which UCX's shared-memory transports reach with direct RMA instead of emulating it. Some
//! requests are followed by polling `status` (which progresses the worker) instead of `wait`.

#![cfg(feature = "ucx")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use pdx_transfer::*;
use rand::{Rng, SeedableRng};

const REGION: usize = 4 << 20;
const SEED: u64 = 21;

fn self_exec(test: &str, env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--ignored",
        "--exact",
        test,
        "--nocapture",
        "--test-threads=1",
    ]);
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// The target agent: one registered region with a known pattern; echoes notifications to their sender (whose
/// listener address starts the payload); exits when stdin closes.
#[test]
#[ignore = "helper process; runs only when PDX_UCX_TARGET is set"]
fn target_process() {
    if std::env::var_os("PDX_UCX_TARGET").is_none() {
        return;
    }
    let agent = Agent::new(AgentConfig::new("ucx-target")).unwrap();
    let region = match std::env::var("PDX_UCX_TARGET_MEMORY").as_deref() {
        Ok("ucx") => agent.allocate_ucx(REGION).unwrap(),
        _ => agent.register_vec(vec![0; REGION]).unwrap(),
    };
    assert!(read_back(&region, 0, REGION).iter().all(|&b| b == 0));
    fill_pattern(&region, SEED);
    println!("READY {} {}", agent.listen_addr().unwrap(), region.addr());
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = closed.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        flag.store(true, std::sync::atomic::Ordering::Release);
    });
    while !closed.load(std::sync::atomic::Ordering::Acquire) {
        for n in agent.wait_notifications(Duration::from_millis(50)) {
            let text = String::from_utf8_lossy(&n.payload).into_owned();
            let sender = text.split(' ').next().unwrap_or_default();
            if agent.fetch_remote(sender).is_ok() {
                agent.notify(&n.from, n.payload).unwrap();
            }
        }
    }
}

struct Target {
    child: Child,
    addr: String,
    base: u64,
}

impl Target {
    fn spawn() -> Target {
        let memory = std::env::var("PDX_UCX_TARGET_MEMORY").unwrap_or_default();
        let mut child = self_exec(
            "target_process",
            &[("PDX_UCX_TARGET", "1"), ("PDX_UCX_TARGET_MEMORY", &memory)],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines
            .find_map(|l| {
                l.ok()
                    .and_then(|l| l.find("READY ").map(|i| l[i..].to_string()))
            })
            .expect("target did not start");
        std::thread::spawn(move || lines.for_each(drop));
        let f: Vec<&str> = ready.split_whitespace().collect();
        Target {
            addr: f[1].to_string(),
            base: f[2].parse().unwrap(),
            child,
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ucx_opts(notif: Option<Vec<u8>>) -> XferOptions {
    XferOptions {
        transport: Some(TransportKind::Ucx),
        notif,
    }
}

fn random_traffic() {
    let target = Target::spawn();
    let me = Agent::new(AgentConfig::new("ucx-initiator")).unwrap();
    let local = me.allocate(REGION).unwrap();
    let peer = me.fetch_remote(&target.addr).unwrap();
    let mut model = pattern(SEED, 0, REGION);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let slot = REGION / 32;
    for round in 0..24 {
        let n = rng.gen_range(1..=32);
        let pairs: Vec<(usize, usize, usize)> = (0..n)
            .map(|i| {
                let len = rng.gen_range(1..=slot / 2);
                let lo = i * slot + rng.gen_range(0..slot - len);
                let ro = ((i + 7) % 32) * slot + rng.gen_range(0..slot - len);
                (lo, ro, len)
            })
            .collect();
        let l = XferDescList::host_from(
            pairs
                .iter()
                .map(|&(lo, _, len)| (local.addr() + lo as u64, len as u64)),
        );
        let r = XferDescList::host_from(
            pairs
                .iter()
                .map(|&(_, ro, len)| (target.base + ro as u64, len as u64)),
        );
        let op = if round % 3 == 1 {
            XferOp::Write
        } else {
            XferOp::Read
        };
        if op == XferOp::Write {
            for &(lo, ro, len) in &pairs {
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                local.write(lo, &data).unwrap();
                model[ro..ro + len].copy_from_slice(&data);
            }
        }
        let req = me
            .create_xfer_from_descs(op, &l, &peer, &r, ucx_opts(None))
            .unwrap();
        assert_eq!(req.transport(), TransportKind::Ucx);
        if req.post().unwrap() == XferStatus::InProgress {
            if round % 4 == 3 {
                // Poll: each status call progresses the worker.
                let deadline = Instant::now() + Duration::from_secs(20);
                while req.status().unwrap() != XferStatus::Done {
                    assert!(
                        Instant::now() < deadline,
                        "round {round}: status never Done"
                    );
                }
            } else {
                req.wait(Some(Duration::from_secs(20))).unwrap();
            }
        }
        if op == XferOp::Read {
            for &(lo, ro, len) in &pairs {
                assert_eq!(
                    read_back(&local, lo, len),
                    model[ro..ro + len],
                    "round {round}: READ {len} bytes at {ro}"
                );
            }
        }
    }
    // Every WRITE landed: read the whole region back over UCX and compare.
    let whole = me
        .create_xfer_from_descs(
            XferOp::Read,
            &XferDescList::host_from([(local.addr(), REGION as u64)]),
            &peer,
            &XferDescList::host_from([(target.base, REGION as u64)]),
            ucx_opts(None),
        )
        .unwrap();
    whole.post().unwrap();
    whole.wait(Some(Duration::from_secs(20))).unwrap();
    assert!(
        read_back(&local, 0, REGION) == model,
        "remote region differs from the model"
    );

    // Notifications ride UCX active messages after the data; the target echoes them (over TCP).
    for op in [XferOp::Read, XferOp::Write] {
        let payload = format!("{} done {op:?}", me.listen_addr().unwrap()).into_bytes();
        let req = me
            .create_xfer_from_descs(
                op,
                &XferDescList::host_from([(local.addr(), 4096)]),
                &peer,
                &XferDescList::host_from([(target.base, 4096)]),
                ucx_opts(Some(payload.clone())),
            )
            .unwrap();
        req.post().unwrap();
        req.wait(Some(Duration::from_secs(10))).unwrap();
        let echo = me.wait_notifications(Duration::from_secs(10));
        assert_eq!(echo.len(), 1, "{op:?}");
        assert_eq!(echo[0].payload, payload);
        assert_eq!(echo[0].from, "ucx-target");
    }
}

fn killed_peer_fails() {
    let mut target = Target::spawn();
    let me = Agent::new(AgentConfig::new("ucx-victim")).unwrap();
    let local = me.allocate(REGION).unwrap();
    let peer = me.fetch_remote(&target.addr).unwrap();
    let req = me
        .create_xfer_from_descs(
            XferOp::Read,
            &XferDescList::host_from((0..64).map(|i| (local.addr() + i * 65536, 65536))),
            &peer,
            &XferDescList::host_from((0..64).map(|i| (target.base + i * 65536, 65536))),
            ucx_opts(None),
        )
        .unwrap();
    req.post().unwrap();
    req.wait(Some(Duration::from_secs(10))).unwrap();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        target.child.kill().unwrap();
        target.child.wait().unwrap();
        target
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let err = loop {
        assert!(
            Instant::now() < deadline,
            "transfers kept succeeding after the kill"
        );
        let posted = req.post().and_then(|s| match s {
            XferStatus::InProgress => req.wait(Some(Duration::from_secs(30))),
            _ => Ok(()),
        });
        if let Err(e) = posted {
            break e;
        }
    };
    assert!(
        matches!(err, TransferError::PeerDisconnected { .. }),
        "expected a peer failure, got {err}"
    );
    assert!(err.is_retryable());
    drop(killer.join().unwrap());
}

/// The driver: runs inside a child with `UCX_TLS` set.
#[test]
#[ignore = "helper process; runs only when PDX_UCX_DRIVER is set"]
fn driver_process() {
    if std::env::var_os("PDX_UCX_DRIVER").is_none() {
        return;
    }
    random_traffic();
    killed_peer_fails();
}

fn run_driver(tls: &str, target_memory: &str) {
    let out = self_exec(
        "driver_process",
        &[
            ("PDX_UCX_DRIVER", "1"),
            ("UCX_TLS", tls),
            ("PDX_UCX_TARGET_MEMORY", target_memory),
        ],
    )
    .output()
    .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "UCX_TLS={tls}: driver failed:\n{text}"
    );
    assert!(
        text.contains("test result: ok. 1 passed"),
        "UCX_TLS={tls}: driver did not run:\n{text}"
    );
}

#[test]
fn ucx_shm_self_between_processes() {
    run_driver("shm,self", "heap");
}

#[test]
fn ucx_shm_self_to_ucx_allocated_memory() {
    run_driver("shm,self", "ucx");
}

#[test]
fn ucx_tcp_between_processes() {
    run_driver("tcp", "heap");
}

#[test]
fn ucx_tcp_to_ucx_allocated_memory() {
    run_driver("tcp", "ucx");
}

#[test]
fn ucx_is_refused_when_the_peer_does_not_serve_it() {
    let a = Agent::new(AgentConfig::new("ucx-a")).unwrap();
    let mut cfg = AgentConfig::new("plain-b");
    cfg.transports = vec![TransportKind::Tcp];
    let b = Agent::new(cfg).unwrap();
    let mem_b = b.allocate(4096).unwrap();
    let mem_a = a.allocate(4096).unwrap();
    a.load_remote(&b.local_metadata().unwrap()).unwrap();
    let err = a
        .create_xfer_from_descs(
            XferOp::Read,
            &XferDescList::host_from([(mem_a.addr(), 4096)]),
            "plain-b",
            &XferDescList::host_from([(mem_b.addr(), 4096)]),
            ucx_opts(None),
        )
        .err()
        .expect("ucx must be refused");
    assert!(
        matches!(err, TransferError::TransportUnavailable { .. }),
        "{err}"
    );
}
