//! Sans-IO HTTP/1.1 response decoding for the upstream client: the response head
//! (`httparse`) and the body framing (`Content-Length`, chunked, or until EOF).
//!
//! Body data is handed out as slices split off the connection's read buffer (`BytesMut::split_to`
//! then `freeze`): no copy, and no allocation per chunk while the buffer has room. One frame is one
//! HTTP chunk (or what of it has arrived), as hyper does, so the client sees the engine's framing.

use bytes::{Buf, Bytes, BytesMut};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::StatusCode;

/// Largest response head accepted, bytes.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest chunk-size line (with extensions) or trailer line accepted, bytes.
const MAX_LINE: usize = 4096;
/// Headers parsed per response head at most.
const MAX_HEADERS: usize = 64;

/// A malformed or oversized response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The head is not valid HTTP/1.x.
    Head,
    /// The head is over [`MAX_HEAD`] bytes.
    HeadTooLarge,
    /// A bad chunk-size line or chunk terminator.
    Chunk,
}

impl std::error::Error for DecodeError {}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Head => "malformed response head",
            Self::HeadTooLarge => "response head too large",
            Self::Chunk => "malformed chunked body",
        })
    }
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    /// Status code.
    pub status: StatusCode,
    /// Response headers (all of them, in order; repeated names appended).
    pub headers: HeaderMap,
    /// How the body is delimited.
    pub framing: Framing,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
}

/// Parses a response head from the start of `buf`. `Ok(None)`: incomplete, read more.
/// Interim 1xx heads (other than 101) are consumed and skipped. On success the head's bytes
/// are removed from `buf`.
pub fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, DecodeError> {
    loop {
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut hs);
        let n = match r.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return if buf.len() > MAX_HEAD {
                    Err(DecodeError::HeadTooLarge)
                } else {
                    Ok(None)
                };
            }
            Err(_) => return Err(DecodeError::Head),
        };
        let code = r.code.ok_or(DecodeError::Head)?;
        let status = StatusCode::from_u16(code).map_err(|_| DecodeError::Head)?;
        if status.is_informational() && code != 101 {
            buf.advance(n);
            continue;
        }
        let mut headers = HeaderMap::with_capacity(r.headers.len());
        let mut chunked = false;
        let mut length: Option<u64> = None;
        let mut close = r.version == Some(0);
        for h in r.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| DecodeError::Head)?;
            if name == hyper::header::TRANSFER_ENCODING {
                // chunked must be the last coding
                chunked = h
                    .value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name == hyper::header::CONTENT_LENGTH {
                let v = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or(DecodeError::Head)?;
                if length.is_some_and(|l| l != v) {
                    return Err(DecodeError::Head);
                }
                length = Some(v);
            } else if name == hyper::header::CONNECTION {
                for t in h.value.split(|&b| b == b',') {
                    let t = t.trim_ascii();
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") && r.version == Some(0) {
                        close = false;
                    }
                }
            }
            let value = HeaderValue::from_bytes(h.value).map_err(|_| DecodeError::Head)?;
            headers.append(name, value);
        }
        buf.advance(n);
        let framing = if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Length(0)
        } else if chunked {
            Framing::Chunked(Chunk::Size)
        } else if let Some(l) = length {
            Framing::Length(l)
        } else {
            close = true;
            Framing::Eof
        };
        return Ok(Some(Head {
            status,
            headers,
            framing,
            keep_alive: !close,
        }));
    }
}

/// Body delimitation and decoding state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length`: bytes left.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunk),
    /// Until the server closes the connection.
    Eof,
}

/// Chunked decoding state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk: data bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    Crlf,
    /// After the last chunk: trailer lines until an empty line.
    Trailers,
    /// Body complete.
    Done,
}

/// What one decoding step produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// A body frame.
    Data(Bytes),
    /// The body is complete.
    Done,
    /// More bytes are needed.
    More,
}

fn line(buf: &BytesMut) -> Result<Option<usize>, DecodeError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) => Ok(Some(i)),
        None if buf.len() > MAX_LINE => Err(DecodeError::Chunk),
        None => Ok(None),
    }
}

impl Framing {
    /// Whether no body bytes are left.
    pub fn is_done(&self) -> bool {
        matches!(self, Framing::Length(0) | Framing::Chunked(Chunk::Done))
    }

