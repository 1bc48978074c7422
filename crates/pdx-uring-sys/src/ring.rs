//! A single-threaded io_uring of pdx's own, used the way io_uring is meant to be used (issue 19): multishot
//! accept and receive into a provided buffer ring, a fixed-file table, sends whose bytes the ring keeps alive
//! (or `'static` requests whose successful completions are skipped), and one `io_uring_enter` per loop turn that
//! submits everything queued and waits for the next completion.
//!
//! The caller drives it as an event loop: queue operations ([`Ring::listen`], [`Ring::connect`],
//! [`Ring::recv`], [`Ring::send_static`], [`Ring::send_vec`], [`Ring::close`]), then [`Ring::wait`] submits them
//! and hands out what completed as [`Event`] values. A received buffer comes as a [`RecvBuf`] guard that gives
//! the buffer back to the kernel when dropped.
//!
//! # Soundness: where the kernel reads or writes user memory, and why it is never freed or shared under it
//! * **Provided buffers** (the kernel writes received bytes into them): one allocation per ring, owned by an
//!   `Rc`'d pool that the ring, and every [`RecvBuf`], hold. A buffer is either in the buffer ring (the kernel
//!   may write it; safe code has no reference to it) or out of it (named by exactly one completion, whose
//!   [`RecvBuf`] is the only handle; the kernel does not touch a buffer it has consumed until it is published
//!   again, which only that guard's drop does). Buffer ids from the kernel are checked against the pool's size.
//!   When the ring is dropped it cancels every request synchronously (`IORING_REGISTER_SYNC_CANCEL`; it does
//!   not wait for a request already running in an io-wq worker, which is only signalled, see
//!   io_uring/cancel.c), then reaps completions for up to 1 s until no owned send or connect is in flight, and
//!   unregisters the buffer ring before the pool can be freed; if the cancel or the unregister fails, the pool
//!   is leaked instead, and so is every send vector or connect address still in flight at the deadline.
//!   Receives never run in an io-wq worker (sockets can be polled, and `IOSQE_ASYNC` is never set), so a
//!   provided buffer is only ever chosen on the ring's own thread.
//! * **The buffer ring itself** (the kernel reads its entries): part of the pool, page-aligned, written only
//!   by the ring's thread (the pool is `!Send`), entries before the release-store of the tail.
//! * **Owned sends** ([`Ring::send_vec`]): the `Vec<u8>` moves into the ring and stays in its slab until the
//!   send's completion, then goes back to the caller; its heap memory does not move while owned. Their
//!   completions are never skipped. On drop, a vector whose completion did not come within the drain is leaked.
//! * **Static sends** ([`Ring::send_static`]): `&'static [u8]`, alive for the process; these alone may use
//!   `IOSQE_CQE_SKIP_SUCCESS` (a failed send still completes: the kernel posts failures).
//! * **Connect addresses**: boxed in an address slab until the connect's own completion (its `user_data` holds
//!   the slab index), even if the socket was closed before; leaked on drop if it never came.
//! * **File descriptors / fixed slots**: a closed socket's queued entries are submitted before its requests are
//!   cancelled and its slot (or fd number) is released (if the queue will not drain, the close fails and the
//!   slot stays live), so a later socket reusing the slot never receives operations meant for the old one;
//!   every operation on a handle checks the slot's generation (`NotConnected` for a stale one); completions of
//!   a closed socket carry an older generation and are dropped (their buffers go back to the ring).
//!
//! Sends use `MSG_WAITALL` (the kernel retries a short send on a stream socket until all bytes are out or an
//! error: a completion shorter than the send is an error) and `MSG_NOSIGNAL`.
//!
//! Registered ring fd (`IORING_REGISTER_RING_FDS`): not used; the `io-uring` 0.6 crate has no call for it, and
//! the ring's users are single-threaded processes, whose `fdget` on the ring fd already skips the reference
//! count (the file table is not shared), which is the cost a registered ring fd saves.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::Cell;
use std::collections::VecDeque;
use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{CancelBuilder, Fd, Fixed, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};

/// The ring setup: how completions are run (see [`RingConfig::setup`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// `SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN` (Linux 6.1+): completion work runs only when the thread
    /// enters the kernel to wait, never by interrupting it.
    Defer,
    /// `SINGLE_ISSUER | COOP_TASKRUN` (6.0+): completion work runs at the next kernel entry, without an
    /// inter-processor interrupt.
    Coop,
    /// A plain ring.
    Plain,
}

impl Setup {
    /// The name printed in reports: `defer`, `coop` or `plain`.
    pub fn name(self) -> &'static str {
        match self {
            Setup::Defer => "defer",
            Setup::Coop => "coop",
            Setup::Plain => "plain",
        }
    }
}

/// How to build a [`Ring`].
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// Submission queue entries (the completion queue gets 4x).
    pub entries: u32,
    /// The setups to try, in order; the first the kernel accepts is used.
    pub setup: Vec<Setup>,
    /// Register sockets in a fixed-file table of `max_sockets` slots (falls back to plain fds if the kernel
    /// refuses the table).
    pub fixed_files: bool,
    /// Most sockets open at once (listener excluded; at most [`MAX_SOCKETS`]); further accepted connections are
    /// closed at once.
    pub max_sockets: u32,
    /// Buffers in the provided buffer ring (a power of two, at most 32768).
    pub buf_count: u16,
    /// Bytes per provided buffer.
    pub buf_size: u32,
    /// Skip the successful completions of [`Ring::send_static`] (`IOSQE_CQE_SKIP_SUCCESS`).
    pub skip_static_sends: bool,
    /// Set `TCP_NODELAY` on every accepted and connected socket.
    pub nodelay: bool,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            entries: 1024,
            setup: vec![Setup::Defer, Setup::Coop, Setup::Plain],
            fixed_files: true,
            max_sockets: 4096,
            buf_count: 1024,
            buf_size: 16 * 1024,
            skip_static_sends: true,
            nodelay: true,
        }
    }
}

