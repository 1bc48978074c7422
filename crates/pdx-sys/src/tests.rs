use super::*;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn anonymous_memory_is_page_aligned_zeroed_and_no_memfd() {
    assert!(Memory::anonymous(0, false).is_err());
    let m = Memory::anonymous(10_000, true).unwrap();
    assert_eq!(m.addr() % 4096, 0);
    assert_eq!(m.len(), 10_000);
    assert!(m.memfd_fd().is_none() && m.memfd_handle().is_none());
    let mut out = vec![1u8; 10_000];
    m.read_at(0, &mut out).unwrap();
    assert!(out.iter().all(|&b| b == 0));
    let data = pattern(10_000, 3);
    m.write_at(0, &data).unwrap();
    m.read_at(0, &mut out).unwrap();
    assert_eq!(out, data);
    assert!(m.write_at(9_999, &[0, 0]).is_err());
}

#[test]
fn memfd_read_write_roundtrip_and_bounds() {
    let mem = Memory::memfd("t", 10_000, false).unwrap();
    assert_eq!(mem.len(), 10_000);
    assert!(mem.memfd_fd().is_some());
    let data = pattern(100, 3);
    mem.write_at(9_900, &data).unwrap();
    let mut out = vec![0; 100];
    mem.read_at(9_900, &mut out).unwrap();
    assert_eq!(out, data);
    assert!(matches!(
        mem.write_at(9_901, &data),
        Err(SysError::OutOfBounds { .. })
    ));
    assert!(matches!(
        mem.read_at(usize::MAX, &mut out),
        Err(SysError::OutOfBounds { .. })
    ));
    assert!(matches!(
        Memory::memfd("t", 0, false),
        Err(SysError::InvalidLength(0))
    ));
}

#[test]
fn peer_mapping_of_a_passed_memfd_sees_owner_writes() {
    let owner = Memory::memfd("owner", 8192, true).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    ipc::send_with_fds(&a, b"M", &[owner.memfd_handle().unwrap()]).unwrap();
    let (mut buf, mut fds) = ([0u8; 8], Vec::new());
    assert_eq!(ipc::recv_with_fds(&b, &mut buf, 4, &mut fds).unwrap(), 1);
    assert_eq!(fds.len(), 1);
    let peer = Memory::map_memfd(fds[0].as_fd(), 8192, true).unwrap();
    owner.write_at(4000, b"hello").unwrap();
    let mut out = [0u8; 5];
    peer.read_at(4000, &mut out).unwrap();
    assert_eq!(&out, b"hello");
    // Longer than the file: refused.
    assert!(matches!(
        Memory::map_memfd(fds[0].as_fd(), 8193 + 4096, false),
        Err(SysError::InvalidLength(_))
    ));
    // The mapping outlives the owner's mapping and descriptor.
    drop(owner);
    drop(fds);
    peer.write_at(0, b"still mapped").unwrap();
}

#[test]
fn only_sealed_memfds_are_mapped() {
    // A memfd without the shrink seal: its owner could truncate it under our mapping (SIGBUS on access).
    let unsealed = rustix::fs::memfd_create("unsealed", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&unsealed, 8192).unwrap();
    assert!(matches!(
        Memory::map_memfd(unsealed.as_fd(), 4096, false),
        Err(SysError::UnsafeDescriptor(_))
    ));
    // Not a memfd at all.
    let file = std::fs::File::open("/proc/self/status").unwrap();
    assert!(matches!(
        Memory::map_memfd(file.as_fd(), 16, false),
        Err(SysError::UnsafeDescriptor(_))
    ));
    // Our own arenas are sealed, so they cannot shrink either.
    let mem = Memory::memfd("sealed", 4096, false).unwrap();
    assert!(rustix::fs::ftruncate(mem.memfd_handle().unwrap(), 0).is_err());
}

#[test]
fn descriptors_beyond_the_limit_are_refused() {
    let (a, b) = UnixStream::pair().unwrap();
    let mems: Vec<_> = (0..3)
        .map(|_| Memory::memfd("many", 4096, false).unwrap())
        .collect();
    let fds: Vec<_> = mems.iter().map(|m| m.memfd_handle().unwrap()).collect();
    ipc::send_with_fds(&a, b"XYZ", &fds).unwrap();
    let (mut buf, mut got) = ([0u8; 8], Vec::new());
    assert!(ipc::recv_with_fds(&b, &mut buf, 2, &mut got).is_err());
    assert!(got.is_empty());
}

#[test]
fn unix_peer_identity_comes_from_the_kernel() {
    let (a, b) = UnixStream::pair().unwrap();
    let (process, cred) = ipc::PeerProcess::of_unix_peer(&a).unwrap();
    assert_eq!(process.pid(), std::process::id());
    assert_eq!(cred.uid, ipc::effective_uid());
    assert!(process.is_alive());
    assert!(ipc::is_connected(&a));
    drop(b);
    assert!(!ipc::is_connected(&a));
}

