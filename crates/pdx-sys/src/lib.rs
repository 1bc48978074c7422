//! Host-memory system layer of pdx: every `unsafe` operation the host transports need, behind a safe API.
//!
//! The transfer engine (`pdx-transfer`) is `#![forbid(unsafe_code)]`; what it cannot do in safe Rust lives here:
//! - [`Memory`]: a region of host memory addressed by raw pointer: a memfd arena that same-host peers can map
//!   ([`Memory::memfd`], sealed against shrinking), a heap buffer owned by the region ([`Memory::from_vec`]), caller
//!   memory registered as it is ([`Memory::from_raw_parts`], `unsafe`), or a peer's memfd, received over a Unix
//!   socket, mapped into this process ([`Memory::map_memfd`]);
//! - copies between regions with every access bounds-checked ([`copy`]);
//! - the same-host identity the kernel vouches for ([`ipc`]): Unix-socket peer credentials, memfds passed with
//!   `SCM_RIGHTS`, and a peer process held by pidfd ([`ipc::PeerProcess`]), through which alone
//!   `process_vm_readv` / `process_vm_writev` are reached ([`ipc::PeerProcess::read`], [`ipc::PeerProcess::write`]);
//! - socket I/O straight out of and into registered memory ([`write_all_vectored`], [`read_exact_into`]).
//!
//! # Shared-memory model
//! Registered memory is shared with other agents (other threads, other processes through a memfd mapping or
//! cross-memory attach). Its bytes are therefore never exposed as Rust references: every access goes through
//! raw-pointer copies in this crate, so no `&[u8]`/`&mut [u8]` ever aliases memory that someone else writes. The
//! content of a region that is written while it is read is unspecified (as with DMA), never undefined behaviour
//! on the Rust side: callers synchronise through transfer completion and notifications.

#![deny(missing_docs)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

pub mod ipc;
mod stream_copy;

