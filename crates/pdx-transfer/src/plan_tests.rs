//! Table tests of the planner: every locality × memory kind × forced transport, errors included. No I/O.

use super::*;
use MemoryKind::{Device, Host, PinnedHost};
use TransportKind::{Cma, Cuda, Local, Shm, Tcp, Ucx};

const DEFAULT: [TransportKind; 5] = [Local, Shm, Cma, Tcp, Cuda];
const FORCED: [Option<TransportKind>; 7] = [
    None,
    Some(Local),
    Some(Shm),
    Some(Cma),
    Some(Tcp),
    Some(Ucx),
    Some(Cuda),
];

fn not_registered() -> TransferError {
    TransferError::NotRegistered {
        agent: "p".into(),
        index: 0,
        addr: 0x1000,
        len: 4096,
    }
}

/// The localities of the tables, by name.
#[derive(Clone, Copy, Debug)]
enum Where {
    /// Same process, the remote range in a memfd arena.
    SpMemfd,
    /// Same process, caller-owned host memory.
    SpOwned,
    /// Same process, the range not registered there.
    SpUnregistered,
    /// Same process, the peer agent dropped.
    SpDropped,
    /// Same host, the region's memfd mapped here.
    ShMapped,
    /// Same host, the region not a memfd (caller memory).
    ShUnmapped,
    /// Same host, the peer gone (its mappings dropped).
    ShGone,
    /// Another host.
    Remote,
}

const ALL_WHERE: [Where; 8] = [
    Where::SpMemfd,
    Where::SpOwned,
    Where::SpUnregistered,
    Where::SpDropped,
    Where::ShMapped,
    Where::ShUnmapped,
    Where::ShGone,
    Where::Remote,
];

struct Case {
    kinds: Vec<(MemoryKind, MemoryKind)>,
    at: Where,
    transports: Vec<TransportKind>,
    forced: Option<TransportKind>,
    listens: bool,
    ucx: bool,
}

fn run(c: &Case) -> Result<Choice> {
    let resolved: Result<Vec<Resolved>> = match c.at {
        Where::SpMemfd => Ok(vec![
            Resolved {
                host: true,
                memfd: true
            };
            c.kinds.len()
        ]),
        Where::SpOwned => Ok(vec![
            Resolved {
                host: true,
                memfd: false
            };
            c.kinds.len()
        ]),
        _ => Err(not_registered()),
    };
    let reach = match c.at {
        Where::SpMemfd | Where::SpOwned | Where::SpUnregistered => {
            Reach::SameProcess(Some(&resolved))
        }
        Where::SpDropped => Reach::SameProcess(None),
        Where::ShMapped => Reach::SameHost(Ok(vec![Some(3); c.kinds.len()])),
        Where::ShUnmapped => Reach::SameHost(Ok(vec![None; c.kinds.len()])),
        Where::ShGone => Reach::SameHost(Err("peer `p` disconnected: gone".into())),
        Where::Remote => Reach::Remote("agent `p` is on another host"),
    };
    choose(&Facts {
        peer: "p",
        kinds: &c.kinds,
        reach,
        transports: &c.transports,
        forced: c.forced,
        peer_listens: c.listens,
        ucx_built: c.ucx,
    })
}

/// A short name of an outcome: the route (`local`, `shm`, `shm-map`, `cma-this`, `cma-peer`, `tcp`, `ucx`,
/// `cuda`, `staged`) or `err`.
fn outcome(r: &Result<Choice>) -> &'static str {
    match r {
        Err(_) => "err",
        Ok(c) => match (&c.route, c.transport) {
            (Route::Copy, Local) => "local",
            (Route::Copy, Shm) => "shm",
            (Route::Shm { .. }, Shm) => "shm-map",
            (Route::Cma { this_process: true }, Cma) => "cma-this",
            (
                Route::Cma {
                    this_process: false,
                },
                Cma,
            ) => "cma-peer",
            (Route::Tcp, Tcp) => "tcp",
            (Route::Ucx, Ucx) => "ucx",
            (Route::Cuda, Cuda) => "cuda",
            (Route::Staged, Tcp) => "staged",
            (route, t) => panic!("route {route:?} under transport {t}"),
        },
    }
}

