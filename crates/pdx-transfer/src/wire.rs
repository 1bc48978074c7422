//! The agent wire protocol: framed messages over TCP for the metadata side channel, the TCP transport and
//! notifications, and over the agent's Unix socket for same-host peers (authentication, then the agent's metadata
//! and its memfds passed with `SCM_RIGHTS`).
//!
//! Every frame is a 24-byte header, a control body of `ctrl_len` bytes (postcard-encoded [`Ctrl`]), and, for
//! `ReadResponse` and `WriteRequest`, raw data whose length is the sum of the request's segment lengths:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `b"PDXF"` |
//! | 4 | protocol version (1) |
//! | 5 | frame kind ([`FrameKind`]) |
//! | 6..8 | reserved, 0 |
//! | 8..16 | request id, `u64` LE (0 when unused) |
//! | 16..20 | `ctrl_len`, `u32` LE, at most [`MAX_CTRL_BYTES`] |
//! | 20..24 | reserved, 0 |
//!
//! Data never goes through a buffer: the sender `writev`s straight from registered memory and the receiver
//! `readv`s straight into it, after validating every segment against its registrations.
//!
//! [`decode_frame`] parses a frame's header and control body from bytes (what a fuzz target calls); the agent's
//! connections run the same checks as they read.

use serde::{Deserialize, Serialize};

/// Frame magic.
pub const FRAME_MAGIC: [u8; 4] = *b"PDXF";
/// Wire protocol version.
pub const WIRE_VERSION: u8 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 24;
/// Upper bound of a control body, in bytes (2 MiB: metadata plus framing).
pub const MAX_CTRL_BYTES: u32 = 2 << 20;
/// Upper bound of segments in one request.
pub const MAX_SEGMENTS: usize = 1 << 16;
/// Upper bound of a notification payload, in bytes (64 KiB).
pub const MAX_NOTIF_BYTES: usize = 64 << 10;
/// Most memfds one `Memfds` frame carries (the kernel passes at most 253 descriptors per message).
pub const MAX_FDS_PER_FRAME: usize = pdx_sys::ipc::MAX_FDS_PER_MESSAGE;

/// Kind of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Initiator → target, first frame on a connection: who is calling.
    Hello = 1,
    /// Side channel: ask for the agent's metadata.
    GetMetadata = 2,
    /// Side channel: the agent's metadata.
    Metadata = 3,
    /// TCP transport: read these target segments.
    ReadRequest = 4,
    /// TCP transport: the data of a read, in request order.
    ReadResponse = 5,
    /// TCP transport: write the following data into these target segments.
    WriteRequest = 6,
    /// TCP transport: a write is complete.
    WriteAck = 7,
    /// A notification for the receiving agent.
    Notify = 8,
    /// The request failed on the target.
    Error = 9,
    /// Initiator → target, first frame when the initiator has a secret: who is calling, and its nonce
    /// ([`crate::auth`]).
    AuthHello = 10,
    /// Target → initiator: the target's nonce and its proof of the secret.
    Challenge = 11,
    /// Initiator → target: the initiator's proof of the secret.
    Auth = 12,
    /// Target → initiator: the initiator is authenticated.
    AuthOk = 13,
    /// Unix socket only: send your metadata and memfds.
    ShareMemory = 14,
    /// Unix socket only: the agent's metadata; `Memfds` frames with the descriptors follow.
    SharedMemory = 15,
    /// Unix socket only: memfds of these regions, attached to the frame with `SCM_RIGHTS`, in order.
    Memfds = 16,
    /// Keeps an idle connection from being closed by the peer's idle timeout; no answer.
    Ping = 17,
    /// Target → initiator: the connection is refused for want of the agent secret (body: `Error`); it closes.
    AuthError = 18,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<FrameKind> {
        use FrameKind::*;
        [
            Hello,
            GetMetadata,
            Metadata,
            ReadRequest,
            ReadResponse,
            WriteRequest,
            WriteAck,
            Notify,
            Error,
            AuthHello,
            Challenge,
            Auth,
            AuthOk,
            ShareMemory,
            SharedMemory,
            Memfds,
            Ping,
            AuthError,
        ]
        .into_iter()
        .find(|k| *k as u8 == v)
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Frame kind.
    pub kind: FrameKind,
    /// Request id the frame belongs to.
    pub req_id: u64,
    /// Control body length in bytes.
    pub ctrl_len: u32,
}