/// Errors of the host-memory layer.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// A system call failed. `op` names the call, e.g. `"memfd_create"`.
    #[error("{op} failed: {source}")]
    Io {
        /// The failing call.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An access `[offset, offset + len)` fell outside a region of `region_len` bytes.
    #[error("access [{offset}, {offset}+{len}) is outside a region of {region_len} bytes")]
    OutOfBounds {
        /// Offset of the access in bytes.
        offset: u64,
        /// Length of the access in bytes.
        len: u64,
        /// Length of the region in bytes.
        region_len: u64,
    },
    /// A length was zero or too large for this platform.
    #[error("invalid length {0} bytes")]
    InvalidLength(u64),
    /// The peer closed the stream before all bytes arrived.
    #[error("stream closed after {received} of {expected} bytes")]
    UnexpectedEof {
        /// Bytes received before the end.
        received: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// A descriptor offered for mapping is not a memfd sealed against shrinking (`F_SEAL_SHRINK`): a file that can
    /// shrink under a mapping turns later accesses into `SIGBUS`, so it is refused.
    #[error("descriptor cannot be mapped safely: {0}")]
    UnsafeDescriptor(&'static str),
    /// The peer process exited (or its pid could not be pinned with a pidfd) around a cross-process copy.
    #[error("process {pid} has exited")]
    ProcessExited {
        /// The process id it had.
        pid: u32,
    },
    /// The kernel moved fewer bytes than asked without an error (the remote range is partly unmapped).
    #[error("cross-process copy moved {moved} of {expected} bytes")]
    ShortCopy {
        /// Bytes moved.
        moved: u64,
        /// Bytes expected.
        expected: u64,
    },
}

impl SysError {
    fn last(op: &'static str) -> Self {
        SysError::Io {
            op,
            source: io::Error::last_os_error(),
        }
    }

    /// True when a cross-process copy failed because the peer process no longer exists (`ESRCH`).
    pub fn is_process_gone(&self) -> bool {
        match self {
            SysError::Io { source, .. } => source.raw_os_error() == Some(libc::ESRCH),
            SysError::ProcessExited { .. } => true,
            _ => false,
        }
    }

    /// True when retrying the same operation later may succeed (interrupted or would-block I/O, timeouts).
    pub fn is_retryable(&self) -> bool {
        match self {
            SysError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            _ => false,
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, SysError>;

/// What backs a [`Memory`] and how it is released.
#[derive(Debug)]
enum Backing {
    /// A memfd mapped `MAP_SHARED`; `map_len` is the page-rounded mapping length.
    Memfd { fd: OwnedFd, map_len: usize },
    /// A peer's memfd (received over a Unix socket) mapped into this process; no fd is kept.
    PeerMapping { map_len: usize },
    /// A private anonymous mapping ([`Memory::anonymous`]).
    Anonymous { map_len: usize },
    /// A heap allocation owned by the region, from `Box<[u8]>::into_raw`.
    Heap,
    /// Memory owned by the caller; nothing to release.
    Foreign,
    /// Memory kept valid by an owner (an allocation of a communication library, say), released when the owner
    /// drops, which happens after the last use through this `Memory`.
    Owned(#[allow(dead_code)] Box<dyn std::any::Any + Send + Sync>),
}

/// A region of host memory addressed by raw pointer, shared with transfers and peers.
///
/// Invariant: `ptr .. ptr + len` is valid for reads and writes for the life of the value.
#[derive(Debug)]
pub struct Memory {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
}

// SAFETY: `Memory` is a pointer to memory valid for its whole life (type invariant); every access goes through
// raw-pointer copies in this crate and never through references, so sharing it across threads cannot create
// aliasing references. Concurrent writes give unspecified bytes, as documented in the crate docs.
unsafe impl Send for Memory {}
// SAFETY: as for `Send`: no method hands out references into the region.
unsafe impl Sync for Memory {}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        page as usize
    } else {
        4096
    }
}

fn round_up_to_page(len: usize) -> Option<usize> {
    let page = page_size();
    len.checked_add(page - 1).map(|v| v / page * page)
}

/// Maps `map_len` bytes of `fd` shared, read-write, optionally pre-faulting every page.
fn mmap_shared(fd: RawFd, map_len: usize, populate: bool) -> Result<NonNull<u8>> {
    let flags = libc::MAP_SHARED | if populate { libc::MAP_POPULATE } else { 0 };
    // SAFETY: a fresh mapping chosen by the kernel (addr = null) overlaps no Rust object; fd is a valid descriptor
    // owned by the caller for the duration of the call.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(SysError::last("mmap"));
    }
    NonNull::new(ptr.cast::<u8>()).ok_or(SysError::InvalidLength(map_len as u64))
}

impl Memory {
    /// Allocates `len` bytes (> 0) in a new memfd named `name` (shown in `/proc/<pid>/maps`), mapped shared.
    ///
    /// Same-host peers map it from the descriptor this agent passes them over a Unix socket
    /// ([`Memory::memfd_handle`], [`ipc::send_with_fds`], [`Memory::map_memfd`]). The file is sealed against
    /// shrinking (`F_SEAL_SHRINK`), so no peer mapping can ever fault past its end. With `populate` every page is
    /// faulted in now, so later copies take no page faults. The mapping length is rounded up to whole pages;
    /// [`Memory::len`] is `len`.
    ///
    /// Errors: [`SysError::InvalidLength`] for 0; [`SysError::Io`] from `memfd_create`, `ftruncate`, `fcntl` or
    /// `mmap`.
    pub fn memfd(name: &str, len: usize, populate: bool) -> Result<Memory> {
        let map_len = match round_up_to_page(len) {
            Some(l) if len > 0 && l <= isize::MAX as usize => l,
            _ => return Err(SysError::InvalidLength(len as u64)),
        };
        let cname = CString::new(name.replace('\0', "_")).unwrap_or_default();
        // SAFETY: cname is a valid NUL-terminated string for the duration of the call.
        let raw = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(SysError::last("memfd_create"));
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: fd is a valid memfd; ftruncate only sizes the file.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), map_len as libc::off_t) } != 0 {
            return Err(SysError::last("ftruncate"));
        }
        rustix::fs::fcntl_add_seals(&fd, rustix::fs::SealFlags::SHRINK).map_err(|e| {
            SysError::Io {
                op: "fcntl(F_ADD_SEALS)",
                source: e.into(),
            }
        })?;
        let ptr = mmap_shared(fd.as_raw_fd(), map_len, populate)?;
        Ok(Memory {
            ptr,
            len,
            backing: Backing::Memfd { fd, map_len },
        })
    }

    /// Maps `len` bytes of a memfd a same-host peer passed over a Unix socket ([`ipc::recv_with_fds`]).
    ///
    /// Only a memfd sealed against shrinking is accepted (as [`Memory::memfd`] makes them): the peer cannot then
    /// truncate the file under this mapping, which would turn a later copy into `SIGBUS`. The mapping keeps the
    /// file alive; it stays valid (and harmless) after the peer exits, until this value is dropped.
    ///
    /// Errors: [`SysError::UnsafeDescriptor`] for a descriptor that is not a sealed memfd;
    /// [`SysError::InvalidLength`] when `len` is 0 or the file is shorter than `len`; [`SysError::Io`] from
    /// `fstat` or `mmap`.
    pub fn map_memfd(fd: BorrowedFd<'_>, len: usize, populate: bool) -> Result<Memory> {
        let seals = rustix::fs::fcntl_get_seals(fd)
            .map_err(|_| SysError::UnsafeDescriptor("not a memfd"))?;
        if !seals.contains(rustix::fs::SealFlags::SHRINK) {
            return Err(SysError::UnsafeDescriptor(
                "memfd is not sealed against shrinking",
            ));
        }
        let file_len = rustix::fs::fstat(fd)
            .map_err(|e| SysError::Io {
                op: "fstat peer memfd",
                source: e.into(),
            })?
            .st_size;
        let file_len = u64::try_from(file_len).unwrap_or(0);
        if len == 0 || (len as u64) > file_len {
            return Err(SysError::InvalidLength(len as u64));
        }
        let map_len = round_up_to_page(len).ok_or(SysError::InvalidLength(len as u64))?;
        let map_len = map_len.min(file_len as usize);
        let ptr = mmap_shared(fd.as_raw_fd(), map_len, populate)?;
        Ok(Memory {
            ptr,
            len,
            backing: Backing::PeerMapping { map_len },
        })
    }

    /// Maps `len` bytes (> 0) of private anonymous memory (`mmap(MAP_PRIVATE | MAP_ANONYMOUS)`): page-aligned,
    /// zero-filled, unmapped on drop. This is host memory as an engine or NumPy has it (glibc's `malloc` maps large
    /// blocks this way): no memfd, so same-host peers cannot map it and reach it by cross-memory attach, TCP or
    /// UCX instead, exactly as memory registered with [`Memory::from_raw_parts`]. With `populate` every page is
    /// faulted in now. Errors: [`SysError::InvalidLength`] for 0; [`SysError::Io`] from `mmap`.
    pub fn anonymous(len: usize, populate: bool) -> Result<Memory> {
        let map_len = match round_up_to_page(len) {
            Some(l) if len > 0 && l <= isize::MAX as usize => l,
            _ => return Err(SysError::InvalidLength(len as u64)),
        };
        let flags =
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if populate { libc::MAP_POPULATE } else { 0 };
        // SAFETY: a fresh mapping chosen by the kernel (addr = null, no file) overlaps no Rust object.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(SysError::last("mmap"));
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(SysError::InvalidLength(map_len as u64))?;
        Ok(Memory {
            ptr,
            len,
            backing: Backing::Anonymous { map_len },
        })
    }

    /// Takes ownership of `buf` as a region (caller-allocated memory that peers reach by cross-memory attach or
    /// TCP, not by mapping). Errors: [`SysError::InvalidLength`] when `buf` is empty.
    pub fn from_vec(buf: Vec<u8>) -> Result<Memory> {
        let len = buf.len();
        if len == 0 {
            return Err(SysError::InvalidLength(0));
        }
        let raw = Box::into_raw(buf.into_boxed_slice());
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or(SysError::InvalidLength(0))?;
        Ok(Memory {
            ptr,
            len,
            backing: Backing::Heap,
        })
    }

    /// Registers caller-owned memory as it is (an engine's KV cache, say). Nothing is freed on drop.
    ///
    /// # Safety
    /// `ptr .. ptr + len` must be valid for reads and writes, and stay so, until this `Memory` and every clone of
    /// the `Arc` that holds it are dropped; the caller must not hold Rust references into it while transfers run.
    pub unsafe fn from_raw_parts(ptr: NonNull<u8>, len: usize) -> Memory {
        Memory {
            ptr,
            len,
            backing: Backing::Foreign,
        }
    }

    /// Wraps memory that `owner` keeps valid, such as an allocation made by UCX (`ucp_mem_map` with
    /// `UCP_MEM_MAP_ALLOCATE`): `owner` is dropped with this `Memory`, after its last use, and releases it.
    ///
    /// # Safety
    /// `ptr .. ptr + len` must be valid for reads and writes for as long as `owner` is alive, and nothing may
    /// hold Rust references into it while this `Memory` exists.
    pub unsafe fn from_raw_parts_owned(
        ptr: NonNull<u8>,
        len: usize,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Memory {
        Memory {
            ptr,
            len,
            backing: Backing::Owned(owner),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: regions are never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The region's start address in this process's address space (what remote descriptors name).
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The memfd descriptor number when this region is a memfd arena (informational: peers receive the
    /// descriptor itself over a Unix socket, see [`Memory::memfd_handle`]).
    pub fn memfd_fd(&self) -> Option<RawFd> {
        match &self.backing {
            Backing::Memfd { fd, .. } => Some(fd.as_raw_fd()),
            _ => None,
        }
    }

    /// The memfd of a memfd arena, to pass to a same-host peer with [`ipc::send_with_fds`]; `None` for any other
    /// memory.
    pub fn memfd_handle(&self) -> Option<BorrowedFd<'_>> {
        match &self.backing {
            Backing::Memfd { fd, .. } => Some(fd.as_fd()),
            _ => None,
        }
    }

    /// Checks `[offset, offset + len)` lies inside the region; returns the start pointer.
    fn range(&self, offset: usize, len: usize) -> Result<*mut u8> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {
                // SAFETY: offset <= end <= self.len, so the result stays inside (or one past) the allocation.
                Ok(unsafe { self.ptr.as_ptr().add(offset) })
            }
            _ => Err(SysError::OutOfBounds {
                offset: offset as u64,
                len: len as u64,
                region_len: self.len as u64,
            }),
        }
    }

    /// Copies `out.len()` bytes starting at `offset` into `out`. Errors: [`SysError::OutOfBounds`].
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        let src = self.range(offset, out.len())?;
        // SAFETY: src..src+len is inside the region (checked); `out` is a distinct Rust buffer, which cannot
        // overlap a region that is only ever accessed through raw pointers.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copies `data` into the region at `offset`. Errors: [`SysError::OutOfBounds`].
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        let dst = self.range(offset, data.len())?;
        // SAFETY: dst..dst+len is inside the region (checked); `data` is a Rust buffer that cannot overlap it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Fills `[offset, offset + len)` with `byte`. Errors: [`SysError::OutOfBounds`].
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<()> {
        let dst = self.range(offset, len)?;
        // SAFETY: dst..dst+len is inside the region (checked).
        unsafe { std::ptr::write_bytes(dst, byte, len) };
        Ok(())
    }

    /// A bounds-checked view `[offset, offset + len)` for vectored I/O. Errors: [`SysError::OutOfBounds`].
    pub fn slice(&self, offset: usize, len: usize) -> Result<MemSlice<'_>> {
        let ptr = self.range(offset, len)?;
        Ok(MemSlice {
            ptr,
            len,
            _mem: std::marker::PhantomData,
        })
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        match &self.backing {
            Backing::Memfd { map_len, .. }
            | Backing::PeerMapping { map_len }
            | Backing::Anonymous { map_len } => {
                // SAFETY: ptr/map_len are exactly the mapping made at construction, unmapped once here.
                unsafe { libc::munmap(self.ptr.as_ptr().cast(), *map_len) };
            }
            Backing::Heap => {
                let slice = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
                // SAFETY: ptr/len came from Box::<[u8]>::into_raw in `from_vec` and are released once here.
                drop(unsafe { Box::from_raw(slice) });
            }
            Backing::Foreign | Backing::Owned(_) => {}
        }
    }
}