/// Host memory on both sides, default transports, a listening peer, no UCX in the build: the outcome for each
/// forced transport, in the order of [`FORCED`] (auto, local, shm, cma, tcp, ucx, cuda).
#[test]
fn host_memory_every_locality_and_forced_transport() {
    let table: [(Where, [&str; 7]); 8] = [
        (
            Where::SpMemfd,
            ["local", "local", "shm", "cma-this", "tcp", "err", "err"],
        ),
        (
            Where::SpOwned,
            ["local", "local", "err", "cma-this", "tcp", "err", "err"],
        ),
        (
            Where::SpUnregistered,
            ["err", "err", "err", "err", "tcp", "err", "err"],
        ),
        (
            Where::SpDropped,
            ["tcp", "err", "err", "err", "tcp", "err", "err"],
        ),
        (
            Where::ShMapped,
            ["shm-map", "err", "shm-map", "cma-peer", "tcp", "err", "err"],
        ),
        (
            Where::ShUnmapped,
            ["cma-peer", "err", "err", "cma-peer", "tcp", "err", "err"],
        ),
        // A gone peer still plans `cma` (its post fails at once with the peer's error).
        (
            Where::ShGone,
            ["cma-peer", "err", "err", "cma-peer", "tcp", "err", "err"],
        ),
        (
            Where::Remote,
            ["tcp", "err", "err", "err", "tcp", "err", "err"],
        ),
    ];
    for (at, expected) in table {
        for (forced, want) in FORCED.into_iter().zip(expected) {
            let got = run(&Case {
                kinds: vec![(Host, Host); 2],
                at,
                transports: DEFAULT.to_vec(),
                forced,
                listens: true,
                ucx: false,
            });
            assert_eq!(outcome(&got), want, "{at:?}, forced {forced:?}: {got:?}");
        }
    }
}

/// The reasons of the errors of the host table: each names what the caller can act on.
#[test]
fn host_memory_errors_say_why() {
    let err = |at, forced, listens| {
        run(&Case {
            kinds: vec![(Host, Host)],
            at,
            transports: DEFAULT.to_vec(),
            forced,
            listens,
            ucx: false,
        })
        .expect_err("an error")
        .to_string()
    };
    let cases: [(Where, Option<TransportKind>, bool, &str); 12] = [
        (Where::SpUnregistered, None, true, "not inside a registered region of agent `p`"),
        (Where::SpUnregistered, Some(Shm), true, "shm: descriptor 0"),
        (Where::SpUnregistered, Some(Cma), true, "cma: descriptor 0"),
        (Where::SpOwned, Some(Shm), true, "shm: remote memory is not a pdx-allocated (memfd) region"),
        (Where::SpDropped, Some(Local), true, "local: peer agent dropped"),
        (Where::ShMapped, Some(Local), true, "local: peer is in another process"),
        (Where::ShGone, Some(Shm), true, "shm: peer `p` disconnected: gone"),
        (Where::Remote, Some(Cma), true, "cma: agent `p` is on another host"),
        (Where::Remote, Some(Ucx), true, "transport `ucx` cannot serve this request: transport not implemented"),
        (Where::Remote, Some(Cuda), true, "transport `cuda` cannot serve this request"),
        (
            Where::Remote,
            None,
            false,
            "transport `any` cannot serve this request: local: peer is in another process; shm: agent `p` is \
             on another host; cma: agent `p` is on another host; tcp: peer runs no listener",
        ),
        (
            Where::SpDropped,
            None,
            false,
            "local: peer agent dropped; shm: peer agent dropped; cma: peer agent dropped; tcp: peer runs no listener",
        ),
    ];
    for (at, forced, listens, want) in cases {
        let got = err(at, forced, listens);
        assert!(
            got.contains(want),
            "{at:?}, forced {forced:?}: `{got}` lacks `{want}`"
        );
    }
    // `local` refuses with the peer's own error, untouched (the caller sees which descriptor).
    let got = run(&Case {
        kinds: vec![(Host, Host)],
        at: Where::SpUnregistered,
        transports: DEFAULT.to_vec(),
        forced: None,
        listens: true,
        ucx: false,
    });
    assert!(
        matches!(got, Err(TransferError::NotRegistered { index: 0, .. })),
        "{got:?}"
    );
}

