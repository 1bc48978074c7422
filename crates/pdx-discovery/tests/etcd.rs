//! The etcd driver against a real etcd on loopback (skipped, saying so, without an `etcd` binary): a
//! worker's lease registration, lease expiry, the router write-through, a compaction while the watcher is
//! cut off (re-list and diff), and etcd away (no change, then catch-up).

mod support;

use pdx_discovery::etcd::EtcdTarget;
use pdx_discovery::etcd_driver::{self, EtcdOptions, WriteThrough};
use std::time::{Duration, Instant};
use support::*;

fn body(port: u16) -> Vec<u8> {
    format!(r#"{{"role":"decode","pool":"decode","url":"http://127.0.0.1:{port}","model":"m"}}"#)
        .into_bytes()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `register` for `body` on a thread of its own; returns the stop sender and the thread. Dropping the
/// runtime (the thread ends) without a stop is a process that died: no revoke.
fn registration(
    target: &EtcdTarget,
    body: Vec<u8>,
    ttl: u64,
) -> (
    tokio::sync::watch::Sender<bool>,
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (stop, rx) = tokio::sync::watch::channel(false);
    let (die, died) = std::sync::mpsc::channel::<()>();
    let t = target.clone();
    let th = std::thread::spawn(move || {
        let rt = rt();
        let task = rt.spawn(etcd_driver::register(
            t,
            EtcdOptions::default(),
            body,
            ttl,
            rx,
        ));
        // Runs until told to die (the runtime is dropped with the task: no revoke) or the task ends.
        loop {
            if died.try_recv().is_ok() || task.is_finished() {
                break;
            }
            rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
        }
        if task.is_finished() {
            let _ = rt.block_on(task);
        }
    });
    (stop, die, th)
}

#[test]
fn a_registration_is_seen_and_leaves_at_lease_expiry_or_at_once_when_revoked() {
    let Some(etcd) = Etcd::start("reg") else {
        return;
    };
    let target = EtcdTarget::parse(&etcd.url("")).unwrap();
    let (sink, seen) = recorder();
    let _w = etcd_driver::spawn(target.clone(), EtcdOptions::default(), sink, None).unwrap();
    // A worker that dies: its lease (2 s) expires.
    let (_stop, die, th) = registration(&target, body(1001), 2);
    assert!(wait_until(GUARD, || summary(&seen.lock().unwrap())
        == ["+http://127.0.0.1:1001"]));
    die.send(()).unwrap();
    th.join().unwrap();
    let t0 = Instant::now();
    assert!(wait_until(GUARD, || seen.lock().unwrap().len() == 2));
    let gone = t0.elapsed();
    assert_eq!(summary(&seen.lock().unwrap())[1], "-http://127.0.0.1:1001");
    println!("lease of 2 s: removed {gone:?} after the registering process stopped");
    // A worker that stops cleanly: its lease is revoked, the key goes at once.
    let (stop, _die, th) = registration(&target, body(1002), 30);
    assert!(wait_until(GUARD, || seen.lock().unwrap().len() == 3));
    stop.send(true).unwrap();
    th.join().unwrap();
    assert!(wait_until(Duration::from_secs(5), || seen
        .lock()
        .unwrap()
        .len()
        == 4));
    assert_eq!(summary(&seen.lock().unwrap())[3], "-http://127.0.0.1:1002");
}

#[test]
fn the_write_through_puts_renews_and_deletes() {
    let Some(etcd) = Etcd::start("wt") else {
        return;
    };
    let target = EtcdTarget::parse(&etcd.url("/wt")).unwrap();
    let (sink, seen) = recorder();
    let wt = WriteThrough::new(&target);
    let _w = etcd_driver::spawn(
        target.clone(),
        EtcdOptions::default(),
        sink,
        Some(wt.clone()),
    )
    .unwrap();
    // Heartbeats every 0.5 s for 4 s with a TTL of 2 s: one add, never a removal, whatever the key order.
    let spaced =
        br#"{ "url":"http://127.0.0.1:1003", "model":"m", "role":"decode", "pool":"decode" }"#;
    for i in 0..8 {
        let b = if i % 2 == 0 {
            body(1003)
        } else {
            spaced.to_vec()
        };
        wt.put(&b, 2).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(summary(&seen.lock().unwrap()), ["+http://127.0.0.1:1003"]);
    // No more heartbeats: the lease expires.
    assert!(wait_until(GUARD, || seen.lock().unwrap().len() == 2));
    // A drain deletes the key at once.
    wt.put(&body(1004), 30).unwrap();
    assert!(wait_until(GUARD, || seen.lock().unwrap().len() == 3));
    let reg = pdx_discovery::DiscoveredWorker::from_body(&body(1004))
        .unwrap()
        .registration;
    wt.delete(&reg);
    assert!(wait_until(Duration::from_secs(5), || seen
        .lock()
        .unwrap()
        .len()
        == 4));
    assert_eq!(
        summary(&seen.lock().unwrap()),
        [
            "+http://127.0.0.1:1003",
            "-http://127.0.0.1:1003",
            "+http://127.0.0.1:1004",
            "-http://127.0.0.1:1004"
        ]
    );
    assert!(wt.put(b"{}", 2).is_err(), "not a registration");
}

#[test]
fn a_watcher_cut_off_across_a_compaction_lists_again_and_changes_only_the_difference() {
    let Some(etcd) = Etcd::start("compact") else {
        return;
    };
    let proxy = Proxy::start(etcd.port);
    let direct = EtcdTarget::parse(&etcd.url("")).unwrap();
    let via_proxy = EtcdTarget::parse(&format!("etcd://127.0.0.1:{}", proxy.port)).unwrap();
    let rt = rt();
    let mut c = rt
        .block_on(etcd_client::Client::connect([etcd.endpoint()], None))
        .unwrap();
    let key = |port: u16| {
        let w = pdx_discovery::DiscoveredWorker::from_body(&body(port)).unwrap();
        direct.key_for(&w.registration)
    };
    for p in [2001, 2002] {
        rt.block_on(c.put(key(p), body(p), None)).unwrap();
    }
    let (sink, seen) = recorder();
    let _w = etcd_driver::spawn(via_proxy, EtcdOptions::default(), sink, None).unwrap();
    assert!(wait_until(GUARD, || seen.lock().unwrap().len() == 2));
    proxy.cut();
    // While the watcher is cut off: 2001 leaves, 2003 comes, and the history is compacted away.
    rt.block_on(c.delete(key(2001), None)).unwrap();
    let put = rt.block_on(c.put(key(2003), body(2003), None)).unwrap();
    let rev = put.header().unwrap().revision();
    rt.block_on(c.compact(rev, None)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "etcd away: no change (no mass removal)"
    );
    proxy.restore();
    assert!(wait_until(GUARD, || seen.lock().unwrap().len() == 4));
    std::thread::sleep(Duration::from_millis(300));
    let s = summary(&seen.lock().unwrap());
    assert_eq!(
        s[2..],
        ["-http://127.0.0.1:2001", "+http://127.0.0.1:2003"],
        "{s:?}"
    );
}

#[test]
fn etcd_restarted_changes_nothing_and_the_watch_catches_up() {
    let Some(mut etcd) = Etcd::start("restart") else {
        return;
    };
    let target = EtcdTarget::parse(&etcd.url("")).unwrap();
    let rt = rt();
    let key = |port: u16| {
        let w = pdx_discovery::DiscoveredWorker::from_body(&body(port)).unwrap();
        target.key_for(&w.registration)
    };
    {
        let mut c = rt
            .block_on(etcd_client::Client::connect([etcd.endpoint()], None))
            .unwrap();
        rt.block_on(c.put(key(3001), body(3001), None)).unwrap();
    }
    let (sink, seen) = recorder();
    let _w = etcd_driver::spawn(target.clone(), EtcdOptions::default(), sink, None).unwrap();
    assert!(wait_until(GUARD, || seen.lock().unwrap().len() == 1));
    etcd.kill();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(seen.lock().unwrap().len(), 1, "etcd away: no change");
    etcd.spawn();
    let t0 = Instant::now();
    let mut c = rt
        .block_on(etcd_client::Client::connect([etcd.endpoint()], None))
        .unwrap();
    rt.block_on(c.put(key(3002), body(3002), None)).unwrap();
    assert!(wait_until(GUARD, || seen.lock().unwrap().len() == 2));
    println!(
        "a put right after etcd came back was seen {:?} later",
        t0.elapsed()
    );
    assert_eq!(
        summary(&seen.lock().unwrap()),
        ["+http://127.0.0.1:3001", "+http://127.0.0.1:3002"]
    );
}
