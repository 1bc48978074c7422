//! Agent metadata: what a peer needs to reach an agent's registered memory.
//!
//! Wire format (version 1): `b"PDXM"`, version `u16` little endian, then the [`AgentMetadata`] struct in
//! postcard encoding. The whole blob is at most [`MAX_METADATA_BYTES`]. Decoding checks every limit, so
//! malformed or hostile bytes give [`TransferError::BadMetadata`], never a panic.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TransferError};
use crate::memory::MemoryKind;
use crate::transport::TransportKind;

/// Magic prefix of encoded metadata.
pub const METADATA_MAGIC: [u8; 4] = *b"PDXM";
/// Metadata format version written by this build.
pub const METADATA_VERSION: u16 = 1;
/// Upper bound of an encoded metadata blob, in bytes (1 MiB).
pub const MAX_METADATA_BYTES: usize = 1 << 20;
/// Upper bound of regions in one agent's metadata.
pub const MAX_REGIONS: usize = 65_536;
/// Upper bound of an agent name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// One registered region as peers see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionMetadata {
    /// Agent-unique region id.
    pub id: u64,
    /// Memory kind.
    pub kind: MemoryKind,
    /// Start address in the owner's address space.
    pub addr: u64,
    /// Length in bytes (> 0).
    pub len: u64,
    /// memfd descriptor number in the owner, for same-host mapping (`/proc/<pid>/fd/<n>`); `None` for
    /// caller-owned memory, reached by CMA or TCP instead.
    pub memfd: Option<i32>,
}

/// Everything a peer needs to transfer to and from an agent. Produced by [`crate::Agent::local_metadata`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMetadata {
    /// Agent name, unique among the agents that talk to each other (1..=256 bytes).
    pub name: String,
    /// Random id of this agent instance: a restarted agent with the same name has a new one.
    pub instance_id: u64,
    /// Host identity (boot id and namespaces): equal ids can use memfd mapping and CMA.
    pub host_id: String,
    /// Owner process id.
    pub pid: u32,
    /// `ip:port` of the agent's listener (TCP transport, notifications, metadata side channel).
    pub listen_addr: Option<String>,
    /// Transports the agent serves.
    pub transports: Vec<TransportKind>,
    /// Registered regions sorted by address, non-overlapping.
    pub regions: Vec<RegionMetadata>,
}

fn bad(reason: impl Into<String>) -> TransferError {
    TransferError::BadMetadata(reason.into())
}

