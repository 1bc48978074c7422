//! The transfer engine's hand-offs and transport planning under faults a user causes (issue 18):
//! - an engine drops its agent while threads and tasks wait for a transfer that will never finish: every waiter
//!   gets an error at once, none hangs (the completion wakes blocked threads and every awaiting task);
//! - a request forces a transport that cannot reach the peer: a clear error naming why, no connection left
//!   half made, and the agent keeps working (the automatic choice then moves and checks the bytes).

use std::future::Future;
use std::pin::pin;
use std::sync::mpsc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake};
use std::time::{Duration, Instant};

use pdx_transfer::{
    Agent, AgentConfig, AgentMetadata, TransferError, TransportKind, XferDescList, XferOp,
    XferOptions, XferStatus,
};

use crate::support::GUARD;

/// Wakes the thread that blocks in [`block_on`].
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future to completion on this thread (the runtime-free way an engine may await a request).
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

#[test]
fn waiters_of_a_transfer_end_when_the_agent_is_dropped() {
    // A peer that accepts and never answers: only the agent's drop can end the READ (its peer timeout is 60 s).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let conns: Vec<_> = listener.incoming().take(1).collect();
        std::thread::sleep(GUARD);
        drop(conns);
    });
    let md = AgentMetadata {
        name: "mute-prefill".into(),
        instance_id: 42,
        host_id: "another host".into(),
        pid: 1,
        listen_addr: Some(addr.to_string()),
        transports: vec![TransportKind::Tcp],
        regions: vec![pdx_transfer::metadata::RegionMetadata {
            id: 1,
            kind: pdx_transfer::MemoryKind::Host,
            addr: 0x10000,
            len: 4096,
            memfd: None,
        }],
    };
    let mut cfg = AgentConfig::new("decode-shutting-down");
    cfg.peer_timeout = Duration::from_secs(60);
    let agent = Agent::new(cfg).unwrap();
    let kv = agent.allocate(4096).unwrap();
    agent.load_remote(&md.encode().unwrap()).unwrap();
    let req = agent
        .create_xfer_from_descs(
            XferOp::Read,
            &XferDescList::host_from([(kv.addr(), 4096)]),
            "mute-prefill",
            &XferDescList::host_from([(0x10000, 4096)]),
            XferOptions::default(),
        )
        .unwrap();
    assert_eq!(req.post().unwrap(), XferStatus::InProgress);
    let req = Arc::new(req);
    let (tx, rx) = mpsc::channel();
    // Two tasks awaiting the request and one thread blocked on it, none joined: a waiter that is never woken must
    // fail the test, not hang it.
    for waiter in ["task 1", "task 2", "thread"] {
        let (tx, req) = (tx.clone(), req.clone());
        std::thread::spawn(move || {
            let outcome = match waiter {
                "thread" => req.wait(None),
                _ => block_on(req.completion()),
            };
            let _ = tx.send((waiter, outcome));
        });
    }
    // Let the waiters block, then the engine drops its agent.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        rx.try_recv().is_err(),
        "nothing ends the READ before the drop"
    );
    let dropped = Instant::now();
    drop(kv);
    drop(agent);
    let mut ended = Vec::new();
    for _ in 0..3 {
        let (waiter, outcome) = rx
            .recv_timeout(GUARD)
            .expect("a waiter of the request was never woken");
        let err = outcome.expect_err("a READ nobody answered cannot succeed");
        assert!(
            matches!(
                err,
                TransferError::UnknownRemote(_) | TransferError::Shutdown
            ),
            "{waiter}: {err}"
        );
        ended.push(waiter);
    }
    // Reported, not asserted (no timings in tests): the 60 s peer timeout would have ended them with `Timeout`,
    // which the match above refuses, and `GUARD` bounds a hang.
    eprintln!("the waiters ended {:?} after the drop", dropped.elapsed());
    ended.sort();
    assert_eq!(ended, ["task 1", "task 2", "thread"]);
    // A post after the drop fails at once, it does not hang.
    assert!(req.post().is_err());
}

#[test]
fn a_forced_transport_that_cannot_reach_the_peer_says_why() {
    let prefill = Agent::new(AgentConfig::new("far-prefill")).unwrap();
    let kv_p = prefill.allocate(1 << 16).unwrap();
    kv_p.fill(0, 1 << 16, 0x5a).unwrap();
    // The prefill's metadata as another host would publish it: same listener, another host and instance, so the
    // decode reaches it over tcp only.
    let (mut md, _) = AgentMetadata::decode_ext(&prefill.local_metadata().unwrap()).unwrap();
    md.host_id = "another host".into();
    md.instance_id ^= 1;
    let decode = Agent::new(AgentConfig::new("near-decode")).unwrap();
    let kv_d = decode.allocate(1 << 16).unwrap();
    decode.load_remote(&md.encode().unwrap()).unwrap();
    let request = |transport: Option<TransportKind>| {
        decode.create_xfer_from_descs(
            XferOp::Read,
            &XferDescList::host_from([(kv_d.addr(), 1 << 16)]),
            "far-prefill",
            &XferDescList::host_from([(kv_p.addr(), 1 << 16)]),
            XferOptions {
                transport,
                notif: None,
            },
        )
    };
    for (forced, why) in [
        (TransportKind::Local, "local: peer is in another process"),
        (
            TransportKind::Shm,
            "shm: agent `far-prefill` is on another host",
        ),
        (
            TransportKind::Cma,
            "cma: agent `far-prefill` is on another host",
        ),
        (
            TransportKind::Cuda,
            "transport `cuda` cannot serve this request",
        ),
    ] {
        let err = request(Some(forced))
            .err()
            .unwrap_or_else(|| panic!("{forced} cannot reach another host"));
        assert!(
            matches!(err, TransferError::TransportUnavailable { .. }),
            "{forced}: {err}"
        );
        assert!(!err.is_retryable(), "{forced}: {err}");
        assert!(
            err.to_string().contains(why),
            "{forced}: `{err}` lacks `{why}`"
        );
    }
    // Refused while planning: no connection was opened to the prefill for them.
    assert_eq!(prefill.connection_stats().0, 0);
    // The agent is unharmed: the automatic choice reads over tcp, every byte as the prefill holds it.
    let req = request(None).unwrap();
    assert_eq!(req.transport(), TransportKind::Tcp);
    if req.post().unwrap() == XferStatus::InProgress {
        req.wait(Some(GUARD)).unwrap();
    }
    let mut got = vec![0u8; 1 << 16];
    kv_d.read(0, &mut got).unwrap();
    assert!(got.iter().all(|&b| b == 0x5a));
}
