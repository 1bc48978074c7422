//! What the two floors (`pd_floor`: epoll, `pd_floor_uring`: io_uring) share, so that both do exactly the same
//! socket work: the flags, the prebuilt upstream requests and the minimal HTTP/1.1 framing. Not an example of
//! its own (cargo finds examples as `examples/*.rs` and `examples/*/main.rs`); each floor includes it with
//! `#[path = "floor/mod.rs"] mod floor;`.

use std::io::{self, ErrorKind};
use std::net::{SocketAddr, ToSocketAddrs};

use pdx_protocol::{ChatCompletionRequest, KvTransferParams};

/// First size of every connection's buffers, bytes (grown by doubling for a larger message).
pub const BUF: usize = 16 * 1024;
/// Index of the client socket in a connection's sockets (`pd_floor`'s tokens; the io_uring floor has none).
#[allow(dead_code)]
pub const CLIENT: usize = 0;
/// Index of the prefill upstream.
pub const PREFILL: usize = 1;
/// Index of the decode upstream.
pub const DECODE: usize = 2;

const PREFILL_BODY: &str = r#"{"model":"mock","messages":[{"role":"user","content":"the quick brown fox jumps over the lazy dog"}],"max_tokens":1,"stream":false,"kv_transfer_params":{"do_remote_decode":true,"do_remote_prefill":false}}"#;
const DECODE_BODY: &str = r#"{"model":"mock","messages":[{"role":"user","content":"the quick brown fox jumps over the lazy dog"}],"max_tokens":16,"kv_transfer_params":{"do_remote_decode":false,"do_remote_prefill":true}}"#;

/// The listen address and the upstreams, from the command line.
pub struct Setup {
    /// Where to listen.
    pub bind: SocketAddr,
    /// Upstream addresses, by `PREFILL` / `DECODE` (`CLIENT`'s slot repeats the prefill's, unused).
    pub addr: [SocketAddr; 3],
    /// The prebuilt request for each upstream (`CLIENT`'s slot empty).
    pub req: [Vec<u8>; 3],
}

/// Reads `--host` (default 127.0.0.1), `--port` (default `default_port`), `--prefill URL`, `--decode URL`.
pub fn setup(name: &str, default_port: u16) -> io::Result<Setup> {
    let (mut host, mut port) = ("127.0.0.1".to_string(), default_port);
    let (mut prefill, mut decode) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| invalid(format!("{flag} needs a value")))?;
        match flag.as_str() {
            "--host" => host = value,
            "--port" => {
                port = value
                    .parse()
                    .map_err(|_| invalid(format!("bad --port {value}")))?
            }
            "--prefill" => prefill = Some(value),
            "--decode" => decode = Some(value),
            _ => {
                return Err(invalid(format!(
                    "{name}: unknown flag {flag} (--host, --port, --prefill, --decode)"
                )))
            }
        }
    }
    let (pa, pre) = upstream(
        &prefill.ok_or_else(|| invalid("--prefill URL is required".into()))?,
        PREFILL_BODY,
    )?;
    let (da, dec) = upstream(
        &decode.ok_or_else(|| invalid("--decode URL is required".into()))?,
        DECODE_BODY,
    )?;
    let bind = (host.as_str(), port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| invalid(format!("no address for {host}")))?;
    Ok(Setup {
        bind,
        addr: [pa, pa, da],
        req: [Vec::new(), pre, dec],
    })
}

/// A listening socket on `bind` with a backlog of 1024 (mio's and std's `bind` use 128: too few for hundreds of
/// connections at once), `SO_REUSEADDR`, no `SO_REUSEPORT` (a second floor on the port fails instead of sharing).
#[allow(dead_code)] // `pd_floor_uring` binds through monoio
pub fn listener(bind: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&bind.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// An `InvalidInput` error with `msg`.
pub fn invalid(msg: String) -> io::Error {
    io::Error::new(ErrorKind::InvalidInput, msg)
}

/// `http://host:port[/...]` -> the address and the prebuilt POST for `body`, with `Host: host:port`.
fn upstream(url: &str, body: &str) -> io::Result<(SocketAddr, Vec<u8>)> {
    let authority = url
        .strip_prefix("http://")
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default();
    let addr = authority
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| invalid(format!("no address for {url}")))?;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    Ok((addr, req.into_bytes()))
}

