//! Agent metadata: what a peer needs to reach an agent's registered memory.
//!
//! Metadata from the network is untrusted: [`AgentMetadata::decode`] (or [`AgentMetadata::decode_ext`]) checks its
//! form and limits (they are the fuzzing entry points), and nothing in it selects local memory to touch.
//!
//! Wire format (version 1): `b"PDXM"`, version `u16` little endian, then the [`AgentMetadata`] struct in
//! postcard encoding. The whole blob is at most [`MAX_METADATA_BYTES`]. Decoding checks every limit, so
//! malformed or hostile bytes give [`TransferError::BadMetadata`], never a panic.
//!
//! Version 2 (written only by agents that serve UCX) appends a [`UcxMetadata`] in postcard encoding after the
//! version 1 body: the UCX worker address and one packed rkey per region. Agents without UCX keep writing
//! version 1, byte for byte as before, so older peers still read them; this build reads both.
//!
//! Version 3 (written only by agents with GPU memory registered) appends `Option<UcxMetadata>` and then a
//! [`CudaMetadata`] (the CUDA IPC handle of each device region) after the version 1 body. Agents without GPU
//! regions keep writing version 1 or 2 exactly as before; this build reads all three.
//!
//! Version 4 is version 3 whose IPC handles also carry the offset of each region in its CUDA allocation (device
//! memory registered by pointer inside a larger allocation, [`pdx_cuda::DeviceBuffer::from_raw`]). It is written
//! only when some offset is not 0, so metadata of agents whose device regions are whole allocations stays
//! version 3, byte for byte, and older peers keep reading it.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TransferError};
use crate::memory::MemoryKind;
use crate::transport::TransportKind;

/// Magic prefix of encoded metadata.
pub const METADATA_MAGIC: [u8; 4] = *b"PDXM";
/// Metadata format version written by this build (by agents without UCX).
pub const METADATA_VERSION: u16 = 1;
/// Metadata format version with the [`UcxMetadata`] extension.
pub const METADATA_VERSION_UCX: u16 = 2;
/// Metadata format version with the [`CudaMetadata`] extension (and an optional UCX one), IPC handles without
/// offsets (every offset 0).
pub const METADATA_VERSION_CUDA: u16 = 3;
/// Metadata format version 3 with an offset in each IPC handle (written when some offset is not 0).
pub const METADATA_VERSION_CUDA_OFFSET: u16 = 4;
/// Upper bound of a UCX worker address or packed rkey, in bytes.
pub const MAX_UCX_BLOB_BYTES: usize = 64 << 10;
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
    /// `Some` for a memfd arena the owner shares with same-host peers over its Unix socket (the number is the
    /// owner's descriptor, informational only: peers receive the descriptor itself, never open it by number);
    /// `None` for caller-owned memory, reached by CMA or TCP instead.
    pub memfd: Option<i32>,
}

/// Everything a peer needs to transfer to and from an agent. Produced by [`crate::Agent::local_metadata`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMetadata {
    /// Agent name, unique among the agents that talk to each other (1..=256 bytes).
    pub name: String,
    /// Random id of this agent instance: a restarted agent with the same name has a new one.
    pub instance_id: u64,
    /// Host identity (boot id and namespaces). A hint: an agent with an equal id tries the peer's Unix socket,
    /// where the kernel, not this field, says whether the peer is on this host.
    pub host_id: String,
    /// Owner process id, informational: no agent uses it to reach memory (same-host peers are identified by the
    /// kernel over their Unix socket, see `crate::peer`).
    pub pid: u32,
    /// `ip:port` of the agent's listener (TCP transport, notifications, metadata side channel).
    pub listen_addr: Option<String>,
    /// Transports the agent serves.
    pub transports: Vec<TransportKind>,
    /// Registered regions sorted by address, non-overlapping.
    pub regions: Vec<RegionMetadata>,
}

/// What a peer needs to reach an agent over UCX (metadata version 2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UcxMetadata {
    /// The agent's UCX worker address (`ucp_worker_get_address`), opaque bytes (≤ 64 KiB).
    pub worker_address: Vec<u8>,
    /// `(region id, packed rkey)` (`ucp_rkey_pack`) of regions reachable over UCX, each ≤ 64 KiB.
    pub rkeys: Vec<(u64, Vec<u8>)>,
}

