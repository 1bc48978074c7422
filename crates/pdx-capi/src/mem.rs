//! Memory registration (NIXL `registerMem` / `deregisterMem`) of memory the caller owns, by address, length and
//! kind.
//!
//! The one promise the C caller makes, stated once: **registered memory stays valid (mapped, readable and writable)
//! until `pdx_deregister_mem` has returned `PDX_OK` and every peer has invalidated this agent's metadata** (a
//! same-host `cma` peer writes into this process's memory directly, as with NIXL). pdx neither frees, pins nor
//! resizes it.

use std::ptr::NonNull;

use pdx_sys::Memory;
use pdx_transfer::{MemoryKind, RegisteredMemory, TransferError};

use crate::agent::pdx_agent;
use crate::ptr::{self, out_arg};
use crate::status::{guard, pdx_status, CapiError, Result};

/// Memory kinds (NIXL `nixl_mem_t`), passed to pdx as `int32_t`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum pdx_mem_kind {
    /// Host memory (NIXL `DRAM_SEG`): any readable and writable mapping of this process. `dev_id` is ignored.
    PDX_MEM_DRAM = 0,
    /// GPU memory (NIXL `VRAM_SEG`): a device pointer of CUDA device `dev_id`.
    PDX_MEM_VRAM = 1,
}

/// The memory kind of a C integer, or `PDX_ERR_INVALID`.
pub(crate) fn mem_kind(kind: i32, dev_id: u32) -> Result<MemoryKind> {
    match kind {
        k if k == pdx_mem_kind::PDX_MEM_DRAM as i32 => Ok(MemoryKind::Host),
        k if k == pdx_mem_kind::PDX_MEM_VRAM as i32 => Ok(MemoryKind::Device(dev_id)),
        k => Err(CapiError::invalid(format!(
            "memory kind {k} is not a pdx_mem_kind (PDX_MEM_DRAM = 0, PDX_MEM_VRAM = 1)"
        ))),
    }
}

/// A registration. Opaque; made by `pdx_register_mem`, ended by `pdx_deregister_mem`.
pub struct pdx_mem {
    /// `None` only inside `pdx_deregister_mem`, between taking the registration out and freeing the handle.
    mem: Option<RegisteredMemory>,
}

/// Checks that `addr .. addr + len` lies in readable and writable mappings of this process (`/proc/self/maps`), so a
/// wrong address fails here with `PDX_ERR_INVALID` rather than crashing the first transfer that touches it.
fn check_host_range(addr: u64, len: u64) -> Result<()> {
    let end = addr
        .checked_add(len)
        .ok_or_else(|| CapiError::invalid(format!("{addr:#x}+{len} wraps around")))?;
    match pdx_sys::unmapped_rw(addr, end) {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(CapiError::invalid(format!("{addr:#x}+{len}: {why}"))),
        // No procfs (a sandbox): the caller's promise is all there is.
        Err(_) => Ok(()),
    }
}

/// Registers device memory by pointer: validated with `cuPointerGetAttributes` (device memory of GPU `dev_id`,
/// inside one driver allocation) by `pdx_cuda::DeviceBuffer::from_raw`, exported to same-host peers through the CUDA
/// IPC handle of its allocation plus the offset.
///
/// # Safety
/// As `pdx_register_mem`'s memory promise, for device memory.
unsafe fn register_vram(
    a: &pdx_agent,
    addr: u64,
    len: u64,
    dev_id: u32,
) -> Result<RegisteredMemory> {
    let len =
        usize::try_from(len).map_err(|_| CapiError::invalid(format!("len {len} too large")))?;
    // SAFETY: the caller's memory promise (pdx_register_mem): the device range stays allocated until the
    // registration and everything using it are gone; pdx never frees it.
    let buf = unsafe { pdx_cuda::DeviceBuffer::from_raw(addr, len, dev_id) }.map_err(cuda_error)?;
    Ok(a.agent.register_device(buf))
}

/// A CUDA error of registration: the caller's bad range is `PDX_ERR_INVALID`, no CUDA `PDX_ERR_UNSUPPORTED`.
fn cuda_error(e: pdx_cuda::CudaError) -> CapiError {
    match e {
        pdx_cuda::CudaError::Invalid(m) => CapiError::Invalid(m),
        e if e.is_unavailable() => CapiError::Unsupported(format!("VRAM registration: {e}")),
        e => TransferError::Cuda(e).into(),
    }
}

