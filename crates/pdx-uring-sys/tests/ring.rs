//! The ring of pdx's own over loopback: echo, multishot receive armed again after the buffer ring ran dry
//! (`ENOBUFS`), peer close, many connections, connect + static sends, closing a socket with its receive armed,
//! and buffers that outlive the ring. Every variant of the setup the kernel offers (fixed files or not,
//! skip-success sends or not) runs where it matters.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use pdx_uring_sys::ring::{Event, Ring, RingConfig, Setup, Sock};

/// A guard against hangs, not a speed assertion.
const LIMIT: Duration = Duration::from_secs(20);

fn ring_or_skip(cfg: &RingConfig) -> Option<Ring> {
    match Ring::new(cfg) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("skipped: no io_uring with a provided buffer ring here ({e})");
            None
        }
    }
}

fn listening(ring: &mut Ring) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    ring.listen(l).unwrap();
    addr
}

/// A clean end of stream on `s` (no error): the socket is closed.
fn ended_clean(ring: &mut Ring, s: Sock, e: Option<std::io::Error>) {
    assert!(e.is_none(), "end of stream, not an error: {e:?}");
    ring.close(s).unwrap();
}

/// Runs the ring until `step` says done (true), handing it every event.
fn pump(ring: &mut Ring, mut step: impl FnMut(&mut Ring, Event) -> bool) {
    let start = Instant::now();
    let mut events = Vec::new();
    loop {
        assert!(start.elapsed() < LIMIT, "ring test hung");
        ring.wait(&mut events, Some(Duration::from_millis(200)))
            .unwrap();
        for ev in events.drain(..) {
            if step(ring, ev) {
                return;
            }
        }
    }
}

fn client(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s
}

fn configs() -> Vec<RingConfig> {
    let mut v = Vec::new();
    for fixed in [true, false] {
        for skip in [true, false] {
            v.push(RingConfig {
                fixed_files: fixed,
                skip_static_sends: skip,
                max_sockets: 256,
                buf_count: 64,
                buf_size: 4096,
                ..RingConfig::default()
            });
        }
    }
    v
}

#[test]
fn echo_with_owned_sends() {
    for cfg in configs() {
        let Some(mut ring) = ring_or_skip(&cfg) else {
            return;
        };
        assert_eq!(ring.features().fixed_files, cfg.fixed_files);
        let addr = listening(&mut ring);
        let t = thread::spawn(move || {
            let mut c = client(addr);
            for i in 0..50u32 {
                let msg = format!("hello {i}");
                c.write_all(msg.as_bytes()).unwrap();
                let mut got = vec![0; msg.len()];
                c.read_exact(&mut got).unwrap();
                assert_eq!(got, msg.as_bytes());
            }
        });
        let mut echoed = 0;
        let mut outstanding = 0;
        pump(&mut ring, |ring, ev| match ev {
            Event::Accepted(s) => {
                ring.recv(s).unwrap();
                false
            }
            Event::Data(s, buf) => {
                echoed += buf.len();
                outstanding += 1;
                ring.send_vec(s, buf.to_vec(), buf.len()).unwrap();
                false
            }
            Event::Sent(_, r, v) => {
                r.unwrap();
                assert!(v.is_some(), "an owned send gives its vector back");
                outstanding -= 1;
                false
            }
            Event::RecvEnded(s, e) => {
                ended_clean(ring, s, e);
                outstanding == 0
            }
            other => panic!("unexpected {other:?}"),
        });
        t.join().unwrap();
        let expect: usize = (0..50).map(|i| format!("hello {i}").len()).sum();
        assert_eq!(echoed, expect);
        assert_eq!(ring.bufs_out(), 0, "every buffer went back to the ring");
    }
}

