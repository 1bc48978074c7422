//! Agents (NIXL `nixlAgent`): creation from a C configuration, destruction, the listener address, and metadata out
//! (`getLocalMD`), in (`loadRemoteMD`, the side channel) and invalidated (`invalidateRemoteMD`).

use std::ffi::c_char;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pdx_transfer::metadata::MAX_NAME_BYTES;
use pdx_transfer::{Agent, AgentConfig, AgentSecret, TransferError, TransportKind};

use crate::ptr::{self, out_arg};
use crate::status::{guard, pdx_status, CapiError, Result};

/// Size of a buffer that holds any agent name with its terminating NUL (names are 1..=256 bytes), as
/// `pdx_load_remote_md` and `pdx_fetch_remote_md` need for their `name_out`.
pub const PDX_AGENT_NAME_BUF: usize = 257;
const _: () = assert!(PDX_AGENT_NAME_BUF == MAX_NAME_BYTES + 1);

/// Longest string argument that is not an agent name (addresses, transport lists), in bytes.
pub(crate) const MAX_ARG_BYTES: usize = 4096;

/// Configuration of `pdx_agent_create`. A zeroed struct with a `name` is a valid configuration: every other field
/// then takes its default.
#[repr(C)]
pub struct pdx_agent_config {
    /// Agent name, unique among agents that talk to each other: NUL-terminated UTF-8, 1..=256 bytes. Required.
    pub name: *const c_char,
    /// Listener address (`"ip:port"` or `"host:port"`; port 0 picks a free one): the metadata side channel, the
    /// `tcp` transport and incoming notifications. NULL: `"127.0.0.1:0"`. `"none"`: no listener (peers can then
    /// neither fetch this agent's metadata nor reach it over `tcp`, nor send it notifications).
    pub listen: *const c_char,
    /// Host to advertise in metadata instead of the bound IP (set it when listening on `0.0.0.0`). NULL: none.
    pub advertise_host: *const c_char,
    /// Transports this agent may use as an initiator, in order of preference, comma-separated names from `local`,
    /// `shm`, `cma`, `tcp`, `ucx`, `cuda` (e.g. `"tcp"` to force TCP). NULL: every transport of this build.
    pub transports: *const c_char,
    /// Shared secret of the agent protocol (mutual HMAC-SHA256 challenge–response on every connection; see
    /// docs/transfer.md, Trust model): `secret_len` bytes, 16..=1024. NULL with `secret_len` 0: no secret.
    pub secret: *const u8,
    /// Length of `secret` in bytes.
    pub secret_len: usize,
    /// A peer that makes no progress for this long while transfers are outstanding is declared dead and its
    /// transfers fail (`PDX_ERR_TIMEOUT`), in µs. 0: the default, 2 s.
    pub peer_timeout_us: u64,
}

/// An agent (NIXL `nixlAgent`): registers memory, publishes metadata, loads peers' metadata, moves bytes with
/// transfer requests, sends and receives notifications. Opaque; made by `pdx_agent_create`, freed by
/// `pdx_agent_destroy`.
pub struct pdx_agent {
    pub(crate) agent: Agent,
    /// Process-unique id, so prepared lists can refuse to be used with an agent other than their own.
    pub(crate) id: u64,
}

