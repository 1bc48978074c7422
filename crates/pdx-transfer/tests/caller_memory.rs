//! Host memory the caller allocated and registered by pointer (`Memory::from_raw_parts` + `Agent::register`,
//! the way an engine registers its KV cache or a NumPy array), reached in place by a peer process.
//!
//! This test binary re-executes itself as the owner (`owner_process`, run only when `PDX_CALLER_OWNER` is set):
//! it allocates a plain heap buffer (no memfd, nothing pdx allocated), fills it with a pattern through the raw
//! pointer, registers it, and answers notifications. The test process is the initiator, per transport (`cma`,
//! `tcp`, and `ucx` with the feature):
//! 1. READ the whole region in 64 scattered blocks, every byte checked against the owner's pattern;
//! 2. WRITE a second pattern over the whole region in scattered blocks, with a notification; the owner then
//!    checks every byte *in its own buffer* (not through pdx), writes a third pattern into it in place, and
//!    notifies back;
//! 3. READ the whole region again: every byte is the owner's in-place write.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use common::pattern;
use pdx_transfer::*;

const REGION: usize = 4 << 20;
const BLOCKS: usize = 64;
/// Pattern seeds: the owner's initial bytes, the initiator's WRITE, the owner's in-place rewrite.
const SEED_OWNER: u64 = 31;
const SEED_WRITE: u64 = 32;
const SEED_REWRITE: u64 = 33;

/// The caller's buffer, addressed only through its raw pointer (pdx and the peer write into it behind Rust's
/// back, so no reference to it lives across a transfer).
struct CallerBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

impl CallerBuffer {
    fn new(len: usize) -> CallerBuffer {
        let raw = Box::into_raw(vec![0u8; len].into_boxed_slice());
        CallerBuffer {
            ptr: NonNull::new(raw.cast::<u8>()).expect("non-null"),
            len,
        }
    }
    /// Copies the whole buffer out. Called only between transfers (after the notification that the peer's WRITE
    /// is complete), so nothing writes the bytes while they are copied.
    fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len];
        // SAFETY: `ptr..ptr+len` is the live allocation made in `new`; `out` is a distinct allocation of `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), out.as_mut_ptr(), self.len) };
        out
    }
    /// Overwrites the whole buffer in place (the engine writing its own memory), between transfers.
    fn store(&self, data: &[u8]) {
        assert_eq!(data.len(), self.len);
        // SAFETY: as in `snapshot`, with the copy going the other way.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr(), self.len) };
    }
}

impl Drop for CallerBuffer {
    fn drop(&mut self) {
        let slice = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
        // SAFETY: `slice` is exactly the boxed slice leaked in `new`, freed once, here, after the agent and its
        // registration (declared after the buffer in `owner_process`, so dropped before it).
        drop(unsafe { Box::from_raw(slice) });
    }
}

/// The owner: registers its own heap buffer by pointer; on a notification `"<sender addr> wrote"` it checks the
/// buffer in place against the initiator's pattern, rewrites it in place and answers `"<..> verified"` (or
/// `"mismatch at <offset>"`). Exits when stdin closes.
#[test]
#[ignore = "helper process of the caller-memory tests; runs only when PDX_CALLER_OWNER is set"]
fn owner_process() {
    if std::env::var_os("PDX_CALLER_OWNER").is_none() {
        return;
    }
    let buf = CallerBuffer::new(REGION);
    buf.store(&pattern(SEED_OWNER, 0, REGION));
    let agent = Agent::new(AgentConfig::new("caller-owner")).unwrap();
    // SAFETY: the one contract of memory registered by pointer: `buf` stays allocated until the registration and
    // the agent (both declared after it, so dropped before it) are gone.
    let mem = unsafe { Memory::from_raw_parts(buf.ptr, buf.len) };
    let region = agent.register(mem, MemoryKind::Host).unwrap();
    assert!(!region.is_shareable(), "caller memory is no memfd");
    assert_eq!(
        region.addr(),
        buf.ptr.as_ptr() as u64,
        "registered in place"
    );
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
            let sender = text.split(' ').next().unwrap_or_default().to_string();
            let got = buf.snapshot();
            let want = pattern(SEED_WRITE, 0, REGION);
            let reply = match got.iter().zip(&want).position(|(a, b)| a != b) {
                None => {
                    buf.store(&pattern(SEED_REWRITE, 0, REGION));
                    format!("{sender} verified")
                }
                Some(i) => format!("{sender} mismatch at {i}"),
            };
            if agent.fetch_remote(&sender).is_ok() {
                agent.notify(&n.from, reply.into_bytes()).unwrap();
            }
        }
    }
}

/// The owner process, killed on drop (a failing assertion never leaves it behind).
struct Owner {
    child: Child,
    addr: String,
    base: u64,
}

