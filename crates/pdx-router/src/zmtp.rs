//! A minimal, bounded ZMTP 3.0 client (ZeroMQ's wire protocol, RFC 23/ZMTP, NULL security mechanism) for
//! the two sockets the KV-event subscriber needs: SUB (to an engine's PUB) and DEALER (to its replay
//! ROUTER). It speaks to libzmq (vLLM, SGLang) and to the `zeromq` crate (`pdx mock`).
//!
//! Why not a ZMQ library: the peer is a worker on the network, and neither the `zeromq` crate nor libzmq
//! by default bounds what a peer may send (a frame header may announce 2^63 bytes, which they try to
//! allocate). Here every frame and every message is checked against [`Limits`] before anything is
//! allocated for it, and anything out of protocol is an [`std::io::ErrorKind::InvalidData`] error that
//! ends the connection (the caller reconnects).
//!
//! Protocol, as used: each side sends the 64-byte greeting (signature `FF 00*8 7F`, version 3.0,
//! mechanism `NULL`, as-server 0); then a `READY` command with the property `Socket-Type`; then frames:
//! a flags byte (bit 0 MORE, bit 1 LONG, bit 2 COMMAND), a size (1 byte, or 8 bytes big-endian when LONG)
//! and the body. A SUB subscribes with the ZMTP 3.0 message `[0x01, topic...]`. `PING` commands are
//! answered with `PONG` (ZMTP 3.1 heartbeats); other commands are ignored.

use bytes::Bytes;
use std::io::{Error, ErrorKind};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Bounds of what a peer may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message (all frames), bytes.
    pub max_message_bytes: usize,
    /// Most frames in one message.
    pub max_frames: usize,
}

impl Default for Limits {
    /// 64 MiB, 16 frames: a KV event message has 3 frames, and a batch storing a 1M-token prompt fits.
    fn default() -> Self {
        Self {
            max_message_bytes: 64 << 20,
            max_frames: 16,
        }
    }
}

/// Largest command a peer may send, bytes (`READY` with a few properties, `PING`).
const MAX_COMMAND_BYTES: usize = 4096;

fn invalid(why: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidData, why.into())
}

/// An established ZMTP connection.
#[derive(Debug)]
pub struct Conn {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    limits: Limits,
}

/// The socket types of this client and the peers they accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketType {
    /// SUB, to a PUB or XPUB.
    Sub,
    /// DEALER, to a ROUTER.
    Dealer,
}

impl SocketType {
    fn name(self) -> &'static [u8] {
        match self {
            SocketType::Sub => b"SUB",
            SocketType::Dealer => b"DEALER",
        }
    }
    fn accepts(self, peer: &[u8]) -> bool {
        match self {
            SocketType::Sub => peer == b"PUB" || peer == b"XPUB",
            SocketType::Dealer => peer == b"ROUTER" || peer == b"DEALER",
        }
    }
}

fn greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3; // major
    g[11] = 0; // minor
    g[12..16].copy_from_slice(b"NULL");
    g
}

impl Conn {
    /// Connects to `addr` (`host:port`) as `kind`, within `timeout` for the TCP connect and handshake.
    ///
    /// Errors: connect errors, a timeout ([`ErrorKind::TimedOut`]), or a peer that does not speak ZMTP 3
    /// with the NULL mechanism as a compatible socket type ([`ErrorKind::InvalidData`]).
    pub async fn connect(
        addr: &str,
        kind: SocketType,
        timeout: Duration,
        limits: Limits,
    ) -> std::io::Result<Self> {
        tokio::time::timeout(timeout, Self::handshake(addr, kind, limits))
            .await
            .map_err(|_| Error::new(ErrorKind::TimedOut, "ZMTP connect timed out"))?
    }

