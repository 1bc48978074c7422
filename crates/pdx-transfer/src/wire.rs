//! The agent wire protocol: framed messages over TCP for the metadata side channel, the TCP transport and
//! notifications.
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
            Ctrl::Hello { name, .. } if name.is_empty() || name.len() > 256 => {
                return Err(HeaderError("bad agent name".into()))
            }
            _ => {}
        }
        Ok(ctrl)
    }
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
        fn ctrl_roundtrip(segs in proptest::collection::vec((0u64..1 << 40, 1u64..1 << 20), 1..50),
                          notif in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..100))) {
            let c = Ctrl::Segments { segs, notif };
            prop_assert_eq!(Ctrl::decode(&c.encode()).unwrap(), c);
        }
    }
}
