//! A small blocking HTTP/1.1 client for `pdx plan`'s polls of `pdx serve` and the workers:
//! one request per connection (`Connection: close`), `http://` URLs only, bounded in time
//! (connect, read and write timeouts) and size (head and body), strict framing
//! (`Content-Length`, `chunked`, or to the end of the connection).

use crate::PlannerError;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Largest answer accepted (the `/metrics` of a busy router fit many times over), bytes.
pub const MAX_BODY: usize = 8 << 20;
const MAX_HEAD: usize = 16 << 10;

fn err(url: &str, why: impl std::fmt::Display) -> PlannerError {
    PlannerError::Http {
        url: url.to_string(),
        why: why.to_string(),
    }
}

/// `(authority, path)` of an `http://` URL.
fn split(url: &str) -> Result<(&str, &str), PlannerError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| err(url, "only http:// URLs are supported"))?;
    Ok(match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    })
}

/// The router's admin token for its admin API (`/v1/workers`, `/v1/planner/diversions`), from
/// `PDX_ADMIN_TOKEN` (the variable `pdx mock --register` reads too, so the workers the `local`
/// connector starts register with it): `None` when unset, empty, or not visible ASCII.
pub fn admin_token() -> Option<String> {
    std::env::var("PDX_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty() && t.len() <= 1024 && t.bytes().all(|b| b.is_ascii_graphic()))
}

/// Sends `method url` with an optional JSON body; returns the status and the body.
///
/// Errors: [`PlannerError::Http`] on connect/read/write failure or timeout, a malformed or
/// oversized answer.
pub fn request(
    method: &str,
    url: &str,
    json: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), PlannerError> {
    request_with(method, url, json, None, timeout)
}

/// [`request`] to the router's admin API: with `Authorization: Bearer TOKEN` when `token` is set
/// ([`admin_token`]). Never used for workers, which have no business seeing the router's token.
///
/// Errors: as [`request`].
pub fn request_with(
    method: &str,
    url: &str,
    json: Option<&str>,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), PlannerError> {
    let (authority, path) = split(url)?;
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| err(url, e))?
        .next()
        .ok_or_else(|| err(url, "no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| err(url, e))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| err(url, e))?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| err(url, e))?;
    let body = json.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nAccept: */*\r\n"
    );
    if let Some(t) = token {
        req += &format!("Authorization: Bearer {t}\r\n");
    }
    if json.is_some() {
        req += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    req += "\r\n";
    req += body;
    s.write_all(req.as_bytes()).map_err(|e| err(url, e))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        let n = s.read(&mut chunk).map_err(|e| err(url, e))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_HEAD + MAX_BODY {
            return Err(err(url, "answer too large"));
        }
    }
    parse_response(&buf).map_err(|why| err(url, why))
}

/// Parses a whole response (the connection closed after it).
///
/// Errors: a message for a malformed head, a bad status, bad framing or a body too large.
pub fn parse_response(buf: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .filter(|&e| e <= MAX_HEAD)
        .ok_or("no complete response head")?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(format!("bad status line `{status_line}`"));
    }
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .filter(|c| (100..600).contains(c))
        .ok_or_else(|| format!("bad status line `{status_line}`"))?;
    let (mut length, mut chunked) = (None, false);
    for l in lines {
        let (k, v) = l.split_once(':').ok_or("malformed header")?;
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            let n: usize = v.parse().map_err(|_| "bad Content-Length")?;
            if length.is_some_and(|m| m != n) {
                return Err("conflicting Content-Length".into());
            }
            length = Some(n);
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.eq_ignore_ascii_case("chunked");
        }
    }
    let rest = &buf[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        if n > MAX_BODY || rest.len() < n {
            return Err("body shorter than Content-Length or too large".into());
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    if body.len() > MAX_BODY {
        return Err("body too large".into());
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_s = std::str::from_utf8(&b[..eol]).map_err(|_| "bad chunk size")?;
        let size_s = size_s.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_s, 16).map_err(|_| "bad chunk size")?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if size > MAX_BODY || b.len() < size + 2 || out.len() + size > MAX_BODY {
            return Err("truncated or oversized chunk".into());
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request `request_with` sends, as a one-shot server on loopback saw it.
    fn sent(token: Option<&str>) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/workers", l.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = vec![0u8; 4096];
            let n = c.read(&mut buf).unwrap();
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let (status, _) = request_with("GET", &url, None, token, Duration::from_secs(5)).unwrap();
        assert_eq!(status, 200);
        server.join().unwrap()
    }

    #[test]
    fn the_admin_token_goes_only_where_asked() {
        assert!(sent(Some("t0k")).contains("\r\nAuthorization: Bearer t0k\r\n"));
        assert!(!sent(None).to_ascii_lowercase().contains("authorization"));
    }

    #[test]
    fn framing() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiXX").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"hi"[..]));
        let (_, b) = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(b, b"abcde");
        let (s, b) = parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nnope").unwrap();
        assert_eq!((s, b.as_slice()), (404, &b"nope"[..]));
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/1.1 999 What\r\n\r\n",
            b"SMTP 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK",
        ] {
            assert!(
                parse_response(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(split("https://x/").is_err());
        assert_eq!(split("http://h:1/a?b").unwrap(), ("h:1", "/a?b"));
        assert_eq!(split("http://h:1").unwrap(), ("h:1", "/"));
    }
}