    async fn handshake(addr: &str, kind: SocketType, limits: Limits) -> std::io::Result<Self> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut c = Conn {
            r: BufReader::with_capacity(64 * 1024, r),
            w,
            limits,
        };
        c.w.write_all(&greeting()).await?;
        let mut g = [0u8; 64];
        c.r.read_exact(&mut g).await?;
        if g[0] != 0xff || g[9] != 0x7f {
            return Err(invalid("not a ZMTP peer (bad greeting signature)"));
        }
        if g[10] < 3 {
            return Err(invalid(format!(
                "ZMTP version {}.{} (need 3)",
                g[10], g[11]
            )));
        }
        if &g[12..16] != b"NULL" || g[16..32].iter().any(|&b| b != 0) {
            return Err(invalid(
                "ZMTP peer wants a security mechanism other than NULL",
            ));
        }
        // READY with our socket type.
        let name = kind.name();
        let mut ready = Vec::with_capacity(32);
        ready.push(5);
        ready.extend_from_slice(b"READY");
        ready.push(11);
        ready.extend_from_slice(b"Socket-Type");
        ready.extend_from_slice(&(name.len() as u32).to_be_bytes());
        ready.extend_from_slice(name);
        c.write_frame(&ready, false, true).await?;
        c.w.flush().await?;
        // The peer's READY comes first.
        let (flags, body) = c.read_frame(MAX_COMMAND_BYTES).await?;
        if flags & 0x04 == 0 {
            return Err(invalid("ZMTP peer sent a message before READY"));
        }
        let peer = ready_socket_type(&body)?;
        if !kind.accepts(&peer) {
            return Err(invalid(format!(
                "ZMTP peer is a {} socket",
                String::from_utf8_lossy(&peer)
            )));
        }
        Ok(c)
    }

    async fn write_frame(&mut self, body: &[u8], more: bool, command: bool) -> std::io::Result<()> {
        let long = body.len() > 255;
        let flags = u8::from(more) | (u8::from(long) << 1) | (u8::from(command) << 2);
        self.w.write_u8(flags).await?;
        if long {
            self.w.write_u64(body.len() as u64).await?;
        } else {
            self.w.write_u8(body.len() as u8).await?;
        }
        self.w.write_all(body).await
    }

    /// Reads one frame of at most `max` bytes: its flags and body.
    async fn read_frame(&mut self, max: usize) -> std::io::Result<(u8, Vec<u8>)> {
        let flags = self.r.read_u8().await?;
        if flags & !0x07 != 0 {
            return Err(invalid(format!("ZMTP frame flags {flags:#04x}")));
        }
        let len = if flags & 0x02 != 0 {
            self.r.read_u64().await?
        } else {
            u64::from(self.r.read_u8().await?)
        };
        if len > max as u64 {
            return Err(invalid(format!(
                "ZMTP frame of {len} bytes (at most {max})"
            )));
        }
        let mut body = vec![0u8; len as usize];
        self.r.read_exact(&mut body).await?;
        Ok((flags, body))
    }

    /// Sends one message of `frames`.
    ///
    /// Errors: write errors.
    pub async fn send(&mut self, frames: &[&[u8]]) -> std::io::Result<()> {
        for (i, f) in frames.iter().enumerate() {
            self.write_frame(f, i + 1 < frames.len(), false).await?;
        }
        self.w.flush().await
    }

    /// SUB: subscribes to messages whose first frame starts with `topic` (empty: all).
    ///
    /// Errors: write errors.
    pub async fn subscribe(&mut self, topic: &[u8]) -> std::io::Result<()> {
        let mut m = Vec::with_capacity(1 + topic.len());
        m.push(1);
        m.extend_from_slice(topic);
        self.send(&[&m]).await
    }

    /// Receives the next message: its frames. Commands in between are handled (`PING` answered) and
    /// skipped.
    ///
    /// Errors: read errors, end of stream ([`ErrorKind::UnexpectedEof`]), a frame or message over the
    /// limits or out of protocol ([`ErrorKind::InvalidData`]).
    pub async fn recv(&mut self) -> std::io::Result<Vec<Bytes>> {
        let mut frames = Vec::new();
        let mut total = 0usize;
        loop {
            let left = self.limits.max_message_bytes - total;
            let peek_flags = peek_flags(&mut self.r).await?;
            let is_command = peek_flags & 0x04 != 0;
            let (flags, body) = self
                .read_frame(if is_command { MAX_COMMAND_BYTES } else { left })
                .await?;
            if is_command {
                if !frames.is_empty() {
                    return Err(invalid("ZMTP command inside a multipart message"));
                }
                self.on_command(&body).await?;
                continue;
            }
            total += body.len();
            frames.push(Bytes::from(body));
            if flags & 0x01 == 0 {
                return Ok(frames);
            }
            if frames.len() >= self.limits.max_frames {
                return Err(invalid(format!(
                    "ZMTP message of more than {} frames",
                    self.limits.max_frames
                )));
            }
        }
    }

    async fn on_command(&mut self, body: &[u8]) -> std::io::Result<()> {
        let Some((&n, rest)) = body.split_first() else {
            return Err(invalid("empty ZMTP command"));
        };
        let n = usize::from(n);
        if rest.len() < n {
            return Err(invalid("truncated ZMTP command name"));
        }
        if &rest[..n] == b"PING" {
            // PING: TTL (2 bytes), context (0..16 bytes); PONG echoes the context.
            let ctx = rest.get(n + 2..).unwrap_or(&[]);
            let ctx = &ctx[..ctx.len().min(16)];
            let mut pong = Vec::with_capacity(5 + ctx.len());
            pong.push(4);
            pong.extend_from_slice(b"PONG");
            pong.extend_from_slice(ctx);
            self.write_frame(&pong, false, true).await?;
            self.w.flush().await?;
        }
        Ok(())
    }
}

