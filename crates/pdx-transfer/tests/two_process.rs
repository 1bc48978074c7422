//! Two-process tests: this test binary re-executes itself as the target agent (`target_process`, run only
//! when `PDX_TEST_TARGET` is set), and the tests drive it over `shm`, `cma` and `tcp` with random ranges
//! verified byte for byte, notifications, and peer death.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use pdx_transfer::*;
use rand::{Rng, SeedableRng};

const REGION: usize = 4 << 20;
const SHARED_SEED: u64 = 11;
const OWNED_SEED: u64 = 12;

/// The target agent: a memfd region and a caller-owned region filled with known patterns; it echoes every
/// notification back to its sender (whose listener address starts the payload, up to a space); it exits when its
/// standard input closes.
#[test]
#[ignore = "helper process for the two-process tests; runs only when PDX_TEST_TARGET is set"]
fn target_process() {
    if std::env::var_os("PDX_TEST_TARGET").is_none() {
        return;
    }
    let agent = Agent::new(AgentConfig::new("target")).unwrap();
    let shared = agent.allocate(REGION).unwrap();
    let owned = agent.register_vec(vec![0; REGION]).unwrap();
    fill_pattern(&shared, SHARED_SEED);
    fill_pattern(&owned, OWNED_SEED);
    println!(
        "READY {} {} {}",
        agent.listen_addr().unwrap(),
        shared.addr(),
        owned.addr()
    );
    let stdin_closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stdin_closed.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        flag.store(true, std::sync::atomic::Ordering::Release);
    });
    while !stdin_closed.load(std::sync::atomic::Ordering::Acquire) {
        for n in agent.wait_notifications(Duration::from_millis(50)) {
            let text = String::from_utf8_lossy(&n.payload).into_owned();
            let sender_addr = text.split(' ').next().unwrap_or_default();
            if agent.fetch_remote(sender_addr).is_ok() {
                agent.notify(&n.from, n.payload).unwrap();
            }
        }
    }
}

struct Target {
    child: Child,
    addr: String,
    shared: u64,
    owned: u64,
}