/// What a same-host peer needs to reach an agent's GPU memory (metadata version 3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaMetadata {
    /// `(region id, CUDA IPC handle)` of the device regions exported by the agent (`cuIpcGetMemHandle`).
    pub ipc: Vec<(u64, pdx_cuda::IpcHandle)>,
}

/// [`CudaMetadata`] as version 3 writes it: handles without offsets.
#[derive(Serialize, Deserialize)]
struct CudaMetadataV3 {
    ipc: Vec<(u64, IpcHandleV3)>,
}

/// An IPC handle as version 3 writes it (postcard encodes struct fields in order, so this is `IpcHandle` before
/// it had an offset).
#[derive(Serialize, Deserialize)]
struct IpcHandleV3 {
    bytes: Vec<u8>,
    len: u64,
    device: u32,
}

impl CudaMetadata {
    /// The version 3 form, when every handle has offset 0.
    fn to_v3(&self) -> Option<CudaMetadataV3> {
        self.ipc
            .iter()
            .map(|(id, h)| {
                (h.offset() == 0).then(|| {
                    let v3 = IpcHandleV3 {
                        bytes: h.bytes().to_vec(),
                        len: h.len(),
                        device: h.device(),
                    };
                    (*id, v3)
                })
            })
            .collect::<Option<Vec<_>>>()
            .map(|ipc| CudaMetadataV3 { ipc })
    }

    fn from_v3(v3: CudaMetadataV3) -> Result<CudaMetadata> {
        let ipc = v3
            .ipc
            .into_iter()
            .map(|(id, h)| {
                pdx_cuda::IpcHandle::from_parts(&h.bytes, h.len, h.device, 0)
                    .map(|h| (id, h))
                    .map_err(|e| bad(e.to_string()))
            })
            .collect::<Result<_>>()?;
        Ok(CudaMetadata { ipc })
    }
}

/// Every extension a metadata blob may carry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    /// UCX (version 2, or inside version 3).
    pub ucx: Option<UcxMetadata>,
    /// CUDA IPC (version 3).
    pub cuda: Option<CudaMetadata>,
}

fn bad(reason: impl Into<String>) -> TransferError {
    TransferError::BadMetadata(reason.into())
}

