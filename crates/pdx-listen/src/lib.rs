//! Listening sockets of pdx's servers (`pdx serve`, `pdx mock`): one listener per server thread, all on one
//! address with `SO_REUSEPORT` so the kernel spreads connections over the threads, and never an address that
//! another process already holds.
//!
//! Why the check: Linux lets every socket that sets `SO_REUSEPORT` and belongs to the same user join a port's
//! group, and then spreads new connections over all of them (`socket(7)`). Without a check, a second
//! `pdx serve` (or `pdx mock`) started by mistake on the port of a running one starts without a word and takes
//! part of its traffic. So [`bind_set`] binds its listeners, then reads the port's listening sockets from
//! `/proc/net/tcp` and `/proc/net/tcp6` and fails with [`ListenError::InUse`] when one of them is not its own.
//! A holder that did not set `SO_REUSEPORT`, or runs as another user, already makes the bind itself fail with
//! `EADDRINUSE`; that error is [`ListenError::InUse`] as well. Both name the address and, when `/proc` shows it,
//! the holder's pid and command.
//!
//! Why not a plain probe bind first (no `SO_REUSEPORT`, then close it and bind the set): a second process could
//! probe in the gap between the first one's probe and its set, and both would start. Checking after binding
//! has no such gap: of two processes binding at the same moment, each sees the other's sockets, and at worst
//! both refuse to start; never do both share the port.
//!
//! Where `/proc/net` cannot be read (not Linux, or a restricted container), the check is skipped and only the
//! kernel's own `EADDRINUSE` protects the address.

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// A process that listens on an address (from `/proc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its pid.
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`).
    pub command: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.command)
    }
}

/// Errors of [`bind_set`].
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another process listens on the address (fatal: pick another port or stop that process).
    #[error(
        "{addr} is already in use by another process{}: stop it or choose another --port",
        holder.as_ref().map_or(String::new(), |h| format!(", {h}"))
    )]
    InUse {
        /// The address asked for.
        addr: SocketAddr,
        /// The process holding it, when `/proc` shows it (only processes of the same user are visible).
        holder: Option<Holder>,
    },
    /// Any other socket error (fatal at start).
    #[error("cannot listen on {addr}: {source}")]
    Io {
        /// The address asked for.
        addr: SocketAddr,
        /// The system error.
        source: std::io::Error,
    },
}

/// Binds `count` (at least 1) listeners with `SO_REUSEADDR` and `SO_REUSEPORT` on `addr`, each non-blocking
/// with a listen backlog of `backlog` connections, and checks that no other process listens on the address.
/// Port 0 picks one free port for the whole set.
///
/// Errors: [`ListenError::InUse`] when another process holds the address (with `SO_REUSEPORT` or without),
/// [`ListenError::Io`] for any other socket error.
pub fn bind_set(
    addr: SocketAddr,
    count: usize,
    backlog: i32,
) -> Result<Vec<std::net::TcpListener>, ListenError> {
    let first = bind_one(addr, backlog)?;
    let bound = first
        .local_addr()
        .map_err(|source| ListenError::Io { addr, source })?;
    let mut set = vec![first];
    for _ in 1..count.max(1) {
        set.push(bind_one(bound, backlog)?);
    }
    let ours: HashSet<u64> = set.iter().filter_map(socket_inode).collect();
    if ours.len() == set.len() {
        check_alone(bound, &ours)?;
    }
    Ok(set)
}

/// How long a listener that no process holds may linger before the address counts as taken: a process killed
/// a moment ago (a restart) leaves its listening socket for a few ms while the kernel tears down its io_uring.
pub const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Fails when a listener on `bound` other than `ours` belongs to a process, or when one that belongs to none
/// outlives [`ORPHAN_GRACE`].
fn check_alone(bound: SocketAddr, ours: &HashSet<u64>) -> Result<(), ListenError> {
    let deadline = std::time::Instant::now() + ORPHAN_GRACE;
    loop {
        let foreign: Vec<u64> = listeners_on(bound)
            .into_iter()
            .filter(|inode| !ours.contains(inode))
            .collect();
        let Some(&first) = foreign.first() else {
            return Ok(());
        };
        if let Some(holder) = foreign.iter().find_map(|&i| holder_of(i)) {
            return Err(ListenError::InUse {
                addr: bound,
                holder: Some(holder),
            });
        }
        if std::time::Instant::now() >= deadline {
            return Err(ListenError::InUse {
                addr: bound,
                holder: holder_of(first),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn bind_one(addr: SocketAddr, backlog: i32) -> Result<std::net::TcpListener, ListenError> {
    use socket2::{Domain, Socket, Type};
    let io = |source| ListenError::Io { addr, source };
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(io)?;
    s.set_reuse_address(true).map_err(io)?;
    s.set_reuse_port(true).map_err(io)?;
    s.set_nonblocking(true).map_err(io)?;
    if let Err(e) = s.bind(&addr.into()) {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            let holder = listeners_on(addr).into_iter().find_map(holder_of);
            return Err(ListenError::InUse { addr, holder });
        }
        return Err(io(e));
    }
    s.listen(backlog).map_err(io)?;
    Ok(s.into())
}

/// The inode of one of our sockets (`/proc/self/fd/N` resolves to the socket itself).
fn socket_inode(l: &std::net::TcpListener) -> Option<u64> {
    std::fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd()))
        .ok()
        .map(|m| m.ino())
}

/// Inodes of the listening TCP sockets whose address conflicts with `addr` (same port, and the same IP or
/// either side a wildcard; an IPv6 wildcard also covers IPv4, as a dual-stack socket does).
fn listeners_on(addr: SocketAddr) -> Vec<u64> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        out.extend(
            text.lines()
                .skip(1)
                .filter_map(|l| parse_line(l, v6))
                .filter(|(a, _)| conflicts(*a, addr))
                .map(|(_, inode)| inode),
        );
    }
    out
}

/// One line of `/proc/net/tcp{,6}`: the local address and inode of a socket in state LISTEN (`0A`).
/// Addresses are hex words in the kernel's byte order (`0100007F:1F40` is 127.0.0.1:8000 on x86).
fn parse_line(line: &str, v6: bool) -> Option<(SocketAddr, u64)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 10 || f[3] != "0A" {
        return None;
    }
    let (ip_hex, port_hex) = f[1].split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(ip_hex.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = if v6 {
        let mut b = [0u8; 16];
        for i in 0..4 {
            b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
        }
        IpAddr::V6(Ipv6Addr::from(b))
    } else {
        IpAddr::V4(Ipv4Addr::from(word(0)?))
    };
    Some((SocketAddr::new(ip, port), f[9].parse().ok()?))
}

fn conflicts(listener: SocketAddr, ours: SocketAddr) -> bool {
    if listener.port() != ours.port() {
        return false;
    }
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let (a, b) = (canon(listener.ip()), canon(ours.ip()));
    let v6_any = |ip: IpAddr| ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    a == b
        || v6_any(a)
        || v6_any(b)
        || (a.is_unspecified() && a.is_ipv4() == b.is_ipv4())
        || (b.is_unspecified() && a.is_ipv4() == b.is_ipv4())
}

/// The process that holds socket `inode`, if `/proc` shows it (processes of other users hide their fds).
fn holder_of(inode: u64) -> Option<Holder> {
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let owns = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str())
        });
        if owns {
            let command = std::fs::read_to_string(entry.path().join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_default();
            return Some(Holder { pid, command });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[test]
    fn a_set_shares_one_port() {
        let set = bind_set(loopback(), 3, 16).unwrap();
        let port = set[0].local_addr().unwrap().port();
        assert!(set.iter().all(|l| l.local_addr().unwrap().port() == port));
    }

    #[test]
    fn a_second_reuseport_set_on_the_same_address_is_refused() {
        // The kernel would let this set join the first one's group (same user, SO_REUSEPORT on both): the
        // /proc check is what refuses it.
        let first = bind_set(loopback(), 2, 16).unwrap();
        let addr = first[0].local_addr().unwrap();
        let err = bind_set(addr, 2, 16).unwrap_err();
        assert!(matches!(err, ListenError::InUse { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&addr.to_string()), "names the address: {msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "names the holder: {msg}"
        );
        // The wildcard address of the same port conflicts too.
        let any: SocketAddr = format!("0.0.0.0:{}", addr.port()).parse().unwrap();
        assert!(matches!(
            bind_set(any, 1, 16),
            Err(ListenError::InUse { .. })
        ));
    }

    #[test]
    fn a_plain_listener_of_another_program_is_refused_with_its_address() {
        // std's listener sets no SO_REUSEPORT, so the kernel refuses the bind itself.
        let other = std::net::TcpListener::bind(loopback()).unwrap();
        let addr = other.local_addr().unwrap();
        let err = bind_set(addr, 1, 16).unwrap_err();
        assert!(matches!(err, ListenError::InUse { .. }), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }

    #[test]
    fn proc_net_lines_parse() {
        let v4 = "   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 12345 1 0000000000000000 100 0 0 10 0";
        let (a, inode) = parse_line(v4, false).unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(a, "127.0.0.1:8000".parse().unwrap());
        }
        assert_eq!(inode, 12345);
        let established = v4.replace(" 0A ", " 01 ");
        assert_eq!(parse_line(&established, false), None);
        let v6 = "   0: 00000000000000000000000000000000:1F40 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 777 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_line(v6, true),
            Some(("[::]:8000".parse().unwrap(), 777))
        );
    }

    #[test]
    fn conflicting_addresses() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(conflicts(a("127.0.0.1:80"), a("127.0.0.1:80")));
        assert!(conflicts(a("0.0.0.0:80"), a("127.0.0.1:80")));
        assert!(conflicts(a("127.0.0.1:80"), a("0.0.0.0:80")));
        assert!(conflicts(a("[::]:80"), a("127.0.0.1:80")));
        assert!(!conflicts(a("127.0.0.2:80"), a("127.0.0.1:80")));
        assert!(!conflicts(a("127.0.0.1:81"), a("127.0.0.1:80")));
        assert!(!conflicts(a("0.0.0.0:80"), a("[::1]:80")));
    }
}