/// The agent's transport list limits the choice (its order does not: candidates are tried in the fixed order
/// local, shm, cma, tcp, ucx), and the rejected ones are kept for a later error.
#[test]
fn the_transport_list_limits_the_choice() {
    let with = |transports: Vec<TransportKind>, at, listens, ucx| {
        run(&Case {
            kinds: vec![(Host, Host)],
            at,
            transports,
            forced: None,
            listens,
            ucx,
        })
    };
    assert_eq!(
        outcome(&with(vec![Tcp, Local], Where::SpMemfd, true, false)),
        "local"
    );
    assert_eq!(
        outcome(&with(vec![Cma, Tcp], Where::ShMapped, true, false)),
        "cma-peer"
    );
    assert_eq!(
        outcome(&with(vec![Tcp], Where::ShMapped, true, false)),
        "tcp"
    );
    assert_eq!(
        outcome(&with(vec![Local], Where::Remote, true, false)),
        "err"
    );
    // UCX comes last: taken only when nothing before it can serve the request, and only in a build with it.
    assert_eq!(
        outcome(&with(vec![Tcp, Ucx], Where::Remote, true, true)),
        "tcp"
    );
    assert_eq!(
        outcome(&with(vec![Tcp, Ucx], Where::Remote, false, true)),
        "ucx"
    );
    assert_eq!(outcome(&with(vec![Ucx], Where::SpMemfd, true, true)), "ucx");
    assert_eq!(
        outcome(&with(vec![Ucx], Where::SpMemfd, true, false)),
        "err"
    );
    let c = with(vec![Local, Shm, Cma, Tcp, Ucx], Where::Remote, false, true).unwrap();
    assert_eq!(c.rejected.len(), 4, "{:?}", c.rejected);
    // When UCX then cannot connect, the error lists every reason (auto) or is UCX's own (forced).
    let e = c.fell_through("ucx: not available to both agents", TransferError::Shutdown);
    assert!(
        e.to_string()
            .contains("tcp: peer runs no listener; ucx: not available to both agents"),
        "{e}"
    );
    let forced = run(&Case {
        kinds: vec![(Host, Host)],
        at: Where::Remote,
        transports: DEFAULT.to_vec(),
        forced: Some(Ucx),
        listens: true,
        ucx: true,
    })
    .unwrap();
    assert_eq!(outcome(&Ok(forced.clone())), "ucx");
    assert!(matches!(
        forced.fell_through("ucx: no", TransferError::Shutdown),
        TransferError::Shutdown
    ));
}

/// GPU memory on either side: `cuda` where the peer's memory can be reached from here, staged `tcp` to another
/// host or when `tcp` is forced, never a host transport, and the reason otherwise.
#[test]
fn gpu_memory_every_locality_and_forced_transport() {
    // Outcomes for forced: auto, local, shm, cma, tcp, ucx, cuda.
    let table: [(Where, [&str; 7]); 8] = [
        (
            Where::SpMemfd,
            ["cuda", "err", "err", "err", "staged", "err", "cuda"],
        ),
        (
            Where::SpOwned,
            ["cuda", "err", "err", "err", "staged", "err", "cuda"],
        ),
        (
            Where::SpUnregistered,
            ["err", "err", "err", "err", "staged", "err", "err"],
        ),
        (
            Where::SpDropped,
            ["err", "err", "err", "err", "staged", "err", "err"],
        ),
        (
            Where::ShMapped,
            ["cuda", "err", "err", "err", "staged", "err", "cuda"],
        ),
        (
            Where::ShUnmapped,
            ["cuda", "err", "err", "err", "staged", "err", "cuda"],
        ),
        (
            Where::ShGone,
            ["cuda", "err", "err", "err", "staged", "err", "cuda"],
        ),
        (
            Where::Remote,
            ["staged", "err", "err", "err", "staged", "err", "err"],
        ),
    ];
    for kinds in [
        vec![(Device(0), Host)],
        vec![(Host, Device(1))],
        vec![(Device(0), Device(0))],
        vec![(Host, Host), (Device(0), PinnedHost)],
    ] {
        for (at, expected) in table {
            for (forced, want) in FORCED.into_iter().zip(expected) {
                let got = run(&Case {
                    kinds: kinds.clone(),
                    at,
                    transports: DEFAULT.to_vec(),
                    forced,
                    listens: true,
                    ucx: true,
                });
                assert_eq!(
                    outcome(&got),
                    want,
                    "{kinds:?} {at:?}, forced {forced:?}: {got:?}"
                );
            }
        }
    }
}

