//! Memory registered from Python: the caller's host memory by address (NumPy arrays, buffers, tensors, NIXL's
//! `(addr, len, dev_id, meta)` tuples), or memory pdx allocates (memfd, which same-host peers map: `shm`).

use std::ptr::NonNull;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

use pdx_transfer::{Agent, Memory, MemoryKind, RegisteredMemory};

use crate::errors::{invalid, IntoPy};

/// Registers `len` bytes of host memory at `addr` with `agent`, after checking that the whole range is mapped
/// readable and writable in this process (`/proc/self/maps`), so an address that names nothing is refused here
/// instead of faulting in a later copy. `owner` (the NumPy array, tensor or buffer export the range belongs to)
/// is kept alive until the region's last use ends: the registration, prepared lists and in-flight transfers.
///
/// The `unsafe` contract of this crate, stated once: the caller promises the range stays valid (mapped, not
/// freed, not reused) for as long as it is registered, as NIXL's `registerMem` asks; pdx neither frees nor pins
/// it. Python code meets it by keeping the object alive (pdx does, when it is given the object), or by
/// deregistering before freeing raw memory.
///
/// Errors: `nixlInvalidParamError` for a null address, zero length, overflow, or a range that is not mapped
/// read-write.
pub fn register_host(
    agent: &Agent,
    addr: u64,
    len: u64,
    owner: Option<Py<PyAny>>,
) -> PyResult<RegisteredMemory> {
    if len == 0 {
        return Err(invalid("cannot register 0 bytes"));
    }
    let end = addr
        .checked_add(len)
        .ok_or_else(|| invalid(format!("range {addr:#x}+{len} overflows")))?;
    let len_usize = usize::try_from(len).map_err(|_| invalid("length does not fit in usize"))?;
    check_mapped(addr, end)?;
    let ptr = NonNull::new(std::ptr::with_exposed_provenance_mut::<u8>(addr as usize))
        .ok_or_else(|| invalid("cannot register address 0"))?;
    let mem = match owner {
        // SAFETY: `ptr .. ptr + len` is mapped read-write now (checked above); that it stays valid while the
        // `Memory` lives is the caller's promise (this function's contract, NIXL's own), and `owner`, the Python
        // object the range belongs to, is kept alive by the `Memory` until its last use. pdx never forms Rust
        // references into it: every access is a bounds-checked copy or a system call.
        Some(owner) => unsafe {
            Memory::from_raw_parts_owned(ptr, len_usize, Box::new(PyOwner(owner)))
        },
        // SAFETY: as above, without an owner object: the caller (a raw `(addr, len)` from Python) keeps the
        // memory valid until it deregisters, as with NIXL.
        None => unsafe { Memory::from_raw_parts(ptr, len_usize) },
    };
    agent.register(mem, MemoryKind::Host).py_err()
}

/// A Python object kept alive by a registration. Dropping it off the GIL (on a connection thread, after an
/// in-flight transfer) is fine: PyO3 defers the decref until a thread holds the GIL again.
struct PyOwner(#[allow(dead_code)] Py<PyAny>);

/// Checks that `[addr, end)` lies in mappings of this process that are readable and writable.
fn check_mapped(addr: u64, end: u64) -> PyResult<()> {
    match pdx_sys::unmapped_rw(addr, end) {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(invalid(format!("memory {addr:#x}..{end:#x}: {why}"))),
        Err(e) => Err(invalid(format!("cannot read /proc/self/maps: {e}"))),
    }
}

/// Registers `len` bytes of GPU `device`'s memory at device address `addr` (engine-owned VRAM: a torch CUDA
/// tensor, a `cudaMalloc` block), validated by `pdx_cuda::DeviceBuffer::from_raw` (`cuPointerGetAttributes`: device
/// memory of that GPU, inside one allocation). Same-host peers reach it through the CUDA IPC handle of its
/// allocation plus the offset. The contract is [`register_host`]'s: the caller keeps the memory allocated while it
/// is registered (a tensor given as an object is kept alive by the Python `Registration`).
///
/// Errors: `nixlNotSupportedError` without CUDA or without GPU `device`; `nixlInvalidParamError` for a range
/// that is not device memory of that GPU or runs past its allocation.
pub fn register_device(
    agent: &Agent,
    addr: u64,
    len: u64,
    device: u32,
) -> PyResult<RegisteredMemory> {
    let len = usize::try_from(len).map_err(|_| invalid("length does not fit in usize"))?;
    // SAFETY: `from_raw` validates the range against the driver's allocation table; that it stays allocated while
    // registered is the caller's promise (this crate's one contract, see `register_host`). pdx only touches it
    // through CUDA copies bounded by `[addr, addr + len)`.
    let buf = unsafe { pdx_cuda::DeviceBuffer::from_raw(addr, len, device) }
        .map_err(pdx_transfer::TransferError::from)
        .py_err()?;
    Ok(agent.register_device(buf))
}

/// A registered memory region (NIXL: one entry of a registration descriptor list). It stays registered until
/// [`Registration::deregister`] or [`Registration::close`], or until it is garbage-collected.
#[pyclass(frozen, module = "pdx_transfer")]
pub struct Registration {
    mem: Mutex<Option<RegisteredMemory>>,
    /// The Python object of device memory (a tensor), kept alive as long as this object (host memory keeps its
    /// owner inside the region itself).
    _owner: Option<Py<PyAny>>,
    addr: u64,
    len: u64,
    kind: MemoryKind,
}

impl Registration {
    /// Wraps a registered region.
    pub fn new(mem: RegisteredMemory) -> Registration {
        Registration::with_owner(mem, None)
    }

    /// Wraps a registered region and keeps `owner` alive with it.
    pub fn with_owner(mem: RegisteredMemory, owner: Option<Py<PyAny>>) -> Registration {
        Registration {
            addr: mem.addr(),
            len: mem.len() as u64,
            kind: mem.kind(),
            mem: Mutex::new(Some(mem)),
            _owner: owner,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&RegisteredMemory) -> pdx_transfer::Result<T>) -> PyResult<T> {
        let guard = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        let mem = guard
            .as_ref()
            .ok_or_else(|| invalid("the region is no longer registered"))?;
        f(mem).py_err()
    }
}

/// The Python name of a memory kind: "host", "pinned" or "device".
pub fn kind_name(kind: MemoryKind) -> &'static str {
    match kind {
        MemoryKind::Host => "host",
        MemoryKind::PinnedHost => "pinned",
        MemoryKind::Device(_) => "device",
    }
}