/// A bounds-checked range of a [`Memory`], borrowed for one I/O call.
#[derive(Debug, Clone, Copy)]
pub struct MemSlice<'a> {
    ptr: *mut u8,
    len: usize,
    _mem: std::marker::PhantomData<&'a Memory>,
}

impl MemSlice<'_> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length slice.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Copies `len` bytes from `src[src_off..]` to `dst[dst_off..]` (memmove semantics: the ranges may overlap when
/// `src` and `dst` are the same region). Both ranges are bounds-checked first.
///
/// Errors: [`SysError::OutOfBounds`] for either range.
pub fn copy(src: &Memory, src_off: usize, dst: &Memory, dst_off: usize, len: usize) -> Result<()> {
    let s = src.range(src_off, len)?;
    let d = dst.range(dst_off, len)?;
    // SAFETY: both ranges lie inside live regions (checked); `copy` tolerates overlap.
    unsafe { std::ptr::copy(s, d, len) };
    Ok(())
}

/// Copies `len` bytes from `src[src_off..]` to `dst[dst_off..]` with non-temporal (streaming) stores where the
/// CPU has them (x86-64 with AVX2), for copies larger than the cache whose destination this thread will not read
/// again: a batch of KV blocks. Faster than [`copy`] out of cache, slower for data that would have stayed cached
/// (figures: `docs/benchmarks.md`, "KV transfer"). Overlapping ranges (the same region) fall back
/// to [`copy`]. The stores are fenced before it returns, so the bytes are visible before anything published
/// afterwards. See the `stream_copy` module docs.
///
/// Errors: [`SysError::OutOfBounds`] for either range.
pub fn copy_streaming(
    src: &Memory,
    src_off: usize,
    dst: &Memory,
    dst_off: usize,
    len: usize,
) -> Result<()> {
    let s = src.range(src_off, len)?;
    let d = dst.range(dst_off, len)?;
    let (s_addr, d_addr) = (s as usize, d as usize);
    if s_addr < d_addr + len && d_addr < s_addr + len {
        return copy(src, src_off, dst, dst_off, len);
    }
    // SAFETY: both ranges lie inside live regions (checked) and do not overlap (checked just above).
    unsafe { stream_copy::copy_nonoverlapping_streaming(s, d, len) };
    Ok(())
}