#[test]
fn gpu_memory_errors_say_why() {
    let err = |kinds: Vec<(MemoryKind, MemoryKind)>,
               at,
               transports: Vec<TransportKind>,
               forced,
               listens| {
        run(&Case {
            kinds,
            at,
            transports,
            forced,
            listens,
            ucx: false,
        })
        .expect_err("an error")
        .to_string()
    };
    let d = vec![(Device(0), Host)];
    let cases = [
        (
            err(d.clone(), Where::Remote, DEFAULT.to_vec(), None, false),
            "agent `p` runs no listener",
        ),
        (
            err(d.clone(), Where::SpMemfd, DEFAULT.to_vec(), Some(Shm), true),
            "transport `shm` cannot serve",
        ),
        (
            err(d.clone(), Where::SpMemfd, DEFAULT.to_vec(), Some(Shm), true),
            "GPU memory moves only over the cuda",
        ),
        (
            err(
                d.clone(),
                Where::SpMemfd,
                vec![Local, Shm, Cma, Tcp],
                None,
                true,
            ),
            "transport `any` cannot serve",
        ),
        (
            err(d.clone(), Where::SpDropped, DEFAULT.to_vec(), None, true),
            "peer agent dropped",
        ),
        (
            err(
                d.clone(),
                Where::SpUnregistered,
                DEFAULT.to_vec(),
                None,
                true,
            ),
            "descriptor 0 (0x1000+4096)",
        ),
        (
            err(d.clone(), Where::Remote, DEFAULT.to_vec(), Some(Cuda), true),
            "needs the staged path",
        ),
        // Another host without tcp among the agent's transports: no staging, and cuda cannot reach it.
        (
            err(d, Where::Remote, vec![Cuda], None, true),
            "GPU memory of another host",
        ),
    ];
    for (got, want) in cases {
        assert!(got.contains(want), "`{got}` lacks `{want}`");
    }
}