/// What the ring got from the kernel (printed at start by its users).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// The setup the kernel accepted.
    pub setup: Setup,
    /// Sockets live in a fixed-file table.
    pub fixed_files: bool,
    /// Successful static sends post no completion.
    pub skip_static_sends: bool,
    /// [`Ring::wait_batch`] can wait for several completions with a bound on the wait for the first
    /// (`min_wait_usec` of `io_uring_getevents_arg`, `IORING_FEAT_MIN_TIMEOUT`, Linux 6.12+); learnt at the
    /// first such wait, true until the kernel refuses it.
    pub min_wait: bool,
}

impl std::fmt::Display for Features {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "setup {}, fixed files {}, skip-success static sends {}, registered ring fd no, \
             min-wait batches {}, multishot accept+recv with a provided buffer ring",
            self.setup.name(),
            yes(self.fixed_files),
            yes(self.skip_static_sends),
            yes(self.min_wait)
        )
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Counters of the ring's work since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// `io_uring_enter` calls made by [`Ring::wait`] (and by a full submission queue).
    pub enters: u64,
    /// Submission queue entries queued.
    pub sqes: u64,
    /// Completions read.
    pub cqes: u64,
    /// Multishot receives armed again after the kernel ended them.
    pub recv_rearms: u64,
    /// Multishot receives ended because the buffer ring was empty (`ENOBUFS`).
    pub enobufs: u64,
    /// Accepted connections closed at once because every socket slot was in use.
    pub rejected: u64,
}

/// A socket of the ring: its slot and the slot's generation (a closed socket's handle never matches a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sock {
    idx: u32,
    gen: u32,
}

impl Sock {
    /// The socket's slot, below [`RingConfig::max_sockets`]: callers index their own tables with it (a slot is
    /// reused only after [`Ring::close`]).
    pub fn slot(self) -> usize {
        self.idx as usize
    }
}

/// A [`Ring::send_vec`] that was not queued: why, and the vector back.
#[derive(Debug)]
pub struct SendError {
    /// Why (`NotConnected`: the socket is closed or not of this ring).
    pub error: io::Error,
    /// The caller's vector, untouched.
    pub buf: Vec<u8>,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "owned send not queued: {}", self.error)
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<SendError> for io::Error {
    fn from(e: SendError) -> io::Error {
        e.error
    }
}

/// Something that completed.
#[derive(Debug)]
pub enum Event {
    /// A connection was accepted on the listener (its receive is not armed yet: [`Ring::recv`]).
    Accepted(Sock),
    /// Accepting failed (the multishot accept is armed again).
    AcceptFailed(io::Error),
    /// A [`Ring::connect`] finished.
    Connected(Sock, io::Result<()>),
    /// Bytes received on a socket (never empty).
    Data(Sock, RecvBuf),
    /// The socket's receive ended for good: `None` at end of stream, else the error. The socket stays open
    /// (sends still work) until [`Ring::close`].
    RecvEnded(Sock, Option<io::Error>),
    /// A send finished: all bytes went out, or the error; [`Ring::send_vec`]'s vector comes back.
    Sent(Sock, io::Result<()>, Option<Vec<u8>>),
}

// user_data: kind in the top 8 bits; for socket operations the slot's generation (16 bits), the slot (20 bits)
// and, for static sends, the length (20 bits), for connects the address slab index (20 bits); for owned sends
// the send slab index.
const K_ACCEPT: u64 = 1;
const K_CONNECT: u64 = 2;
const K_RECV: u64 = 3;
const K_SEND_STATIC: u64 = 4;
const K_SEND_VEC: u64 = 5;
const GEN_MASK: u32 = 0xffff;
/// Most socket slots (20 bits of `user_data`).
pub const MAX_SOCKETS: u32 = 1 << 20;
/// Longest [`Ring::send_static`], bytes (20 bits of `user_data`).
pub const MAX_STATIC_SEND: usize = (1 << 20) - 1;
/// How many `io_uring_enter` calls a full (or, in [`Ring::close`], non-empty) submission queue gets before
/// the operation fails: the kernel answers EAGAIN/EBUSY while its completion queue overflows.
const SUBMIT_TRIES: usize = 64;
/// Most connects in flight (their address slab index is 20 bits of `user_data`).
const MAX_CONNECTS: usize = 1 << 20;
const SEND_FLAGS: i32 = libc::MSG_NOSIGNAL | libc::MSG_WAITALL;
/// The provided buffer group id of the ring's pool.
const BGID: u16 = 0;

fn ud(kind: u64, s: Sock, extra: u32) -> u64 {
    kind << 56
        | u64::from(s.gen & GEN_MASK) << 40
        | u64::from(s.idx & (MAX_SOCKETS - 1)) << 20
        | u64::from(extra & 0xfffff)
}

fn ud_sock(ud: u64) -> Sock {
    Sock {
        idx: (ud >> 20) as u32 & (MAX_SOCKETS - 1),
        gen: (ud >> 40) as u32 & GEN_MASK,
    }
}

/// The provided buffers of one ring: the buffer ring (entries the kernel reads) and the buffers (bytes the
/// kernel writes). Not `Send`: its tail is written by one thread.
struct Pool {
    ring: *mut u8,
    ring_layout: Layout,
    data: *mut u8,
    data_layout: Layout,
    count: u16,
    buf_size: u32,
    /// Our copy of the ring's tail (the kernel reads the shared one).
    tail: Cell<u16>,
    /// Buffers out of the ring (held by `RecvBuf`s).
    out: Cell<u32>,
}

/// `struct io_uring_buf`: `addr: u64, len: u32, bid: u16, resv: u16` (the ring's tail is entry 0's `resv`).
const ENTRY: usize = 16;