#[test]
fn multishot_receive_rearms_after_enobufs() {
    // Two 16-byte buffers: a 4 KiB message exhausts them many times over while the test holds what it got.
    let cfg = RingConfig {
        buf_count: 2,
        buf_size: 16,
        max_sockets: 8,
        ..RingConfig::default()
    };
    let Some(mut ring) = ring_or_skip(&cfg) else {
        return;
    };
    let addr = listening(&mut ring);
    let msg: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let sent = msg.clone();
    let t = thread::spawn(move || {
        let mut c = client(addr);
        c.write_all(&sent).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
    });
    let mut got = Vec::new();
    let mut held = Vec::new();
    pump(&mut ring, |ring, ev| match ev {
        Event::Accepted(s) => {
            ring.recv(s).unwrap();
            false
        }
        Event::Data(_, buf) => {
            assert!(buf.len() <= 16);
            got.extend_from_slice(&buf);
            held.push(buf);
            if held.len() == 2 {
                held.clear(); // both buffers back: the ring arms the receive again on its next wait
            }
            false
        }
        Event::RecvEnded(s, e) => {
            ended_clean(ring, s, e);
            true
        }
        other => panic!("unexpected {other:?}"),
    });
    t.join().unwrap();
    assert_eq!(got, msg, "all bytes, in order, across the re-arms");
    let st = ring.stats();
    assert!(st.enobufs > 0, "the buffer ring ran dry: {st:?}");
    assert!(
        st.recv_rearms > 0,
        "and the receive was armed again: {st:?}"
    );
}

#[test]
fn peer_close_ends_the_receive() {
    let Some(mut ring) = ring_or_skip(&configs()[0]) else {
        return;
    };
    let addr = listening(&mut ring);
    let t = thread::spawn(move || {
        let mut c = client(addr);
        c.write_all(b"bye").unwrap();
        // dropped: FIN
    });
    let mut got = Vec::new();
    let mut sock = None;
    pump(&mut ring, |ring, ev| match ev {
        Event::Accepted(s) => {
            sock = Some(s);
            ring.recv(s).unwrap();
            false
        }
        Event::Data(s, buf) => {
            assert_eq!(Some(s), sock);
            got.extend_from_slice(&buf);
            false
        }
        Event::RecvEnded(s, e) => {
            assert_eq!(Some(s), sock);
            ended_clean(ring, s, e);
            true
        }
        other => panic!("unexpected {other:?}"),
    });
    t.join().unwrap();
    assert_eq!(got, b"bye");
}

#[test]
fn many_connections_echo() {
    const N: usize = 200;
    for cfg in configs() {
        let Some(mut ring) = ring_or_skip(&cfg) else {
            return;
        };
        let addr = listening(&mut ring);
        let t = thread::spawn(move || {
            let mut cs: Vec<TcpStream> = (0..N).map(|_| client(addr)).collect();
            for round in 0..3 {
                for (i, c) in cs.iter_mut().enumerate() {
                    c.write_all(format!("{i:04}:{round}").as_bytes()).unwrap();
                }
                for (i, c) in cs.iter_mut().enumerate() {
                    let mut b = [0u8; 6];
                    c.read_exact(&mut b).unwrap();
                    assert_eq!(&b, format!("{i:04}:{round}").as_bytes());
                }
            }
        });
        let (mut open, mut closed) = (0, 0);
        pump(&mut ring, |ring, ev| match ev {
            Event::Accepted(s) => {
                open += 1;
                ring.recv(s).unwrap();
                false
            }
            Event::Data(s, buf) => {
                ring.send_vec(s, buf.to_vec(), buf.len()).unwrap();
                false
            }
            Event::Sent(_, r, _) => {
                r.unwrap();
                false
            }
            Event::RecvEnded(s, _) => {
                ring.close(s).unwrap();
                closed += 1;
                closed == N
            }
            other => panic!("unexpected {other:?}"),
        });
        t.join().unwrap();
        assert_eq!(open, N);
        assert_eq!(ring.bufs_out(), 0);
    }
}

#[test]
fn connect_and_static_sends() {
    static REQ: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
    for cfg in configs() {
        let Some(mut ring) = ring_or_skip(&cfg) else {
            return;
        };
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = upstream.local_addr().unwrap();
        let t = thread::spawn(move || {
            let (mut s, _) = upstream.accept().unwrap();
            s.set_read_timeout(Some(LIMIT)).unwrap();
            for _ in 0..3 {
                let mut b = vec![0; REQ.len()];
                s.read_exact(&mut b).unwrap();
                assert_eq!(b, REQ);
                s.write_all(b"ok").unwrap();
            }
        });
        let sock = ring.connect(addr).unwrap();
        let (mut got, mut sent_events) = (Vec::new(), 0);
        pump(&mut ring, |ring, ev| match ev {
            Event::Connected(s, r) => {
                assert_eq!(s, sock);
                r.unwrap();
                ring.recv(s).unwrap();
                ring.send_static(s, REQ).unwrap();
                false
            }
            Event::Data(s, buf) => {
                got.extend_from_slice(&buf);
                if got.len() < 6 && got.len() % 2 == 0 {
                    ring.send_static(s, REQ).unwrap();
                }
                false
            }
            Event::Sent(_, r, v) => {
                r.unwrap();
                assert!(v.is_none());
                sent_events += 1;
                false
            }
            Event::RecvEnded(s, e) => {
                ended_clean(ring, s, e);
                true
            }
            other => panic!("unexpected {other:?}"),
        });
        t.join().unwrap();
        assert_eq!(got, b"okokok");
        // Skipped successes post nothing; otherwise each of the three sends completes.
        let expect = if ring.features().skip_static_sends {
            0
        } else {
            3
        };
        assert_eq!(sent_events, expect, "{}", ring.features());
    }
}

