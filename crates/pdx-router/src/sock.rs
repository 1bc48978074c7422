//! TCP connections on monoio's native io_uring operations (owned buffers, no readiness round trips), shared by
//! the client side ([`crate::server`]) and the upstream side ([`crate::upstream`]).
//!
//! A socket is split into its read half, driven by a [`Reader`], and its write half, written with owned
//! buffers (a `Vec<u8>`, or a [`WriteBatch`] of shared frames for `writev`). The two run independently: a read
//! stays in flight while the connection writes. That is what lets one read do two jobs: on a client connection,
//! the read posted while a request is routed or its answer streams tells at once when the client goes away (EOF
//! or an error) and is, when the answer is done, already the read of the next request; on an idle pooled
//! upstream connection, the read posted when it went back to the pool tells when the server closes it, and is
//! the read of the next response once a request is written. Nothing is asked of the kernel that the kernel does
//! not answer with data: no `EAGAIN`.
//!
//! On monoio's legacy driver (epoll, where io_uring is unavailable) the same operations run as readiness waits
//! and non-blocking calls.

use bytes::BytesMut;
use monoio::buf::SliceMut;
use monoio::io::{AsyncReadRent, OwnedReadHalf};
use monoio::net::TcpStream;
use pdx_uring_sys::WriteBatch;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A finished read: the result (bytes read, 0 at EOF) and the buffer, with the bytes appended after what it
/// held.
pub(crate) type ReadDone = (std::io::Result<usize>, BytesMut);

/// The hand-over between a [`Reader`] and its read loop.
#[derive(Default)]
struct Slot {
    /// The buffer of the next read.
    give: Cell<Option<BytesMut>>,
    /// The last read's result.
    done: Cell<Option<ReadDone>>,
}

/// The read side of a connection: at most one read in flight, started with [`Reader::start`] and collected
/// with [`Reader::poll_done`], which can be polled from any task and in any `poll` (an HTTP body's
/// `poll_frame`, beside another future).
///
/// The read loop is one boxed future, made when the connection is (one allocation per connection, none per
/// read); it owns the read half, so the pending operation is named nowhere else. Dropping the reader drops an
/// operation in flight: monoio cancels it (`IORING_OP_ASYNC_CANCEL`) and keeps its buffer until the kernel
/// lets go of it.
pub(crate) struct Reader {
    slot: Rc<Slot>,
    run: Pin<Box<dyn Future<Output = ()>>>,
    in_flight: bool,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Reader {
    pub(crate) fn new(mut rh: OwnedReadHalf<TcpStream>) -> Reader {
        let slot = Rc::new(Slot::default());
        let s = slot.clone();
        let run = Box::pin(async move {
            loop {
                let buf = std::future::poll_fn(|_| match s.give.take() {
                    Some(b) => Poll::Ready(b),
                    // Polled only by `Reader`, right after it hands a buffer over: no waker to keep.
                    None => Poll::Pending,
                })
                .await;
                // monoio reads to the start of a buffer: the slice past its bytes appends instead.
                let (len, cap) = (buf.len(), buf.capacity());
                let (r, slice) = rh.read(SliceMut::new(buf, len, cap)).await;
                s.done.set(Some((r, slice.into_inner())));
            }
        });
        Reader {
            slot,
            run,
            in_flight: false,
        }
    }

    /// True while a read is in flight (its buffer is the operation's).
    pub(crate) fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Starts a read into the free room of `buf` (at least 1 byte; the bytes already in it stay in front).
    /// The operation is queued for the kernel now, with the next submission of this thread's ring.
    pub(crate) fn start(&mut self, buf: BytesMut) {
        debug_assert!(!self.in_flight && buf.capacity() > buf.len());
        self.slot.give.set(Some(buf));
        self.in_flight = true;
        // Runs the loop up to the read, which submits the operation (no waker yet: the caller's poll sets it).
        let _ = self
            .run
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()));
    }

    /// The read in flight, once it is done; `Pending` (the task woken when it completes) while it runs.
    /// Polling with no read in flight is a bug (it stays `Pending`).
    pub(crate) fn poll_done(&mut self, cx: &mut Context<'_>) -> Poll<ReadDone> {
        debug_assert!(self.in_flight, "no read in flight");
        if let Some(d) = self.slot.done.take() {
            self.in_flight = false;
            return Poll::Ready(d);
        }
        let _ = self.run.as_mut().poll(cx);
        match self.slot.done.take() {
            Some(d) => {
                self.in_flight = false;
                Poll::Ready(d)
            }
            None => Poll::Pending,
        }
    }

    /// [`Reader::poll_done`] as a future.
    pub(crate) async fn done(&mut self) -> ReadDone {
        std::future::poll_fn(|cx| self.poll_done(cx)).await
    }

    /// True when the read in flight has finished (data, EOF or an error), without waiting; false while it
    /// runs or when none is in flight. The result stays for [`Reader::poll_done`].
    pub(crate) fn is_done(&mut self) -> bool {
        if !self.in_flight {
            return false;
        }
        if let Some(d) = self.slot.done.take() {
            self.slot.done.set(Some(d));
            return true;
        }
        let _ = self
            .run
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()));
        let d = self.slot.done.take();
        let finished = d.is_some();
        self.slot.done.set(d);
        finished
    }
}

