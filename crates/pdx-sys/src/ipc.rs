//! Same-host identity the kernel vouches for: who is at the other end of a Unix socket (`SO_PEERCRED`, and
//! `SO_PEERPIDFD` where the kernel has it), descriptors passed over it (`SCM_RIGHTS`), and a peer process held
//! by pidfd so that cross-memory attach (`process_vm_readv` / `process_vm_writev`) only ever reaches the process
//! the kernel named, never a pid some peer wrote into a message.
//!
//! The transfer engine uses it for its same-host transports: a peer's memfds arrive over the peer's Unix socket
//! and are mapped with [`crate::Memory::map_memfd`]; `cma` copies go through [`PeerProcess`], built from the
//! connected socket. Descriptor passing, pidfds and `poll` go through `rustix` (safe wrappers); the two
//! `getsockopt` calls (`SO_PEERCRED`, whose pid may be 0, and `SO_PEERPIDFD`, which `rustix` does not wrap) are
//! here.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::event::{PollFd, PollFlags};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::{cma, CmaDir, MemSlice, Result, SysError};

/// Most descriptors passed in one message. The kernel's limit (`SCM_MAX_FD`) is 253; senders split larger sets.
pub const MAX_FDS_PER_MESSAGE: usize = 128;

fn io_err(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> SysError {
    move |e| SysError::Io {
        op,
        source: e.into(),
    }
}

/// Credentials of the process at the other end of a connected Unix socket, as the kernel recorded them when that
/// process called `connect` or `listen` (`SO_PEERCRED`). Nothing the peer writes can change them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id (in this process's pid namespace).
    pub pid: u32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// The peer credentials of a connected Unix socket. Errors: [`SysError::Io`] from `getsockopt`.
///
/// Read with `libc` rather than `rustix`, whose `UCred` holds a non-zero `Pid`: the kernel reports pid 0 for a
/// peer outside this process's pid namespace, which must be a value here, not undefined behaviour.
pub fn peer_cred(sock: &UnixStream) -> Result<PeerCred> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes (one `ucred`, plain integers) into the live local `cred`
    // and updates `len`; a bad socket is an error return.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 || len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(SysError::last("getsockopt(SO_PEERCRED)"));
    }
    Ok(PeerCred {
        pid: cred.pid.max(0) as u32,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// This process's effective user id.
pub fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Sends `data` on `sock` with `fds` attached to its first byte (`SCM_RIGHTS`, at most
/// [`MAX_FDS_PER_MESSAGE`]). Blocking; the socket's send timeout applies.
///
/// Errors: [`SysError::InvalidLength`] for empty `data` or too many descriptors; [`SysError::Io`] from `sendmsg`
/// or `write`.
pub fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
    if data.is_empty() || fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(SysError::InvalidLength(fds.len() as u64));
    }
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(SysError::InvalidLength(fds.len() as u64));
    }
    let mut sent = loop {
        match rustix::net::sendmsg(
            sock,
            &[io::IoSlice::new(data)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(io_err("sendmsg")(e)),
        }
    };
    // The descriptors went with the first byte; the rest (if the kernel took only part) is plain data.
    while sent < data.len() {
        match rustix::net::send(sock, &data[sent..], SendFlags::NOSIGNAL) {
            Ok(0) => {
                return Err(SysError::UnexpectedEof {
                    received: sent as u64,
                    expected: data.len() as u64,
                })
            }
            Ok(n) => sent += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(io_err("send")(e)),
        }
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes from `sock` with one `recvmsg`, appending the descriptors that came with them
/// (at most `max_fds`, close-on-exec) to `fds`. Returns the byte count (0 at end of stream). Blocking; the socket's
/// receive timeout applies.
///
/// Errors: [`SysError::InvalidLength`] when the peer attached more than `max_fds` descriptors (the message is
/// refused: the kernel closes what did not fit, this closes the rest); [`SysError::Io`] from `recvmsg`.
pub fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    max_fds: usize,
    fds: &mut Vec<OwnedFd>,
) -> Result<usize> {
    let max_fds = max_fds.min(MAX_FDS_PER_MESSAGE);
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(max_fds.max(1)))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        match rustix::net::recvmsg(
            sock,
            &mut [io::IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(m) => break m,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(io_err("recvmsg")(e)),
        }
    };
    let mut got = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            got.extend(rights);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) || got.len() > max_fds {
        return Err(SysError::InvalidLength(got.len() as u64));
    }
    fds.extend(got);
    Ok(msg.bytes)
}

/// True while the other end of `sock` has not hung up (no `POLLHUP` / `POLLRDHUP`), checked without blocking.
pub fn is_connected(sock: &UnixStream) -> bool {
    let mut fds = [PollFd::new(sock, PollFlags::RDHUP)];
    match rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default())) {
        Ok(_) => !fds[0]
            .revents()
            .intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR | PollFlags::NVAL),
        Err(_) => false,
    }
}

/// `SO_PEERPIDFD` (Linux 6.5): a pidfd of the peer that called `connect`/`listen`, race-free against pid reuse.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const SO_PEERPIDFD: libc::c_int = 77;