#[test]
fn connect_refused_is_an_event() {
    let Some(mut ring) = ring_or_skip(&configs()[0]) else {
        return;
    };
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap() // closed when `l` drops: nobody listens there
    };
    let sock = ring.connect(addr).unwrap();
    pump(&mut ring, |ring, ev| match ev {
        Event::Connected(s, r) => {
            assert_eq!(s, sock);
            assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused);
            ring.close(s).unwrap();
            true
        }
        other => panic!("unexpected {other:?}"),
    });
}

#[test]
fn closed_socket_completions_are_dropped_and_slots_reused() {
    for cfg in configs().into_iter().step_by(2) {
        // One slot, so B takes A's (free slots are otherwise reused oldest first).
        let cfg = RingConfig {
            max_sockets: 1,
            ..cfg
        };
        let Some(mut ring) = ring_or_skip(&cfg) else {
            return;
        };
        let addr = listening(&mut ring);
        // A connects and sends; the ring closes A with its receive armed, then B connects on the same slot.
        let mut a = client(addr);
        a.write_all(b"a1").unwrap();
        let mut first: Option<Sock> = None;
        pump(&mut ring, |ring, ev| match ev {
            Event::Accepted(s) => {
                ring.recv(s).unwrap();
                first = Some(s);
                false
            }
            Event::Data(s, buf) => {
                assert_eq!(&*buf, b"a1");
                ring.close(s).unwrap();
                true
            }
            other => panic!("unexpected {other:?}"),
        });
        let _ = a.write_all(b"a2"); // may fail (reset): A is closed on the ring's side
        let mut b = client(addr);
        b.write_all(b"b1").unwrap();
        let first = first.unwrap();
        pump(&mut ring, |ring, ev| match ev {
            Event::Accepted(s) => {
                assert_eq!(s.slot(), first.slot(), "B reuses A's slot");
                assert_ne!(s, first, "a closed socket's handle never matches a new one");
                ring.recv(s).unwrap();
                false
            }
            Event::Data(s, buf) => {
                assert_ne!(s, first, "no data for the closed socket");
                assert_eq!(&*buf, b"b1");
                ring.close(s).unwrap();
                true
            }
            other => panic!("unexpected {other:?}"),
        });
        drop((a, b));
        assert_eq!(ring.bufs_out(), 0);
        assert!(ring.close(first).is_ok(), "closing twice is harmless");
    }
}

#[test]
fn received_buffer_outlives_the_ring() {
    let Some(mut ring) = ring_or_skip(&configs()[0]) else {
        return;
    };
    let addr = listening(&mut ring);
    let mut c = client(addr);
    c.write_all(b"kept").unwrap();
    let mut kept = None;
    let mut other = None;
    pump(&mut ring, |ring, ev| match ev {
        Event::Accepted(s) => {
            ring.recv(s).unwrap();
            other = Some(client(addr)); // a second connection with its receive armed when the ring drops
            false
        }
        Event::Data(_, buf) => {
            kept = Some(buf);
            true
        }
        ev => panic!("unexpected {ev:?}"),
    });
    drop(ring); // cancels every request and unregisters the buffer ring
    let kept = kept.unwrap();
    assert_eq!(&*kept, b"kept");
    drop(kept); // gives the buffer back to a ring the kernel no longer reads
    drop((c, other));
}

#[test]
fn setups_fall_back_in_order() {
    let cfg = RingConfig {
        setup: vec![Setup::Plain],
        buf_count: 4,
        buf_size: 64,
        max_sockets: 4,
        ..RingConfig::default()
    };
    let Some(ring) = ring_or_skip(&cfg) else {
        return;
    };
    assert_eq!(ring.features().setup, Setup::Plain);
    let bad = RingConfig {
        buf_count: 3,
        ..cfg
    };
    assert!(
        Ring::new(&bad).is_err(),
        "a buffer count not a power of two"
    );
}