fn next_agent_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Turns the C configuration into the engine's.
///
/// # Safety
/// As `pdx_agent_create`.
unsafe fn config_from_c(cfg: &pdx_agent_config) -> Result<AgentConfig> {
    // SAFETY: the caller promises NUL-terminated strings or NULL in the configuration (pdx_agent_create's contract).
    let name = unsafe { ptr::str_arg(cfg.name, MAX_NAME_BYTES, "config.name") }?;
    let mut config = AgentConfig::new(name);
    // SAFETY: as above.
    let listen = unsafe { ptr::opt_str_arg(cfg.listen, MAX_ARG_BYTES, "config.listen") }?;
    config.listen = match listen {
        None => config.listen,
        Some("none") => None,
        Some(addr) => Some(resolve(addr)?),
    };
    // SAFETY: as above.
    let advertise =
        unsafe { ptr::opt_str_arg(cfg.advertise_host, MAX_ARG_BYTES, "config.advertise_host") }?;
    if let Some(host) = advertise {
        if host.is_empty() {
            return Err(CapiError::invalid("config.advertise_host is empty"));
        }
        config.advertise_host = Some(host.to_string());
    }
    // SAFETY: as above.
    let transports =
        unsafe { ptr::opt_str_arg(cfg.transports, MAX_ARG_BYTES, "config.transports") }?;
    if let Some(list) = transports {
        config.transports = parse_transports(list)?;
    }
    // SAFETY: `secret_len` readable bytes at `secret` (pdx_agent_create's contract).
    let secret = unsafe { ptr::slice_arg(cfg.secret, cfg.secret_len, "config.secret") }?;
    if !secret.is_empty() {
        config.secret = Some(
            AgentSecret::new(secret.to_vec())
                .map_err(|e| CapiError::invalid(format!("config.secret: {e}")))?,
        );
    }
    if cfg.peer_timeout_us > 0 {
        config.peer_timeout = Duration::from_micros(cfg.peer_timeout_us);
    }
    Ok(config)
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| CapiError::invalid(format!("config.listen `{addr}`: {e}")))?
        .next()
        .ok_or_else(|| CapiError::invalid(format!("config.listen `{addr}` resolves to no address")))
}

fn parse_transports(list: &str) -> Result<Vec<TransportKind>> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim) {
        let t: TransportKind = name
            .parse()
            .map_err(|e| CapiError::invalid(format!("config.transports: {e}")))?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

/// Creates an agent and starts its listener (NIXL `nixlAgent(name, cfg)`); writes the handle to `*out`.
///
/// Errors: `PDX_ERR_INVALID` for a null pointer, a missing or over-long name, an unknown transport, a secret outside
/// 16..=1024 bytes or an unresolvable listen address; `PDX_ERR_IO_TRANSIENT` when the listener cannot bind.
///
/// Thread safety: any thread. The agent itself may be used from any number of threads at once (each function says
/// what it allows).
///
/// # Safety
/// `cfg` points to a `pdx_agent_config` whose string fields are NULL or NUL-terminated and whose `secret` points to
/// `secret_len` readable bytes; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn pdx_agent_create(
    cfg: *const pdx_agent_config,
    out: *mut *mut pdx_agent,
) -> pdx_status {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: null-checked; the caller promises a readable configuration (see above).
        let cfg = unsafe { ptr::handle(cfg, "cfg") }?;
        // SAFETY: the caller promises the configuration's pointers (see above).
        let config = unsafe { config_from_c(cfg) }?;
        let agent = Agent::new(config)?;
        let handle = ptr::into_handle(pdx_agent {
            agent,
            id: next_agent_id(),
        });
        // SAFETY: `out` is writable storage for a pointer (see above).
        unsafe { ptr::write_out(out, handle) };
        Ok(pdx_status::PDX_OK)
    })
}

/// Destroys an agent (NIXL `~nixlAgent`): its listener and connections close, transfers in flight fail. Memory
/// handles, descriptor lists, prepared lists, transfer requests and notification lists made from it stay valid to
/// destroy (and keep the memory they use alive until then). NULL is a no-op (`PDX_OK`).
///
/// Thread safety: not concurrently with any other call on the same agent; destroying twice is the caller's bug.
///
/// # Safety
/// `agent` is NULL or a handle from `pdx_agent_create` that has not been destroyed.
#[no_mangle]
pub unsafe extern "C" fn pdx_agent_destroy(agent: *mut pdx_agent) -> pdx_status {
    guard(|| {
        // SAFETY: a live handle or NULL, given back once (see above).
        unsafe { ptr::destroy(agent) };
        Ok(pdx_status::PDX_OK)
    })
}

