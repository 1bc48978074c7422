//! Closed-loop routing faults (issue 17), driven through the real `pdx` binary:
//!
//! * workers whose `/metrics` misbehave (an endless body, a malformed one, one that never answers): the
//!   router reads at most its bound, counts the scrapes failed, believes nothing of those workers (they stay
//!   unknown, which `kv_aware` treats as loaded) and keeps serving through the healthy worker;
//! * a client flood against a prefill pool with admission shaping: every answer is a 200, a 429 with
//!   `Retry-After` or a 503, nothing stays admitted or queued afterwards, and the router serves again;
//! * the same against a decode pool shaped by ITL, with streamed requests of which half the clients leave right
//!   after the response head: the answers are 200, 429 or 503, every slot comes back (also those of the streams
//!   cut short), the pool's smoothed TPOT is over its target (the cut was driven by samples) and the router
//!   serves again.
//!
//! Child processes are killed and fake workers stopped when their guards drop (also on a failed assertion).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

/// How a fake worker answers `GET /metrics`.
#[derive(Clone, Copy, PartialEq)]
enum Metrics {
    /// A 64 MiB body, written until the reader goes away.
    Endless,
    /// A body that breaks the text format.
    Malformed,
    /// Nothing, ever (the connection stays open).
    Silent,
}

