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
/// are removed from `buf`; after an error `buf` is not to be read on (the head may be gone).
///
/// The head leaves `buf` as one shared slice (`split_to(n).freeze()`) and the header values are slices of it,
/// validated in place (`HeaderValue::from_maybe_shared`): no copy, no allocation per value. Header names
/// come from [`cached_name`].
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
        let http10 = r.version == Some(0);
        let mut spans = [HeaderSpan::default(); MAX_HEADERS];
        let count = r.headers.len();
        for (s, h) in spans.iter_mut().zip(r.headers.iter()) {
            *s = HeaderSpan::of(buf, h);
        }
        let head = buf.split_to(n).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        let mut chunked = false;
        let mut length: Option<u64> = None;
        let mut close = http10;
        RESPONSE_NAMES.with(|names| {
            let mut names = names.borrow_mut();
            for (i, s) in spans[..count].iter().enumerate() {
                let name =
                    cached_name(&mut names, i, &head[s.name()]).map_err(|_| DecodeError::Head)?;
                let raw = &head[s.value()];
                if name == hyper::header::TRANSFER_ENCODING {
                    chunked = chunked_last(raw);
                } else if name == hyper::header::CONTENT_LENGTH {
                    length = Some(content_length(raw, length).ok_or(DecodeError::Head)?);
                } else if name == hyper::header::CONNECTION {
                    for t in raw.split(|&b| b == b',') {
                        let t = t.trim_ascii();
                        if t.eq_ignore_ascii_case(b"close") {
                            close = true;
                        } else if t.eq_ignore_ascii_case(b"keep-alive") && http10 {
                            close = false;
                        }
                    }
                }
                let value = HeaderValue::from_maybe_shared(head.slice(s.value()))
                    .map_err(|_| DecodeError::Head)?;
                headers.append(name, value);
            }
            Ok(())
        })?;
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

/// Whether `chunked` is the last coding of a `Transfer-Encoding` value (RFC 9112 §6.1: it must be).
pub(crate) fn chunked_last(raw: &[u8]) -> bool {
    raw.rsplit(|&b| b == b',')
        .next()
        .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// A `Content-Length` value (bytes), given the one an earlier `Content-Length` header of the same head set
/// (`seen`). `None`: not a decimal number, or one that differs from `seen` (two lengths are a smuggling attempt,
/// RFC 9112 §6.3).
pub(crate) fn content_length(raw: &[u8], seen: Option<u64>) -> Option<u64> {
    let v = std::str::from_utf8(raw).ok()?.trim().parse::<u64>().ok()?;
    seen.is_none_or(|l| l == v).then_some(v)
}

/// Where one parsed header lies in the buffer it was parsed from: the byte ranges (start, end) of its name and
/// value.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HeaderSpan {
    name: (usize, usize),
    value: (usize, usize),
}

impl HeaderSpan {
    /// The span of `h`, a header `httparse` parsed from `base` (its name and value are slices of `base`).
    pub(crate) fn of(base: &[u8], h: &httparse::Header<'_>) -> HeaderSpan {
        HeaderSpan {
            name: span_in(base, h.name.as_bytes()),
            value: span_in(base, h.value),
        }
    }

    /// The name's byte range.
    pub(crate) fn name(&self) -> std::ops::Range<usize> {
        self.name.0..self.name.1
    }

    /// The value's byte range.
    pub(crate) fn value(&self) -> std::ops::Range<usize> {
        self.value.0..self.value.1
    }
}

/// The byte range (start, end) of `part` in `base`; `part` is a slice of `base` (as `httparse` returns them).
pub(crate) fn span_in(base: &[u8], part: &[u8]) -> (usize, usize) {
    let at = (part.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize);
    debug_assert!(at
        .checked_add(part.len())
        .is_some_and(|end| end <= base.len()));
    (at, at + part.len())
}

/// Header names cached: this many positions of a head at most, names of this many bytes at most.
const NAMES_CACHED: usize = 64;
const NAME_CACHED_MAX: usize = 64;

/// A header name remembered at one position of a head, and how many heads in a row had another name there.
#[derive(Debug)]
pub(crate) struct CachedName {
    name: HeaderName,
    misses: u8,
}