#[test]
fn batched_wait_returns_with_fewer_completions_after_min_wait() {
    let Some(mut ring) = ring_or_skip(&configs()[0]) else {
        return;
    };
    let addr = listening(&mut ring);
    let mut c = client(addr);
    c.write_all(b"one").unwrap();
    let mut events = Vec::new();
    let start = Instant::now();
    let mut got = Vec::new();
    while got.len() < 3 {
        assert!(start.elapsed() < LIMIT, "batched wait hung");
        // 64 completions will never come: the wait must end min_wait after at least one is there.
        ring.wait_batch(&mut events, 64, Duration::from_millis(2))
            .unwrap();
        for ev in events.drain(..) {
            match ev {
                Event::Accepted(s) => ring.recv(s).unwrap(),
                Event::Data(_, buf) => got.extend_from_slice(&buf),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(got, b"one");
    if !ring.features().min_wait {
        eprintln!("note: the kernel lacks min_wait (Linux < 6.12); the batched wait fell back to plain waits");
    }
}

#[test]
fn stale_handle_never_reaches_the_slot_reuser() {
    // One slot: B, accepted after A closed, gets A's slot. Every operation on A's handle must fail (or do
    // nothing), and B must receive nothing meant for A.
    static STALE: &[u8] = b"stale";
    for cfg in configs().into_iter().step_by(2) {
        let cfg = RingConfig {
            max_sockets: 1,
            ..cfg
        };
        let Some(mut ring) = ring_or_skip(&cfg) else {
            return;
        };
        let addr = listening(&mut ring);
        let a = client(addr);
        let mut first = None;
        pump(&mut ring, |ring, ev| match ev {
            Event::Accepted(s) => {
                ring.close(s).unwrap();
                first = Some(s);
                true
            }
            other => panic!("unexpected {other:?}"),
        });
        let first = first.unwrap();
        let mut b = client(addr);
        let mut second = None;
        pump(&mut ring, |_, ev| match ev {
            Event::Accepted(s) => {
                second = Some(s);
                true
            }
            other => panic!("unexpected {other:?}"),
        });
        let second = second.unwrap();
        assert_eq!(first.slot(), second.slot(), "B reuses A's slot");
        assert_ne!(first, second);
        let e = ring.send_static(first, STALE).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotConnected);
        let e = ring.send_vec(first, b"stale vec".to_vec(), 9).unwrap_err();
        assert_eq!(e.error.kind(), ErrorKind::NotConnected);
        assert_eq!(e.buf, b"stale vec", "the vector comes back");
        ring.recv(first).unwrap(); // nothing: closed
        ring.close(first).unwrap(); // nothing: closed
                                    // B's first bytes are B's own send, not A's.
        ring.send_static(second, b"ok").unwrap();
        let mut events = Vec::new();
        ring.wait(&mut events, Some(Duration::from_millis(50)))
            .unwrap();
        for ev in events.drain(..) {
            assert!(
                matches!(ev, Event::Sent(s, Ok(()), None) if s == second),
                "{ev:?}"
            );
        }
        let mut got = [0u8; 2];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ok");
        b.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut more = [0u8; 16];
        match b.read(&mut more) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            other => panic!("B received more than its own send: {other:?}"),
        }
        ring.close(second).unwrap();
        drop((a, b));
    }
}

#[test]
fn foreign_or_out_of_range_handle_is_an_error_not_a_panic() {
    let Some(mut big) = ring_or_skip(&configs()[0]) else {
        return;
    };
    let small = RingConfig {
        max_sockets: 1,
        ..configs()[0].clone()
    };
    let Some(mut ring) = ring_or_skip(&small) else {
        return;
    };
    let up = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = up.local_addr().unwrap();
    let socks: Vec<Sock> = (0..3).map(|_| big.connect(addr).unwrap()).collect();
    let far = socks[2];
    assert!(far.slot() >= 1, "a slot the small ring does not have");
    let e = ring.send_static(far, b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotConnected);
    let e = ring.send_vec(far, vec![1, 2, 3], 3).unwrap_err();
    assert_eq!((e.error.kind(), e.buf.len()), (ErrorKind::NotConnected, 3));
    ring.recv(far).unwrap();
    ring.close(far).unwrap();
    for s in socks {
        big.close(s).unwrap();
    }
}

#[test]
fn generation_wrap_keeps_stale_handles_stale() {
    // 65,536 sockets on one slot bring the low 16 bits of its generation (what completions carry) back to the
    // first handle's; the handle itself compares all 32 bits and stays stale.
    let cfg = RingConfig {
        max_sockets: 1,
        ..configs()[0].clone()
    };
    let Some(mut ring) = ring_or_skip(&cfg) else {
        return;
    };
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap() // nobody listens: each connect is refused at once
    };
    let first = ring.connect(addr).unwrap();
    ring.close(first).unwrap();
    let mut events = Vec::new();
    let start = Instant::now();
    // 65,535 more sockets on the slot: the next generation's low 16 bits would equal the first handle's, so a
    // 16-bit comparison would take the first handle for the last one.
    for i in 1..(1u32 << 16) {
        assert!(start.elapsed() < LIMIT * 3, "wrap test hung");
        let s = ring.connect(addr).unwrap();
        assert_eq!(s.slot(), first.slot());
        ring.close(s).unwrap();
        if i % 256 == 0 {
            ring.wait(&mut events, Some(Duration::ZERO)).unwrap();
            assert!(events.is_empty(), "closed sockets post nothing: {events:?}");
        }
    }
    let now = ring.connect(addr).unwrap();
    assert_eq!(now.slot(), first.slot());
    assert_ne!(now, first);
    let e = ring.send_static(first, b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotConnected);
    ring.close(now).unwrap();
}