#[test]
fn exited_peer_process_fails_copies_and_leaves_no_bytes() {
    // A child held by a pidfd, then gone: the pidfd reports it, and a READ is refused and scrubbed.
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap();
    let process = ipc::PeerProcess::from_parts_for_test(child.id(), pidfd);
    assert!(process.is_alive());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!process.is_alive());
    let local = Memory::from_vec(vec![7; 64]).unwrap();
    let err = process
        .read(&[local.slice(0, 64).unwrap()], &[(0x1000, 64)])
        .unwrap_err();
    assert!(err.is_process_gone(), "{err}");
    let mut out = [1u8; 64];
    local.read_at(0, &mut out).unwrap();
    assert_eq!(out, [0u8; 64]);
}

#[test]
fn copy_checks_both_ranges_and_allows_overlap() {
    let a = Memory::from_vec(pattern(64, 1)).unwrap();
    let b = Memory::from_vec(vec![0; 64]).unwrap();
    copy(&a, 8, &b, 0, 56).unwrap();
    let mut out = vec![0; 56];
    b.read_at(0, &mut out).unwrap();
    assert_eq!(out, pattern(64, 1)[8..]);
    assert!(copy(&a, 9, &b, 0, 56).is_err());
    assert!(copy(&a, 0, &b, 9, 56).is_err());
    copy(&a, 0, &a, 4, 32).unwrap(); // overlapping move within one region
    let mut moved = vec![0; 32];
    a.read_at(4, &mut moved).unwrap();
    assert_eq!(moved, pattern(64, 1)[..32]);
}

#[test]
fn cma_read_and_write_own_process() {
    // CMA on our own pid exercises the same batching code as a peer process.
    let remote = Memory::from_vec(pattern(3 * 4096, 7)).unwrap();
    let local = Memory::memfd("l", 3 * 4096, false).unwrap();
    let me = ipc::PeerProcess::this_process();
    let segs = [
        local.slice(0, 100).unwrap(),
        local.slice(4096, 4096).unwrap(),
    ];
    let ranges = [(remote.addr() + 10, 100), (remote.addr() + 8192, 4096)];
    me.read(&segs, &ranges).unwrap();
    let mut out = vec![0; 100];
    local.read_at(0, &mut out).unwrap();
    assert_eq!(out, pattern(3 * 4096, 7)[10..110]);
    local.write_at(0, &[9; 100]).unwrap();
    me.write(&segs[..1], &ranges[..1]).unwrap();
    remote.read_at(10, &mut out).unwrap();
    assert_eq!(out, vec![9; 100]);
    // Mismatched totals and unmapped remote ranges are errors.
    assert!(me.read(&segs[..1], &ranges).is_err());
    assert!(me.read(&segs[..1], &[(8, 100)]).is_err());
}

#[test]
fn many_iovecs_go_through_in_batches() {
    let n = 3000; // more than IOV_MAX
    let src = Memory::from_vec(pattern(n * 8, 5)).unwrap();
    let dst = Memory::from_vec(vec![0; n * 8]).unwrap();
    let segs: Vec<_> = (0..n).map(|i| dst.slice(i * 8, 8).unwrap()).collect();
    let ranges: Vec<_> = (0..n).map(|i| (src.addr() + (i * 8) as u64, 8)).collect();
    ipc::PeerProcess::this_process()
        .read(&segs, &ranges)
        .unwrap();
    let mut out = vec![0; n * 8];
    dst.read_at(0, &mut out).unwrap();
    assert_eq!(out, pattern(n * 8, 5));
}

#[test]
fn vectored_socket_io_moves_exact_bytes() {
    let (mut a, b) = UnixStream::pair().unwrap();
    let src = Memory::from_vec(pattern(5000, 9)).unwrap();
    let dst = Memory::from_vec(vec![0; 5000]).unwrap();
    let writer = std::thread::spawn(move || {
        let segs = [src.slice(0, 1000).unwrap(), src.slice(1000, 4000).unwrap()];
        write_all_vectored(a.as_raw_fd(), b"HDR!", &segs, &mut |_| true).unwrap();
        a.flush().unwrap();
    });
    let hdr = Memory::from_vec(vec![0; 4]).unwrap();
    read_exact_into(
        b.as_raw_fd(),
        &[hdr.slice(0, 4).unwrap(), dst.slice(0, 5000).unwrap()],
        &mut |_| true,
    )
    .unwrap();
    writer.join().unwrap();
    let mut out = vec![0; 5000];
    dst.read_at(0, &mut out).unwrap();
    assert_eq!(out, pattern(5000, 9));
    // The writer has closed its end: a further read reports how much arrived.
    let err =
        read_exact_into(b.as_raw_fd(), &[hdr.slice(0, 4).unwrap()], &mut |_| true).unwrap_err();
    assert!(matches!(
        err,
        SysError::UnexpectedEof {
            received: 0,
            expected: 4
        }
    ));
}

