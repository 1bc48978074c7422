//! KV peer death mid-READ (issue 13): a prefill `pdx mock` killed (SIGKILL) while its KV is being read.
//! - an initiator agent (this test process) reading a prefill's whole KV region over `shm`, `cma` and `tcp` gets
//!   its answer promptly: a clear, retryable error, or, where the bytes were still mapped in this process
//!   (`shm`) or copied before the exit (`cma`), every byte as the prefill held it; never a hang, a crash or
//!   partial bytes reported as a success. Posting the request again fails at once, and the dead prefill's
//!   memory is unmapped;
//! - a decode `pdx mock` whose prefill is killed while it reads answers that request promptly, keeps serving
//!   (the next request, prefilled by a fresh engine, succeeds), and unmaps the dead prefill's memory.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use pdx_transfer::{
    Agent, AgentConfig, RegisteredMemory, TransferError, TransportKind, XferDescList, XferOp,
    XferOptions, XferRequest, XferStatus,
};

use crate::support::*;

/// KV blocks of the prefill engines, at their real size (`--kv-scale-down 1`: 1.75 MiB a block for the
/// built-in Qwen3-0.6B profile), so a READ of all of them (224 MiB) lasts long enough to be cut.
const BLOCKS: u32 = 128;

/// The byte the test writes all over the prefill's KV before reading it back.
const FILL: u8 = 0xa5;

/// How long an answer may take after the kill: a guard against hangs (the agents' `peer_timeout` is 2 s, the
/// mock's transfer timeout 10 s).
const ANSWER: Duration = Duration::from_secs(15);

/// Whether `mem[at]` holds `FILL`.
fn filled_at(mem: &RegisteredMemory, at: usize) -> bool {
    let mut b = [0u8; 1];
    mem.read(at, &mut b).unwrap();
    b[0] == FILL
}

/// Whether all of `mem` holds `FILL`.
fn all_filled(mem: &RegisteredMemory) -> bool {
    let mut chunk = vec![0u8; 1 << 20];
    (0..mem.len()).step_by(chunk.len()).all(|at| {
        let n = chunk.len().min(mem.len() - at);
        mem.read(at, &mut chunk[..n]).unwrap();
        chunk[..n].iter().all(|&b| b == FILL)
    })
}

/// Posts `req` and waits up to `limit` for it if it goes on in the background.
fn post_and_wait(req: &XferRequest, limit: Duration) -> Result<(), TransferError> {
    match req.post()? {
        XferStatus::InProgress => req.wait(Some(limit)),
        _ => Ok(()),
    }
}