/// The peer's pidfd from the kernel, where it offers one; `None` on older kernels (`ENOPROTOOPT`).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn peer_pidfd(sock: &UnixStream) -> Option<OwnedFd> {
    use std::os::fd::AsRawFd;
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes (one int) into the live local `fd` and updates `len`; a bad
    // option or socket is an error return.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || fd < 0 || len as usize != std::mem::size_of::<libc::c_int>() {
        return None;
    }
    // SAFETY: on success SO_PEERPIDFD installs a new descriptor in our table that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn peer_pidfd(_sock: &UnixStream) -> Option<OwnedFd> {
    None
}

/// A process this process may copy to and from with cross-memory attach: either this process, or the process at
/// the other end of a connected Unix socket, whose pid the kernel reported and which is held by a pidfd.
///
/// Every copy checks, after the system call, that the process has not exited: a pid is only reused after its
/// process has exited and been reaped, so a copy that finishes while the pidfd still reports the process alive
/// reached that process and no other. A copy that races with the exit fails with [`SysError::ProcessExited`]; a
/// READ's destination is zeroed then, so bytes of whatever held the pid never stay in registered memory.
#[derive(Debug)]
pub struct PeerProcess {
    pid: u32,
    /// `None` for this process (it is alive while it runs).
    pidfd: Option<OwnedFd>,
}

impl PeerProcess {
    /// This process.
    pub fn this_process() -> PeerProcess {
        PeerProcess {
            pid: std::process::id(),
            pidfd: None,
        }
    }

    /// The process at the other end of `sock`, with its credentials. The pidfd comes from the kernel
    /// (`SO_PEERPIDFD`, Linux 6.5) or, on older kernels, from `pidfd_open` of the `SO_PEERCRED` pid while the
    /// socket is still connected (a peer that exits between the two calls is refused; one that hands its socket
    /// to a child and exits before `pidfd_open` could race it, which the kernel pidfd rules out).
    ///
    /// Errors: [`SysError::Io`] from `getsockopt` or `pidfd_open`; [`SysError::ProcessExited`] when the peer is
    /// already gone.
    pub fn of_unix_peer(sock: &UnixStream) -> Result<(PeerProcess, PeerCred)> {
        let cred = peer_cred(sock)?;
        if cred.pid == 0 {
            // Outside our pid namespace: no pid of ours names it (and pid 0 would mean this process).
            return Err(SysError::ProcessExited { pid: 0 });
        }
        let pidfd = match peer_pidfd(sock) {
            Some(fd) => fd,
            None => {
                let pid = rustix::process::Pid::from_raw(cred.pid as i32)
                    .ok_or(SysError::ProcessExited { pid: cred.pid })?;
                let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
                    .map_err(io_err("pidfd_open"))?;
                if !is_connected(sock) {
                    return Err(SysError::ProcessExited { pid: cred.pid });
                }
                fd
            }
        };
        let p = PeerProcess {
            pid: cred.pid,
            pidfd: Some(pidfd),
        };
        if !p.is_alive() {
            return Err(SysError::ProcessExited { pid: cred.pid });
        }
        Ok((p, cred))
    }

    /// A process held by a pidfd the caller opened (tests only).
    #[cfg(test)]
    pub(crate) fn from_parts_for_test(pid: u32, pidfd: OwnedFd) -> PeerProcess {
        PeerProcess {
            pid,
            pidfd: Some(pidfd),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// False once the process has exited (its pidfd is readable).
    pub fn is_alive(&self) -> bool {
        let Some(fd) = &self.pidfd else {
            return true;
        };
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default())) {
            Ok(n) => n == 0,
            Err(_) => false,
        }
    }

    /// Reads the process's `remote` ranges `(address, length)` into `local`, in order, with batched
    /// `process_vm_readv` calls (up to 1024 iovecs each). The total lengths must match.
    ///
    /// Needs ptrace-read permission on the process (same user, or `CAP_SYS_PTRACE`; Yama scope 0). Errors:
    /// [`SysError::Io`] (`EFAULT` for unmapped remote ranges, `EPERM`); [`SysError::ProcessExited`] (the
    /// destination is zeroed); [`SysError::ShortCopy`]; [`SysError::InvalidLength`] when totals differ.
    pub fn read(&self, local: &[MemSlice<'_>], remote: &[(u64, usize)]) -> Result<()> {
        // One liveness check, after the copy, is enough (see the type's docs): a process that exited before the
        // call fails it the same way.
        let r = cma(CmaDir::Read, self.pid, local, remote);
        if !self.is_alive() {
            for s in local {
                // SAFETY: every MemSlice is a bounds-checked range of a live region (its invariant).
                unsafe { std::ptr::write_bytes(s.ptr, 0, s.len) };
            }
            return Err(SysError::ProcessExited { pid: self.pid });
        }
        r
    }

    /// Writes `local` into the process's `remote` ranges with batched `process_vm_writev`. See
    /// [`PeerProcess::read`] for permissions and errors.
    pub fn write(&self, local: &[MemSlice<'_>], remote: &[(u64, usize)]) -> Result<()> {
        let r = cma(CmaDir::Write, self.pid, local, remote);
        if !self.is_alive() {
            return Err(SysError::ProcessExited { pid: self.pid });
        }
        r
    }
}