/// Parts of one response write at most: the head, a chunk-size line, frame and CRLF per frame, the last chunk.
const BATCH_PARTS: usize = 3 * crate::server::BATCH + 2;
/// Bytes of copied framing per write at most: per frame its size line (`{n:x}\r\n` of a 64-bit length is 18
/// bytes) and its closing CRLF.
const BATCH_LINES: usize = crate::server::FRAME_LINE_BYTES * crate::server::BATCH;
/// Write batches kept per thread for reuse.
const BATCHES_KEPT: usize = 64;

thread_local! {
    /// Write batches not in use: a connection holds one only while it writes, so a stream waiting for its next
    /// token holds none, and a busy thread allocates none.
    static BATCHES: RefCell<Vec<WriteBatch>> = const { RefCell::new(Vec::new()) };
}

/// An empty write batch (from this thread's spares when there is one).
pub(crate) fn batch() -> WriteBatch {
    BATCHES
        .with(|b| b.borrow_mut().pop())
        .unwrap_or_else(|| WriteBatch::new(BATCH_PARTS, BATCH_LINES))
}

/// Gives a batch back for reuse (emptied; its frames are dropped now).
pub(crate) fn give_back(mut b: WriteBatch) {
    b.clear();
    BATCHES.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < BATCHES_KEPT {
            s.push(b);
        }
    });
}

/// Read buffers of one size, reused on this thread: a connection's small read buffer (the client's watch read,
/// an upstream response's first read) is shared by what is split off it (a request's head and body, a
/// response's head and frames) until those are dropped, so each read would otherwise take a new buffer, and
/// the first split of a new buffer allocates its shared header too. A buffer taken here comes with a [`Keep`],
/// an empty handle on its start: once everything else that shared the buffer is gone, the handle reclaims the
/// whole buffer (`BytesMut::try_reclaim`, no allocation) and it goes back to the free list. The keep pins the
/// buffer's size: the buffer is never grown in place while it is kept (a read that needs more room gets a new
/// one), so the free list holds only buffers of exactly [`Recycler::cap`] bytes, at most [`FREE_BUFS`] of them.
pub(crate) struct Recycler {
    /// Bytes per buffer.
    cap: usize,
    /// Free buffers: whole, empty, referenced by nothing else.
    free: RefCell<Vec<BytesMut>>,
}

/// Free buffers kept per [`Recycler`] (per size, per thread).
pub(crate) const FREE_BUFS: usize = 64;

/// An empty handle on the start of a buffer taken from a [`Recycler`]: it gets the buffer back once nothing
/// else shares it.
pub(crate) struct Keep(BytesMut);

impl Recycler {
    /// A recycler of buffers of `cap` bytes (`cap` > 0).
    pub(crate) const fn new(cap: usize) -> Self {
        Self {
            cap,
            free: RefCell::new(Vec::new()),
        }
    }

    /// An empty buffer of exactly the recycler's size (a free one when there is one) and its [`Keep`].
    pub(crate) fn take(&self) -> (BytesMut, Keep) {
        let mut b = self
            .free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(self.cap));
        // An empty handle at the start of the allocation (for a new buffer, this split makes it shared: its one
        // allocation of a shared header, never repeated while the buffer is recycled).
        let keep = b.split_to(0);
        (b, Keep(keep))
    }

    /// Puts the buffer of `k` back on the free list when nothing else shares it; otherwise hands `k` back.
    pub(crate) fn give(&self, mut k: Keep) -> Result<(), Keep> {
        // Unique: the handle is moved back to the start and given the whole buffer, which is `cap` bytes (kept
        // since it was taken, it never grew). Shared: nothing changes.
        if !k.0.try_reclaim(self.cap) {
            return Err(k);
        }
        debug_assert_eq!(k.0.capacity(), self.cap, "a kept buffer never grows");
        let mut free = self.free.borrow_mut();
        if free.len() < FREE_BUFS && k.0.capacity() == self.cap {
            free.push(k.0);
        }
        Ok(())
    }

    /// Free buffers on the list (tests).
    #[cfg(test)]
    pub(crate) fn free_len(&self) -> usize {
        self.free.borrow().len()
    }
}

/// The [`Keep`]s of a connection's recent read buffers (the one being read into, the one the last message
/// came in): two, as a buffer is free again at the latest when the read after next is started.
#[derive(Default)]
pub(crate) struct Kept([Option<Keep>; 2]);

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Kept")
            .field(&self.0.iter().filter(|k| k.is_some()).count())
            .finish()
    }
}