/// Writes the agent's name, NUL-terminated, to `buf` (`cap` bytes; `PDX_AGENT_NAME_BUF` always suffices).
///
/// Errors: `PDX_ERR_INVALID` for null pointers; `PDX_ERR_BUFFER_TOO_SMALL` (nothing written) when it does not fit.
///
/// Thread safety: any thread, concurrently with other calls on the agent.
///
/// # Safety
/// `agent` is a live agent handle; `buf` points to `cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pdx_agent_name(
    agent: *const pdx_agent,
    buf: *mut c_char,
    cap: usize,
) -> pdx_status {
    guard(|| {
        let buf = out_arg(buf, "buf")?;
        // SAFETY: a live agent handle or NULL (see above).
        let a = unsafe { ptr::handle(agent, "agent") }?;
        // SAFETY: `cap` writable bytes at `buf` (see above).
        unsafe { ptr::write_c_string(buf, cap, a.agent.name().as_bytes()) }?;
        Ok(pdx_status::PDX_OK)
    })
}

/// Writes the listener's bound address (`"ip:port"`, NUL-terminated) to `buf` (`cap` bytes; 64 always suffice):
/// what peers pass to `pdx_fetch_remote_md`.
///
/// Errors: `PDX_ERR_INVALID` for null pointers or an agent created with `listen = "none"`;
/// `PDX_ERR_BUFFER_TOO_SMALL` (nothing written) when it does not fit.
///
/// Thread safety: any thread, concurrently with other calls on the agent.
///
/// # Safety
/// `agent` is a live agent handle; `buf` points to `cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pdx_agent_listen_addr(
    agent: *const pdx_agent,
    buf: *mut c_char,
    cap: usize,
) -> pdx_status {
    guard(|| {
        let buf = out_arg(buf, "buf")?;
        // SAFETY: a live agent handle or NULL (see above).
        let a = unsafe { ptr::handle(agent, "agent") }?;
        let addr = a
            .agent
            .listen_addr()
            .ok_or_else(|| CapiError::invalid("the agent has no listener (listen = \"none\")"))?;
        // SAFETY: `cap` writable bytes at `buf` (see above).
        unsafe { ptr::write_c_string(buf, cap, addr.to_string().as_bytes()) }?;
        Ok(pdx_status::PDX_OK)
    })
}

/// Copies this agent's metadata (NIXL `getLocalMD`: versioned bytes, at most 1 MiB, listing its registrations) into
/// the caller's buffer. Size query: with `buf` NULL, writes the size in bytes to `*len` and returns `PDX_OK`; with a
/// buffer, `*len` is its capacity on entry and the metadata's size on return. Registrations made between the query
/// and the copy can make the metadata grow: on `PDX_ERR_BUFFER_TOO_SMALL` (nothing copied, `*len` = size needed)
/// query again.
///
/// Errors: `PDX_ERR_INVALID` for a null agent or `len`; `PDX_ERR_BUFFER_TOO_SMALL`.
///
/// Thread safety: any thread, concurrently with other calls on the agent.
///
/// # Safety
/// `agent` is a live agent handle; `len` points to a readable and writable `size_t`; `buf` is NULL or points to
/// `*len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pdx_get_local_md(
    agent: *const pdx_agent,
    buf: *mut u8,
    len: *mut usize,
) -> pdx_status {
    guard(|| {
        let len = out_arg(len, "len")?;
        // SAFETY: a live agent handle or NULL (see above).
        let a = unsafe { ptr::handle(agent, "agent") }?;
        let md = a.agent.local_metadata()?;
        // SAFETY: `len` is a readable size_t (see above).
        let cap = unsafe { ptr::read_in(len) };
        // SAFETY: `len` is writable (see above).
        unsafe { ptr::write_out(len, md.len()) };
        let Some(buf) = std::ptr::NonNull::new(buf) else {
            return Ok(pdx_status::PDX_OK);
        };
        if md.len() > cap {
            return Err(CapiError::BufferTooSmall {
                need: md.len(),
                have: cap,
            });
        }
        // SAFETY: `cap >= md.len()` writable bytes at `buf` (see above).
        unsafe { ptr::write_bytes(buf, &md) };
        Ok(pdx_status::PDX_OK)
    })
}