impl Target {
    fn spawn() -> Target {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "target_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("PDX_TEST_TARGET", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let ready = lines
            .find_map(|l| {
                l.ok()
                    .and_then(|l| l.find("READY ").map(|i| l[i..].to_string()))
            })
            .expect("target did not start");
        // libtest may print `test target_process ... ` before our line.
        let f: Vec<&str> = ready.split_whitespace().collect();
        // Keep draining the child's stdout so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Target {
            addr: f[1].to_string(),
            shared: f[2].parse().unwrap(),
            owned: f[3].parse().unwrap(),
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

fn random_traffic(transport: TransportKind, owned: bool) {
    let target = Target::spawn();
    let me = Agent::new(AgentConfig::new(format!("initiator-{transport}"))).unwrap();
    let local = me.allocate(REGION).unwrap();
    let peer = me.fetch_remote(&target.addr).unwrap();
    assert_eq!(peer, "target");
    let (remote_base, seed) = if owned {
        (target.owned, OWNED_SEED)
    } else {
        (target.shared, SHARED_SEED)
    };
    let mut model = pattern(seed, 0, REGION);
    let mut rng = rand::rngs::StdRng::seed_from_u64(42 + transport as u64);
    for round in 0..24 {
        let n = rng.gen_range(1..=32);
        let slot = REGION / 32;
        let mut pairs = Vec::new();
        for i in 0..n {
            let len = rng.gen_range(1..=slot / 2);
            let lo = i * slot + rng.gen_range(0..slot - len);
            let ro = ((i + 7) % 32) * slot + rng.gen_range(0..slot - len);
            pairs.push((lo, ro, len));
        }
        let l = XferDescList::host_from(
            pairs
                .iter()
                .map(|&(lo, _, len)| (local.addr() + lo as u64, len as u64)),
        );
        let r = XferDescList::host_from(
            pairs
                .iter()
                .map(|&(_, ro, len)| (remote_base + ro as u64, len as u64)),
        );
        let op = if round % 3 == 1 {
            XferOp::Write
        } else {
            XferOp::Read
        };
        if op == XferOp::Write {
            for &(lo, _, len) in &pairs {
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                local.write(lo, &data).unwrap();
            }
        }
        let req = me
            .create_xfer_from_descs(
                op,
                &l,
                &peer,
                &r,
                XferOptions {
                    transport: Some(transport),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(req.transport(), transport);
        if req.post().unwrap() == XferStatus::InProgress {
            req.wait(Some(Duration::from_secs(20))).unwrap();
        }
        for &(lo, ro, len) in &pairs {
            match op {
                XferOp::Write => {
                    let mut sent = vec![0; len];
                    local.read(lo, &mut sent).unwrap();
                    model[ro..ro + len].copy_from_slice(&sent);
                }
                XferOp::Read => assert_eq!(
                    read_back(&local, lo, len),
                    model[ro..ro + len],
                    "{transport} round {round}: READ of {len} bytes at remote offset {ro}"
                ),
            }
        }
    }
    // Every WRITE landed: read the whole remote region back over TCP and compare with the model.
    let whole = me
        .create_xfer_from_descs(
            XferOp::Read,
            &XferDescList::host_from([(local.addr(), REGION as u64)]),
            &peer,
            &XferDescList::host_from([(remote_base, REGION as u64)]),
            XferOptions {
                transport: Some(TransportKind::Tcp),
                ..Default::default()
            },
        )
        .unwrap();
    whole.post().unwrap();
    whole.wait(Some(Duration::from_secs(20))).unwrap();
    assert!(
        read_back(&local, 0, REGION) == model,
        "{transport}: remote region differs from the model"
    );
}

#[test]
fn shm_between_processes() {
    random_traffic(TransportKind::Shm, false);
}

#[test]
fn cma_between_processes() {
    random_traffic(TransportKind::Cma, true);
}

#[test]
fn tcp_between_processes() {
    random_traffic(TransportKind::Tcp, false);
    random_traffic(TransportKind::Tcp, true);
}

#[test]
fn notifications_cross_processes_with_every_transport() {
    let target = Target::spawn();
    let me = Agent::new(AgentConfig::new("notifier")).unwrap();
    let local = me.allocate(4096).unwrap();
    let peer = me.fetch_remote(&target.addr).unwrap();
    for (transport, base) in [
        (TransportKind::Shm, target.shared),
        (TransportKind::Cma, target.owned),
        (TransportKind::Tcp, target.shared),
    ] {
        let payload = format!("{} done via {transport}", me.listen_addr().unwrap()).into_bytes();
        let req = me
            .create_xfer_from_descs(
                XferOp::Read,
                &XferDescList::host_from([(local.addr(), 4096)]),
                &peer,
                &XferDescList::host_from([(base, 4096)]),
                XferOptions {
                    transport: Some(transport),
                    notif: Some(payload.clone()),
                },
            )
            .unwrap();
        req.post().unwrap();
        req.wait(Some(Duration::from_secs(10))).unwrap();
        // The target echoes what it received, so the echo proves delivery.
        let echo = me.wait_notifications(Duration::from_secs(10));
        assert_eq!(echo.len(), 1, "{transport}");
        assert_eq!(echo[0].payload, payload);
        assert_eq!(echo[0].from, "target");
    }
}

#[test]
fn killed_peer_fails_transfers_instead_of_hanging() {
    for transport in [TransportKind::Tcp, TransportKind::Shm, TransportKind::Cma] {
        let mut target = Target::spawn();
        let me = Agent::new(AgentConfig::new(format!("victim-{transport}"))).unwrap();
        let local = me.allocate(REGION).unwrap();
        let peer = me.fetch_remote(&target.addr).unwrap();
        let base = if transport == TransportKind::Cma {
            target.owned
        } else {
            target.shared
        };
        let req = me
            .create_xfer_from_descs(
                XferOp::Read,
                &XferDescList::host_from((0..64).map(|i| (local.addr() + i * 65536, 65536))),
                &peer,
                &XferDescList::host_from((0..64).map(|i| (base + i * 65536, 65536))),
                XferOptions {
                    transport: Some(transport),
                    ..Default::default()
                },
            )
            .unwrap();
        req.post().unwrap();
        req.wait(Some(Duration::from_secs(10))).unwrap();
        // Keep transfers going while the peer is killed; the first failure must come, not a hang.
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            target.child.kill().unwrap();
            target.child.wait().unwrap();
            target
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let err = loop {
            assert!(
                Instant::now() < deadline,
                "{transport}: transfers kept succeeding after the kill"
            );
            let posted = req.post().and_then(|s| match s {
                XferStatus::InProgress => req.wait(Some(Duration::from_secs(10))),
                _ => Ok(()),
            });
            if let Err(e) = posted {
                break e;
            }
        };
        assert!(
            matches!(
                err,
                TransferError::PeerDisconnected { .. } | TransferError::Timeout { .. }
            ),
            "{transport}: {err}"
        );
        assert!(err.is_retryable());
        drop(killer.join().unwrap());
    }
}