impl Pool {
    fn new(count: u16, buf_size: u32) -> io::Result<Pool> {
        if !count.is_power_of_two() || count > 32768 || buf_size == 0 {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                "buf_count must be a power of two <= 32768, buf_size > 0",
            ));
        }
        let bad = |_| io::Error::new(ErrorKind::InvalidInput, "buffer pool too large");
        // The kernel wants the buffer ring page-aligned; the page size is the system's, not always 4 KiB.
        // SAFETY: sysconf reads a system constant.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096);
        let ring_layout = Layout::from_size_align(count as usize * ENTRY, page).map_err(bad)?;
        let data_layout =
            Layout::from_size_align(count as usize * buf_size as usize, page).map_err(bad)?;
        // SAFETY: both layouts have a non-zero size (count >= 1, buf_size >= 1).
        let ring = unsafe { alloc_zeroed(ring_layout) };
        // SAFETY: as above.
        let data = unsafe { alloc_zeroed(data_layout) };
        if ring.is_null() || data.is_null() {
            // SAFETY: each non-null pointer came from `alloc_zeroed` with its layout and is freed once.
            unsafe {
                if !ring.is_null() {
                    dealloc(ring, ring_layout);
                }
                if !data.is_null() {
                    dealloc(data, data_layout);
                }
            }
            return Err(io::Error::from(ErrorKind::OutOfMemory));
        }
        let pool = Pool {
            ring,
            ring_layout,
            data,
            data_layout,
            count,
            buf_size,
            tail: Cell::new(0),
            out: Cell::new(u32::from(count)),
        };
        for bid in 0..count {
            pool.publish(bid);
        }
        Ok(pool)
    }

    /// Puts buffer `bid` back at the ring's tail, for the kernel to fill again.
    fn publish(&self, bid: u16) {
        debug_assert!(bid < self.count);
        let tail = self.tail.get();
        let slot = usize::from(tail & (self.count - 1));
        let addr = self.data as u64 + u64::from(bid) * u64::from(self.buf_size);
        // SAFETY: `slot < count`, so the entry lies inside the ring allocation (16-byte entries, 8-aligned
        // fields at offsets 0, 8, 12); the kernel only reads entries up to the tail, which this entry is not yet
        // behind. Entry 0's `resv` (the tail) is not written here.
        unsafe {
            let e = self.ring.add(slot * ENTRY);
            std::ptr::write_volatile(e.cast::<u64>(), addr);
            std::ptr::write_volatile(e.add(8).cast::<u32>(), self.buf_size);
            std::ptr::write_volatile(e.add(12).cast::<u16>(), bid);
        }
        let tail = tail.wrapping_add(1);
        self.tail.set(tail);
        // SAFETY: offset 14 of the ring (entry 0's `resv`) is the shared tail, a 2-aligned u16 inside the
        // allocation that only this thread writes; the release store orders the entry writes above before it.
        unsafe { (*self.ring.add(14).cast::<AtomicU16>()).store(tail, Ordering::Release) };
        self.out.set(self.out.get() - 1);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: both came from `alloc_zeroed` with these layouts; the pool is only dropped once the kernel no
        // longer uses it (the ring unregistered it, or leaked its reference) and no `RecvBuf` is left.
        unsafe {
            dealloc(self.ring, self.ring_layout);
            dealloc(self.data, self.data_layout);
        }
    }
}

/// Bytes the kernel received into a provided buffer; dropping it gives the buffer back to the ring.
pub struct RecvBuf {
    pool: Rc<Pool>,
    bid: u16,
    len: u32,
}

impl RecvBuf {
    /// The received bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: buffer `bid` (< count, checked when the completion was read) lies inside the pool's data
        // allocation, which `self.pool` keeps alive; the kernel wrote `len <= buf_size` bytes into it and posted
        // the completion, and will not write it again until `drop` publishes it; this guard is its only handle.
        unsafe {
            std::slice::from_raw_parts(
                self.pool
                    .data
                    .add(usize::from(self.bid) * self.pool.buf_size as usize),
                self.len as usize,
            )
        }
    }
}

impl std::ops::Deref for RecvBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for RecvBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBuf")
            .field("bid", &self.bid)
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        self.pool.publish(self.bid);
    }
}

/// One socket slot.
#[derive(Default)]
struct Slot {
    /// Bumped at every close (32 bits in handles; completions carry the low 16 bits, and free slots are reused
    /// oldest first, so a stale completion matches only after 65536 reuses of one slot).
    gen: u32,
    live: bool,
    /// The socket's fd when it is not in the fixed-file table.
    fd: Option<OwnedFd>,
    recv_armed: bool,
}

/// The ring; see the module docs.
pub struct Ring {
    ring: IoUring,
    pool: Rc<Pool>,
    features: Features,
    slots: Vec<Slot>,
    /// Free slots, reused oldest first.
    free: VecDeque<u32>,
    starved: Vec<Sock>,
    /// Owned sends in flight: the vector and its socket, by send slab index.
    sends: Vec<Option<(Vec<u8>, Sock, u32)>>,
    free_sends: Vec<u32>,
    /// Connect addresses in flight, by index (in the connect's `user_data`), until the connect's completion.
    addrs: Vec<Option<Box<socket2::SockAddr>>>,
    free_addrs: Vec<u32>,
    listener: Option<TcpListener>,
    /// The multishot accept ended on fd or memory exhaustion and is not armed: armed again at the next
    /// [`Ring::close`] or after the next wait turn (not at once: that would spin on the same error).
    accept_paused: bool,
    cqes: Vec<(u64, i32, u32)>,
    nodelay: bool,
    stats: Stats,
}