/// Peeks the flags byte of the next frame without consuming it.
async fn peek_flags(r: &mut BufReader<OwnedReadHalf>) -> std::io::Result<u8> {
    use tokio::io::AsyncBufReadExt;
    let b = r.fill_buf().await?;
    b.first()
        .copied()
        .ok_or_else(|| Error::new(ErrorKind::UnexpectedEof, "ZMTP peer closed"))
}

/// The `Socket-Type` property of a `READY` command body.
fn ready_socket_type(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let rest = body
        .strip_prefix(b"\x05READY")
        .ok_or_else(|| invalid("ZMTP peer's first command is not READY"))?;
    let mut p = rest;
    while !p.is_empty() {
        let n = usize::from(p[0]);
        let name = p.get(1..1 + n).ok_or_else(|| invalid("truncated READY"))?;
        let len_at = 1 + n;
        let len = p
            .get(len_at..len_at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| invalid("truncated READY"))?;
        let value = p
            .get(len_at + 4..len_at + 4 + len)
            .ok_or_else(|| invalid("truncated READY"))?;
        if name.eq_ignore_ascii_case(b"Socket-Type") {
            return Ok(value.to_vec());
        }
        p = &p[len_at + 4 + len..];
    }
    Err(invalid("READY without Socket-Type"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_properties_are_parsed_strictly() {
        let mut b = b"\x05READY".to_vec();
        b.push(8);
        b.extend_from_slice(b"Identity");
        b.extend_from_slice(&0u32.to_be_bytes());
        b.push(11);
        b.extend_from_slice(b"Socket-Type");
        b.extend_from_slice(&3u32.to_be_bytes());
        b.extend_from_slice(b"PUB");
        assert_eq!(ready_socket_type(&b).unwrap(), b"PUB");
        for cut in 6..b.len() - 1 {
            assert!(ready_socket_type(&b[..cut]).is_err(), "cut {cut}");
        }
        assert!(ready_socket_type(b"\x04PING").is_err());
        let mut huge = b"\x05READY\x0bSocket-Type".to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(ready_socket_type(&huge).is_err());
    }

    /// A fake peer: greeting, READY as `peer`, then `then` raw bytes.
    async fn fake_peer(peer: &'static [u8], then: Vec<u8>) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(&greeting()).await.unwrap();
            let mut ready = b"\x05READY\x0bSocket-Type".to_vec();
            ready.extend_from_slice(&(peer.len() as u32).to_be_bytes());
            ready.extend_from_slice(peer);
            s.write_all(&[0x04, ready.len() as u8]).await.unwrap();
            s.write_all(&ready).await.unwrap();
            s.write_all(&then).await.unwrap();
            let mut sink = vec![0u8; 4096];
            while let Ok(n) = s.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn oversized_frames_wrong_peers_and_long_messages_are_refused() {
        let lim = Limits {
            max_message_bytes: 1000,
            max_frames: 3,
        };
        let t = Duration::from_secs(5);
        // A frame announcing 2^63 bytes: refused before any allocation.
        let mut huge = vec![0x02];
        huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
        let a = fake_peer(b"PUB", huge).await;
        let mut c = Conn::connect(&a.to_string(), SocketType::Sub, t, lim)
            .await
            .unwrap();
        assert_eq!(c.recv().await.unwrap_err().kind(), ErrorKind::InvalidData);
        // Too many frames.
        let a = fake_peer(b"PUB", [0x01, 0x00].repeat(5)).await;
        let mut c = Conn::connect(&a.to_string(), SocketType::Sub, t, lim)
            .await
            .unwrap();
        assert_eq!(c.recv().await.unwrap_err().kind(), ErrorKind::InvalidData);
        // A DEALER does not talk to a PUB.
        let a = fake_peer(b"PUB", vec![]).await;
        let e = Conn::connect(&a.to_string(), SocketType::Dealer, t, lim)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidData);
        // A PING is answered and skipped; then a good 2-frame message.
        let mut ok = vec![0x04, 0x07, 0x04];
        ok.extend_from_slice(b"PING\x00\x00");
        ok.extend_from_slice(&[0x01, 0x01, b'a', 0x00, 0x02, b'b', b'c']);
        let a = fake_peer(b"XPUB", ok).await;
        let mut c = Conn::connect(&a.to_string(), SocketType::Sub, t, lim)
            .await
            .unwrap();
        let m = c.recv().await.unwrap();
        assert_eq!(m, vec![Bytes::from_static(b"a"), Bytes::from_static(b"bc")]);
    }
}