/// Longest head a floor waits for, bytes (a peer that never ends its head is dropped, not buffered forever).
const MAX_HEAD: usize = 64 * 1024;
/// Longest message a floor takes, bytes (a peer's `Content-Length` is not trusted beyond it).
const MAX_MESSAGE: usize = 16 << 20;

/// Length of the first complete HTTP/1.1 message in `buf`, if it is all there: head, then `Content-Length` bytes
/// (none without the header), or for a `Transfer-Encoding: chunked` response everything up to the `0\r\n\r\n`
/// last chunk (minimal: trailers are not supported and the terminator must end what was read).
/// `Err`: an unreadable `Content-Length`, no head within [`MAX_HEAD`] bytes, a message over [`MAX_MESSAGE`].
pub fn message_len(buf: &[u8], response: bool) -> io::Result<Option<usize>> {
    let Some(head) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else {
        if buf.len() > MAX_HEAD {
            return Err(invalid("head too long".into()));
        }
        return Ok(None);
    };
    let mut body = 0;
    for line in buf[..head - 4].split(|&b| b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            body = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| invalid("bad Content-Length".into()))?;
        } else if response
            && name.eq_ignore_ascii_case(b"transfer-encoding")
            && value.windows(7).any(|w| w.eq_ignore_ascii_case(b"chunked"))
        {
            let rest = &buf[head..];
            let done = rest == b"0\r\n\r\n" || rest.ends_with(b"\r\n0\r\n\r\n");
            return Ok(done.then_some(buf.len()));
        }
    }
    let len = head
        .checked_add(body)
        .filter(|&n| n <= MAX_MESSAGE)
        .ok_or_else(|| invalid("message too long".into()))?;
    Ok((buf.len() >= len).then_some(len))
}

/// `PD_FLOOR_WORK=1` (a benchmark variant, off by default): a floor also does the JSON work pdx does per request,
/// with pdx's own code: the client's chat body parsed and validated (`pdx_protocol::sampling::parse_chat`), the
/// prefill body serialized from it (`stream` false, `max_tokens` 1, `kv_transfer_params` asking for a remote
/// decode), the prefill answer's `kv_transfer_params` parsed, the decode body serialized with them; the upstream
/// requests are built per request. What is left between such a floor and `pdx serve` is the router's machinery
/// (futures and tasks, timers, `http` types, metrics, policies): docs/benchmarks.md "Allocations per request
/// (issue 19, tenth session)" and "The work floors, the stream floor, and what the bars allow (issue 19, eleventh
/// session)".
#[allow(dead_code)] // `pd_floor_ring` does not do the work
pub fn work_asked() -> bool {
    std::env::var("PD_FLOOR_WORK").is_ok_and(|v| v == "1")
}

/// The part of a prefill answer read (as pdx reads it).
#[allow(dead_code)] // `pd_floor_ring` does not do the work
#[derive(serde::Deserialize)]
struct PrefillAnswer {
    #[serde(default)]
    kv_transfer_params: Option<KvTransferParams>,
}

/// One connection's `PD_FLOOR_WORK` state: the upstream request heads (up to `Content-Length: `) and the parsed
/// client request between its prefill and its decode.
#[allow(dead_code)] // `pd_floor_ring` does not do the work
pub struct Work {
    head: [Vec<u8>; 3],
    chat: Option<ChatCompletionRequest>,
}

