//! Owned I/O buffers for monoio's io_uring operations, with the `unsafe` their traits need behind a safe API.
//!
//! io_uring reads the memory of a write after the submitting code has moved on, so monoio takes the buffers of
//! an operation by value ("owned buffers") and hands them back with the result; a buffer type promises, through
//! the `unsafe` traits [`monoio::buf::IoBuf`] / [`monoio::buf::IoVecBuf`], that the memory it describes stays
//! valid and unmoved while the runtime owns it. monoio implements them for `Vec<u8>`, `Bytes` and a vector of
//! vectors (copies), but not for a list of shared `Bytes` frames, which is what the router's zero-copy SSE
//! forwarding writes: each upstream data frame goes to the client as the same `Bytes`, framed by a chunk-size
//! line and CRLF. [`WriteBatch`] is that buffer: an owned head, copied short lines (fixed capacity), shared
//! frames and static parts, written with one `writev` (`IORING_OP_WRITEV`, or `writev(2)` on monoio's legacy
//! epoll driver) with no copy of a frame and, once built, no allocation per frame.
//!
//! What monoio 0.2 does not expose: multishot receive (`IORING_OP_RECV` with `IORING_RECV_MULTISHOT`) into a
//! provided buffer ring needs an operation that stays registered across several completions
//! (`IORING_CQE_F_MORE`) and a buffer ring registered on the runtime's own ring (`io_uring_register_buf_ring`);
//! monoio's driver, its operation slab and its ring are private, and its operation lifecycle ends at the first
//! completion. [`ring`] is a ring of pdx's own that has them (issue 19's floor on it: `examples/pd_floor_ring`).
#![deny(missing_docs)]

pub mod ring;

use bytes::Bytes;

/// The batch has no room for another part (its part count or its line bytes are used up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// A vectored write of owned parts: at most one head first (an owned `Vec<u8>`), then shared `Bytes` frames,
/// `'static` slices and short copied lines, in order.
///
/// Built once and reused (`clear` keeps every allocation): pushing parts allocates nothing. After a write of
/// `n` bytes, [`WriteBatch::advance`] drops what went out, so the same batch is written again until
/// [`WriteBatch::is_empty`]. Every `iovec` points into memory the batch owns (its head and line buffers, whose
/// heap allocations do not move with the batch and never grow while parts point into them) or keeps alive (the
/// frames' `Bytes`, static slices).
pub struct WriteBatch {
    /// One `iovec` per part; entries from `start` on are still to be written.
    iov: Vec<libc::iovec>,
    start: usize,
    /// The head's bytes (part 0 when present).
    head: Vec<u8>,
    /// Copied short parts (chunk-size lines); its capacity is fixed at construction.
    lines: Vec<u8>,
    /// The frames the `iovec`s point into, alive until `clear`.
    frames: Vec<Bytes>,
    max_parts: usize,
}

impl std::fmt::Debug for WriteBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBatch")
            .field("parts", &(self.iov.len() - self.start))
            .field("bytes", &self.len())
            .finish()
    }
}

impl WriteBatch {
    /// An empty batch for up to `max_parts` parts (head included) and `line_bytes` bytes of copied lines; both
    /// bounds are allocated now, so later pushes never allocate.
    pub fn new(max_parts: usize, line_bytes: usize) -> WriteBatch {
        WriteBatch {
            iov: Vec::with_capacity(max_parts),
            start: 0,
            head: Vec::new(),
            lines: Vec::with_capacity(line_bytes),
            frames: Vec::with_capacity(max_parts),
            max_parts,
        }
    }

    /// The head buffer to build in, emptied (its allocation is reused from the last head), or `None` once parts
    /// are pushed (they may point into it). Add it to the batch with [`WriteBatch::push_head`].
    pub fn head_mut(&mut self) -> Option<&mut Vec<u8>> {
        if !self.iov.is_empty() {
            return None;
        }
        self.head.clear();
        Some(&mut self.head)
    }

    /// Adds the head built in [`WriteBatch::head_mut`] as the first part (nothing when it is empty).
    ///
    /// Errors: [`Full`] when parts were pushed already (the head must come first) or no part is left.
    pub fn push_head(&mut self) -> Result<(), Full> {
        if !self.iov.is_empty() || self.max_parts == 0 {
            return Err(Full);
        }
        if !self.head.is_empty() {
            self.push_raw(self.head.as_ptr(), self.head.len());
        }
        Ok(())
    }