/// Bytes that pdx allocated for the caller (metadata from `pdx_get_local_md_blob`). Opaque; read with
/// `pdx_blob_data`, freed by `pdx_blob_destroy`.
pub struct pdx_blob {
    pub(crate) bytes: Box<[u8]>,
}

/// This agent's metadata (as `pdx_get_local_md`) in a blob that pdx allocates: no size query, no race with
/// registrations. Free it with `pdx_blob_destroy`.
///
/// Errors: `PDX_ERR_INVALID` for null pointers.
///
/// Thread safety: any thread, concurrently with other calls on the agent.
///
/// # Safety
/// `agent` is a live agent handle; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn pdx_get_local_md_blob(
    agent: *const pdx_agent,
    out: *mut *mut pdx_blob,
) -> pdx_status {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: a live agent handle or NULL (see above).
        let a = unsafe { ptr::handle(agent, "agent") }?;
        let bytes = a.agent.local_metadata()?.into_boxed_slice();
        // SAFETY: `out` is writable (see above).
        unsafe { ptr::write_out(out, ptr::into_handle(pdx_blob { bytes })) };
        Ok(pdx_status::PDX_OK)
    })
}

/// The bytes of a blob: `*data` points to `*len` bytes owned by the blob, valid until `pdx_blob_destroy`.
///
/// Errors: `PDX_ERR_INVALID` for null pointers.
///
/// Thread safety: any thread (the blob is immutable).
///
/// # Safety
/// `blob` is a live blob; `data` and `len` point to writable storage.
#[no_mangle]
pub unsafe extern "C" fn pdx_blob_data(
    blob: *const pdx_blob,
    data: *mut *const u8,
    len: *mut usize,
) -> pdx_status {
    guard(|| {
        let data = out_arg(data, "data")?;
        let len = out_arg(len, "len")?;
        // SAFETY: a live blob or NULL (see above).
        let b = unsafe { ptr::handle(blob, "blob") }?;
        // SAFETY: both outputs are writable (see above).
        unsafe {
            ptr::write_out(data, b.bytes.as_ptr());
            ptr::write_out(len, b.bytes.len());
        }
        Ok(pdx_status::PDX_OK)
    })
}

/// Frees a blob. NULL is a no-op.
///
/// Thread safety: not concurrently with other calls on the same blob; destroying twice is the caller's bug.
///
/// # Safety
/// `blob` is NULL or a live blob, not used after this call.
#[no_mangle]
pub unsafe extern "C" fn pdx_blob_destroy(blob: *mut pdx_blob) -> pdx_status {
    guard(|| {
        // SAFETY: NULL or a live blob given back once (see above).
        unsafe { ptr::destroy(blob) };
        Ok(pdx_status::PDX_OK)
    })
}

/// Writes a remote agent's name to the caller's `name_out` (when not NULL). Checked before anything is loaded.
fn check_name_out(name_out: *mut c_char, name_cap: usize) -> Result<()> {
    if !name_out.is_null() && name_cap < PDX_AGENT_NAME_BUF {
        return Err(CapiError::invalid(format!(
            "name_cap is {name_cap}: it must be at least PDX_AGENT_NAME_BUF ({PDX_AGENT_NAME_BUF})"
        )));
    }
    Ok(())
}

/// After a load: the name into C's buffer (metadata with a NUL byte in its name never loads).
///
/// # Safety
/// `name_out` is NULL or points to `name_cap` writable bytes.
unsafe fn give_name(name: &str, name_out: *mut c_char, name_cap: usize) -> Result<pdx_status> {
    if let Some(buf) = std::ptr::NonNull::new(name_out) {
        // SAFETY: `name_cap` writable bytes (see above); the name fits, as checked by `check_name_out`.
        unsafe { ptr::write_c_string(buf, name_cap, name.as_bytes()) }?;
    }
    Ok(pdx_status::PDX_OK)
}