#[allow(dead_code)] // `pd_floor_ring` does not do the work
impl Work {
    /// From the prebuilt prefill and decode requests of [`Setup::req`].
    pub fn new(prefill: &[u8], decode: &[u8]) -> Work {
        Work {
            head: [
                Vec::new(),
                head_to_length(prefill).to_vec(),
                head_to_length(decode).to_vec(),
            ],
            chat: None,
        }
    }

    /// Parses the client request `msg` (head and body) and writes the prefill request into `out`.
    pub fn prefill_request(&mut self, msg: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let (mut chat, _) = pdx_protocol::sampling::parse_chat(&msg[body_start(msg)..])
            .map_err(|e| io::Error::new(ErrorKind::InvalidData, e.message))?;
        // The prefill's fields set for its body, the client's put back for the decode's.
        let stream = chat.stream.replace(false);
        let limit = chat.max_tokens.replace(1);
        chat.kv_transfer_params = Some(KvTransferParams::for_prefill());
        let body = serde_json::to_vec(&chat)?;
        build_request(out, &self.head[PREFILL], &body);
        (chat.stream, chat.max_tokens, chat.kv_transfer_params) = (stream, limit, None);
        self.chat = Some(chat);
        Ok(())
    }

    /// Reads the prefill answer `msg`'s `kv_transfer_params` and writes the decode request with them into `out`.
    pub fn decode_request(&mut self, msg: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let answer: PrefillAnswer = serde_json::from_slice(&msg[body_start(msg)..])?;
        let mut chat = self.chat.take().ok_or(ErrorKind::InvalidInput)?;
        chat.kv_transfer_params = answer.kv_transfer_params;
        let body = serde_json::to_vec(&chat)?;
        build_request(out, &self.head[DECODE], &body);
        Ok(())
    }
}

/// Writes `head`, the length of `body`, a blank line and `body` into `out`.
#[allow(dead_code)] // `pd_floor_ring` does not do the work
fn build_request(out: &mut Vec<u8>, head: &[u8], body: &[u8]) {
    out.clear();
    out.extend_from_slice(head);
    out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

/// A prebuilt request (it ends with `Content-Length: N\r\n\r\n{body}`) up to the length's number.
#[allow(dead_code)] // `pd_floor_ring` builds no request
fn head_to_length(req: &[u8]) -> &[u8] {
    let at = memchr::memmem::find(req, b"Content-Length: ").map_or(0, |p| p + 16);
    &req[..at]
}

/// Where the body of the message `msg` starts (after its head's blank line).
#[allow(dead_code)] // `pd_floor_ring` does not do the work
fn body_start(msg: &[u8]) -> usize {
    memchr::memmem::find(msg, b"\r\n\r\n").map_or(msg.len(), |p| p + 4)
}

/// `PD_FLOOR_STREAM=1` (a benchmark variant of `pd_floor_uring`, off by default): the decode request is a streamed
/// completion (1000 tokens, as `benches/router_stream.lua` asks) and its answer is relayed to the client read by
/// read, as it comes: the floor of forwarding SSE chunks.
#[allow(dead_code)] // only `pd_floor_uring` streams
pub fn stream_asked() -> bool {
    std::env::var("PD_FLOOR_STREAM").is_ok_and(|v| v == "1")
}

/// The decode request of [`stream_asked`]: `decode` (a prebuilt request of [`Setup::req`]) with a streamed
/// completion's body.
#[allow(dead_code)] // only `pd_floor_uring` streams
pub fn stream_request(decode: &[u8]) -> Vec<u8> {
    const BODY: &[u8] = br#"{"model":"mock","prompt":"the quick brown fox","max_tokens":1000,"ignore_eos":true,"stream":true,"kv_transfer_params":{"do_remote_decode":false,"do_remote_prefill":true}}"#;
    let head = String::from_utf8_lossy(head_to_length(decode))
        .replace("/v1/chat/completions", "/v1/completions");
    let mut out = Vec::new();
    build_request(&mut out, head.as_bytes(), BODY);
    out
}
