//! pdx's KV transfer engine, in the model of NVIDIA NIXL: **agents** register memory, publish **metadata**,
//! load their peers' metadata, and post batched **READ**/**WRITE** transfer requests between **descriptor
//! lists** of their own and a peer's registered memory, with **notifications** delivered to the peer on
//! completion.
//!
//! Transports (chosen per request by locality and memory, or forced; see [`Agent::create_xfer`]):
//! - `local`: peer agent in the same process, memcpy;
//! - `shm`: peer on the same host (vouched for by the kernel over its Unix socket), pdx-allocated (memfd) memory
//!   passed with `SCM_RIGHTS` and mapped once, then memcpy with no system call;
//! - `cma`: peer on the same host (the process the kernel named, held by a pidfd), caller-owned memory, batched
//!   `process_vm_readv` / `process_vm_writev`;
//! - `tcp`: any peer, one connection per peer pair, framed, vectored I/O straight from and into registered
//!   memory ([`wire`] documents the frames);
//! - `cuda`: GPU memory ([`MemoryKind::Device`], registered with [`Agent::allocate_kind`] or
//!   [`Agent::register_device`]): device and pinned copies in one process, CUDA IPC (handles in the metadata)
//!   between processes of one host; to another host (or with `tcp` forced) staged through pinned memory over
//!   `tcp`; without CUDA, allocating GPU memory gives [`TransferError::Cuda`] with `CudaError::Unavailable`;
//! - `ucx` (cargo feature `ucx`, off by default): UCX RMA put/get with active-message notifications, through
//!   `pdx-ucx-sys`; enabled per agent by listing it in `AgentConfig::transports` (the default with the feature).
//!
//! Every remote access is checked against the owner's registrations; metadata never selects local memory (no pid,
//! path or descriptor number from the wire is used); malformed metadata and frames give errors (the parsers,
//! [`wire::decode_frame`] and [`metadata::AgentMetadata::decode_ext`], take `&[u8]`); with
//! [`AgentConfig::secret`] every connection is mutually authenticated ([`auth`]); the listener serves idle
//! connections from one epoll thread within bounded limits; a peer that dies fails its outstanding transfers
//! within `AgentConfig::peer_timeout` (2 s), and a same-host peer's memory is unmapped as soon as it is gone.
//!
//! ```
//! use pdx_transfer::{Agent, AgentConfig, XferDescList, XferOp, XferOptions, XferStatus};
//! # fn main() -> Result<(), pdx_transfer::TransferError> {
//! // Decode side and prefill side (usually two processes; metadata then travels over the side channel with
//! // `Agent::fetch_remote("host:port")`).
//! let prefill = Agent::new(AgentConfig::new("prefill"))?;
//! let decode = Agent::new(AgentConfig::new("decode"))?;
//! let kv_p = prefill.allocate(1 << 20)?; // 1 MiB of KV blocks
//! kv_p.write(0, &[7u8; 4096])?;
//! let kv_d = decode.allocate(1 << 20)?;
//! decode.load_remote(&prefill.local_metadata()?)?;
//! // READ block 0 of the prefill agent into block 3 of ours, then tell the prefill side.
//! let local = XferDescList::host_from([(kv_d.addr() + 3 * 4096, 4096)]);
//! let remote = XferDescList::host_from([(kv_p.addr(), 4096)]);
//! let req = decode.create_xfer_from_descs(XferOp::Read, &local, "prefill", &remote, XferOptions {
//!     notif: Some(b"req-1 done".to_vec()),
//!     ..Default::default()
//! })?;
//! if req.post()? == XferStatus::InProgress {
//!     req.wait(None)?; // or `req.completion().await`
//! }
//! let mut block = vec![0u8; 4096];
//! kv_d.read(3 * 4096, &mut block)?;
//! assert_eq!(block, vec![7u8; 4096]);
//! assert_eq!(prefill.take_notifications()[0].payload, b"req-1 done");
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod agent;
pub mod auth;
mod backend;
mod config;
mod conn;
mod desc;
mod error;
mod gpu;
mod host;
mod memory;
pub mod metadata;
mod notif;
mod peer;
mod plan;
mod remote;
mod request;
mod server;
mod tcp;
mod transport;
#[cfg(feature = "ucx")]
mod ucx;
pub mod wire;
mod xfer;

pub use agent::{Agent, PreparedLocal, PreparedRemote};
pub use auth::AgentSecret;
pub use config::{AgentConfig, XferOptions};
pub use conn::{fetch_metadata, fetch_metadata_with};
pub use desc::{XferDesc, XferDescList};
pub use error::{Result, TransferError};
pub use memory::{MemoryKind, RegisteredMemory};
pub use metadata::AgentMetadata;
pub use notif::Notification;
pub use pdx_sys::{copy as copy_host, copy_streaming as copy_host_streaming, Memory};
pub use request::{XferCompletion, XferOp, XferStatus};
pub use transport::TransportKind;
pub use xfer::XferRequest;