impl AgentMetadata {
    /// Encodes to the versioned wire format. Errors: [`TransferError::BadMetadata`] when over the size limit.
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.encode_with_ucx(None)
    }

    /// Encodes with an optional UCX extension: version 1 without it (as [`AgentMetadata::encode`]), version 2
    /// with it. Errors: [`TransferError::BadMetadata`] when over the size limit.
    pub fn encode_with_ucx(&self, ucx: Option<&UcxMetadata>) -> Result<Vec<u8>> {
        self.encode_ext(ucx, None)
    }

    /// Encodes with optional extensions: version 1 with none, 2 with UCX only, 3 with CUDA (and maybe UCX), 4 when
    /// some IPC handle has a non-zero offset.
    /// Errors: [`TransferError::BadMetadata`] when over the size limit.
    pub fn encode_ext(
        &self,
        ucx: Option<&UcxMetadata>,
        cuda: Option<&CudaMetadata>,
    ) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(64 + self.regions.len() * 24);
        out.extend_from_slice(&METADATA_MAGIC);
        let cuda_v3 = cuda.and_then(CudaMetadata::to_v3);
        let version = match (ucx, cuda) {
            (_, Some(_)) if cuda_v3.is_some() => METADATA_VERSION_CUDA,
            (_, Some(_)) => METADATA_VERSION_CUDA_OFFSET,
            (Some(_), None) => METADATA_VERSION_UCX,
            (None, None) => METADATA_VERSION,
        };
        out.extend_from_slice(&version.to_le_bytes());
        let mut out = postcard::to_extend(self, out).map_err(|e| bad(e.to_string()))?;
        match cuda {
            Some(c) => {
                out = postcard::to_extend(&ucx, out).map_err(|e| bad(e.to_string()))?;
                out = match &cuda_v3 {
                    Some(v3) => postcard::to_extend(v3, out),
                    None => postcard::to_extend(c, out),
                }
                .map_err(|e| bad(e.to_string()))?;
            }
            None => {
                if let Some(u) = ucx {
                    out = postcard::to_extend(u, out).map_err(|e| bad(e.to_string()))?;
                }
            }
        }
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
        Self::decode_with_ucx(bytes).map(|(md, _)| md)
    }

    /// Decodes version 1 or 2 metadata, returning the UCX extension of version 2 (or 3). Errors as
    /// [`AgentMetadata::decode`], plus oversized UCX addresses or keys and keys of unknown regions.
    pub fn decode_with_ucx(bytes: &[u8]) -> Result<(AgentMetadata, Option<UcxMetadata>)> {
        Self::decode_ext(bytes).map(|(md, ext)| (md, ext.ucx))
    }

    /// Decodes version 1, 2, 3 or 4 metadata with its extensions. Errors as [`AgentMetadata::decode`], plus
    /// malformed extensions: oversized UCX blobs, keys or IPC handles of unknown regions, IPC handles of
    /// regions that are not device memory or whose length differs from the region's.
    pub fn decode_ext(bytes: &[u8]) -> Result<(AgentMetadata, Extensions)> {
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
        if ![
            METADATA_VERSION,
            METADATA_VERSION_UCX,
            METADATA_VERSION_CUDA,
            METADATA_VERSION_CUDA_OFFSET,
        ]
        .contains(&version)
        {
            return Err(bad(format!(
                "version {version}, this build reads {METADATA_VERSION} to {METADATA_VERSION_CUDA_OFFSET}"
            )));
        }
        let (md, mut rest): (AgentMetadata, &[u8]) =
            postcard::take_from_bytes(body).map_err(|e| bad(e.to_string()))?;
        let mut ext = Extensions::default();
        if version == METADATA_VERSION_UCX {
            let (u, r): (UcxMetadata, &[u8]) =
                postcard::take_from_bytes(rest).map_err(|e| bad(e.to_string()))?;
            rest = r;
            ext.ucx = Some(u);
        }
        if version == METADATA_VERSION_CUDA || version == METADATA_VERSION_CUDA_OFFSET {
            let (u, r): (Option<UcxMetadata>, &[u8]) =
                postcard::take_from_bytes(rest).map_err(|e| bad(e.to_string()))?;
            let (c, r) = if version == METADATA_VERSION_CUDA {
                let (c, r): (CudaMetadataV3, &[u8]) =
                    postcard::take_from_bytes(r).map_err(|e| bad(e.to_string()))?;
                (CudaMetadata::from_v3(c)?, r)
            } else {
                postcard::take_from_bytes(r).map_err(|e| bad(e.to_string()))?
            };
            rest = r;
            ext.ucx = u;
            ext.cuda = Some(c);
        }
        if let Some(u) = &ext.ucx {
            if u.worker_address.is_empty()
                || u.worker_address.len() > MAX_UCX_BLOB_BYTES
                || u.rkeys.len() > md.regions.len()
                || u.rkeys.iter().any(|(id, k)| {
                    k.is_empty()
                        || k.len() > MAX_UCX_BLOB_BYTES
                        || !md.regions.iter().any(|r| r.id == *id)
                })
            {
                return Err(bad("malformed UCX extension"));
            }
        }
        if let Some(c) = &ext.cuda {
            if c.ipc.len() > md.regions.len()
                || c.ipc.iter().any(|(id, h)| {
                    !md.regions.iter().any(|r| {
                        r.id == *id && matches!(r.kind, MemoryKind::Device(_)) && r.len == h.len()
                    })
                })
            {
                return Err(bad("malformed CUDA extension"));
            }
        }
        if !rest.is_empty() {
            return Err(bad(format!("{} trailing bytes", rest.len())));
        }
        md.validate()?;
        Ok((md, ext))
    }

    fn validate(&self) -> Result<()> {
        if self.name.is_empty() || self.name.len() > MAX_NAME_BYTES {
            return Err(bad("agent name must be 1..=256 bytes"));
        }
        if self.name.contains('\0') {
            // Engines name peers by C strings (the C API) and NIXL's APIs: a NUL would cut the name short.
            return Err(bad("the agent name contains a NUL byte"));
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
    fn a_peer_name_with_a_nul_byte_is_refused() {
        let md = AgentMetadata {
            name: "pre\0fill".into(),
            ..sample()
        };
        let bytes = md.encode().unwrap();
        assert!(matches!(
            AgentMetadata::decode(&bytes),
            Err(TransferError::BadMetadata(_))
        ));
        assert!(crate::Agent::new(crate::AgentConfig::new("a\0b")).is_err());
    }

    /// `sample()` plus a device region, and the CUDA extension naming it.
    fn with_device() -> (AgentMetadata, CudaMetadata) {
        let mut md = sample();
        md.regions.push(RegionMetadata {
            id: 3,
            kind: MemoryKind::Device(0),
            addr: 0x7f00_0000_0000,
            len: 1 << 20,
            memfd: None,
        });
        let h = pdx_cuda::IpcHandle::from_parts(&[9; 64], 1 << 20, 0, 0).unwrap();
        (md, CudaMetadata { ipc: vec![(3, h)] })
    }

    #[test]
    fn version_3_carries_ipc_handles_and_versions_1_2_are_unchanged() {
        let (md, cuda) = with_device();
        let v1 = md.encode().unwrap();
        assert_eq!(u16::from_le_bytes([v1[4], v1[5]]), METADATA_VERSION);
        let v3 = md.encode_ext(None, Some(&cuda)).unwrap();
        assert_eq!(u16::from_le_bytes([v3[4], v3[5]]), METADATA_VERSION_CUDA);
        // Version 3 is the version 1 body plus the extensions: older readers see the same regions.
        assert_eq!(v3[6..v1.len()], v1[6..]);
        let (back, ext) = AgentMetadata::decode_ext(&v3).unwrap();
        assert_eq!(back, md);
        assert_eq!(ext.cuda.as_ref(), Some(&cuda));
        assert_eq!(ext.ucx, None);
        // With a UCX extension too.
        let ucx = UcxMetadata {
            worker_address: vec![1, 2, 3],
            rkeys: vec![(1, vec![4])],
        };
        let both = md.encode_ext(Some(&ucx), Some(&cuda)).unwrap();
        let (_, ext) = AgentMetadata::decode_ext(&both).unwrap();
        assert_eq!((ext.ucx, ext.cuda), (Some(ucx), Some(cuda)));
        // decode() still accepts it, ignoring the extensions.
        assert_eq!(AgentMetadata::decode(&v3).unwrap(), md);
    }

    #[test]
    fn version_3_rejects_handles_of_unknown_host_or_resized_regions() {
        let (md, cuda) = with_device();
        let h = cuda.ipc[0].1.clone();
        for ipc in [
            vec![(99, h.clone())], // unknown region
            vec![(1, h.clone())],  // a host region
            vec![(
                3,
                pdx_cuda::IpcHandle::from_parts(&[9; 64], 4096, 0, 0).unwrap(),
            )], // wrong length
            vec![(3, h.clone()), (3, h.clone()), (3, h.clone()), (3, h)], // more handles than regions
        ] {
            let bytes = md.encode_ext(None, Some(&CudaMetadata { ipc })).unwrap();
            assert!(AgentMetadata::decode_ext(&bytes).is_err());
        }
        let bytes = md.encode_ext(None, Some(&cuda)).unwrap();
        assert!(AgentMetadata::decode_ext(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn version_4_carries_ipc_offsets_and_offset_0_stays_version_3() {
        let (md, cuda) = with_device();
        let v3 = md.encode_ext(None, Some(&cuda)).unwrap();
        // The version 3 bytes are what this build wrote before handles had offsets: the legacy handle shape.
        let legacy = CudaMetadataV3 {
            ipc: vec![(
                3,
                IpcHandleV3 {
                    bytes: vec![9; 64],
                    len: 1 << 20,
                    device: 0,
                },
            )],
        };
        let mut expect = md.encode().unwrap();
        expect[4..6].copy_from_slice(&METADATA_VERSION_CUDA.to_le_bytes());
        let expect = postcard::to_extend(&None::<UcxMetadata>, expect).unwrap();
        let expect = postcard::to_extend(&legacy, expect).unwrap();
        assert_eq!(v3, expect);
        // A region at an offset inside its allocation: version 4, and the offset comes back.
        let h = pdx_cuda::IpcHandle::from_parts(&[9; 64], 1 << 20, 0, 3 << 20).unwrap();
        let off = CudaMetadata {
            ipc: vec![(3, h.clone())],
        };
        let v4 = md.encode_ext(None, Some(&off)).unwrap();
        assert_eq!(
            u16::from_le_bytes([v4[4], v4[5]]),
            METADATA_VERSION_CUDA_OFFSET
        );
        let (back, ext) = AgentMetadata::decode_ext(&v4).unwrap();
        assert_eq!((back, ext.cuda), (md.clone(), Some(off)));
        // The offset is the last field: patched to the largest offset whose range fits u64 it decodes, one more
        // and the range overflows, refused on the way in.
        let head = &v4[..v4.len() - postcard::to_allocvec(&(3u64 << 20)).unwrap().len()];
        let with_offset = |o: u64| [head, &postcard::to_allocvec(&o).unwrap()].concat();
        let (_, ext) = AgentMetadata::decode_ext(&with_offset(u64::MAX - (1 << 20))).unwrap();
        assert_eq!(ext.cuda.unwrap().ipc[0].1.offset(), u64::MAX - (1 << 20));
        assert!(AgentMetadata::decode_ext(&with_offset(u64::MAX - (1 << 20) + 1)).is_err());
        // Version 4 labelled version 3 (or the reverse) does not decode.
        let mut relabel = v4.clone();
        relabel[4] = 3;
        assert!(AgentMetadata::decode_ext(&relabel).is_err());
        let mut relabel = v3.clone();
        relabel[4] = 4;
        assert!(AgentMetadata::decode_ext(&relabel).is_err());
    }

    #[test]
    fn rejects_wrong_magic_version_and_trailing_bytes() {
        let bytes = sample().encode().unwrap();
        let mut wrong = bytes.clone();
        wrong[0] = b'X';
        assert!(AgentMetadata::decode(&wrong).is_err());
        let mut v5 = bytes.clone();
        v5[4] = 5;
        assert!(AgentMetadata::decode(&v5)
            .unwrap_err()
            .to_string()
            .contains("version 5"));
        // A version 1 body labelled version 4 lacks the CUDA extension.
        let mut v4 = bytes.clone();
        v4[4] = 4;
        assert!(AgentMetadata::decode(&v4).is_err());
        // A version 1 body labelled version 3 lacks the CUDA extension.
        let mut v3 = bytes.clone();
        v3[4] = 3;
        assert!(AgentMetadata::decode(&v3).is_err());
        // A version 1 body labelled version 2 lacks the UCX extension.
        let mut v2 = bytes.clone();
        v2[4] = 2;
        assert!(AgentMetadata::decode(&v2).is_err());
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
    fn ucx_extension_roundtrips_and_is_validated() {
        let md = sample();
        // Without UCX the bytes are version 1, as before.
        assert_eq!(md.encode_with_ucx(None).unwrap(), md.encode().unwrap());
        let ucx = UcxMetadata {
            worker_address: vec![1, 2, 3],
            rkeys: vec![(1, vec![9; 40]), (2, vec![8; 40])],
        };
        let bytes = md.encode_with_ucx(Some(&ucx)).unwrap();
        assert_eq!(bytes[4], 2);
        assert_eq!(
            AgentMetadata::decode_with_ucx(&bytes).unwrap(),
            (md.clone(), Some(ucx.clone()))
        );
        // Version 2 still decodes for readers that ignore UCX.
        assert_eq!(AgentMetadata::decode(&bytes).unwrap(), md);
        assert_eq!(
            AgentMetadata::decode_with_ucx(&md.encode().unwrap())
                .unwrap()
                .1,
            None
        );
        // A key for an unknown region, or an empty address, is refused.
        let mut unknown = ucx.clone();
        unknown.rkeys[0].0 = 77;
        assert!(AgentMetadata::decode(&md.encode_with_ucx(Some(&unknown)).unwrap()).is_err());
        let mut empty = ucx;
        empty.worker_address.clear();
        assert!(AgentMetadata::decode(&md.encode_with_ucx(Some(&empty)).unwrap()).is_err());
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