/// Loads a peer's metadata (NIXL `loadRemoteMD`) and writes the peer's name, NUL-terminated, to `name_out` (may be
/// NULL; otherwise at least `PDX_AGENT_NAME_BUF` bytes). The bytes are untrusted: they never select local memory to
/// touch (docs/transfer.md, Trust model). Loading the same peer instance again is a no-op or an update; a new
/// instance under a known name (a restarted peer) replaces the old one, whose transfers then fail.
///
/// Errors: `PDX_ERR_INVALID` for null pointers or a short `name_cap`; `PDX_ERR_BAD_METADATA` for malformed bytes or
/// this agent's own metadata.
///
/// Thread safety: any thread, concurrently with other calls on the agent.
///
/// # Safety
/// `agent` is a live agent handle; `md` points to `md_len` readable bytes; `name_out` is NULL or points to `name_cap`
/// writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pdx_load_remote_md(
    agent: *const pdx_agent,
    md: *const u8,
    md_len: usize,
    name_out: *mut c_char,
    name_cap: usize,
) -> pdx_status {
    guard(|| {
        check_name_out(name_out, name_cap)?;
        // SAFETY: a live agent handle or NULL (see above).
        let a = unsafe { ptr::handle(agent, "agent") }?;
        // SAFETY: `md_len` readable bytes at `md` (see above).
        let bytes = unsafe { ptr::slice_arg(md, md_len, "md") }?;
        let name = a.agent.load_remote(bytes)?;
        // SAFETY: as promised for `name_out` (see above).
        unsafe { give_name(&name, name_out, name_cap) }
    })
}

/// Fetches a peer's metadata from its listener (`addr`: `"host:port"`, what the peer's `pdx_agent_listen_addr`
/// gives) over the side channel, authenticating with this agent's secret when it has one, and loads it as
/// `pdx_load_remote_md` does. Blocks for at most the agent's peer timeout.
///
/// Errors: `PDX_ERR_INVALID` for null pointers, a malformed address or a short `name_cap`; `PDX_ERR_PEER_DISCONNECTED`,
/// `PDX_ERR_TIMEOUT` or `PDX_ERR_IO_TRANSIENT` when the peer cannot be reached; `PDX_ERR_AUTH`;
/// `PDX_ERR_BAD_METADATA`.
///
/// Thread safety: any thread, concurrently with other calls on the agent.
///
/// # Safety
/// `agent` is a live agent handle; `addr` is a NUL-terminated string; `name_out` is NULL or points to `name_cap`
/// writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pdx_fetch_remote_md(
    agent: *const pdx_agent,
    addr: *const c_char,
    name_out: *mut c_char,
    name_cap: usize,
) -> pdx_status {
    guard(|| {
        check_name_out(name_out, name_cap)?;
        // SAFETY: a live agent handle or NULL (see above).
        let a = unsafe { ptr::handle(agent, "agent") }?;
        // SAFETY: NUL-terminated or NULL (see above).
        let addr = unsafe { ptr::str_arg(addr, MAX_ARG_BYTES, "addr") }?;
        let name = a.agent.fetch_remote(addr)?;
        // SAFETY: as promised for `name_out` (see above).
        unsafe { give_name(&name, name_out, name_cap) }
    })
}

/// Forgets a remote agent (NIXL `invalidateRemoteMD`): its connection closes, its outstanding transfers fail, and
/// requests made for it fail on post.
///
/// Errors: `PDX_ERR_INVALID` for null pointers; `PDX_ERR_UNKNOWN_REMOTE` when no such agent was loaded.
///
/// Thread safety: any thread, concurrently with other calls on the agent.
///
/// # Safety
/// `agent` is a live agent handle; `remote_agent` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pdx_invalidate_remote_md(
    agent: *const pdx_agent,
    remote_agent: *const c_char,
) -> pdx_status {
    guard(|| {
        // SAFETY: a live agent handle or NULL (see above).
        let a = unsafe { ptr::handle(agent, "agent") }?;
        // SAFETY: NUL-terminated or NULL (see above).
        let name = unsafe { ptr::str_arg(remote_agent, MAX_NAME_BYTES, "remote_agent") }?;
        if !a.agent.invalidate_remote(name) {
            return Err(TransferError::UnknownRemote(name.to_string()).into());
        }
        Ok(pdx_status::PDX_OK)
    })
}