impl AgentMetadata {
    /// Encodes to the versioned wire format. Errors: [`TransferError::BadMetadata`] when over the size limit.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(64 + self.regions.len() * 24);
        out.extend_from_slice(&METADATA_MAGIC);
        out.extend_from_slice(&METADATA_VERSION.to_le_bytes());
        let out = postcard::to_extend(self, out).map_err(|e| bad(e.to_string()))?;
        if out.len() > MAX_METADATA_BYTES {
            return Err(bad(format!(
                "{} bytes exceeds the {MAX_METADATA_BYTES}-byte limit",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Decodes and validates bytes from [`AgentMetadata::encode`].
    ///
    /// Errors: [`TransferError::BadMetadata`] for a wrong magic or version, truncated or trailing bytes, and any
    /// limit violated (size, name length, region count, zero-length, overflowing or overlapping regions).
    pub fn decode(bytes: &[u8]) -> Result<AgentMetadata> {
        if bytes.len() > MAX_METADATA_BYTES {
            return Err(bad("blob larger than the limit"));
        }
        let body = bytes
            .strip_prefix(&METADATA_MAGIC)
            .ok_or_else(|| bad("missing PDXM magic"))?;
        let (version, body) = body
            .split_first_chunk::<2>()
            .ok_or_else(|| bad("truncated version"))?;
        let version = u16::from_le_bytes(*version);
        if version != METADATA_VERSION {
            return Err(bad(format!(
                "version {version}, this build reads {METADATA_VERSION}"
            )));
        }
        let (md, rest): (AgentMetadata, &[u8]) =
            postcard::take_from_bytes(body).map_err(|e| bad(e.to_string()))?;
        if !rest.is_empty() {
            return Err(bad(format!("{} trailing bytes", rest.len())));
        }
        md.validate()?;
        Ok(md)
    }

    fn validate(&self) -> Result<()> {
        if self.name.is_empty() || self.name.len() > MAX_NAME_BYTES {
            return Err(bad("agent name must be 1..=256 bytes"));
        }
        if self.regions.len() > MAX_REGIONS
            || self.transports.len() > 16
            || self.host_id.len() > 1024
        {
            return Err(bad("too many regions or transports, or host id too long"));
        }
        let mut prev_end = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            let end = r
                .addr
                .checked_add(r.len)
                .ok_or_else(|| bad(format!("region {i} overflows the address space")))?;
            if r.len == 0 {
                return Err(bad(format!("region {i} is empty")));
            }
            if i > 0 && r.addr < prev_end {
                return Err(bad(format!("region {i} overlaps or is out of order")));
            }
            prev_end = end;
        }
        Ok(())
    }

    /// The region containing all of `[addr, addr+len)`, with its index and the offset in it.
    pub fn find_region(&self, addr: u64, len: u64) -> Option<(usize, u64)> {
        let pos = self.regions.partition_point(|r| r.addr <= addr);
        let idx = pos.checked_sub(1)?;
        let r = &self.regions[idx];
        let off = addr - r.addr;
        (off.checked_add(len)? <= r.len).then_some((idx, off))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> AgentMetadata {
        AgentMetadata {
            name: "prefill-0".into(),
            instance_id: 42,
            host_id: "boot|ns".into(),
            pid: 1234,
            listen_addr: Some("127.0.0.1:5600".into()),
            transports: vec![TransportKind::Shm, TransportKind::Tcp],
            regions: vec![
                RegionMetadata {
                    id: 1,
                    kind: MemoryKind::Host,
                    addr: 0x1000,
                    len: 4096,
                    memfd: Some(7),
                },
                RegionMetadata {
                    id: 2,
                    kind: MemoryKind::Host,
                    addr: 0x10000,
                    len: 100,
                    memfd: None,
                },
            ],
        }
    }

    #[test]
    fn roundtrip() {
        let md = sample();
        assert_eq!(AgentMetadata::decode(&md.encode().unwrap()).unwrap(), md);
    }

    #[test]
    fn rejects_wrong_magic_version_and_trailing_bytes() {
        let bytes = sample().encode().unwrap();
        let mut wrong = bytes.clone();
        wrong[0] = b'X';
        assert!(AgentMetadata::decode(&wrong).is_err());
        let mut v2 = bytes.clone();
        v2[4] = 2;
        assert!(AgentMetadata::decode(&v2)
            .unwrap_err()
            .to_string()
            .contains("version 2"));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(AgentMetadata::decode(&trailing).is_err());
        assert!(AgentMetadata::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn rejects_overlapping_empty_and_overflowing_regions() {
        let mut md = sample();
        md.regions[1].addr = 0x1800; // inside region 0
        assert!(AgentMetadata::decode(&md.encode().unwrap()).is_err());
        let mut md = sample();
        md.regions[0].len = 0;
        assert!(AgentMetadata::decode(&md.encode().unwrap()).is_err());
        let mut md = sample();
        md.regions[1].addr = u64::MAX - 10;
        assert!(AgentMetadata::decode(&md.encode().unwrap()).is_err());
        let mut md = sample();
        md.name = String::new();
        assert!(AgentMetadata::decode(&md.encode().unwrap()).is_err());
    }

    #[test]
    fn find_region_requires_full_containment() {
        let md = sample();
        assert_eq!(md.find_region(0x1000, 4096), Some((0, 0)));
        assert_eq!(md.find_region(0x1800, 16), Some((0, 0x800)));
        assert_eq!(md.find_region(0x1800, 4096), None);
        assert_eq!(md.find_region(0x0, 1), None);
        assert_eq!(md.find_region(0x10000 + 99, 1), Some((1, 99)));
        assert_eq!(md.find_region(u64::MAX, 2), None);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = AgentMetadata::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_mutated_valid_blobs(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = sample().encode().unwrap();
            for (i, b) in flips {
                let i = i.index(bytes.len());
                bytes[i] ^= b;
            }
            let cut = cut.index(bytes.len() + 1);
            if let Ok(md) = AgentMetadata::decode(&bytes[..cut]) {
                // Whatever decodes satisfies the invariants.
                prop_assert!(!md.name.is_empty());
                prop_assert!(md.regions.iter().all(|r| r.len > 0));
            }
        }
    }
}