#[pymethods]
impl Registration {
    /// Start address (what descriptors name).
    #[getter]
    fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    #[getter]
    fn length(&self) -> u64 {
        self.len
    }

    /// "host", "pinned" or "device".
    #[getter]
    fn kind(&self) -> &'static str {
        kind_name(self.kind)
    }

    /// The device id descriptors of this region carry (the GPU for device memory, else 0).
    #[getter]
    fn device(&self) -> u32 {
        self.kind.dev_id()
    }

    /// True until deregistered or closed.
    #[getter]
    fn registered(&self) -> bool {
        self.mem.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// True when same-host peers reach this region by mapping it (`shm`: memory pdx allocated).
    #[getter]
    fn shareable(&self) -> bool {
        self.with(|m| Ok(m.is_shareable())).unwrap_or(false)
    }

    /// The descriptor `(addr, len, dev_id)` of `[offset, offset + length)` (default: the whole region).
    /// Errors: `nixlInvalidParamError` when out of bounds.
    #[pyo3(signature = (offset=0, length=None))]
    fn desc(&self, offset: usize, length: Option<usize>) -> PyResult<(u64, u64, u32)> {
        let length = length.unwrap_or((self.len as usize).saturating_sub(offset));
        let d = self.with(|m| m.desc(offset, length))?;
        Ok((d.addr, d.len, d.dev_id))
    }

    /// Copies `length` bytes at `offset` out of the region (GIL released).
    #[pyo3(signature = (offset=0, length=None))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        offset: usize,
        length: Option<usize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let length = length.unwrap_or((self.len as usize).saturating_sub(offset));
        let mut out = vec![0u8; length];
        py.detach(|| self.with(|m| m.read(offset, &mut out)))?;
        Ok(PyBytes::new(py, &out))
    }

    /// Copies `data` into the region at `offset` (GIL released).
    #[pyo3(signature = (data, offset=0))]
    fn write(&self, py: Python<'_>, data: PyBackedBytes, offset: usize) -> PyResult<()> {
        py.detach(|| self.with(|m| m.write(offset, &data)))
    }

    /// Deregisters now; refused (`nixlNotAllowedError`, the region stays registered) while prepared
    /// descriptor lists or transfer requests still use it.
    fn deregister(&self) -> PyResult<()> {
        let mut guard = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mem) = guard.take() else {
            return Err(invalid("the region is no longer registered"));
        };
        match mem.deregister() {
            Ok(()) => Ok(()),
            Err((mem, e)) => {
                *guard = Some(mem);
                Err(crate::errors::to_py(e))
            }
        }
    }

    /// Deregisters at once, even while prepared lists or requests use the region: new descriptors can no
    /// longer name it, peers' requests for it are refused, and the memory stays valid (kept alive, for memory
    /// pdx allocated or a Python owner) until its last in-flight use ends. Closing twice is a no-op.
    fn close(&self, py: Python<'_>) {
        let mem = self.mem.lock().unwrap_or_else(|e| e.into_inner()).take();
        py.detach(move || drop(mem));
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _t: Option<Py<PyAny>>,
        _v: Option<Py<PyAny>>,
        _tb: Option<Py<PyAny>>,
    ) {
        self.close(py);
    }

    fn __repr__(&self) -> String {
        format!(
            "Registration(addr={:#x}, length={}, kind='{}', device={}, registered={})",
            self.addr,
            self.len,
            kind_name(self.kind),
            self.kind.dev_id(),
            self.registered()
        )
    }
}

/// Allocates `len` bytes of `kind` through the agent (host: a memfd arena, zero-filled; device/pinned: CUDA).
pub fn allocate(agent: &Agent, kind: MemoryKind, len: usize) -> PyResult<RegisteredMemory> {
    agent.allocate_kind(kind, len).py_err()
}