    /// Decodes from the front of `buf`: the next data frame, the end, or "need more".
    /// `eof`: the connection has closed (ends an [`Framing::Eof`] body).
    pub fn step(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Step, DecodeError> {
        loop {
            match self {
                Framing::Length(0) => return Ok(Step::Done),
                Framing::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                Framing::Eof => {
                    if !buf.is_empty() {
                        let n = buf.len();
                        return Ok(Step::Data(buf.split_to(n).freeze()));
                    }
                    return Ok(if eof { Step::Done } else { Step::More });
                }
                Framing::Chunked(c) => match *c {
                    Chunk::Done => return Ok(Step::Done),
                    Chunk::Size => {
                        let Some(i) = line(buf)? else {
                            return Ok(Step::More);
                        };
                        let l = &buf[..i];
                        let hex_end = l
                            .iter()
                            .position(|b| !b.is_ascii_hexdigit())
                            .unwrap_or(l.len());
                        if hex_end == 0 || hex_end > 15 {
                            return Err(DecodeError::Chunk);
                        }
                        // after the digits: optional whitespace, `;extensions`, `\r`
                        let rest = &l[hex_end..];
                        let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
                        if !(rest.iter().all(|b| *b == b' ' || *b == b'\t')
                            || rest.trim_ascii_start().first() == Some(&b';'))
                        {
                            return Err(DecodeError::Chunk);
                        }
                        let size = l[..hex_end]
                            .iter()
                            .fold(0u64, |acc, &b| acc * 16 + u64::from(hex(b)));
                        buf.advance(i + 1);
                        *c = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(left) => {
                        if buf.is_empty() {
                            return Ok(Step::More);
                        }
                        let n = left.min(buf.len() as u64) as usize;
                        *c = if left == n as u64 {
                            Chunk::Crlf
                        } else {
                            Chunk::Data(left - n as u64)
                        };
                        return Ok(Step::Data(buf.split_to(n).freeze()));
                    }
                    Chunk::Crlf => {
                        if buf.len() < 2 {
                            if buf.first().is_some_and(|&b| b != b'\r') {
                                return Err(DecodeError::Chunk);
                            }
                            return Ok(Step::More);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(DecodeError::Chunk);
                        }
                        buf.advance(2);
                        *c = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        let Some(i) = line(buf)? else {
                            return Ok(Step::More);
                        };
                        let empty = i == 0 || (i == 1 && buf[0] == b'\r');
                        buf.advance(i + 1);
                        if empty {
                            *c = Chunk::Done;
                        }
                    }
                },
            }
        }
    }
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(f: &mut Framing, buf: &mut BytesMut, eof: bool) -> (Vec<Vec<u8>>, bool) {
        let mut out = Vec::new();
        loop {
            match f.step(buf, eof).expect("decodes") {
                Step::Data(b) => out.push(b.to_vec()),
                Step::Done => return (out, true),
                Step::More => return (out, false),
            }
        }
    }

    #[test]
    fn head_with_chunked_body_in_pieces() {
        let wire = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
        // every split point gives the same bytes
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut head = None;
            let mut data = Vec::new();
            let mut done = false;
            for part in [&wire[..0], &wire[cut..]] {
                buf.extend_from_slice(part);
                if head.is_none() {
                    head = parse_head(&mut buf, false).expect("valid head");
                }
                if let Some(h) = head.as_mut() {
                    let (d, end) = all(&mut h.framing, &mut buf, false);
                    data.extend(d.concat());
                    done = end;
                }
            }
            let h = head.expect("head parsed");
            assert_eq!(h.status, StatusCode::OK);
            assert!(h.keep_alive);
            assert_eq!(h.headers["content-type"], "text/event-stream");
            assert_eq!(data, b"hello, world", "cut at {cut}");
            assert!(done && buf.is_empty(), "cut at {cut}");
        }
    }

    #[test]
    fn one_frame_per_chunk_sharing_the_read_buffer() {
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"[..]);
        let base = buf.as_ptr() as usize;
        let mut f = Framing::Chunked(Chunk::Size);
        let a = f.step(&mut buf, false).unwrap();
        let b = f.step(&mut buf, false).unwrap();
        match (&a, &b) {
            (Step::Data(a), Step::Data(b)) => {
                assert_eq!((&a[..], &b[..]), (&b"abc"[..], &b"de"[..]));
                // slices of the same allocation: no copy
                assert_eq!(a.as_ptr() as usize, base + 3);
                assert_eq!(b.as_ptr() as usize, base + 11);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(f.step(&mut buf, false).unwrap(), Step::Done);
    }

    #[test]
    fn content_length_eof_and_connection_close() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 400 Bad Request\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcdEXTRA"
                [..],
        );
        let mut h = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(h.status, StatusCode::BAD_REQUEST);
        assert!(!h.keep_alive);
        let (d, done) = all(&mut h.framing, &mut buf, false);
        assert_eq!((d.concat(), done), (b"abcd".to_vec(), true));
        assert_eq!(&buf[..], b"EXTRA");

        let mut buf = BytesMut::from(&b"HTTP/1.0 200 OK\r\n\r\nbody"[..]);
        let mut h = parse_head(&mut buf, false).unwrap().unwrap();
        assert!(!h.keep_alive);
        assert_eq!(h.framing, Framing::Eof);
        let (d, done) = all(&mut h.framing, &mut buf, false);
        assert_eq!((d.concat(), done), (b"body".to_vec(), false));
        assert_eq!(h.framing.step(&mut buf, true).unwrap(), Step::Done);
    }

    #[test]
    fn interim_heads_are_skipped_and_bad_input_is_an_error() {
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"[..]);
        let h = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(h.status, StatusCode::NO_CONTENT);
        assert!(h.framing.is_done());
        assert_eq!(
            parse_head(&mut BytesMut::from(&b"NOT HTTP\r\n\r\n"[..]), false).unwrap_err(),
            DecodeError::Head
        );
        let mut big = BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]);
        big.extend_from_slice(&vec![b'a'; MAX_HEAD + 1]);
        assert_eq!(
            parse_head(&mut big, false).unwrap_err(),
            DecodeError::HeadTooLarge
        );
        for bad in [&b"zz\r\n"[..], b"3\r\nabcXY", b"ffffffffffffffffff\r\n"] {
            let mut f = Framing::Chunked(Chunk::Size);
            let mut b = BytesMut::from(bad);
            let r = (0..4).try_for_each(|_| f.step(&mut b, false).map(|_| ()));
            assert_eq!(r, Err(DecodeError::Chunk), "{bad:?}");
        }
    }

    /// Encodes `chunks` as a chunked body (with chunk extensions on odd chunks).
    fn chunked_wire(chunks: &[Vec<u8>]) -> Vec<u8> {
        let mut w = Vec::new();
        for (i, c) in chunks.iter().filter(|c| !c.is_empty()).enumerate() {
            w.extend_from_slice(format!("{:x}", c.len()).as_bytes());
            if i % 2 == 1 {
                w.extend_from_slice(b";ext=1");
            }
            w.extend_from_slice(b"\r\n");
            w.extend_from_slice(c);
            w.extend_from_slice(b"\r\n");
        }
        w.extend_from_slice(b"0\r\n\r\n");
        w
    }

    proptest::proptest! {
        /// Any chunked body, delivered in any pieces, decodes to the same bytes and ends exactly at its
        /// terminator, leaving what follows (a next response) in the buffer.
        #[test]
        fn chunked_bodies_decode_whatever_the_read_boundaries(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..300), 0..8),
            cuts in proptest::collection::vec(1usize..64, 1..40),
        ) {
            let mut wire = chunked_wire(&chunks);
            wire.extend_from_slice(b"NEXT");
            let mut f = Framing::Chunked(Chunk::Size);
            let mut buf = BytesMut::new();
            let (mut data, mut done, mut at) = (Vec::new(), false, 0usize);
            let mut cuts = cuts.into_iter().cycle();
            while !done {
                let n = cuts.next().unwrap_or(1).min(wire.len() - at);
                buf.extend_from_slice(&wire[at..at + n]);
                at += n;
                let (d, end) = all(&mut f, &mut buf, false);
                data.extend(d.concat());
                done = end;
                proptest::prop_assert!(done || at < wire.len(), "decoder wants more after the whole body");
            }
            proptest::prop_assert_eq!(data, chunks.concat());
            let mut rest = buf.to_vec();
            rest.extend_from_slice(&wire[at..]);
            proptest::prop_assert_eq!(rest, b"NEXT".to_vec());
        }

        /// Arbitrary bytes never panic the head parser or the chunked decoder: they decode, ask for more,
        /// or give an error.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_head(&mut BytesMut::from(&bytes[..]), false);
            let mut f = Framing::Chunked(Chunk::Size);
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..64 {
                match f.step(&mut buf, true) {
                    Ok(Step::Data(_)) => {}
                    Ok(Step::Done | Step::More) | Err(_) => break,
                }
            }
        }
    }
}