#[test]
fn host_id_is_stable() {
    assert_eq!(host_id(), host_id());
    assert!(host_id().len() > 10);
}

#[test]
fn stalled_read_asks_and_gives_up() {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(std::time::Duration::from_millis(10)))
        .unwrap();
    let dst = Memory::from_vec(vec![0; 8]).unwrap();
    let mut a = a;
    a.write_all(b"1234").unwrap(); // half of what the reader wants
    let mut calls = Vec::new();
    let err = read_exact_into(
        b.as_raw_fd(),
        &[dst.slice(0, 8).unwrap()],
        &mut |progressed| {
            calls.push(progressed);
            calls.len() < 3
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, SysError::Io { source, .. } if source.kind() == io::ErrorKind::TimedOut)
    );
    // The first stall follows progress (4 bytes arrived), the later ones do not.
    assert_eq!(calls, vec![true, false, false]);
    let mut got = [0u8; 4];
    dst.read_at(0, &mut got).unwrap();
    assert_eq!(&got, b"1234");
}

#[test]
fn streaming_copy_matches_plain_copy_at_every_alignment_and_length() {
    // Lengths around the 128-byte loop step and the 32-byte store alignment, at source and destination
    // offsets that put the head, the loop and the tail at every phase.
    let src = Memory::from_vec(pattern(4096 + 256, 7)).unwrap();
    for len in [0, 1, 31, 32, 33, 127, 128, 129, 255, 256, 1000, 4096] {
        for src_off in [0, 1, 17, 32, 63] {
            for dst_off in [0, 1, 5, 31, 32, 64, 100] {
                let dst = Memory::from_vec(vec![0xEE; 4096 + 256]).unwrap();
                copy_streaming(&src, src_off, &dst, dst_off, len).unwrap();
                let mut out = vec![0; 4096 + 256];
                dst.read_at(0, &mut out).unwrap();
                let mut want = vec![0xEE; 4096 + 256];
                want[dst_off..dst_off + len]
                    .copy_from_slice(&pattern(4096 + 256, 7)[src_off..src_off + len]);
                assert_eq!(out, want, "len {len} src_off {src_off} dst_off {dst_off}");
            }
        }
    }
}

#[test]
fn streaming_copy_checks_bounds_and_falls_back_on_overlap() {
    let a = Memory::from_vec(pattern(1024, 3)).unwrap();
    let b = Memory::from_vec(vec![0; 1024]).unwrap();
    assert!(matches!(
        copy_streaming(&a, 1, &b, 0, 1024),
        Err(SysError::OutOfBounds { .. })
    ));
    assert!(matches!(
        copy_streaming(&a, 0, &b, 1, 1024),
        Err(SysError::OutOfBounds { .. })
    ));
    // Overlapping ranges of one region move like memmove.
    copy_streaming(&a, 0, &a, 100, 900).unwrap();
    let mut out = vec![0; 900];
    a.read_at(100, &mut out).unwrap();
    assert_eq!(out, pattern(1024, 3)[..900]);
}

fn sockopt_int(fd: RawFd, name: libc::c_int) -> libc::c_int {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the live local `v`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0);
    v
}

#[test]
fn large_socket_reads_never_wait_for_a_low_water_mark_the_sender_cannot_fill() {
    use std::net::{TcpListener, TcpStream};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (rx, _) = l.accept().unwrap();
    // Any wait of a whole receive timeout is an error below (`on_stall` says stop), so the read passes only if
    // it never sits on a mark the sender cannot fill.
    rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let len = 8 << 20;
    let data = pattern(len, 9);
    // The sender stops for 300 ms after 1.5 MiB, less than the mark's 2 MiB: the reader must take what came
    // and go on, and the whole read must finish.
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        let mut tx = tx;
        tx.write_all(&sent[..3 << 19]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        tx.write_all(&sent[3 << 19..]).unwrap();
    });
    let mem = Memory::memfd("lowat", len, true).unwrap();
    read_exact_into(rx.as_raw_fd(), &[mem.slice(0, len).unwrap()], &mut |_| {
        false
    })
    .unwrap();
    writer.join().unwrap();
    let mut out = vec![0; len];
    mem.read_at(0, &mut out).unwrap();
    assert!(out == data, "bytes differ");
    // The socket is as it was: no mark, the caller's timeout.
    assert_eq!(sockopt_int(rx.as_raw_fd(), libc::SO_RCVLOWAT), 1);
    assert_eq!(
        rx.read_timeout().unwrap(),
        Some(std::time::Duration::from_secs(2))
    );
}