impl Ring {
    /// Sets up the ring (the first of `cfg.setup` the kernel accepts), its fixed-file table (if asked and
    /// accepted) and its provided buffer ring. Errors: no setup accepted, the buffer ring refused (Linux < 5.19),
    /// bad sizes, a kernel older than 6.0 (multishot receive, `IORING_RECV_MULTISHOT`, came in 6.0; an older
    /// kernel would take the flag as a one-shot receive's unknown flag only at the first receive). In fd mode
    /// (no fixed-file table) `max_sockets` is capped [`FD_HEADROOM`] below `RLIMIT_NOFILE`.
    pub fn new(cfg: &RingConfig) -> io::Result<Ring> {
        if kernel_version().is_none_or(|v| v < (6, 0)) {
            return Err(io::Error::new(
                ErrorKind::Unsupported,
                "io_uring multishot receive needs Linux 6.0+",
            ));
        }
        let mut last = io::Error::new(ErrorKind::InvalidInput, "no ring setup asked for");
        let mut got = None;
        for &setup in &cfg.setup {
            let mut b = IoUring::builder();
            b.setup_cqsize(cfg.entries.saturating_mul(4));
            match setup {
                Setup::Defer => {
                    b.setup_single_issuer()
                        .setup_coop_taskrun()
                        .setup_defer_taskrun();
                }
                Setup::Coop => {
                    b.setup_single_issuer().setup_coop_taskrun();
                }
                Setup::Plain => {}
            }
            match b.build(cfg.entries) {
                Ok(r) => {
                    got = Some((r, setup));
                    break;
                }
                Err(e) => last = e,
            }
        }
        if cfg.max_sockets > MAX_SOCKETS {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                "max_sockets over 2^20",
            ));
        }
        let (ring, setup) = got.ok_or(last)?;
        let fixed = cfg.fixed_files
            && ring
                .submitter()
                .register_files_sparse(cfg.max_sockets)
                .is_ok();
        let max_sockets = if fixed {
            cfg.max_sockets
        } else {
            cfg.max_sockets
                .min(nofile_limit().saturating_sub(FD_HEADROOM))
        };
        let pool = Rc::new(Pool::new(cfg.buf_count, cfg.buf_size)?);
        // SAFETY: the ring memory (count entries, page-aligned) stays allocated until the buffer ring is
        // unregistered in `Drop` (or forever, if that fails: the pool is leaked then).
        unsafe {
            ring.submitter()
                .register_buf_ring(pool.ring as u64, cfg.buf_count, BGID)?
        };
        Ok(Ring {
            ring,
            pool,
            features: Features {
                setup,
                fixed_files: fixed,
                skip_static_sends: cfg.skip_static_sends,
                min_wait: true,
            },
            slots: (0..max_sockets).map(|_| Slot::default()).collect(),
            free: (0..max_sockets).collect(),
            starved: Vec::new(),
            sends: Vec::new(),
            free_sends: Vec::new(),
            addrs: Vec::new(),
            free_addrs: Vec::new(),
            listener: None,
            accept_paused: false,
            cqes: Vec::with_capacity(cfg.entries as usize * 4),
            nodelay: cfg.nodelay,
            stats: Stats::default(),
        })
    }

    /// What the ring got.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Buffers of the pool held by [`RecvBuf`]s now.
    pub fn bufs_out(&self) -> u32 {
        self.pool.out.get()
    }

    /// Accepts connections on `listener` with one multishot accept (armed again whenever the kernel ends it);
    /// each comes as [`Event::Accepted`]. The ring keeps the listener open for its life. One listener per ring.
    pub fn listen(&mut self, listener: TcpListener) -> io::Result<()> {
        if self.listener.is_some() {
            return Err(io::Error::new(
                ErrorKind::AlreadyExists,
                "ring already listens",
            ));
        }
        self.listener = Some(listener);
        // On failure the accept is paused and armed again later (as after EMFILE).
        self.rearm_accept()
    }

    /// Arms the listener's multishot accept again (after the kernel ended it, or a pause).
    fn rearm_accept(&mut self) -> io::Result<()> {
        self.accept_paused = false;
        match self.listener.as_ref().map(|l| l.as_raw_fd()) {
            Some(fd) => self
                .arm_accept(fd)
                .inspect_err(|_| self.accept_paused = true),
            None => Ok(()),
        }
    }

    fn arm_accept(&mut self, fd: RawFd) -> io::Result<()> {
        let e = opcode::AcceptMulti::new(Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(K_ACCEPT << 56);
        // SAFETY: the accept reads and writes no user memory (no address out-parameters); the listener fd
        // stays open as long as the ring (it is the ring's field).
        unsafe { self.push(e) }
    }

    /// Opens a TCP connection to `addr` (the socket now, the connect queued): [`Event::Connected`] follows.
    /// Errors: no free socket slot, socket creation or registration failed, the submission queue full and not
    /// draining (the socket is closed again then).
    pub fn connect(&mut self, addr: SocketAddr) -> io::Result<Sock> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        if self.nodelay {
            s.set_nodelay(true)?;
        }
        let sock = self.install(OwnedFd::from(s))?;
        let a = Box::new(socket2::SockAddr::from(addr));
        let (ptr, len) = (a.as_ptr(), a.len());
        let i = match self.free_addrs.pop() {
            Some(i) => i,
            None if self.addrs.len() < MAX_CONNECTS => {
                self.addrs.push(None);
                (self.addrs.len() - 1) as u32
            }
            None => {
                self.undo_install(sock);
                return Err(io::Error::new(
                    ErrorKind::OutOfMemory,
                    "too many connects in flight",
                ));
            }
        };
        self.addrs[i as usize] = Some(a);
        let e = self.with_target(sock, |t| match t {
            T::Fixed(f) => opcode::Connect::new(f, ptr, len).build(),
            T::Fd(f) => opcode::Connect::new(f, ptr, len).build(),
        });
        // SAFETY: the address is boxed in the address slab until this connect's completion (`K_CONNECT` carries
        // its index), whether or not the socket was closed meanwhile; if the push fails nothing was queued.
        let r = e.and_then(|e| unsafe { self.push(e.user_data(ud(K_CONNECT, sock, i))) });
        if let Err(e) = r {
            self.addrs[i as usize] = None;
            self.free_addrs.push(i);
            self.undo_install(sock);
            return Err(e);
        }
        Ok(sock)
    }

    /// Arms the socket's multishot receive: [`Event::Data`] for every received segment until
    /// [`Event::RecvEnded`]. The ring arms it again itself when the kernel ends it early (a full completion
    /// queue, or `ENOBUFS` once buffers are back). Nothing if it is armed or the socket is closed. Errors: the
    /// submission queue full and not draining (the receive is armed at a later wait turn).
    pub fn recv(&mut self, sock: Sock) -> io::Result<()> {
        if !self.live(sock) || self.slots[sock.slot()].recv_armed {
            return Ok(());
        }
        self.arm_recv(sock)
    }

    /// Queues the multishot receive; `recv_armed` turns true only once it is queued. If it cannot be queued
    /// the socket waits on `starved` for the next wait turn.
    fn arm_recv(&mut self, sock: Sock) -> io::Result<()> {
        let e = self.with_target(sock, |t| match t {
            T::Fixed(f) => opcode::RecvMulti::new(f, BGID).build(),
            T::Fd(f) => opcode::RecvMulti::new(f, BGID).build(),
        })?;
        // SAFETY: the receive writes only into buffers of the pool, which outlives every request (module docs).
        match unsafe { self.push(e.user_data(ud(K_RECV, sock, 0))) } {
            Ok(()) => {
                self.slots[sock.slot()].recv_armed = true;
                Ok(())
            }
            Err(e) => {
                if !self.starved.contains(&sock) {
                    self.starved.push(sock);
                }
                Err(e)
            }
        }
    }

    /// Sends all of `data` (a prebuilt request, alive for the process; at most [`MAX_STATIC_SEND`] bytes). With `skip_static_sends`, only a
    /// failure posts [`Event::Sent`]; else every send does. Errors: `NotConnected` if `sock` is not live,
    /// `InvalidInput` over the size, the submission queue full and not draining.
    pub fn send_static(&mut self, sock: Sock, data: &'static [u8]) -> io::Result<()> {
        if data.len() > MAX_STATIC_SEND {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                "static send over 1 MiB",
            ));
        }
        let len = data.len() as u32;
        let skip = self.features.skip_static_sends;
        let e = self.with_target(sock, |t| match t {
            T::Fixed(f) => opcode::Send::new(f, data.as_ptr(), len)
                .flags(SEND_FLAGS)
                .build(),
            T::Fd(f) => opcode::Send::new(f, data.as_ptr(), len)
                .flags(SEND_FLAGS)
                .build(),
        })?;
        let mut e = e.user_data(ud(K_SEND_STATIC, sock, len));
        if skip {
            e = e.flags(squeue::Flags::SKIP_SUCCESS);
        }
        // SAFETY: `data` is `'static`.
        unsafe { self.push(e) }
    }

    /// Sends `buf[..len]`; the vector comes back in [`Event::Sent`] (posted unless the socket is closed first:
    /// then the vector is dropped with the completion). `len` is clamped to
    /// `buf.len()`. Errors (the vector comes back in the [`SendError`]): `NotConnected` if `sock` is not live,
    /// `InvalidInput` over `i32::MAX` bytes (a completion's result is an `i32`), the submission queue full and
    /// not draining.
    pub fn send_vec(&mut self, sock: Sock, buf: Vec<u8>, len: usize) -> Result<(), SendError> {
        let len = len.min(buf.len());
        let Some(len32) = u32::try_from(len).ok().filter(|&l| l <= i32::MAX as u32) else {
            return Err(SendError {
                error: io::Error::new(ErrorKind::InvalidInput, "owned send over i32::MAX bytes"),
                buf,
            });
        };
        let ptr = buf.as_ptr();
        let e = match self.with_target(sock, |t| match t {
            T::Fixed(f) => opcode::Send::new(f, ptr, len32).flags(SEND_FLAGS).build(),
            T::Fd(f) => opcode::Send::new(f, ptr, len32).flags(SEND_FLAGS).build(),
        }) {
            Ok(e) => e,
            Err(error) => return Err(SendError { error, buf }),
        };
        let i = match self.free_sends.pop() {
            Some(i) => i,
            None => {
                self.sends.push(None);
                (self.sends.len() - 1) as u32
            }
        };
        self.sends[i as usize] = Some((buf, sock, len32));
        // SAFETY: the vector is in the send slab (its heap memory unmoved) until this send's completion; if the
        // push fails the entry was not queued, so the vector may leave the slab again.
        match unsafe { self.push(e.user_data(K_SEND_VEC << 56 | u64::from(i))) } {
            Ok(()) => Ok(()),
            Err(error) => {
                let (buf, _, _) = self.sends[i as usize].take().expect("just stored");
                self.free_sends.push(i);
                Err(SendError { error, buf })
            }
        }
    }

    /// Closes the socket: submits what is queued (so no queued entry outlives the slot), cancels its requests
    /// synchronously, then releases its fixed slot or fd. Its later completions are dropped. Nothing if it is
    /// already closed. Errors: the submission queue would not drain (the socket stays open: close it again
    /// later), the cancel or the fixed-file update failed.
    pub fn close(&mut self, sock: Sock) -> io::Result<()> {
        if !self.live(sock) {
            return Ok(());
        }
        // A submit stops at the first entry that fails setup, and EAGAIN/EBUSY submit nothing: enter until the
        // queue is empty, or give up with the slot still live (an entry for it may still be queued).
        self.drain_sq()?;
        let idx = sock.idx;
        let fixed = self.slots[sock.slot()].fd.is_none();
        let cancel = if fixed {
            CancelBuilder::fd(Fixed(idx)).all()
        } else {
            let fd = self.slots[sock.slot()]
                .fd
                .as_ref()
                .map_or(-1, |f| f.as_raw_fd());
            CancelBuilder::fd(Fd(fd)).all()
        };
        let r = match self.ring.submitter().register_sync_cancel(None, cancel) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        if fixed {
            self.ring.submitter().register_files_update(idx, &[-1])?;
        }
        self.release(sock);
        if self.accept_paused {
            // An fd or slot came free: accepting may work again. The socket is released either way; a failed
            // re-arm leaves the accept paused, to be tried again after the next wait turn.
            let _ = self.rearm_accept();
        }
        r
    }

    /// Enters until the submission queue is empty (at most [`SUBMIT_TRIES`] times).
    fn drain_sq(&mut self) -> io::Result<()> {
        for _ in 0..SUBMIT_TRIES {
            if self.ring.submission().is_empty() {
                return Ok(());
            }
            self.enter(0, None)?;
        }
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        Err(io::Error::new(
            ErrorKind::WouldBlock,
            "io_uring: the submission queue does not drain",
        ))
    }

    /// Takes back a socket that no queued entry names (a connect that could not be queued): its fixed-file
    /// entry is cleared (closing the socket now, not at the slot's next use), then the slot released.
    fn undo_install(&mut self, sock: Sock) {
        if self.slots[sock.slot()].fd.is_none() {
            // If even this fails, the entry is replaced (and the socket closed) when the slot is next used.
            let _ = self.ring.submitter().register_files_update(sock.idx, &[-1]);
        }
        self.release(sock);
    }

    /// Marks the slot free (its fd, if any, closes here) and bumps its generation; the caller has made sure
    /// no queued entry names it.
    fn release(&mut self, sock: Sock) {
        let s = &mut self.slots[sock.slot()];
        (s.live, s.fd, s.recv_armed) = (false, None, false);
        s.gen = s.gen.wrapping_add(1);
        self.free.push_back(sock.idx);
        self.starved.retain(|&x| x != sock);
    }

    /// Submits everything queued, waits for at least one completion (at most `timeout`, if given), and appends
    /// what completed to `events`. Receives that ran out of buffers are armed again first, if buffers are back.
    pub fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let paused = self.before_wait()?;
        // A paused accept is armed again at the end of a turn: cap the turn, or a ring with no other traffic
        // would never accept again.
        let timeout = if paused {
            Some(timeout.map_or(ACCEPT_PAUSE, |t| t.min(ACCEPT_PAUSE)))
        } else {
            timeout
        };
        self.enter(1, timeout)?;
        let r = self.reap(events);
        self.after_wait(paused)?;
        r
    }

    /// Arms starved receives again; says whether accepting was paused before this turn.
    fn before_wait(&mut self) -> io::Result<bool> {
        self.rearm_starved()?;
        Ok(self.accept_paused)
    }

    /// An accept paused since before this turn (a whole wait on other work has passed) is armed again; if that
    /// fails it stays paused for the next turn.
    fn after_wait(&mut self, paused: bool) -> io::Result<()> {
        if paused && self.accept_paused {
            let _ = self.rearm_accept();
        }
        Ok(())
    }

    /// As [`Ring::wait`], but the kernel wakes the thread only once `want` completions are there, or `min_wait`
    /// after it went to sleep if at least one is (then, with none, at the first): fewer sleeps and wake-ups per
    /// completion under load, at the price of up to `min_wait` of added latency per turn. With `DEFER_TASKRUN`
    /// the completions' work is not even run before then. Falls back to [`Ring::wait`] (and
    /// [`Features::min_wait`] turns false) where the kernel lacks it.
    pub fn wait_batch(
        &mut self,
        events: &mut Vec<Event>,
        want: u32,
        min_wait: Duration,
    ) -> io::Result<()> {
        if want <= 1 || min_wait.is_zero() || !self.features.min_wait || self.accept_paused {
            // (A paused accept needs the bounded turn of `wait`.)
            return self.wait(events, None);
        }
        let paused = self.before_wait()?;
        /// `struct io_uring_getevents_arg` (Linux 6.12 names the former `pad` field `min_wait_usec`).
        #[repr(C)]
        struct GetEventsArg {
            sigmask: u64,
            sigmask_sz: u32,
            min_wait_usec: u32,
            ts: u64,
        }
        let arg = GetEventsArg {
            sigmask: 0,
            sigmask_sz: 0,
            min_wait_usec: u32::try_from(min_wait.as_micros()).unwrap_or(u32::MAX),
            ts: 0,
        };
        const IORING_ENTER_GETEVENTS: u32 = 1;
        const IORING_ENTER_EXT_ARG: u32 = 8;
        self.stats.enters += 1;
        let to_submit = self.ring.submission().len() as u32;
        // SAFETY: `arg` is a valid `io_uring_getevents_arg` (no signal mask, no timeout) that lives across the
        // call; every queued entry's buffers are kept alive by the ring (module docs).
        let r = unsafe {
            self.ring.submitter().enter(
                to_submit,
                want,
                IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG,
                Some(&arg),
            )
        };
        match r {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.features.min_wait = false;
                return self.wait(events, None);
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::ETIME | libc::EBUSY | libc::EAGAIN)
                ) => {}
            Err(e) => return Err(e),
        }
        let r = self.reap(events);
        self.after_wait(paused)?;
        r
    }

    fn rearm_starved(&mut self) -> io::Result<()> {
        if !self.starved.is_empty() && self.pool.out.get() < u32::from(self.pool.count) {
            let mut first = Ok(());
            for sock in std::mem::take(&mut self.starved) {
                if self.live(sock) && !self.slots[sock.slot()].recv_armed {
                    self.stats.recv_rearms += 1;
                    // A failure puts the socket back on `starved`; the others are still armed.
                    let r = self.arm_recv(sock);
                    if first.is_ok() {
                        first = r;
                    }
                }
            }
            return first;
        }
        Ok(())
    }

    /// One `io_uring_enter`: submit and wait for `want` completions. Interruptions, timeouts and a busy
    /// completion queue are not errors (the caller reaps what is there).
    fn enter(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()> {
        self.stats.enters += 1;
        let r = match timeout {
            None => self.ring.submitter().submit_and_wait(want),
            Some(t) => {
                let ts = Timespec::from(t);
                let args = SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
        };
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::ETIME | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn reap(&mut self, events: &mut Vec<Event>) -> io::Result<()> {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        self.stats.cqes += cqes.len() as u64;
        // Every completion is handled (accepted fds, buffers and send vectors are never lost to an earlier
        // one's error); the first error is returned after.
        let mut first = Ok(());
        for &(u, res, flags) in &cqes {
            let r = self.complete(u, res, flags, events);
            if first.is_ok() {
                first = r;
            }
        }
        self.cqes = cqes;
        first
    }

    fn complete(
        &mut self,
        u: u64,
        res: i32,
        flags: u32,
        events: &mut Vec<Event>,
    ) -> io::Result<()> {
        // A provided buffer is guarded first, so that whatever happens next it goes back to the ring.
        let buf = match cqueue::buffer_select(flags) {
            Some(bid) if bid < self.pool.count => {
                self.pool.out.set(self.pool.out.get() + 1);
                Some(RecvBuf {
                    pool: self.pool.clone(),
                    bid,
                    len: if res > 0 {
                        (res as u32).min(self.pool.buf_size)
                    } else {
                        0
                    },
                })
            }
            Some(_) => return Err(io::Error::other("io_uring: buffer id out of range")),
            None => None,
        };
        let err = || io::Error::from_raw_os_error(-res);
        match u >> 56 {
            K_ACCEPT => {
                if res >= 0 {
                    // SAFETY: the kernel installed this new fd for this accept; nothing else owns it.
                    let fd = unsafe { OwnedFd::from_raw_fd(res) };
                    match self.accepted(fd) {
                        Ok(Some(sock)) => events.push(Event::Accepted(sock)),
                        Ok(None) => {}
                        Err(e) => events.push(Event::AcceptFailed(e)),
                    }
                } else {
                    events.push(Event::AcceptFailed(err()));
                }
                if !cqueue::more(flags) {
                    if matches!(-res, libc::EMFILE | libc::ENFILE | libc::ENOMEM) {
                        // Arming again at once would fail the same way, in a busy loop.
                        self.accept_paused = true;
                    } else {
                        // A failure pauses the accept; the next wait turn tries again.
                        let _ = self.rearm_accept();
                    }
                }
            }
            K_CONNECT => {
                // The address may go now: the connect is over.
                let i = (u & 0xfffff) as usize;
                if let Some(a) = self.addrs.get_mut(i) {
                    if a.take().is_some() {
                        self.free_addrs.push(i as u32);
                    }
                }
                if let Some(sock) = self.live_ud(u) {
                    let r = if res < 0 { Err(err()) } else { Ok(()) };
                    events.push(Event::Connected(sock, r));
                }
            }
            K_RECV => {
                let Some(sock) = self.live_ud(u) else {
                    return Ok(()); // a closed socket's completion: the buffer goes back with `buf`
                };
                let more = cqueue::more(flags);
                if !more {
                    self.slots[sock.slot()].recv_armed = false;
                }
                if res > 0 {
                    let Some(b) = buf else {
                        return Err(io::Error::other("io_uring: receive without a buffer"));
                    };
                    events.push(Event::Data(sock, b));
                    if !more {
                        self.stats.recv_rearms += 1;
                        // A failure puts the socket on the starved list, armed again before the next wait.
                        let _ = self.arm_recv(sock);
                    }
                } else if res == 0 {
                    events.push(Event::RecvEnded(sock, None));
                } else if res == -libc::ENOBUFS {
                    self.stats.enobufs += 1;
                    if !more {
                        self.starved.push(sock);
                    }
                } else {
                    events.push(Event::RecvEnded(sock, Some(err())));
                }
            }
            K_SEND_STATIC => {
                if let Some(sock) = self.live_ud(u) {
                    // A short send (MSG_WAITALL: the kernel gave up) is an error; so is any completion of a
                    // skip-success send, which the kernel posts only when it failed.
                    let r = if res < 0 {
                        Err(err())
                    } else if res as u64 != u & 0xfffff || self.features.skip_static_sends {
                        Err(ErrorKind::WriteZero.into())
                    } else {
                        Ok(())
                    };
                    events.push(Event::Sent(sock, r, None));
                }
            }
            K_SEND_VEC => {
                let i = (u & 0xffff_ffff) as usize;
                let Some((v, sock, len)) = self.sends.get_mut(i).and_then(Option::take) else {
                    return Err(io::Error::other("io_uring: unknown send completion"));
                };
                self.free_sends.push(i as u32);
                if self.live(sock) {
                    let r = if res < 0 {
                        Err(err())
                    } else if res as u32 != len {
                        Err(ErrorKind::WriteZero.into())
                    } else {
                        Ok(())
                    };
                    events.push(Event::Sent(sock, r, Some(v)));
                }
            }
            _ => return Err(io::Error::other("io_uring: unknown completion")),
        }
        Ok(())
    }

    fn accepted(&mut self, fd: OwnedFd) -> io::Result<Option<Sock>> {
        if self.nodelay {
            socket2::SockRef::from(&fd).set_nodelay(true)?;
        }
        if self.free.is_empty() {
            self.stats.rejected += 1;
            return Ok(None); // dropping `fd` closes the connection
        }
        self.install(fd).map(Some)
    }

    /// Gives `fd` a slot: in the fixed-file table (the fd itself is closed then), or kept as is.
    fn install(&mut self, fd: OwnedFd) -> io::Result<Sock> {
        let idx = self
            .free
            .pop_front()
            .ok_or_else(|| io::Error::new(ErrorKind::OutOfMemory, "no free socket slot"))?;
        let keep = if self.features.fixed_files {
            if let Err(e) = self
                .ring
                .submitter()
                .register_files_update(idx, &[fd.as_raw_fd()])
            {
                self.free.push_front(idx);
                return Err(e);
            }
            None // the table holds its own reference; our fd closes here
        } else {
            Some(fd)
        };
        let s = &mut self.slots[idx as usize];
        (s.live, s.fd, s.recv_armed) = (true, keep, false);
        Ok(Sock { idx, gen: s.gen })
    }

    /// The live socket a completion's `user_data` names (slot and low 16 bits of the generation), if any.
    fn live_ud(&self, u: u64) -> Option<Sock> {
        let c = ud_sock(u);
        let s = self.slots.get(c.slot())?;
        (s.live && s.gen & GEN_MASK == c.gen).then_some(Sock {
            idx: c.idx,
            gen: s.gen,
        })
    }

    fn live(&self, sock: Sock) -> bool {
        self.slots
            .get(sock.slot())
            .is_some_and(|s| s.live && s.gen == sock.gen)
    }

    /// Builds an entry on the socket's fixed slot or fd. Errors: `NotConnected` if `sock` is not a live socket
    /// of this ring (closed, its slot reused, from another ring, out of range): a stale handle must never reach
    /// the socket that now holds its slot.
    fn with_target(
        &self,
        sock: Sock,
        f: impl FnOnce(T) -> squeue::Entry,
    ) -> io::Result<squeue::Entry> {
        match self.slots.get(sock.slot()) {
            Some(s) if s.live && s.gen == sock.gen => Ok(match &s.fd {
                Some(fd) => f(T::Fd(Fd(fd.as_raw_fd()))),
                None => f(T::Fixed(Fixed(sock.idx))),
            }),
            _ => Err(not_connected()),
        }
    }

    /// Queues `e`, submitting what is queued first if the submission queue is full.
    ///
    /// # Safety
    /// Every buffer `e` points to must stay valid (and unmoved, not otherwise accessed where the kernel writes)
    /// until `e` completes.
    unsafe fn push(&mut self, e: squeue::Entry) -> io::Result<()> {
        for _ in 0..=SUBMIT_TRIES {
            // SAFETY: the caller's promise on `e`'s buffers.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                self.stats.sqes += 1;
                return Ok(());
            }
            self.enter(0, None)?;
        }
        Err(io::Error::new(
            ErrorKind::WouldBlock,
            "io_uring: the submission queue is full and does not drain",
        ))
    }
}

/// File descriptors left free below `RLIMIT_NOFILE` in fd mode (the listener, the ring, the process's own).
pub const FD_HEADROOM: u32 = 64;

/// The soft `RLIMIT_NOFILE` (u32::MAX if unlimited or unknown).
fn nofile_limit() -> u32 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid out-parameter for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return u32::MAX;
    }
    u32::try_from(rl.rlim_cur).unwrap_or(u32::MAX)
}