    /// Adds a shared frame, written in place (no copy); it is kept alive until [`WriteBatch::clear`]. An empty
    /// frame adds nothing.
    ///
    /// Errors: [`Full`] when the batch has no part left.
    pub fn push_bytes(&mut self, b: Bytes) -> Result<(), Full> {
        if b.is_empty() {
            return Ok(());
        }
        if self.iov.len() == self.max_parts {
            return Err(Full);
        }
        self.push_raw(b.as_ptr(), b.len());
        self.frames.push(b);
        Ok(())
    }

    /// Adds a static slice (CRLF, the last chunk).
    ///
    /// Errors: [`Full`] when the batch has no part left.
    pub fn push_static(&mut self, s: &'static [u8]) -> Result<(), Full> {
        if s.is_empty() {
            return Ok(());
        }
        if self.iov.len() == self.max_parts {
            return Err(Full);
        }
        self.push_raw(s.as_ptr(), s.len());
        Ok(())
    }

    /// Adds a copy of a short part (a chunk-size line) to the line buffer. A copy that directly follows another
    /// copy extends that part's `iovec` instead of taking a new one (a frame's closing CRLF and the next frame's
    /// size line go out as one part: fewer segments for the kernel to walk per write).
    ///
    /// Errors: [`Full`] when the batch has no part left or the line buffer too few bytes.
    pub fn push_copy(&mut self, s: &[u8]) -> Result<(), Full> {
        if s.is_empty() {
            return Ok(());
        }
        let at = self.lines.len();
        // `at > 0`: with `lines` empty, another allocation (a frame, the head) could end right where `lines`
        // starts, and a merged part would then span two allocations.
        let follows_copy = at > 0
            && self.iov.len() > self.start
            && self.iov.last().is_some_and(|v| {
                v.iov_base as usize + v.iov_len == self.lines.as_ptr() as usize + at
            });
        if (!follows_copy && self.iov.len() == self.max_parts)
            || self.lines.capacity() - at < s.len()
        {
            return Err(Full);
        }
        // Within capacity: no reallocation, so the parts already pointing into `lines` stay valid.
        self.lines.extend_from_slice(s);
        match self.iov.last_mut() {
            // The last part ends where this copy starts, at `lines[at]` with `at > 0`: it ends inside `lines`
            // (parts never straddle allocations), so it is a copy; one part now covers both, all in `lines`.
            Some(v) if follows_copy => v.iov_len += s.len(),
            _ => self.push_raw(self.lines[at..].as_ptr(), s.len()),
        }
        Ok(())
    }

    fn push_raw(&mut self, ptr: *const u8, len: usize) {
        self.iov.push(libc::iovec {
            iov_base: ptr as *mut libc::c_void,
            iov_len: len,
        });
    }

    /// Bytes still to be written.
    pub fn len(&self) -> usize {
        self.iov[self.start..].iter().map(|v| v.iov_len).sum()
    }

    /// True when every part is written (or none was pushed).
    pub fn is_empty(&self) -> bool {
        self.start == self.iov.len()
    }

    /// Parts still to be written.
    pub fn parts(&self) -> usize {
        self.iov.len() - self.start
    }

    /// Room for this many more parts.
    pub fn room(&self) -> usize {
        self.max_parts - self.iov.len()
    }

    /// Room for this many more bytes of copied parts ([`WriteBatch::push_copy`]).
    pub fn line_room(&self) -> usize {
        self.lines.capacity() - self.lines.len()
    }

    /// Marks the first `n` bytes as written (after a short write); more than [`WriteBatch::len`] marks all.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 && self.start < self.iov.len() {
            let v = &mut self.iov[self.start];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.start += 1;
            } else {
                // `wrapping_add` stays inside the part (n < its length): no `unsafe` pointer arithmetic.
                v.iov_base = (v.iov_base as *mut u8).wrapping_add(n) as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
    }

    /// Empties the batch for reuse: drops the frames (their buffers are freed when no one else holds them) and
    /// keeps every allocation.
    pub fn clear(&mut self) {
        self.iov.clear();
        self.start = 0;
        self.lines.clear();
        self.frames.clear();
    }
}