/// Invariants over the whole product of localities, kinds, transport lists and forced transports.
#[test]
fn invariants_hold_everywhere() {
    let kinds = [Host, PinnedHost, Device(0)];
    let lists: [&[TransportKind]; 4] =
        [&DEFAULT, &[Tcp], &[Ucx], &[Local, Shm, Cma, Tcp, Ucx, Cuda]];
    for at in ALL_WHERE {
        for l in kinds {
            for r in kinds {
                for list in lists {
                    for forced in FORCED {
                        for listens in [true, false] {
                            for ucx in [true, false] {
                                let case = Case {
                                    kinds: vec![(l, r)],
                                    at,
                                    transports: list.to_vec(),
                                    forced,
                                    listens,
                                    ucx,
                                };
                                let Ok(c) = run(&case) else { continue };
                                let what = format!(
                                    "{at:?} {l:?}->{r:?} {list:?} {forced:?} {listens} {ucx}"
                                );
                                // Device memory never reaches a host transport.
                                if needs_gpu(l, r) {
                                    assert!(
                                        matches!(c.route, Route::Cuda | Route::Staged),
                                        "{what}: {c:?}"
                                    );
                                } else {
                                    assert!(
                                        !matches!(c.route, Route::Cuda | Route::Staged),
                                        "{what}: {c:?}"
                                    );
                                }
                                // A forced transport is the one used (staging moves GPU memory over tcp).
                                if let Some(t) = forced {
                                    assert_eq!(c.transport, t, "{what}");
                                }
                                // Without forcing, only listed transports (cuda moves GPU memory when listed).
                                if forced.is_none() {
                                    assert!(list.contains(&c.transport), "{what}: {c:?}");
                                }
                                if matches!(c.transport, Tcp) {
                                    assert!(listens, "{what}: tcp to a peer without a listener");
                                }
                                if matches!(c.route, Route::Ucx) {
                                    assert!(ucx, "{what}: ucx in a build without it");
                                }
                                if matches!(
                                    c.route,
                                    Route::Copy | Route::Cma { this_process: true }
                                ) {
                                    assert!(
                                        matches!(at, Where::SpMemfd | Where::SpOwned),
                                        "{what}"
                                    );
                                }
                                if matches!(c.route, Route::Shm { .. }) {
                                    assert!(matches!(at, Where::ShMapped), "{what}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn the_peer_connection_is_needed_where_bytes_or_notifications_cross_processes() {
    let c = |transport| Choice {
        transport,
        route: Route::Tcp,
        rejected: Vec::new(),
        forced: None,
    };
    assert_eq!(c(Local).conn(true), Conn::None);
    assert_eq!(c(Tcp).conn(true), Conn::Required);
    assert_eq!(c(Tcp).conn(false), Conn::Required);
    assert_eq!(c(Shm).conn(true), Conn::None);
    assert_eq!(c(Shm).conn(false), Conn::Optional);
    assert_eq!(c(Cma).conn(false), Conn::Optional);
    assert_eq!(c(Cuda).conn(false), Conn::Optional);
    assert_eq!(c(Ucx).conn(false), Conn::Optional);
}

fn remote(addr: u64, len: u64, region: usize, off: u64) -> RemoteSeg {
    RemoteSeg {
        addr,
        len,
        region,
        off,
    }
}

#[test]
fn pairing_checks_the_request_form() {
    let local = [10usize, 20, 30];
    let len = |l: &usize| *l;
    let rem = [
        remote(0x100, 10, 0, 0),
        remote(0x200, 20, 1, 8),
        remote(0x300, 30, 1, 40),
    ];
    let ok = pair(&local, len, &[2, 0], &rem, &[2, 0], None).unwrap();
    assert_eq!(ok, vec![(30, rem[2]), (10, rem[0])]);
    let err = |l: &[usize], r: &[usize], notif: Option<&[u8]>| {
        pair(&local, len, l, &rem, r, notif)
            .expect_err("an error")
            .to_string()
    };
    assert!(err(&[], &[], None).contains("0 local and 0 remote descriptors"));
    assert!(err(&[0, 1], &[0], None).contains("2 local and 1 remote descriptors"));
    assert!(err(&[0, 3], &[0, 1], None).contains("index pair 1 out of range"));
    assert!(err(&[0], &[7], None).contains("index pair 0 out of range"));
    assert!(err(&[0, 1], &[0, 2], None).contains("pair 1: local 20 bytes, remote 30 bytes"));
    let big = vec![0u8; MAX_NOTIF_BYTES + 1];
    assert!(err(&[0], &[0], Some(&big)).contains("notification over 64 KiB"));
    let at_limit = vec![0u8; MAX_NOTIF_BYTES];
    assert!(pair(&local, len, &[0], &rem, &[0], Some(&at_limit)).is_ok());
}

#[test]
fn segment_lists_follow_the_pairs_in_order() {
    let pairs = [
        ("a", remote(0x100, 16, 0, 0)),
        ("b", remote(0x2000, 32, 2, 64)),
    ];
    assert_eq!(tcp_segments(&pairs), vec![(0x100, 16), (0x2000, 32)]);
    assert_eq!(cma_iovecs(&pairs), vec![(0x100, 16), (0x2000, 32)]);
    assert_eq!(
        shm_segments(&pairs, &[5, 1]),
        vec![("a", 5, 0), ("b", 1, 64)]
    );
    assert_eq!(ucx_ops(&pairs), vec![("a", 0x100, 0), ("b", 0x2000, 2)]);
}