/// KiB of the KV memory (memfd `pdx-AGENT`) of agent `agent` resident in process `pid` (`/proc/PID/smaps`).
fn resident_kib_of(pid: u32, agent: &str) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let needle = format!("memfd:pdx-{agent} ");
    let mut lines = smaps.lines();
    let mut total = 0;
    while let Some(l) = lines.next() {
        if l.contains(&needle) {
            total += lines
                .find_map(|l| l.strip_prefix("Rss:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// Runs `req` (post, then wait if it went on in the background) on another thread; its result and how long
/// it took come on the channel.
fn run_in_background(
    req: std::sync::Arc<XferRequest>,
) -> mpsc::Receiver<(Result<(), TransferError>, Duration)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let t = Instant::now();
        let r = post_and_wait(&req, Duration::from_secs(30));
        let _ = tx.send((r, t.elapsed()));
    });
    rx
}

/// A prefill killed mid-READ, over each transport that reaches a same-host peer: the READ ends promptly, with a
/// clear error or with every byte as the prefill held it; a second post fails at once; the dead prefill's memory
/// is unmapped from this process.
#[test]
fn a_read_from_a_prefill_killed_mid_read_ends_promptly() {
    // `cma` needs ptrace-read access to the prefill, a child of this process: Yama's scope 2 and 3 refuse it.
    let yama = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").unwrap_or_default();
    let cma = yama.trim().parse::<u8>().map_or(true, |scope| scope < 2);
    if !cma {
        eprintln!(
            "skipped: cma: Yama ptrace_scope {} refuses process_vm_readv",
            yama.trim()
        );
    }
    for transport in [TransportKind::Shm, TransportKind::Cma, TransportKind::Tcp] {
        if transport == TransportKind::Cma && !cma {
            continue;
        }
        let engine = format!("chaos-death-{transport}-{}", std::process::id());
        let mut p = KvMock::with_blocks("prefill", BLOCKS, 1, &["--engine-id", &engine]);
        let me = Agent::new(AgentConfig::new(format!("{engine}-reader"))).unwrap();
        let name = me.fetch_remote(&p.agent_addr()).unwrap();
        let region = me.remote_metadata(&name).unwrap().regions[0].clone();
        let len = region.len as usize;
        let local = me.allocate(len).unwrap();
        let descs = |addr: u64| XferDescList::host_from([(addr, region.len)]);
        let xfer = |op, transport, notif: Option<&str>| {
            let opts = XferOptions {
                transport: Some(transport),
                notif: notif.map(|n| n.as_bytes().to_vec()),
            };
            me.create_xfer_from_descs(op, &descs(local.addr()), &name, &descs(region.addr), opts)
                .unwrap()
        };
        // The prefill's KV, all FILL; then a zeroed destination to read it into.
        local.fill(0, len, FILL).unwrap();
        let write = xfer(XferOp::Write, TransportKind::Shm, None);
        post_and_wait(&write, GUARD).unwrap();
        local.fill(0, len, 0).unwrap();
        // The READ, as a decode posts it: with the prefill's request id as the notification.
        let read = std::sync::Arc::new(xfer(XferOp::Read, transport, Some("chaos-death-req")));
        let answer = run_in_background(read.clone());
        // Kill the prefill once the first bytes are in, and before the last ones are.
        let posted = Instant::now();
        while !filled_at(&local, 4096) {
            assert!(
                posted.elapsed() < GUARD,
                "{transport}: the READ did not start"
            );
            std::thread::yield_now();
        }
        // Stopped first, a `tcp` sender sends no more, so the READ is surely cut even on a busy machine.
        p.proc.signal("STOP");
        let cut = !filled_at(&local, len - 1);
        p.proc.kill();
        let killed = Instant::now();
        let (result, took) = answer
            .recv_timeout(ANSWER)
            .unwrap_or_else(|_| panic!("{transport}: no answer {ANSWER:?} after the prefill died"));
        eprintln!(
            "{transport}: prefill killed {} the READ of {} MiB; answer {:.0} ms after the kill ({:.0} ms in all): {result:?}",
            if cut { "in the middle of" } else { "at the end of" },
            len >> 20,
            killed.elapsed().as_secs_f64() * 1e3,
            took.as_secs_f64() * 1e3,
        );
        match &result {
            Err(e) => {
                assert!(
                    matches!(
                        e,
                        TransferError::PeerDisconnected { .. } | TransferError::Timeout { .. }
                    ),
                    "{transport}: not a clear error: {e}"
                );
                assert!(e.is_retryable(), "{transport}: {e}");
            }
            // A success is only ever whole: `shm` keeps the mapping until its copy ends, `cma` checks the
            // process after the copy, `tcp` completes only with every byte received.
            Ok(()) => assert!(
                all_filled(&local),
                "{transport}: a READ cut by the prefill's death succeeded with partial bytes"
            ),
        }
        assert!(cut, "{transport}: the READ was over before the kill");
        // The peer stays lost: posting again fails at once.
        let again = Instant::now();
        let second = post_and_wait(&read, ANSWER);
        assert!(
            matches!(second, Err(TransferError::PeerDisconnected { .. })),
            "{transport}: a post after the prefill died: {second:?}"
        );
        assert!(again.elapsed() < ANSWER, "{transport}: second post hung");
        assert!(
            wait_until(Duration::from_secs(10), || mappings_of(
                std::process::id(),
                &engine
            ) == 0),
            "{transport}: the dead prefill's memory is still mapped"
        );
    }
}

/// A decode engine whose prefill is killed while the decode reads its KV (over `shm`, the transport engines of
/// one host pick) answers that request promptly, keeps serving, and unmaps the dead prefill's memory.
#[test]
fn a_decode_keeps_serving_when_its_prefill_dies_mid_read() {
    let tag = std::process::id();
    let (p1_id, d_id) = (
        format!("chaos-death-p1-{tag}"),
        format!("chaos-death-d-{tag}"),
    );
    let mut p1 = KvMock::with_blocks("prefill", BLOCKS, 1, &["--engine-id", &p1_id]);
    let d = KvMock::with_blocks("decode", BLOCKS, 1, &["--engine-id", &d_id]);
    // Most of the prefill's blocks: a READ of about 200 MiB.
    let prompt = pdx_mock::synthetic_prompt(16 * (BLOCKS as usize - 16), 7);
    let kv = prefill(&p1, &prompt);
    let (tx, rx) = mpsc::channel();
    let (port, body) = (d.http, prompt.clone());
    std::thread::spawn(move || {
        let t = Instant::now();
        let r = complete(port, &body, 2, kv);
        let _ = tx.send((r, t.elapsed()));
    });
    // The decode's own KV memory is touched for the first time by the copy into it: it is under way once some
    // of it is resident.
    let resident_kib = || resident_kib_of(d.pid(), &d_id);
    let copying = wait_until(GUARD, || resident_kib() > 8 * 1024);
    let at_kill = resident_kib();
    p1.proc.kill();
    let killed = Instant::now();
    let ((status, v), took) = rx
        .recv_timeout(ANSWER)
        .expect("the decode answered after its prefill died");
    eprintln!(
        "decode: prefill killed during the READ ({} MiB copied); answer {:.0} ms after the kill ({:.0} ms in all): {status} {v}",
        at_kill >> 10,
        killed.elapsed().as_secs_f64() * 1e3,
        took.as_secs_f64() * 1e3,
    );
    assert!(copying, "the decode never copied the prefill's KV");
    if status == 200 {
        // Read whole before the exit: the tokens follow as usual.
        assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
    } else {
        assert_eq!(status, 502, "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(&p1_id), "the error names the prefill: {v}");
    }
    // The decode serves the next request, prefilled by a fresh engine.
    let p2 = KvMock::with_blocks("prefill", 16, 1, &["--engine-id", &format!("{p1_id}-2")]);
    let prompt = "a fresh prefill for a decode that lost the last one";
    let kv = prefill(&p2, prompt);
    let (st, v) = complete(d.http, prompt, 3, kv);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
    assert!(
        wait_until(Duration::from_secs(10), || mappings_of(d.pid(), &p1_id)
            == 0),
        "the decode still maps the dead prefill's KV memory"
    );
}