/// Most iovecs one system call takes (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

fn iovec_of(ptr: *mut u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    }
}

/// Direction of a cross-process copy.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum CmaDir {
    Read,
    Write,
}

/// One batched cross-process copy with process `pid`. Private: only [`ipc::PeerProcess`], whose pid the kernel
/// vouched for, reaches it.
fn cma(dir: CmaDir, pid: u32, local: &[MemSlice<'_>], remote: &[(u64, usize)]) -> Result<()> {
    let total_local: usize = local.iter().map(|s| s.len).sum();
    let total_remote: usize = remote.iter().map(|r| r.1).sum();
    if total_local != total_remote {
        return Err(SysError::InvalidLength(total_remote as u64));
    }
    let mut liov: Vec<libc::iovec> = local.iter().map(|s| iovec_of(s.ptr, s.len)).collect();
    let mut riov: Vec<libc::iovec> = remote
        .iter()
        .map(|&(addr, len)| iovec_of(addr as usize as *mut u8, len))
        .collect();
    let (mut li, mut ri, mut moved_total) = (0usize, 0usize, 0usize);
    while moved_total < total_local {
        let lcount = (liov.len() - li).min(IOV_MAX);
        let rcount = (riov.len() - ri).min(IOV_MAX);
        // SAFETY: local iovecs point into live, bounds-checked regions of this process (MemSlice invariant);
        // remote iovecs name the peer's address space, which the kernel checks (EFAULT), so they cannot touch
        // our memory.
        let moved = unsafe {
            match dir {
                CmaDir::Read => libc::process_vm_readv(
                    pid as libc::pid_t,
                    liov[li..].as_ptr(),
                    lcount as libc::c_ulong,
                    riov[ri..].as_ptr(),
                    rcount as libc::c_ulong,
                    0,
                ),
                CmaDir::Write => libc::process_vm_writev(
                    pid as libc::pid_t,
                    liov[li..].as_ptr(),
                    lcount as libc::c_ulong,
                    riov[ri..].as_ptr(),
                    rcount as libc::c_ulong,
                    0,
                ),
            }
        };
        if moved < 0 {
            let op = if dir == CmaDir::Read {
                "process_vm_readv"
            } else {
                "process_vm_writev"
            };
            return Err(SysError::last(op));
        }
        if moved == 0 {
            return Err(SysError::ShortCopy {
                moved: moved_total as u64,
                expected: total_local as u64,
            });
        }
        let moved = moved as usize;
        moved_total += moved;
        advance(&mut liov, &mut li, moved);
        advance(&mut riov, &mut ri, moved);
    }
    Ok(())
}

/// Consumes `n` bytes from the iovec list starting at index `*i`.
fn advance(iov: &mut [libc::iovec], i: &mut usize, mut n: usize) {
    while n > 0 && *i < iov.len() {
        let v = &mut iov[*i];
        if n >= v.iov_len {
            n -= v.iov_len;
            *i += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    while *i < iov.len() && iov[*i].iov_len == 0 {
        *i += 1;
    }
}

/// Called when a blocking socket call times out (`SO_SNDTIMEO` / `SO_RCVTIMEO`) with whether any byte moved since
/// the previous call; returns true to keep waiting, false to give up with a `TimedOut` error. The transfer engine
/// uses it to fail a stalled peer within a bound without losing its place in a frame.
pub type OnStall<'a> = &'a mut dyn FnMut(bool) -> bool;

fn stalled(op: &'static str) -> SysError {
    SysError::Io {
        op,
        source: io::Error::new(io::ErrorKind::TimedOut, "peer made no progress"),
    }
}

/// Direction of a vectored socket call.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Vectored {
    Read,
    Write,
}

/// Issues `readv`/`writev` on `fd` until every iovec is consumed, in batches of up to `IOV_MAX`, retrying
/// `EINTR`, asking `on_stall` on timeouts, and reporting an early end of stream.
///
/// Safety contract (checked by the callers): every iovec points into a buffer that is live, and writable for
/// reads, for the whole call.
fn drive_vectored(
    fd: RawFd,
    dir: Vectored,
    mut iov: Vec<libc::iovec>,
    on_stall: OnStall<'_>,
) -> Result<()> {
    let op = if dir == Vectored::Read {
        "readv"
    } else {
        "writev"
    };
    let expected: usize = iov.iter().map(|v| v.iov_len).sum();
    let (mut i, mut moved, mut progressed) = (0usize, 0usize, false);
    // Large socket reads wake only for `lowat` bytes at a time while that works (see `LowWater`).
    let mut lowat = if dir == Vectored::Read {
        LowWater::start(fd, expected)
    } else {
        None
    };
    while i < iov.len() {
        if let Some(lw) = &mut lowat {
            if !lw.keep(expected - moved) {
                lowat = None; // dropping restores the socket's settings
            }
        }
        let batch = &iov[i..i + (iov.len() - i).min(IOV_MAX)];
        let count = batch.len() as libc::c_int;
        // SAFETY: every iovec points into a live buffer (the callers build them from a borrowed prefix and
        // from MemSlices, bounds-checked ranges of live regions); readv writes only inside them and writev only
        // reads them; `count` is the batch's length.
        let n = unsafe {
            match dir {
                Vectored::Read => libc::readv(fd, batch.as_ptr(), count),
                Vectored::Write => libc::writev(fd, batch.as_ptr(), count),
            }
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock && lowat.is_some() {
                // The mark was not reached within its short wait: read plainly from here on.
                lowat = None;
                continue;
            }
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock if on_stall(std::mem::take(&mut progressed)) => continue,
                io::ErrorKind::WouldBlock => return Err(stalled(op)),
                _ => return Err(SysError::Io { op, source: err }),
            }
        }
        if n == 0 {
            return Err(SysError::UnexpectedEof {
                received: moved as u64,
                expected: expected as u64,
            });
        }
        if lowat.as_ref().is_some_and(|lw| (n as usize) < lw.bytes) {
            // The short wait ended before the mark: the sender is not keeping the pipe full.
            lowat = None;
        }
        moved += n as usize;
        progressed = true;
        advance(&mut iov, &mut i, n as usize);
    }
    Ok(())
}

/// Smallest socket read (bytes) that uses a receive low-water mark.
const RCVLOWAT_MIN_READ: usize = 1 << 20;
/// Largest low-water mark, bytes.
const RCVLOWAT_MAX: usize = 2 << 20;
/// How long a read waits for the mark before it gives up on it.
const RCVLOWAT_WAIT: libc::timeval = libc::timeval {
    tv_sec: 0,
    tv_usec: 2000,
};

/// A receive low-water mark (`SO_RCVLOWAT`) for one large socket read.
///
/// By default a blocked reader wakes for every few segments that arrive, and each wake-up of a thread on another
/// core is expensive: large loopback transfers spent much of their CPU time idle between wake-ups. With the mark,
/// the kernel wakes the reader only when `bytes` are queued (or the receive window is nearly closed), and each
/// `readv` copies that much (before/after figures: `docs/benchmarks.md`, "Third session, TCP: a receive
/// low-water mark").
///
/// The mark is a quarter of the read, at most 2 MiB, for reads of 1 MiB or more. It must never hold data back:
/// when the sender cannot fill the mark (slow start after an idle connection, the last bytes of a read), the
/// reader would sleep until a delayed acknowledgement moved things on (40 ms here). So the read waits at most
/// 2 ms for the mark (`SO_RCVTIMEO`); a read that returns less, or nothing, drops the mark for the rest of the
/// read, and the last `2 × bytes` are read without it. Dropping the value restores `SO_RCVLOWAT` = 1 and the
/// socket's own receive timeout.
struct LowWater {
    fd: RawFd,
    bytes: usize,
    timeout: libc::timeval,
    on: bool,
}

impl LowWater {
    /// A mark for a read of `expected` bytes from `fd`, off until [`LowWater::keep`]; `None` for small reads
    /// and for descriptors that are not sockets.
    fn start(fd: RawFd, expected: usize) -> Option<LowWater> {
        if expected < RCVLOWAT_MIN_READ {
            return None;
        }
        let mut timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        };
        let mut len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into the live local `timeout` and updates `len`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&mut timeout as *mut libc::timeval).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(LowWater {
            fd,
            bytes: (expected / 4).min(RCVLOWAT_MAX),
            timeout,
            on: false,
        })
    }

    /// Turns the mark on while more than `2 × bytes` are `left`, off after. False once it is off for good.
    fn keep(&mut self, left: usize) -> bool {
        let want = left > 2 * self.bytes;
        if want && !self.on {
            self.on = true;
            set_sockopt(self.fd, libc::SO_RCVLOWAT, &(self.bytes as libc::c_int));
            set_sockopt(self.fd, libc::SO_RCVTIMEO, &RCVLOWAT_WAIT);
        }
        want
    }
}