impl Kept {
    /// Gives every buffer nothing else shares back to `r`.
    pub(crate) fn recycle(&mut self, r: &Recycler) {
        for slot in &mut self.0 {
            if let Some(k) = slot.take() {
                *slot = r.give(k).err();
            }
        }
        if self.0[0].is_none() {
            // The older first.
            self.0.swap(0, 1);
        }
    }

    /// A buffer from `r` for the next read, its [`Keep`] kept here (buffers free by now are given back first;
    /// with both slots still in use, the older is no longer kept: it is freed as usual when its last user
    /// drops it).
    pub(crate) fn take(&mut self, r: &Recycler) -> BytesMut {
        self.recycle(r);
        let (b, k) = r.take();
        if self.0[0].is_none() {
            self.0[0] = Some(k);
        } else if self.0[1].is_none() {
            self.0[1] = Some(k);
        } else {
            self.0[0] = self.0[1].replace(k);
        }
        b
    }

    /// Stops keeping: buffers nothing else shares go back to `r`, the others are no longer kept (before a
    /// buffer in use grows: unkept, it can grow in place once its other users are gone).
    pub(crate) fn release(&mut self, r: &Recycler) {
        self.recycle(r);
        self.0 = [None, None];
    }
}

thread_local! {
    /// Request buffers not in use (upstream requests: head and body, written with one `write_all`).
    static WRITE_BUFS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Write buffers kept per thread for reuse.
const WRITE_BUFS_KEPT: usize = 16;
/// A write buffer over this size (bytes) is not kept: a rare large request does not pin its memory.
const WRITE_BUF_MAX: usize = 32 * 1024;

/// An empty write buffer with room for `len` bytes (from this thread's spares when there is one).
pub(crate) fn write_buf(len: usize) -> Vec<u8> {
    let mut v = WRITE_BUFS
        .with(|b| b.borrow_mut().pop())
        .unwrap_or_default();
    v.reserve(len);
    v
}

/// Gives a write buffer back for reuse (kept when it is small enough and the spares are not full).
pub(crate) fn give_back_write_buf(mut v: Vec<u8>) {
    if v.capacity() > WRITE_BUF_MAX {
        return;
    }
    v.clear();
    WRITE_BUFS.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < WRITE_BUFS_KEPT {
            s.push(v);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_once_nothing_shares_it() {
        let r = Recycler::new(64);
        let mut kept = Kept::default();
        let mut b = kept.take(&r);
        assert_eq!(b.capacity(), 64);
        let at = b.as_ptr();
        b.extend_from_slice(b"head body");
        let head = b.split_to(4).freeze();
        let body = b.split_to(5).freeze();
        drop(b);
        kept.recycle(&r);
        assert_eq!(r.free_len(), 0, "still shared by its head and body");
        drop(head);
        kept.recycle(&r);
        assert_eq!(r.free_len(), 0, "still shared by its body");
        drop(body);
        kept.recycle(&r);
        assert_eq!(r.free_len(), 1);
        // Taken again: the same memory, whole and empty.
        let b = kept.take(&r);
        assert_eq!((b.as_ptr(), b.len(), b.capacity()), (at, 0, 64));
        assert_eq!(r.free_len(), 0);
    }

    #[test]
    fn a_kept_buffer_never_grows_in_place_and_release_forgets_it() {
        let r = Recycler::new(16);
        let mut kept = Kept::default();
        let mut b = kept.take(&r);
        b.extend_from_slice(&[7u8; 10]);
        // Growth while kept: a new buffer; the kept one stays 16 bytes and comes back whole.
        b.reserve(100);
        assert!(b.capacity() >= 110);
        kept.recycle(&r);
        assert_eq!(r.free_len(), 1);
        assert_eq!(r.take().0.capacity(), 16);

        // Released while in use: not recycled, ever.
        let r = Recycler::new(16);
        let mut kept = Kept::default();
        let b = kept.take(&r);
        kept.release(&r);
        drop(b);
        kept.recycle(&r);
        assert_eq!(r.free_len(), 0);
    }

    #[test]
    fn at_most_two_buffers_are_kept_per_connection() {
        let r = Recycler::new(8);
        let mut kept = Kept::default();
        let bufs: Vec<BytesMut> = (0..3).map(|_| kept.take(&r)).collect();
        drop(bufs);
        kept.recycle(&r);
        assert_eq!(r.free_len(), 2, "the oldest was no longer kept");
    }

    #[test]
    fn write_buffers_are_reused_unless_large() {
        let mut v = write_buf(100);
        v.extend_from_slice(b"abc");
        let at = v.as_ptr();
        give_back_write_buf(v);
        let v = write_buf(10);
        assert_eq!((v.as_ptr(), v.len()), (at, 0));
        give_back_write_buf(v);
        let kept = || WRITE_BUFS.with(|b| b.borrow().len());
        assert_eq!(kept(), 1);
        give_back_write_buf(write_buf(WRITE_BUF_MAX + 1));
        assert_eq!(
            kept(),
            0,
            "a large buffer is not kept (and the spare was taken for it)"
        );
    }
}