/// Registers `len` bytes at `addr` of kind `kind` (a `pdx_mem_kind`; for VRAM, of CUDA device `dev_id`) with the
/// agent (NIXL `registerMem`), and writes the registration's handle to `*out`. Peers can then read and write that
/// range through transfer requests once they load this agent's metadata again. pdx does not copy, free or pin the
/// memory: it stays the caller's (see the promise below). Same-host peers reach host memory with `cma`, others with
/// `tcp`. Start blocks on a 64-byte boundary (a page is best): kernel copies into unaligned destinations run about
/// 4× slower.
///
/// Errors: `PDX_ERR_INVALID` for null pointers, an unknown kind, a zero length, a host range that is not mapped
/// readable and writable in this process, or a VRAM range that is not device memory of GPU `dev_id` inside one
/// allocation (checked with `cuPointerGetAttributes`); `PDX_ERR_UNSUPPORTED` for VRAM on a machine without CUDA (no
/// driver or no GPU `dev_id`); `PDX_ERR_CUDA` for other driver failures.
///
/// Thread safety: any thread, concurrently with other calls on the agent.
///
/// # Safety
/// `agent` is a live agent handle; `out` points to writable storage for a pointer. **The memory promise**: the range
/// stays valid for reads and writes, by pdx and by peers, until `pdx_deregister_mem` of this handle returned `PDX_OK`
/// and peers have invalidated this agent's metadata; the caller reads it only after the transfers that write it
/// completed (pdx writes it from other threads and processes, as DMA would).
#[no_mangle]
pub unsafe extern "C" fn pdx_register_mem(
    agent: *const pdx_agent,
    addr: u64,
    len: u64,
    kind: i32,
    dev_id: u32,
    out: *mut *mut pdx_mem,
) -> pdx_status {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: a live agent handle or NULL (see above).
        let a = unsafe { ptr::handle(agent, "agent") }?;
        let kind = mem_kind(kind, dev_id)?;
        if len == 0 {
            return Err(CapiError::invalid("len is 0"));
        }
        let mem = match kind {
            MemoryKind::Host => {
                check_host_range(addr, len)?;
                let len = usize::try_from(len)
                    .map_err(|_| CapiError::invalid(format!("len {len} too large")))?;
                let base = NonNull::new(addr as usize as *mut u8)
                    .ok_or_else(|| CapiError::invalid("addr is 0"))?;
                // SAFETY: the caller's memory promise (see above): `addr .. addr + len` stays valid for reads and
                // writes until deregistration, and C holds no Rust references into it. Checked mapped just now.
                let raw = unsafe { Memory::from_raw_parts(base, len) };
                a.agent.register(raw, MemoryKind::Host)?
            }
            // SAFETY: the caller's memory promise (see above), for device memory.
            MemoryKind::Device(n) => unsafe { register_vram(a, addr, len, n) }?,
            MemoryKind::PinnedHost => unreachable!("mem_kind never gives pinned host memory"),
        };
        // SAFETY: `out` is writable (see above).
        unsafe { ptr::write_out(out, ptr::into_handle(pdx_mem { mem: Some(mem) })) };
        Ok(pdx_status::PDX_OK)
    })
}

/// Ends a registration (NIXL `deregisterMem`): the agent stops serving the range; a later request for it is refused
/// by this agent. On `PDX_OK` the handle is freed. While prepared lists or transfer requests of this agent still use
/// the range it fails with `PDX_ERR_REGION_IN_USE` and the handle stays valid: release them and call again. NULL is
/// `PDX_ERR_INVALID`.
///
/// After `PDX_OK` the memory is the caller's again as far as this agent goes; same-host peers that still hold the
/// old metadata may write into it until they invalidate it (as with NIXL), so free it only once they have.
///
/// Thread safety: not concurrently with other calls on the same handle; deregistering twice is the caller's bug.
///
/// # Safety
/// `mem` is NULL or a live registration handle, not used after this call returns `PDX_OK`.
#[no_mangle]
pub unsafe extern "C" fn pdx_deregister_mem(mem: *mut pdx_mem) -> pdx_status {
    guard(|| {
        // SAFETY: a live handle or NULL, used by no other call now (see above).
        let handle = unsafe { ptr::handle_mut(mem, "mem") }?;
        // `deregister` takes the registration and hands it back on refusal, when the handle stays valid.
        let reg = handle
            .mem
            .take()
            .ok_or_else(|| CapiError::invalid("mem was already deregistered"))?;
        if let Err((reg, e)) = reg.deregister() {
            handle.mem = Some(reg);
            return Err(e.into());
        }
        // SAFETY: the handle came from `pdx_register_mem` and is given back once, on success only (see above).
        unsafe { ptr::destroy(mem) };
        Ok(pdx_status::PDX_OK)
    })
}
