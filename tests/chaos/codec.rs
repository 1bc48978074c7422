//! The router's HTTP/1.1 codec under what a client can send on one keep-alive connection (issue 19's cuts:
//! header values as slices of the read buffer, header names remembered per position, read buffers and routing
//! futures reused per thread), driven through the real `pdx` binary in front of two `pdx mock` workers:
//!
//! * header sets that change from request to request (order, case, names swapped at a position, long names,
//!   empty and non-ASCII values), pipelined requests, a stream between non-streamed answers: every answer is
//!   the right one, in order;
//! * a head with a malformed header or too many headers: 400 / 431 and the connection closed, the router
//!   serving the next connection as before.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use crate::support::*;

/// A chat request (`stream` or not) with `headers` (name, value as bytes), keep-alive.
fn chat(headers: &[(&str, &[u8])], stream: bool, tag: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "model": "mock",
        "messages": [{"role": "user", "content": format!("codec chaos {tag}")}],
        "max_tokens": 3,
        "stream": stream,
    })
    .to_string();
    let mut req = b"POST /v1/chat/completions HTTP/1.1\r\n".to_vec();
    for (k, v) in headers {
        req.extend_from_slice(k.as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(v);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    req
}

/// Reads one response (Content-Length or chunked): status, head, body.
fn response(r: &mut BufReader<TcpStream>) -> (u16, String, String) {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).expect("a response line") > 0,
            "closed; head so far: {head}"
        );
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).expect("a chunk size");
            let n = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).expect("a chunk");
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        let n: usize = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().expect("a length"))
            .unwrap_or(0);
        body.resize(n, 0);
        r.read_exact(&mut body).expect("the body");
    }
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

/// A keep-alive connection to the router on `port`, bounded in time.
fn connect(port: u16) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(GUARD)).unwrap();
    s.set_write_timeout(Some(GUARD)).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

#[test]
fn whatever_headers_a_client_sends_each_answer_is_its_own() {
    let (pp, dp, rp) = (free_port(), free_port(), free_port());
    let _p = mock(pp, &["--role", "prefill"]);
    let _d = mock(dp, &["--role", "decode"]);
    let _r = router(rp, &["--prefill", &url(pp), "--decode", &url(dp)]);
    assert!(wait_until(GUARD, || ready(rp)), "the router is ready");

    let long = "x-".to_string() + &"long".repeat(30);
    let sets: Vec<Vec<(&str, &[u8])>> = vec![
        vec![("Host", b"pdx"), ("X-Trace", b"1"), ("User-Agent", b"a")],
        vec![("host", b"pdx"), ("x-TRACE", b"2"), ("user-agent", b"b")],
        // Names swapped at their positions, twice in a row (the remembered ones are replaced).
        vec![("X-Trace", b"3"), ("Host", b"pdx"), ("X-Other", b"")],
        vec![("X-Trace", b"4"), ("Host", b"pdx"), ("X-Other", b"")],
        vec![
            ("Host", b"pdx"),
            (&long, b"v"),
            ("X-Note", "caf\u{e9}".as_bytes()),
        ],
        vec![("Host", b"pdx")],
    ];
    let (mut s, mut r) = connect(rp);
    for round in 0..3 {
        for (i, h) in sets.iter().enumerate() {
            s.write_all(&chat(h, false, &format!("{round}.{i}")))
                .unwrap();
            let (status, _, body) = response(&mut r);
            assert_eq!(status, 200, "round {round}, set {i}: {body}");
            assert!(body.contains("\"chat.completion\""), "{body}");
        }
        // A stream between non-streamed answers on the same connection.
        s.write_all(&chat(&sets[0], true, "stream")).unwrap();
        let (status, head, body) = response(&mut r);
        assert_eq!(status, 200, "{body}");
        assert!(
            head.to_ascii_lowercase().contains("text/event-stream"),
            "{head}"
        );
        assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
        // Two requests in one write: both answered, in order.
        let mut two = chat(&sets[1], false, "first");
        two.extend(chat(&sets[4], false, "second"));
        s.write_all(&two).unwrap();
        for _ in 0..2 {
            let (status, _, body) = response(&mut r);
            assert_eq!(status, 200, "{body}");
        }
    }

    // Malformed or too many headers: refused, the connection closed; the next connection is served.
    let mut too_many: Vec<(String, Vec<u8>)> = (0..70)
        .map(|i| (format!("x-h{i}"), b"v".to_vec()))
        .collect();
    too_many.insert(0, ("Host".into(), b"pdx".to_vec()));
    let too_many: Vec<(&str, &[u8])> = too_many.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    for (bad, want) in [
        (
            chat(&[("Host", b"pdx"), ("X-Trace ", b"1")], false, "bad name"),
            400,
        ),
        (
            chat(
                &[("Host", b"pdx"), ("X-Trace", b"a\x01b")],
                false,
                "bad value",
            ),
            400,
        ),
        (chat(&too_many, false, "too many"), 431),
    ] {
        let (mut s, mut r) = connect(rp);
        s.write_all(&bad).unwrap();
        let (status, _, _) = response(&mut r);
        assert_eq!(status, want);
        let mut rest = Vec::new();
        assert_eq!(
            r.read_to_end(&mut rest).expect("closed"),
            0,
            "the connection is closed"
        );
        let (mut s, mut r) = connect(rp);
        s.write_all(&chat(&sets[0], false, "after")).unwrap();
        assert_eq!(response(&mut r).0, 200);
    }
}
