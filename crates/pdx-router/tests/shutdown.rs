//! Graceful shutdown: requests in flight finish, new connections are refused, the deadline is kept.

mod common;
use common::*;
use http_body_util::BodyExt;
use std::io::{Read, Write};
use std::time::Duration;

/// Runs `RouterServer::shutdown` on a thread; the handle yields whether it drained cleanly.
fn shutdown_in_background(
    r: pdx_router::RouterServer,
    timeout: Duration,
) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || r.shutdown(timeout))
}

/// A router in front of an instant prefill mock and an instant decode mock with the `stall` fault options.
fn pd_with_stalling_decode(
    stall: &[&str],
) -> (
    pdx_mock::MockServer,
    pdx_mock::MockServer,
    pdx_router::RouterServer,
) {
    let p = mock(&["--role", "prefill", "--instant"]);
    let mut args = vec!["--role", "decode", "--instant"];
    args.extend_from_slice(stall);
    let d = mock(&args);
    let r = pd(&[&p], &[&d], &[]);
    (p, d, r)
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_lets_a_stream_in_flight_finish_and_refuses_new_connections() {
    // The decode pauses 1 s after 2 tokens, so the stream is in flight while the drain starts.
    let (_p, _d, r) =
        pd_with_stalling_decode(&["--fault-stall-after-tokens", "2", "--fault-stall-secs", "1"]);
    let addr = r.addr;
    let resp = chat_request(addr, 6, true).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap()
        .to_vec();
    assert_eq!(r.shared.drain.active_requests(), 1);
    let shared = r.shared.clone();
    let done = shutdown_in_background(r, Duration::from_secs(20));
    assert!(eventually(|| shared.drain.is_draining()).await);
    // No new connection once the listener is shut down.
    assert!(
        eventually(|| std::net::TcpStream::connect(addr).is_err()).await,
        "router still accepts connections while draining"
    );
    // The stream in flight runs to its end.
    while let Some(f) = body.frame().await {
        got.extend_from_slice(&f.expect("stream completes").into_data().unwrap_or_default());
    }
    let evs = events(&got);
    assert_eq!(evs.last().map(String::as_str), Some("[DONE]"), "{evs:?}");
    let clean = tokio::task::spawn_blocking(move || done.join().unwrap())
        .await
        .unwrap();
    // Clean: the stream ended before the 20 s deadline, and the drain noticed.
    assert!(clean, "shutdown reported requests left");
    assert_eq!(shared.drain.active_requests(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_deadline_ends_a_stalled_stream_and_aborts_the_decode() {
    // The decode stalls for good after 1 token.
    let (_p, d, r) = pd_with_stalling_decode(&["--fault-stall-after-tokens", "1"]);
    let resp = chat_request(r.addr, 50, true).await;
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    let done = shutdown_in_background(r, Duration::from_millis(300));
    let mut rest = Vec::new();
    // Only the deadline can end this stream; the outer bound only keeps a broken drain from hanging the test.
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(Ok(f)) = body.frame().await {
            rest.extend_from_slice(&f.into_data().unwrap_or_default());
        }
    })
    .await
    .expect("the shutdown deadline ended the stalled stream");
    assert!(
        !events(&rest).iter().any(|e| e == "[DONE]"),
        "a stalled stream cannot have finished"
    );
    let clean = tokio::task::spawn_blocking(move || done.join().unwrap())
        .await
        .unwrap();
    assert!(
        !clean,
        "the stalled request was still in flight at the deadline"
    );
    // Dropping the request closed the decode connection: the engine aborts it and frees its KV.
    assert!(
        eventually(|| mock_metric(&d, "vllm:request_success_total", "abort") == 1.0).await,
        "decode did not see the abort"
    );
}

#[test]
fn draining_router_answers_not_ready_and_closes_the_connection() {
    let w = mock(&["--role", "aggregated", "--instant"]);
    let r = router(&["--worker", &url(&w)]);
    let mut ready = std::net::TcpStream::connect(r.addr).unwrap();
    ready
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let ask = format!("GET /ready HTTP/1.1\r\nhost: {}\r\n\r\n", r.addr);
    // Before the drain: ready, and the connection stays open.
    ready.write_all(ask.as_bytes()).unwrap();
    let mut buf = [0u8; 1024];
    let n = ready.read(&mut buf).unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(!first.contains("connection: close"), "{first}");
    // Draining (without shutting the listener, so a new connection still gets through): not ready, and the
    // answer is the connection's last.
    r.shared.drain.begin(Duration::from_secs(30));
    let mut c = std::net::TcpStream::connect(r.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(ask.as_bytes()).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap(); // ends: the router closes the connection
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(answer.contains("shutting down"), "{answer}");
}