/// A header that failed to decode.
#[derive(Debug, PartialEq, Eq)]
pub struct HeaderError(pub String);

impl Header {
    /// Encodes into 24 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&FRAME_MAGIC);
        b[4] = WIRE_VERSION;
        b[5] = self.kind as u8;
        b[8..16].copy_from_slice(&self.req_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.ctrl_len.to_le_bytes());
        b
    }

    /// Decodes and validates a header. Errors: wrong magic or version, unknown kind, oversized control body.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, HeaderError> {
        if b[0..4] != FRAME_MAGIC {
            return Err(HeaderError("bad frame magic".into()));
        }
        if b[4] != WIRE_VERSION {
            return Err(HeaderError(format!("wire version {} unsupported", b[4])));
        }
        let kind = FrameKind::from_u8(b[5])
            .ok_or_else(|| HeaderError(format!("unknown kind {}", b[5])))?;
        let req_id = u64::from_le_bytes(b[8..16].try_into().unwrap_or_default());
        let ctrl_len = u32::from_le_bytes(b[16..20].try_into().unwrap_or_default());
        if ctrl_len > MAX_CTRL_BYTES {
            return Err(HeaderError(format!("control body of {ctrl_len} bytes")));
        }
        Ok(Header {
            kind,
            req_id,
            ctrl_len,
        })
    }
}

/// Control bodies, by frame kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ctrl {
    /// `Hello`: the initiator's agent name and instance id.
    Hello {
        /// Agent name.
        name: String,
        /// Agent instance id.
        instance_id: u64,
    },
    /// `GetMetadata`.
    GetMetadata,
    /// `Metadata`: encoded [`crate::AgentMetadata`].
    Metadata(Vec<u8>),
    /// `ReadRequest` / `WriteRequest`: target segments `(addr, len)` and an optional notification.
    Segments {
        /// Target ranges, in order.
        segs: Vec<(u64, u64)>,
        /// Notification delivered to the target when the transfer completes.
        notif: Option<Vec<u8>>,
    },
    /// `ReadResponse` / `WriteAck`: nothing more.
    Empty,
    /// `Notify`: the payload.
    Notify(Vec<u8>),
    /// `Error`: what failed.
    Error(String),
    /// `AuthHello`: the initiator's agent name, instance id and nonce.
    AuthHello {
        /// Agent name.
        name: String,
        /// Agent instance id.
        instance_id: u64,
        /// The initiator's random nonce.
        nonce: [u8; crate::auth::NONCE_LEN],
    },
    /// `Challenge`: the target's nonce and proof.
    Challenge {
        /// The target's random nonce.
        nonce: [u8; crate::auth::NONCE_LEN],
        /// HMAC-SHA256 proof of the secret over both nonces.
        proof: [u8; crate::auth::PROOF_LEN],
    },
    /// `Auth`: the initiator's proof.
    Auth {
        /// HMAC-SHA256 proof of the secret over both nonces and the initiator's name.
        proof: [u8; crate::auth::PROOF_LEN],
    },
    /// `SharedMemory`: encoded [`crate::AgentMetadata`] and how many memfds follow in `Memfds` frames.
    SharedMemory {
        /// The agent's metadata (the same bytes as [`crate::Agent::local_metadata`]).
        metadata: Vec<u8>,
        /// Memfds that follow.
        memfds: u32,
    },
    /// `Memfds`: the region ids of the descriptors attached to this frame, in order.
    Memfds {
        /// Region ids (1..=[`MAX_FDS_PER_FRAME`]).
        region_ids: Vec<u64>,
    },
}