impl Drop for LowWater {
    fn drop(&mut self) {
        if self.on {
            set_sockopt(self.fd, libc::SO_RCVLOWAT, &(1 as libc::c_int));
            set_sockopt(self.fd, libc::SO_RCVTIMEO, &self.timeout);
        }
    }
}

/// Sets a `SOL_SOCKET` option to `value`; errors are ignored (the low-water mark only saves wake-ups).
fn set_sockopt<T>(fd: RawFd, name: libc::c_int, value: &T) {
    // SAFETY: setsockopt reads `size_of::<T>()` bytes from the live reference; a bad fd is an error return.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
}

/// Writes `prefix` and then every slice of `segments` to the socket or pipe `fd`, with `writev`, looping over
/// partial writes. Blocking; when the descriptor's `SO_SNDTIMEO` expires, `on_stall` decides whether to go on.
///
/// Errors: [`SysError::Io`] from `writev` (`EPIPE`/`ECONNRESET` when the peer is gone, `TimedOut` when
/// `on_stall` gave up).
pub fn write_all_vectored(
    fd: RawFd,
    prefix: &[u8],
    segments: &[MemSlice<'_>],
    on_stall: OnStall<'_>,
) -> Result<()> {
    let mut iov = Vec::with_capacity(segments.len() + 1);
    if !prefix.is_empty() {
        iov.push(iovec_of(prefix.as_ptr().cast_mut(), prefix.len()));
    }
    iov.extend(
        segments
            .iter()
            .filter(|s| s.len > 0)
            .map(|s| iovec_of(s.ptr, s.len)),
    );
    drive_vectored(fd, Vectored::Write, iov, on_stall)
}

/// Reads exactly the total length of `segments` from `fd` into them, in order, with `readv`, looping over partial
/// reads. Blocking; when `SO_RCVTIMEO` expires, `on_stall` decides whether to go on.
///
/// Errors: [`SysError::UnexpectedEof`] when the stream ends early; [`SysError::Io`] from `readv` (`TimedOut`
/// when `on_stall` gave up).
pub fn read_exact_into(fd: RawFd, segments: &[MemSlice<'_>], on_stall: OnStall<'_>) -> Result<()> {
    let iov = segments
        .iter()
        .filter(|s| s.len > 0)
        .map(|s| iovec_of(s.ptr, s.len))
        .collect();
    drive_vectored(fd, Vectored::Read, iov, on_stall)
}

/// Waits up to `timeout` for `fd` to have something to read (data, end of stream, or an error), without reading
/// it (`poll` for `POLLIN`). False on timeout or when `fd` cannot be polled.
pub fn readable(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
    let ts = Timespec {
        tv_sec: timeout.as_secs() as _,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    loop {
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(n) => return n > 0,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Why `[addr, end)` is not wholly in readable and writable mappings of this process (`/proc/self/maps`), or `None`
/// when it is: what engines' FFI layers check before registering memory by address, so a wrong address fails at
/// registration rather than crashing the first transfer that touches it.
///
/// Errors: `/proc/self/maps` cannot be read (no procfs); callers decide whether that refuses the registration.
pub fn unmapped_rw(addr: u64, end: u64) -> io::Result<Option<String>> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut cursor = addr;
    for line in maps.lines() {
        let mut fields = line.split_ascii_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((start, stop)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(stop)) = (
            u64::from_str_radix(start, 16),
            u64::from_str_radix(stop, 16),
        ) else {
            continue;
        };
        if stop <= cursor {
            continue;
        }
        if start > cursor {
            break;
        }
        if !perms.starts_with("rw") {
            return Ok(Some(format!(
                "{start:#x}-{stop:#x} is mapped `{perms}`, not readable and writable"
            )));
        }
        cursor = stop;
        if cursor >= end {
            return Ok(None);
        }
    }
    Ok(Some(format!("{cursor:#x} is not mapped in this process")))
}

/// Identity of this kernel boot (`/proc/sys/kernel/random/boot_id`) plus this process's network and PID
/// namespaces: two agents with equal host ids can reach each other's memory through memfd mapping and CMA.
pub fn host_id() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let ns = |p: &str| {
        std::fs::read_link(p)
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    format!(
        "{}|{}|{}",
        boot.trim(),
        ns("/proc/self/ns/pid"),
        ns("/proc/self/ns/mnt")
    )
}

#[cfg(test)]
mod tests;