thread_local! {
    /// The header names of the response heads parsed on this thread, by position ([`cached_name`]).
    static RESPONSE_NAMES: std::cell::RefCell<Vec<CachedName>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The header name `raw` at position `i` of a head: the one remembered in `names` at that position when it is
/// the same name, else parsed (`HeaderName::from_bytes`).
///
/// A name `http` does not know is a copy (an allocation) each time it is parsed; an engine or a client sends
/// the same names in the same order on every message, so the name at a position is almost always the one
/// remembered there, found with one comparison and its clone shared. A hit is exact: `raw` equals a valid
/// (lowercase) name up to the case of ASCII letters, so it is that valid name. A remembered name is replaced
/// after two heads in a row had another name there (two peers that alternate keep the first's names rather
/// than trade copies). At most [`NAMES_CACHED`] positions and names of at most [`NAME_CACHED_MAX`] bytes are
/// kept, so what a peer sends pins little memory.
///
/// Errors: `raw` is not a valid header name.
pub(crate) fn cached_name(
    names: &mut Vec<CachedName>,
    i: usize,
    raw: &[u8],
) -> Result<HeaderName, hyper::header::InvalidHeaderName> {
    if let Some(c) = names.get_mut(i) {
        if c.name.as_str().as_bytes().eq_ignore_ascii_case(raw) {
            c.misses = 0;
            return Ok(c.name.clone());
        }
    }
    let n = HeaderName::from_bytes(raw)?;
    if i < NAMES_CACHED && raw.len() <= NAME_CACHED_MAX {
        if let Some(c) = names.get_mut(i) {
            c.misses += 1;
            if c.misses >= 2 {
                *c = CachedName {
                    name: n.clone(),
                    misses: 0,
                };
            }
        } else if names.len() == i {
            if names.capacity() == 0 {
                names.reserve_exact(NAMES_CACHED);
            }
            names.push(CachedName {
                name: n.clone(),
                misses: 0,
            });
        }
    }
    Ok(n)
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

    #[test]
    fn header_values_are_slices_of_the_read_buffer() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nX-Pdx-Worker: w1\r\ncontent-type: application/json\r\ncontent-length: 2\r\nx-empty:\r\n\r\nok"[..],
        );
        let read = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let h = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(h.headers.len(), 4);
        for (k, v) in &h.headers {
            if !v.is_empty() {
                assert!(
                    read.contains(&(v.as_bytes().as_ptr() as usize)),
                    "{k}: a copy"
                );
            }
        }
        assert_eq!(h.headers["x-pdx-worker"], "w1");
        assert_eq!(h.headers["x-empty"], "");
        assert_eq!(h.framing, Framing::Length(2));
        assert_eq!(&buf[..], b"ok");
        // Values are still checked: obs-text is kept as it came, a control byte is refused.
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx-a: caf\xc3\xa9\r\n\r\n"[..]);
        let h = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(h.headers["x-a"].as_bytes(), "café".as_bytes());
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx-a: a\x01b\r\n\r\n"[..]);
        assert_eq!(parse_head(&mut buf, false).unwrap_err(), DecodeError::Head);
    }

    #[test]
    fn header_names_are_remembered_by_position() {
        let mut names = Vec::new();
        let a = cached_name(&mut names, 0, b"X-Pdx-Worker").unwrap();
        assert_eq!(a, "x-pdx-worker");
        // The same name (in any case) at the same position: the remembered one, its bytes shared.
        let b = cached_name(&mut names, 0, b"x-pdx-WORKER").unwrap();
        assert_eq!(b, "x-pdx-worker");
        assert_eq!(b.as_str().as_ptr(), names[0].name.as_str().as_ptr());
        // Another name there: parsed; it replaces the remembered one after two heads in a row.
        assert_eq!(cached_name(&mut names, 0, b"x-other").unwrap(), "x-other");
        assert_eq!(names[0].name, "x-pdx-worker");
        cached_name(&mut names, 0, b"x-pdx-worker").unwrap();
        assert_eq!(cached_name(&mut names, 0, b"x-other").unwrap(), "x-other");
        assert_eq!(names[0].name, "x-pdx-worker", "a hit between misses");
        cached_name(&mut names, 0, b"x-other").unwrap();
        assert_eq!(names[0].name, "x-other");
        // Invalid names are refused, whatever is remembered.
        assert!(cached_name(&mut names, 0, b"x-oth\xe9r").is_err());
        assert!(cached_name(&mut names, 0, b"x-other ").is_err());
        assert!(cached_name(&mut names, 1, b"bad name").is_err());
        // Positions fill in order; long names are not kept.
        cached_name(&mut names, 5, b"x-far").unwrap();
        cached_name(&mut names, 1, &[b'a'; NAME_CACHED_MAX + 1]).unwrap();
        assert_eq!(names.len(), 1);
        cached_name(&mut names, 1, b"date").unwrap();
        assert_eq!((names.len(), names[1].name.as_str()), (2, "date"));
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
