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