/// Set in the child process of `accept_pauses_on_fd_exhaustion` (it lowers its own fd limit).
const EMFILE_CHILD: &str = "PDX_RING_EMFILE_CHILD";

#[test]
fn accept_pauses_on_fd_exhaustion() {
    // The fd limit is per process: the test runs itself again in a child that lowers it.
    if std::env::var_os(EMFILE_CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "accept_pauses_on_fd_exhaustion",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(EMFILE_CHILD, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{text}");
        assert!(text.contains("1 passed"), "the child ran the test:\n{text}");
        return;
    }
    let cfg = RingConfig {
        max_sockets: 4,
        fixed_files: false,
        ..configs()[0].clone()
    };
    let Some(mut ring) = ring_or_skip(&cfg) else {
        return;
    };
    let addr = listening(&mut ring);
    // Fill the fd table below a low limit, so the kernel's accept fails with EMFILE.
    let rl = libc::rlimit {
        rlim_cur: 128,
        rlim_max: 128,
    };
    // SAFETY: a valid rlimit; this child process is alone in lowering it.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) }, 0);
    let mut fillers = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        fillers.push(f);
    }
    assert!(!fillers.is_empty());
    // The client's socket (in this process too) needs one fd: give one filler back for it.
    fillers.pop();
    let c = TcpStream::connect(addr).unwrap();
    let mut events = Vec::new();
    let (mut failed, turns) = (0, 40);
    for _ in 0..turns {
        ring.wait(&mut events, Some(Duration::from_millis(5)))
            .unwrap();
        for ev in events.drain(..) {
            match ev {
                Event::AcceptFailed(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
                    failed += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert!(failed >= 1, "the accept hit the fd limit");
    // Armed again at once, each turn would fail at once: the pause leaves at least every other turn idle.
    assert!(
        failed <= turns / 2 + 1,
        "{failed} failures in {turns} turns: a busy loop"
    );
    // The accept is paused right after a failure: wait for one, then free the fds. With no other traffic to end
    // a wait turn, the ring must still arm the accept again (a paused accept bounds the turn).
    let start = Instant::now();
    let mut paused = false;
    while !paused {
        assert!(start.elapsed() < LIMIT, "no accept failure");
        ring.wait(&mut events, Some(Duration::from_millis(5)))
            .unwrap();
        for ev in events.drain(..) {
            match ev {
                Event::AcceptFailed(_) => paused = true,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    drop(fillers);
    let start = Instant::now();
    let mut accepted = None;
    while accepted.is_none() {
        // One long wait: it returns early only if the ring bounds its turn while the accept is paused.
        ring.wait(&mut events, Some(LIMIT)).unwrap();
        assert!(
            start.elapsed() < LIMIT,
            "a paused accept was never armed again"
        );
        for ev in events.drain(..) {
            match ev {
                Event::Accepted(s) => accepted = Some(s),
                Event::AcceptFailed(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    ring.close(accepted.unwrap()).unwrap();
    drop(c);
}