// SAFETY: every `iovec` from `start` on describes `iov_len` initialized bytes that the batch owns or keeps alive
// for as long as it lives: the head's and the lines' heap buffers (never written, grown or freed while a part
// points into them: `head_mut` refuses once parts exist, `push_copy` stays within the capacity fixed at
// construction, `clear` empties the parts first), the frames' `Bytes` (held in `frames`, whose data does not move
// when the handle moves) and `'static` slices. The `iovec` array itself is a heap `Vec`, so the pointer returned
// stays put when monoio moves the batch into its operation; while the runtime owns the batch nobody can reach
// it to push, advance or clear. `advance` only moves a base forward within its part.
unsafe impl monoio::buf::IoVecBuf for WriteBatch {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov[self.start..].as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iov.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use monoio::io::AsyncWriteRent;
    use std::io::Read;

    fn rt() -> monoio::FusionRuntime<
        monoio::time::TimeDriver<monoio::IoUringDriver>,
        monoio::time::TimeDriver<monoio::LegacyDriver>,
    > {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
    }

    #[test]
    fn bounds_and_order() {
        let mut b = WriteBatch::new(4, 4);
        b.head_mut().unwrap().extend_from_slice(b"HEAD");
        b.push_head().unwrap();
        assert!(b.head_mut().is_none(), "the head is fixed once parts exist");
        assert_eq!(b.push_head(), Err(Full));
        b.push_copy(b"1\r\n").unwrap();
        assert_eq!(b.push_copy(b"ab"), Err(Full), "line bytes are bounded");
        b.push_bytes(Bytes::from_static(b"x")).unwrap();
        b.push_bytes(Bytes::new()).unwrap(); // empty: no part
        b.push_static(b"\r\n").unwrap();
        assert_eq!(b.push_static(b"more"), Err(Full), "parts are bounded");
        assert_eq!((b.parts(), b.len(), b.room()), (4, 10, 0));
        b.advance(5);
        assert_eq!((b.parts(), b.len()), (3, 5));
        b.advance(100);
        assert!(b.is_empty());
        b.clear();
        assert_eq!((b.parts(), b.room()), (0, 4));
    }

    /// Copies that follow each other share one part; a copy after any other part takes its own.
    #[test]
    fn consecutive_copies_share_a_part() {
        let mut b = WriteBatch::new(3, 16);
        b.push_copy(b"5\r\n").unwrap();
        b.push_bytes(Bytes::from_static(b"hello")).unwrap();
        b.push_copy(b"\r\n").unwrap();
        b.push_copy(b"3\r\n").unwrap(); // merged into the CRLF's part
        assert_eq!((b.parts(), b.len()), (3, 13));
        b.push_copy(b"abc").unwrap(); // still merged: no part needed, only line bytes
        assert_eq!((b.parts(), b.len()), (3, 16));
        assert_eq!(b.push_bytes(Bytes::from_static(b"x")), Err(Full));
        assert_eq!(
            b.push_copy(b"0123456789"),
            Err(Full),
            "line bytes are bounded"
        );
        let got: Vec<u8> = b.iov[b.start..]
            .iter()
            .flat_map(|v| {
                // SAFETY: each iovec describes initialized bytes the batch owns or keeps alive (test only).
                unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) }.to_vec()
            })
            .collect();
        assert_eq!(got, b"5\r\nhello\r\n3\r\nabc");
        // Once written, a new copy does not extend the written part.
        b.advance(16);
        b.push_copy(b"z").unwrap_err(); // no room for a new part: the batch still counts 3 used
        b.clear();
        b.push_copy(b"z").unwrap();
        assert_eq!((b.parts(), b.len()), (1, 1));
    }

    /// A batch written over a socket arrives whole and in order, after short writes too (the batch is advanced
    /// by what went out and written again).
    #[test]
    fn written_in_place_in_order() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let reader = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got
        });
        let frame = Bytes::from(vec![b'z'; 100_000]);
        let mut expect = b"HEAD\r\n".to_vec();
        rt().block_on(async {
            let mut s = monoio::net::TcpStream::connect(addr).await.unwrap();
            let mut b = WriteBatch::new(8, 64);
            b.head_mut().unwrap().extend_from_slice(b"HEAD\r\n");
            b.push_head().unwrap();
            for i in 0..2 {
                let line = format!("{:x}\r\n", frame.len() + i);
                b.push_copy(line.as_bytes()).unwrap();
                expect.extend_from_slice(line.as_bytes());
                b.push_bytes(frame.clone()).unwrap();
                expect.extend_from_slice(&frame);
                b.push_static(b"\r\n").unwrap();
                expect.extend_from_slice(b"\r\n");
            }
            while !b.is_empty() {
                let (r, back) = s.writev(b).await;
                b = back;
                b.advance(r.unwrap());
            }
            b.clear();
        });
        assert_eq!(reader.join().unwrap(), expect);
    }
}