/// A fake worker on a loopback port: `/health` 200, completions 503, `/metrics` per its mode. Stops on drop.
struct Fake {
    port: u16,
    stop: Arc<AtomicBool>,
    /// Most bytes of one `/metrics` body it managed to write.
    most_written: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Fake {
    fn start(mode: Metrics) -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let most_written = Arc::new(AtomicU64::new(0));
        let (st, mw) = (stop.clone(), most_written.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let (st, mw) = (st.clone(), mw.clone());
                        std::thread::spawn(move || serve(s, mode, &st, &mw));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Fake {
            port,
            stop,
            most_written,
            thread: Some(thread),
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut s: TcpStream, mode: Metrics, stop: &AtomicBool, most: &AtomicU64) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(_) if stop.load(Ordering::Relaxed) => return,
            Err(_) => {}
        }
    }
    let line = String::from_utf8_lossy(&head);
    let path = line.split(' ').nth(1).unwrap_or("").to_string();
    let answer = |s: &mut TcpStream, status: &str, body: &str| {
        let _ = write!(
            s,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    };
    match (path.as_str(), mode) {
        ("/metrics", Metrics::Endless) => {
            let total: u64 = 64 << 20;
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {total}\r\n\r\n"
            );
            let chunk = "vllm:num_requests_waiting 1\n".repeat(2048);
            let mut written = 0u64;
            let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
            while written < total && !stop.load(Ordering::Relaxed) {
                let n = (chunk.len() as u64).min(total - written) as usize;
                if s.write_all(&chunk.as_bytes()[..n]).is_err() {
                    break;
                }
                written += n as u64;
                most.fetch_max(written, Ordering::Relaxed);
            }
        }
        ("/metrics", Metrics::Malformed) => answer(
            &mut s,
            "200 OK",
            "vllm:num_requests_waiting{model_name=\"m} 1\nvllm:kv_cache_usage_perc 0.1\n",
        ),
        (_, Metrics::Silent) => {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        ("/health", _) => answer(&mut s, "200 OK", ""),
        _ => answer(
            &mut s,
            "503 Service Unavailable",
            r#"{"error":{"message":"fake","type":"ServiceUnavailableError","param":null,"code":503}}"#,
        ),
    }
}

/// The sample of `name` whose line names `worker` in the router's `/metrics`, if any.
fn worker_sample(port: u16, name: &str, worker: &str) -> Option<f64> {
    let r = http(port, "GET", "/metrics", &[], "", Duration::from_secs(2)).ok()?;
    let needle = format!("worker=\"{worker}\"");
    r.body
        .lines()
        .find(|l| l.starts_with(name) && l.contains(&needle))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The value of the router's `/metrics` line that starts with `prefix` (0 if none).
fn line_value(port: u16, prefix: &str) -> f64 {
    http(port, "GET", "/metrics", &[], "", Duration::from_secs(2))
        .ok()
        .and_then(|r| {
            r.body
                .lines()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        })
        .unwrap_or(0.0)
}

#[test]
fn workers_with_misbehaving_metrics_stay_unknown_and_the_router_serves_on() {
    let mp = free_port();
    let _real = mock(mp, &[]);
    let fakes = [
        Fake::start(Metrics::Endless),
        Fake::start(Metrics::Malformed),
        Fake::start(Metrics::Silent),
    ];
    let rp = free_port();
    let real_url = url(mp);
    let fake_urls: Vec<String> = fakes.iter().map(|f| url(f.port)).collect();
    let mut args = vec![
        "--policy",
        "kv_aware",
        "--telemetry-interval-ms",
        "50",
        "--upstream-timeout-secs",
        "5",
        "--worker",
        &real_url,
    ];
    for u in &fake_urls {
        args.extend(["--worker", u.as_str()]);
    }
    let mut r = router(rp, &args);
    wait_healthy(&mut r, rp);
    // The healthy worker's gauges arrive; the misbehaving ones' never do, and their scrapes count as failed.
    assert!(wait_until(GUARD, || worker_sample(
        rp,
        "pdx_worker_kv_usage",
        &real_url
    )
    .is_some()));
    assert!(wait_until(GUARD, || line_value(
        rp,
        "pdx_telemetry_scrapes_total{outcome=\"failed\"}"
    ) >= 6.0));
    for u in &fake_urls {
        for name in [
            "pdx_worker_waiting",
            "pdx_worker_kv_usage",
            "pdx_worker_telemetry_age_seconds",
        ] {
            assert_eq!(worker_sample(rp, name, u), None, "{name} of {u}");
        }
    }
    // The endless body was cut at the router's bound (4 MiB), not read to its 64 MiB.
    let most = fakes[0].most_written.load(Ordering::Relaxed);
    println!("endless /metrics: at most {most} bytes written per scrape");
    assert!(most < 16 << 20, "{most}");
    // Unknown is not idle: kv_aware sends every request to the worker it knows.
    for k in 0..20 {
        let body = format!(
            r#"{{"model":"mock","prompt":"request {k} of the chaos suite","max_tokens":4}}"#
        );
        let resp = http(rp, "POST", "/v1/completions", &[], &body, GUARD).expect("answer");
        assert_eq!(resp.status, 200, "{}", resp.body);
        assert_eq!(resp.header("x-pdx-worker"), Some(real_url.as_str()));
    }
    assert!(health_ok(rp));
}

#[test]
fn a_client_flood_on_an_admission_shaped_pool_gets_429s_and_leaves_nothing_behind() {
    // A prefill whose every step takes at least 0.1 s (modelled and slept), a decode that answers at once.
    let (_workers, rp) = shaped_pd(
        &["--speed", "0.02"],
        &["--instant"],
        &[
            "--admission-ttft-target-ms",
            "1000",
            "--admission-initial-limit",
            "4",
            "--admission-max-queue",
            "8",
            "--admission-max-wait-ms",
            "300",
        ],
    );
    let body =
        r#"{"model":"mock","prompt":"the quick brown fox jumps over the lazy dog","max_tokens":2}"#;
    let clients: Vec<_> = (0..120)
        .map(|_| {
            std::thread::spawn(move || {
                let r = http(rp, "POST", "/v1/completions", &[], body, GUARD).expect("answer");
                (r.status, r.header("retry-after").map(str::to_string))
            })
        })
        .collect();
    let by_status = tally("120 clients at once", clients);
    assert!(
        by_status.get(&200).copied().unwrap_or(0) >= 4,
        "{by_status:?}"
    );
    assert!(
        by_status.get(&429).copied().unwrap_or(0) >= 1,
        "{by_status:?}"
    );
    // Nothing admitted or queued is left, and the pool serves again.
    assert!(wait_until(GUARD, || {
        metric(rp, "pdx_admission_in_flight") == Some(0.0)
            && metric(rp, "pdx_admission_queue") == Some(0.0)
    }));
    let (s, v) = post_json(rp, "/v1/completions", &serde_json::from_str(body).unwrap());
    assert_eq!(s, 200, "{v}");
}

#[test]
fn a_stream_flood_on_an_itl_shaped_decode_pool_with_clients_leaving_mid_stream_leaves_nothing_behind(
) {
    // Decode steps of ~40 ms (modelled and slept): over the 20 ms ITL target whatever the batch.
    let (_workers, rp) = shaped_pd(
        &["--instant"],
        &["--speed", "0.05"],
        &["--admission-itl-target-ms", "20"],
    );
    let body = r#"{"model":"mock","prompt":"the quick brown fox jumps over the lazy dog","max_tokens":48,"stream":true}"#;
    // Every other client leaves right after the response head (its stream is cut short); the rest read their
    // answer to the end.
    let clients: Vec<_> = (0..45)
        .map(|k| {
            std::thread::spawn(move || {
                if k % 2 == 0 {
                    let r = http(rp, "POST", "/v1/completions", &[], body, GUARD).expect("answer");
                    return (r.status, r.header("retry-after").map(str::to_string));
                }
                let mut s = TcpStream::connect(("127.0.0.1", rp)).unwrap();
                s.set_read_timeout(Some(GUARD)).unwrap();
                write!(
                    s,
                    "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                let mut head = [0u8; 512];
                let n = s.read(&mut head).unwrap_or(0);
                let text = String::from_utf8_lossy(&head[..n]).to_string();
                let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
                drop(s);
                let retry = text
                    .lines()
                    .find_map(|l| l.strip_prefix("retry-after: "))
                    .map(|v| v.trim().to_string());
                (status, retry)
            })
        })
        .collect();
    let by_status = tally("45 streamed clients at once", clients);
    assert!(
        by_status.get(&200).copied().unwrap_or(0) >= 8,
        "{by_status:?}"
    );
    assert!(
        by_status.get(&429).copied().unwrap_or(0) + by_status.get(&503).copied().unwrap_or(0) >= 1,
        "{by_status:?}"
    );
    // Every slot comes back; the pool's smoothed TPOT was measured over its 20 ms target (and within the 4x
    // bound on a sample).
    assert!(wait_until(GUARD, || {
        metric(rp, "pdx_admission_in_flight") == Some(0.0)
            && metric(rp, "pdx_admission_queue") == Some(0.0)
    }));
    let tpot = metric(rp, "pdx_admission_ewma_tpot_seconds").expect("decode pool shaped");
    assert!(tpot > 0.02 && tpot <= 0.08, "{tpot}");
    let (s, v) = post_json(
        rp,
        "/v1/completions",
        &serde_json::json!({"model": "mock", "prompt": "again", "max_tokens": 2}),
    );
    assert_eq!(s, 200, "{v}");
}

/// One prefill and one decode mock (KV over pdx-transfer, scaled down; `prefill` and `decode`: their timing
/// flags) behind a router started with `router_args`, all ready: the processes (killed when dropped) and the
/// router's port.
fn shaped_pd(prefill: &[&str], decode: &[&str], router_args: &[&str]) -> ([Proc; 3], u16) {
    let (pp, dp, rp) = (free_port(), free_port(), free_port());
    let kv = ["--kv-listen", "127.0.0.1:0", "--kv-scale-down", "1024"];
    let mut p = spawn_mock(pp, &[&["--role", "prefill"], &kv[..], prefill].concat());
    let mut d = spawn_mock(dp, &[&["--role", "decode"], &kv[..], decode].concat());
    wait_healthy(&mut p, pp);
    wait_healthy(&mut d, dp);
    let (pu, du) = (url(pp), url(dp));
    let mut r = router(
        rp,
        &[
            &["--prefill", pu.as_str(), "--decode", du.as_str()],
            router_args,
        ]
        .concat(),
    );
    wait_healthy(&mut r, rp);
    assert!(wait_until(GUARD, || ready(rp)));
    ([p, d, r], rp)
}

/// Joins client threads that each return (status, `Retry-After`), counts their statuses (printed under
/// `label`), and checks that each is 200, 429 or 503 and that every refusal carries `Retry-After: 1`.
fn tally(
    label: &str,
    clients: Vec<std::thread::JoinHandle<(u16, Option<String>)>>,
) -> std::collections::BTreeMap<u16, u32> {
    let mut by_status = std::collections::BTreeMap::<u16, u32>::new();
    for c in clients {
        let (status, retry) = c.join().unwrap();
        *by_status.entry(status).or_default() += 1;
        if status == 429 || status == 503 {
            assert_eq!(retry.as_deref(), Some("1"), "{status}");
        }
    }
    println!("{label}: {by_status:?}");
    assert!(
        by_status.keys().all(|s| [200, 429, 503].contains(s)),
        "{by_status:?}"
    );
    by_status
}