impl Owner {
    fn spawn() -> Owner {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "owner_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("PDX_CALLER_OWNER", "1")
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
            .expect("owner did not start");
        std::thread::spawn(move || lines.for_each(drop));
        let f: Vec<&str> = ready.split_whitespace().collect();
        Owner {
            addr: f[1].to_string(),
            base: f[2].parse().unwrap(),
            child,
        }
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `BLOCKS` blocks covering the whole region: block `i` of the local side is block `(i * 7 + 3) % BLOCKS` of the
/// remote side, so the transfer is scattered, not one contiguous copy.
fn scattered(local: u64, remote: u64) -> (XferDescList, XferDescList) {
    let b = (REGION / BLOCKS) as u64;
    let l = XferDescList::host_from((0..BLOCKS as u64).map(|i| (local + i * b, b)));
    let r = XferDescList::host_from(
        (0..BLOCKS as u64).map(|i| (remote + ((i * 7 + 3) % BLOCKS as u64) * b, b)),
    );
    (l, r)
}

/// The remote region's bytes as seen through `scattered`'s local side.
fn scattered_view(remote: &[u8]) -> Vec<u8> {
    let b = REGION / BLOCKS;
    (0..BLOCKS)
        .flat_map(|i| {
            let r = (i * 7 + 3) % BLOCKS;
            remote[r * b..(r + 1) * b].iter().copied()
        })
        .collect()
}

fn run(
    me: &Agent,
    peer: &str,
    op: XferOp,
    l: &XferDescList,
    r: &XferDescList,
    t: TransportKind,
    notif: Option<Vec<u8>>,
) {
    let req = me
        .create_xfer_from_descs(
            op,
            l,
            peer,
            r,
            XferOptions {
                transport: Some(t),
                notif,
            },
        )
        .unwrap();
    assert_eq!(req.transport(), t);
    if req.post().unwrap() == XferStatus::InProgress {
        req.wait(Some(Duration::from_secs(20))).unwrap();
    }
}

fn read_write_in_place(transport: TransportKind) {
    let owner = Owner::spawn();
    let me = Agent::new(AgentConfig::new(format!("caller-initiator-{transport}"))).unwrap();
    let local = me.allocate(REGION).unwrap();
    let peer = me.fetch_remote(&owner.addr).unwrap();
    let (l, r) = scattered(local.addr(), owner.base);

    // 1. READ: the owner's own bytes.
    run(&me, &peer, XferOp::Read, &l, &r, transport, None);
    assert!(
        common::read_back(&local, 0, REGION) == scattered_view(&pattern(SEED_OWNER, 0, REGION)),
        "{transport}: READ of caller memory returned other bytes"
    );

    // 2. WRITE with a notification; the owner checks its buffer in place and rewrites it.
    local
        .write(0, &scattered_view(&pattern(SEED_WRITE, 0, REGION)))
        .unwrap();
    let me_addr = me.listen_addr().unwrap().to_string();
    run(
        &me,
        &peer,
        XferOp::Write,
        &l,
        &r,
        transport,
        Some(format!("{me_addr} wrote").into_bytes()),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let reply = loop {
        assert!(
            Instant::now() < deadline,
            "{transport}: no answer from the owner"
        );
        if let Some(n) = me.wait_notifications(Duration::from_millis(200)).pop() {
            break String::from_utf8_lossy(&n.payload).into_owned();
        }
    };
    assert_eq!(
        reply,
        format!("{me_addr} verified"),
        "{transport}: the owner's check of its own buffer"
    );

    // 3. READ again: the owner's in-place rewrite, not a copy pdx kept.
    local.fill(0, REGION, 0).unwrap();
    run(&me, &peer, XferOp::Read, &l, &r, transport, None);
    assert!(
        common::read_back(&local, 0, REGION) == scattered_view(&pattern(SEED_REWRITE, 0, REGION)),
        "{transport}: READ after the owner's in-place write returned other bytes"
    );
}

#[test]
fn cma_reads_and_writes_caller_memory_in_place() {
    read_write_in_place(TransportKind::Cma);
}

#[test]
fn tcp_reads_and_writes_caller_memory_in_place() {
    read_write_in_place(TransportKind::Tcp);
}

#[cfg(feature = "ucx")]
#[test]
fn ucx_reads_and_writes_caller_memory_in_place() {
    read_write_in_place(TransportKind::Ucx);
}

#[test]
fn shm_is_refused_for_caller_memory() {
    // Caller memory is no memfd: same-host peers cannot map it, so `shm` is refused and `cma` is the default.
    let owner = Owner::spawn();
    let me = Agent::new(AgentConfig::new("caller-shm")).unwrap();
    let local = me.allocate(4096).unwrap();
    let peer = me.fetch_remote(&owner.addr).unwrap();
    let l = XferDescList::host_from([(local.addr(), 4096)]);
    let r = XferDescList::host_from([(owner.base, 4096)]);
    let forced = me.create_xfer_from_descs(
        XferOp::Read,
        &l,
        &peer,
        &r,
        XferOptions {
            transport: Some(TransportKind::Shm),
            ..Default::default()
        },
    );
    assert!(forced.is_err(), "shm over caller memory must be refused");
    let chosen = me
        .create_xfer_from_descs(XferOp::Read, &l, &peer, &r, XferOptions::default())
        .unwrap();
    assert_eq!(chosen.transport(), TransportKind::Cma);
}