/// The running kernel's (major, minor), from `uname`.
fn kernel_version() -> Option<(u32, u32)> {
    // SAFETY: an all-zero utsname is valid; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid out-parameter.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    // SAFETY: uname NUL-terminates `release` inside the array.
    let rel = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_str()
        .ok()?;
    let mut it = rel.split(['.', '-']);
    let major = it.next()?.parse().ok()?;
    let minor = it
        .next()?
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok()?;
    Some((major, minor))
}

fn not_connected() -> io::Error {
    io::Error::new(ErrorKind::NotConnected, "socket closed or not of this ring")
}

/// The target of an entry (the crate's `UseFixed` trait is sealed, so each opcode is built for both).
enum T {
    Fixed(Fixed),
    Fd(Fd),
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Stop every request before the memory they may use goes: whatever is still queued submitted first (so
        // the cancel sees it, and nothing runs uncancelled after it), a synchronous cancel of all, then the
        // buffer ring unregistered. If any fails the kernel may still use the pool or a send's vector: leak them.
        let drained = self.drain_sq().is_ok();
        let cancelled = drained
            && match self
                .ring
                .submitter()
                .register_sync_cancel(None, CancelBuilder::any())
            {
                Ok(()) => true,
                Err(e) => e.kind() == ErrorKind::NotFound,
            };
        // The sync cancel does not wait for requests already running in io-wq workers (io_uring/cancel.c:
        // a running work item is only signalled), so a worker may still read an owned send's vector: wait for
        // the sends' completions (up to DROP_DRAIN), and leak what is still out at the deadline.
        self.drain_sends();
        let unregistered = cancelled && self.ring.submitter().unregister_buf_ring(BGID).is_ok();
        if !unregistered {
            std::mem::forget(self.pool.clone());
        }
        for s in self.sends.drain(..).flatten() {
            std::mem::forget(s.0); // still in flight at the deadline
        }
        for a in self.addrs.drain(..).flatten() {
            std::mem::forget(a); // a connect that never completed
        }
        // The listener and fds close with their fields; the fixed-file table with the ring.
    }
}