impl Ctrl {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes a body and checks its limits. Errors: malformed bytes, too many segments, oversized notification,
    /// a zero-length or overflowing segment.
    pub fn decode(bytes: &[u8]) -> Result<Ctrl, HeaderError> {
        let (ctrl, rest): (Ctrl, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(|e| HeaderError(e.to_string()))?;
        if !rest.is_empty() {
            return Err(HeaderError("trailing bytes after control body".into()));
        }
        match &ctrl {
            Ctrl::Segments { segs, notif } => {
                if segs.is_empty() || segs.len() > MAX_SEGMENTS {
                    return Err(HeaderError(format!("{} segments", segs.len())));
                }
                if notif.as_ref().is_some_and(|n| n.len() > MAX_NOTIF_BYTES) {
                    return Err(HeaderError("notification too large".into()));
                }
                if segs
                    .iter()
                    .any(|&(a, l)| l == 0 || a.checked_add(l).is_none())
                {
                    return Err(HeaderError("empty or overflowing segment".into()));
                }
                segs.iter()
                    .try_fold(0u64, |acc, s| acc.checked_add(s.1))
                    .ok_or_else(|| HeaderError("total length overflows".into()))?;
            }
            Ctrl::Notify(p) if p.len() > MAX_NOTIF_BYTES => {
                return Err(HeaderError("notification too large".into()))
            }
            Ctrl::Hello { name, .. } | Ctrl::AuthHello { name, .. }
                if name.is_empty() || name.len() > 256 =>
            {
                return Err(HeaderError("bad agent name".into()))
            }
            Ctrl::Metadata(md) | Ctrl::SharedMemory { metadata: md, .. }
                if md.len() > crate::metadata::MAX_METADATA_BYTES =>
            {
                return Err(HeaderError("metadata too large".into()))
            }
            Ctrl::SharedMemory { memfds, .. }
                if *memfds as usize > crate::metadata::MAX_REGIONS =>
            {
                return Err(HeaderError(format!("{memfds} memfds")))
            }
            Ctrl::Memfds { region_ids }
                if region_ids.is_empty() || region_ids.len() > MAX_FDS_PER_FRAME =>
            {
                return Err(HeaderError(format!(
                    "{} memfds in one frame",
                    region_ids.len()
                )))
            }
            Ctrl::Error(m) if m.len() > MAX_NOTIF_BYTES => {
                return Err(HeaderError("error message too large".into()))
            }
            _ => {}
        }
        Ok(ctrl)
    }

    /// True when this body is what a frame of `kind` carries.
    pub fn fits(&self, kind: FrameKind) -> bool {
        use FrameKind as K;
        matches!(
            (kind, self),
            (K::Hello, Ctrl::Hello { .. })
                | (K::GetMetadata, Ctrl::GetMetadata | Ctrl::Empty)
                | (K::Metadata, Ctrl::Metadata(_))
                | (K::ReadRequest | K::WriteRequest, Ctrl::Segments { .. })
                | (
                    K::ReadResponse | K::WriteAck | K::AuthOk | K::ShareMemory | K::Ping,
                    Ctrl::Empty
                )
                | (K::Notify, Ctrl::Notify(_))
                | (K::Error | K::AuthError, Ctrl::Error(_))
                | (K::AuthHello, Ctrl::AuthHello { .. })
                | (K::Challenge, Ctrl::Challenge { .. })
                | (K::Auth, Ctrl::Auth { .. })
                | (K::SharedMemory, Ctrl::SharedMemory { .. })
                | (K::Memfds, Ctrl::Memfds { .. })
        )
    }
}

/// Decodes one frame's header and control body from the start of `bytes`, with every check a connection applies:
/// magic, version, kind, the control body's size and limits, and a body that fits the kind. Returns the header,
/// the body, and the bytes consumed (raw data of `ReadResponse`/`WriteRequest` follows them and is not read).
/// The entry point for fuzzing the agent protocol.
///
/// Errors: [`HeaderError`] for anything malformed or truncated; never a panic.
pub fn decode_frame(bytes: &[u8]) -> Result<(Header, Ctrl, usize), HeaderError> {
    let hdr: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| HeaderError("truncated header".into()))?;
    let header = Header::decode(hdr)?;
    let end = HEADER_LEN + header.ctrl_len as usize;
    let body = bytes
        .get(HEADER_LEN..end)
        .ok_or_else(|| HeaderError("truncated control body".into()))?;
    let ctrl = Ctrl::decode(body)?;
    if !ctrl.fits(header.kind) {
        return Err(HeaderError(format!(
            "{:?} frame with a mismatched body",
            header.kind
        )));
    }
    Ok((header, ctrl, end))
}