/// Longest wait turn while the accept is paused (it is armed again at the end of a turn).
const ACCEPT_PAUSE: Duration = Duration::from_millis(10);

/// How long a dropped ring waits for its owned sends' completions.
const DROP_DRAIN: Duration = Duration::from_secs(1);

impl Ring {
    /// Reaps completions until no owned send or connect is in flight, or [`DROP_DRAIN`] passed. Only frees:
    /// send vectors and connect addresses whose request completed, accepted fds (closed); provided buffers
    /// are guarded and dropped at once; nothing is armed again.
    fn drain_sends(&mut self) {
        let deadline = Instant::now() + DROP_DRAIN;
        let busy =
            |r: &Ring| r.sends.iter().any(Option::is_some) || r.addrs.iter().any(Option::is_some);
        while busy(self) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            let ts = Timespec::from((deadline - now).min(Duration::from_millis(50)));
            let args = SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::ETIME | libc::EBUSY | libc::EAGAIN)
                    ) => {}
                Err(_) => return,
            }
            let cqes: Vec<_> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags()))
                .collect();
            for (u, res, flags) in cqes {
                if let Some(bid) = cqueue::buffer_select(flags).filter(|&b| b < self.pool.count) {
                    self.pool.out.set(self.pool.out.get() + 1);
                    drop(RecvBuf {
                        pool: self.pool.clone(),
                        bid,
                        len: 0,
                    });
                }
                match u >> 56 {
                    K_SEND_VEC => {
                        let i = (u & 0xffff_ffff) as usize;
                        if let Some(s) = self.sends.get_mut(i) {
                            *s = None;
                        }
                    }
                    K_CONNECT => {
                        if let Some(a) = self.addrs.get_mut((u & 0xfffff) as usize) {
                            *a = None;
                        }
                    }
                    K_ACCEPT if res >= 0 => {
                        // SAFETY: the kernel installed this new fd for this accept; nothing else owns it.
                        drop(unsafe { OwnedFd::from_raw_fd(res) });
                    }
                    _ => {}
                }
            }
        }
    }
}