/// Encodes a whole control frame (header and body) into one buffer.
pub fn encode_frame(kind: FrameKind, req_id: u64, ctrl: &Ctrl) -> Vec<u8> {
    let body = ctrl.encode();
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(
        &Header {
            kind,
            req_id,
            ctrl_len: body.len() as u32,
        }
        .encode(),
    );
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_roundtrip_and_rejects() {
        let h = Header {
            kind: FrameKind::WriteRequest,
            req_id: 99,
            ctrl_len: 1000,
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let mut b = h.encode();
        b[5] = 200;
        assert!(Header::decode(&b).is_err());
        let mut b = h.encode();
        b[16..20].copy_from_slice(&(MAX_CTRL_BYTES + 1).to_le_bytes());
        assert!(Header::decode(&b).is_err());
        let mut b = h.encode();
        b[4] = 9;
        assert!(Header::decode(&b).is_err());
    }

    #[test]
    fn decode_frame_checks_kind_body_and_truncation() {
        let f = encode_frame(
            FrameKind::Auth,
            0,
            &Ctrl::Auth {
                proof: [7; crate::auth::PROOF_LEN],
            },
        );
        let (h, c, n) = decode_frame(&f).unwrap();
        assert_eq!((h.kind, n), (FrameKind::Auth, f.len()));
        assert!(matches!(c, Ctrl::Auth { .. }));
        assert!(decode_frame(&f[..f.len() - 1]).is_err());
        assert!(decode_frame(&f[..10]).is_err());
        // A body that does not fit its kind: a WriteRequest without segments.
        assert!(decode_frame(&encode_frame(FrameKind::WriteRequest, 1, &Ctrl::Empty)).is_err());
        // Memfd frames carry 1..=128 ids.
        let many = Ctrl::Memfds {
            region_ids: (0..MAX_FDS_PER_FRAME as u64 + 1).collect(),
        };
        assert!(decode_frame(&encode_frame(FrameKind::Memfds, 0, &many)).is_err());
    }

    #[test]
    fn segments_limits() {
        let ok = Ctrl::Segments {
            segs: vec![(10, 5)],
            notif: Some(b"x".to_vec()),
        };
        assert_eq!(Ctrl::decode(&ok.encode()).unwrap(), ok);
        for bad in [
            Ctrl::Segments {
                segs: vec![],
                notif: None,
            },
            Ctrl::Segments {
                segs: vec![(10, 0)],
                notif: None,
            },
            Ctrl::Segments {
                segs: vec![(u64::MAX, 2)],
                notif: None,
            },
            Ctrl::Segments {
                segs: vec![(0, u64::MAX / 2 + 1), (0, u64::MAX / 2 + 1)],
                notif: None,
            },
            Ctrl::Notify(vec![0; MAX_NOTIF_BYTES + 1]),
        ] {
            assert!(Ctrl::decode(&bad.encode()).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn header_decode_never_panics(bytes in proptest::array::uniform24(any::<u8>())) {
            let _ = Header::decode(&bytes);
        }

        #[test]
        fn ctrl_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Ctrl::decode(&bytes);
        }

        #[test]
        fn decode_frame_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame(&bytes);
        }

        #[test]
        fn decode_frame_never_panics_on_mutated_frames(
            which in 0usize..4, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)
        ) {
            let mut f = match which {
                0 => encode_frame(FrameKind::AuthHello, 0, &Ctrl::AuthHello {
                    name: "decode".into(), instance_id: 9, nonce: [3; 32] }),
                1 => encode_frame(FrameKind::Challenge, 0, &Ctrl::Challenge { nonce: [1; 32], proof: [2; 32] }),
                2 => encode_frame(FrameKind::Memfds, 0, &Ctrl::Memfds { region_ids: vec![1, 2, 3] }),
                _ => encode_frame(FrameKind::WriteRequest, 5, &Ctrl::Segments {
                    segs: vec![(4096, 64)], notif: Some(b"n".to_vec()) }),
            };
            for (at, x) in flips {
                let i = at % f.len();
                f[i] ^= x;
            }
            let _ = decode_frame(&f);
        }

        #[test]
        fn ctrl_roundtrip(segs in proptest::collection::vec((0u64..1 << 40, 1u64..1 << 20), 1..50),
                          notif in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..100))) {
            let c = Ctrl::Segments { segs, notif };
            prop_assert_eq!(Ctrl::decode(&c.encode()).unwrap(), c);
        }
    }
}
