//! Descriptor lists, prepared lists and transfer requests.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use pdx_transfer::{Agent, MemoryKind, TransportKind, XferDesc, XferDescList, XferOp, XferStatus};

use crate::errors::{invalid, nixlNotPostedError, IntoPy};
use crate::memory::kind_name;

/// Most descriptors in one list (16 Mi): bounds what one call allocates from caller input.
const MAX_DESCS: usize = 1 << 24;

/// Parses a memory kind name: "host"/"DRAM"/"cpu", "device"/"VRAM"/"cuda" (with `device`), "pinned".
pub fn parse_kind(kind: &str, device: u32) -> PyResult<MemoryKind> {
    match kind {
        "host" | "DRAM" | "cpu" => Ok(MemoryKind::Host),
        "pinned" => Ok(MemoryKind::PinnedHost),
        "device" | "VRAM" | "cuda" => Ok(MemoryKind::Device(device)),
        other => Err(crate::errors::unsupported(format!(
            "memory kind `{other}` (pdx moves host, pinned and device memory: DRAM, VRAM)"
        ))),
    }
}

/// Parses "READ" / "WRITE" (either case).
pub fn parse_op(op: &str) -> PyResult<XferOp> {
    match op {
        "READ" | "read" => Ok(XferOp::Read),
        "WRITE" | "write" => Ok(XferOp::Write),
        other => Err(invalid(format!(
            "operation `{other}` (expected READ or WRITE)"
        ))),
    }
}

/// Parses a transport name (`local`, `shm`, `cma`, `tcp`, `ucx`, `cuda`).
pub fn parse_transport(name: Option<&str>) -> PyResult<Option<TransportKind>> {
    name.map(|n| n.parse::<TransportKind>().map_err(invalid))
        .transpose()
}

/// A descriptor list: `(addr, len, dev_id)` ranges of one memory kind (NIXL `nixlXferDList`).
///
/// For host memory the device id is kept as given but not matched against registrations (NIXL engines put
/// their rank there); for device memory every descriptor must name the list's device.
#[pyclass(frozen, module = "pdx_transfer", sequence)]
#[derive(Clone)]
pub struct DescList {
    pub(crate) list: XferDescList,
    /// The device ids as given (what `__getitem__` returns).
    dev_ids: Vec<u32>,
}

impl DescList {
    fn build(
        kind: &str,
        rows: impl Iterator<Item = PyResult<(u64, u64, u64)>>,
    ) -> PyResult<DescList> {
        let per_device = matches!(parse_kind(kind, 0)?, MemoryKind::Device(_));
        let mut descs = Vec::new();
        let mut dev_ids = Vec::new();
        let mut device = None;
        for (i, row) in rows.enumerate() {
            let (addr, len, dev) = row?;
            if i >= MAX_DESCS {
                return Err(invalid(format!("more than {MAX_DESCS} descriptors")));
            }
            let dev = u32::try_from(dev)
                .map_err(|_| invalid(format!("descriptor {i}: device id {dev} out of range")))?;
            if len == 0 {
                return Err(invalid(format!("descriptor {i} is empty")));
            }
            if addr.checked_add(len).is_none() {
                return Err(invalid(format!(
                    "descriptor {i}: {addr:#x}+{len} overflows"
                )));
            }
            if *device.get_or_insert(dev) != dev && per_device {
                return Err(invalid(format!(
                    "descriptor {i} names device {dev}, the list device {}",
                    device.unwrap_or_default()
                )));
            }
            dev_ids.push(dev);
            descs.push(XferDesc {
                addr,
                len,
                // Host descriptors always name "device" 0 in pdx: the id is not part of the match.
                dev_id: dev,
            });
        }
        let kind = parse_kind(kind, device.unwrap_or(0))?;
        if matches!(kind, MemoryKind::Host | MemoryKind::PinnedHost) {
            descs.iter_mut().for_each(|d| d.dev_id = 0);
        }
        Ok(DescList {
            list: XferDescList { kind, descs },
            dev_ids,
        })
    }
}

#[pymethods]
impl DescList {
    /// A list from `(addr, len, dev_id)` tuples (a fourth element, NIXL's registration meta info, is ignored).
    /// `kind`: "host"/"DRAM", "device"/"VRAM", "pinned". Errors: `nixlInvalidParamError` for malformed rows,
    /// empty ranges, overflow; `nixlNotSupportedError` for other memory kinds.
    #[new]
    #[pyo3(signature = (kind, descs))]
    fn new(kind: &str, descs: &Bound<'_, PyAny>) -> PyResult<DescList> {
        let rows = descs.try_iter()?.map(|item| {
            let item = item?;
            let t = item
                .cast::<PyTuple>()
                .map_err(|_| invalid("each descriptor must be a tuple (addr, len, dev_id)"))?;
            if !(3..=4).contains(&t.len()) {
                return Err(invalid(format!(
                    "a descriptor tuple has 3 elements (addr, len, dev_id), or 4 with meta info; got {}",
                    t.len()
                )));
            }
            Ok((
                t.get_item(0)?.extract::<u64>()?,
                t.get_item(1)?.extract::<u64>()?,
                t.get_item(2)?.extract::<u64>()?,
            ))
        });
        DescList::build(kind, rows)
    }

    /// A list from the bytes of an N×3 array of native-endian u64 `(addr, len, dev_id)` rows (NumPy's
    /// `arr.astype(np.uint64).tobytes()`). Errors: a length that is not a multiple of 24 bytes; as `new`.
    #[staticmethod]
    fn from_u64_rows(kind: &str, rows: &[u8]) -> PyResult<DescList> {
        if rows.len() % 24 != 0 {
            return Err(invalid(format!(
                "{} bytes is not a whole number of (addr, len, dev_id) u64 rows",
                rows.len()
            )));
        }
        let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]));
        DescList::build(
            kind,
            rows.chunks_exact(24)
                .map(|r| Ok((word(&r[0..8]), word(&r[8..16]), word(&r[16..24])))),
        )
    }

    /// "host", "pinned" or "device".
    #[getter]
    fn kind(&self) -> &'static str {
        kind_name(self.list.kind)
    }

    /// Sum of lengths in bytes.
    #[getter]
    fn total_bytes(&self) -> u64 {
        self.list.total_bytes()
    }

    fn __len__(&self) -> usize {
        self.list.len()
    }

    fn __getitem__(&self, i: isize) -> PyResult<(u64, u64, u32)> {
        let n = self.list.len() as isize;
        let j = if i < 0 { i + n } else { i };
        if j < 0 || j >= n {
            return Err(pyo3::exceptions::PyIndexError::new_err(
                "descriptor index out of range",
            ));
        }
        let d = &self.list.descs[j as usize];
        Ok((d.addr, d.len, self.dev_ids[j as usize]))
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<DescList>()
            .is_ok_and(|o| o.get().list == self.list && o.get().dev_ids == self.dev_ids)
    }

    /// Pickling: `(DescList, (kind, [(addr, len, dev), ...]))`.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Reduced<'py>> {
        let me = slf.get();
        let rows = PyList::empty(slf.py());
        for (d, dev) in me.list.descs.iter().zip(&me.dev_ids) {
            rows.append((d.addr, d.len, *dev))?;
        }
        Ok((slf.get_type().into_any(), (kind_name(me.list.kind), rows)))
    }

    fn __repr__(&self) -> String {
        format!(
            "DescList(kind='{}', {} descriptors, {} bytes)",
            kind_name(self.list.kind),
            self.list.len(),
            self.list.total_bytes()
        )
    }
}

/// What `DescList.__reduce__` returns: the class and its constructor's arguments.
type Reduced<'py> = (Bound<'py, PyAny>, (&'static str, Bound<'py, PyList>));

/// A local descriptor list validated against this agent's registrations (NIXL `prep_xfer_dlist` with
/// `NIXL_INIT_AGENT`).
#[pyclass(frozen, module = "pdx_transfer")]
pub struct PreparedLocal {
    pub(crate) inner: Arc<pdx_transfer::PreparedLocal>,
}

#[pymethods]
impl PreparedLocal {
    fn __len__(&self) -> usize {
        self.inner.len()
    }
}

/// A descriptor list validated against a remote agent's metadata (NIXL `prep_xfer_dlist` with the remote's
/// name).
#[pyclass(frozen, module = "pdx_transfer")]
pub struct PreparedRemote {
    pub(crate) inner: Arc<pdx_transfer::PreparedRemote>,
}

#[pymethods]
impl PreparedRemote {
    /// The remote agent's name.
    #[getter]
    fn agent(&self) -> &str {
        self.inner.agent()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }
}

/// How a request was made, so it can be made again with another notification (NIXL lets each post replace the
/// request's notification; pdx fixes it at creation).
pub enum Recipe {
    /// From descriptor lists.
    Descs {
        local: XferDescList,
        remote_agent: String,
        remote: XferDescList,
    },
    /// From prepared lists and indices.
    Prepped {
        local: Arc<pdx_transfer::PreparedLocal>,
        local_idx: Vec<usize>,
        remote: Arc<pdx_transfer::PreparedRemote>,
        remote_idx: Vec<usize>,
    },
}

impl Recipe {
    /// Creates the request.
    pub fn make(
        &self,
        agent: &Agent,
        op: XferOp,
        notif: Option<Vec<u8>>,
        transport: Option<TransportKind>,
    ) -> pdx_transfer::Result<pdx_transfer::XferRequest> {
        let opts = pdx_transfer::XferOptions { notif, transport };
        match self {
            Recipe::Descs {
                local,
                remote_agent,
                remote,
            } => agent.create_xfer_from_descs(op, local, remote_agent, remote, opts),
            Recipe::Prepped {
                local,
                local_idx,
                remote,
                remote_idx,
            } => agent.create_xfer(op, local, local_idx, remote, remote_idx, opts),
        }
    }
}

struct ReqState {
    req: Arc<pdx_transfer::XferRequest>,
    notif: Option<Vec<u8>>,
}

/// A READ or WRITE transfer request (NIXL's transfer handle). Post it any number of times; follow it with
/// `status()` (polling) or `wait(timeout)` (blocking, GIL released).
#[pyclass(frozen, module = "pdx_transfer")]
pub struct XferRequest {
    state: Mutex<ReqState>,
    recipe: Recipe,
    op: XferOp,
    transport: Option<TransportKind>,
    /// Weak: a request does not keep its agent running after `Agent.close()`.
    agent: Weak<Agent>,
}

impl XferRequest {
    /// Creates a request (GIL released by the caller).
    pub fn create(
        agent: &Arc<Agent>,
        recipe: Recipe,
        op: XferOp,
        notif: Option<Vec<u8>>,
        transport: Option<TransportKind>,
    ) -> pdx_transfer::Result<XferRequest> {
        let req = recipe.make(agent, op, notif.clone(), transport)?;
        Ok(XferRequest {
            state: Mutex::new(ReqState {
                req: Arc::new(req),
                notif,
            }),
            recipe,
            op,
            transport,
            agent: Arc::downgrade(agent),
        })
    }

    fn current(&self) -> Arc<pdx_transfer::XferRequest> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .req
            .clone()
    }
}

/// Interned status strings: no allocation per call on the polling path.
fn status_str(py: Python<'_>, s: XferStatus) -> &Bound<'_, PyString> {
    static DONE: PyOnceLock<Py<PyString>> = PyOnceLock::new();
    static PROC: PyOnceLock<Py<PyString>> = PyOnceLock::new();
    static IDLE: PyOnceLock<Py<PyString>> = PyOnceLock::new();
    let (cell, text) = match s {
        XferStatus::Done => (&DONE, "DONE"),
        XferStatus::InProgress => (&PROC, "PROC"),
        XferStatus::Idle => (&IDLE, "IDLE"),
    };
    cell.get_or_init(py, || PyString::intern(py, text).unbind())
        .bind(py)
}

#[pymethods]
impl XferRequest {
    /// Starts (or restarts) the transfer; returns "DONE" when it completed inside the call (`local`, `shm`,
    /// `cma`) and "PROC" when it completes later (`tcp`, `ucx`). `notif` replaces the request's notification
    /// from this post on (NIXL's `transfer(handle, notif_msg)`); `None` keeps it. The GIL is released while the
    /// bytes move. Errors: `nixlRepostActiveError` while the previous post is in progress; the transfer's own
    /// error when it fails inside the call.
    #[pyo3(signature = (notif=None))]
    fn post<'py>(
        &self,
        py: Python<'py>,
        notif: Option<PyBackedBytes>,
    ) -> PyResult<&Bound<'py, PyString>> {
        let in_progress = || crate::errors::to_py(pdx_transfer::TransferError::InProgress);
        let new_notif = {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match notif.filter(|n| st.notif.as_deref() != Some(&n[..])) {
                Some(_) if st.req.status().ok() == Some(XferStatus::InProgress) => {
                    return Err(in_progress())
                }
                n => n.map(|n| n.to_vec()),
            }
        };
        if let Some(n) = new_notif {
            // Made with the state unlocked: `make` runs without the GIL, and a thread holding the GIL that reads
            // this request's state meanwhile must not wait on a lock held across it (each would wait for the
            // other).
            let agent = self
                .agent
                .upgrade()
                .ok_or_else(|| crate::errors::to_py(pdx_transfer::TransferError::Shutdown))?;
            let fresh = py
                .detach(|| {
                    self.recipe
                        .make(&agent, self.op, Some(n.clone()), self.transport)
                })
                .py_err()?;
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.req.status().ok() == Some(XferStatus::InProgress) {
                return Err(in_progress()); // another thread posted meanwhile
            }
            st.req = Arc::new(fresh);
            st.notif = Some(n);
        }
        let req = self.current();
        let s = py.detach(move || req.post()).py_err()?;
        Ok(status_str(py, s))
    }

    /// "IDLE" (never posted), "PROC" or "DONE". Errors: the failure of the last post.
    fn status<'py>(&self, py: Python<'py>) -> PyResult<&Bound<'py, PyString>> {
        let req = self.current();
        Ok(status_str(py, req.status().py_err()?))
    }

    /// NIXL's `check_xfer_state`: "DONE" or "PROC"; a request never posted raises `nixlNotPostedError`, a failed
    /// one its error.
    fn state<'py>(&self, py: Python<'py>) -> PyResult<&Bound<'py, PyString>> {
        match self.current().status().py_err()? {
            XferStatus::Idle => Err(nixlNotPostedError::new_err(
                "the transfer request was never posted",
            )),
            s => Ok(status_str(py, s)),
        }
    }

    /// Blocks (GIL released) until the current post completes, or `timeout` seconds pass. Returns True when
    /// done, False on timeout. Errors: the transfer's failure.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let timeout = timeout
            .map(|t| {
                Duration::try_from_secs_f64(t.max(0.0)).map_err(|_| invalid("timeout out of range"))
            })
            .transpose()?;
        let req = self.current();
        match py.detach(move || req.wait(timeout)) {
            Ok(()) => Ok(true),
            Err(pdx_transfer::TransferError::InProgress) => Ok(false),
            Err(e) => Err(crate::errors::to_py(e)),
        }
    }

    /// The transport chosen for this request.
    #[getter]
    fn transport(&self) -> &'static str {
        self.current().transport().name()
    }

    /// Bytes moved by one post.
    #[getter]
    fn total_bytes(&self) -> u64 {
        self.current().total_bytes()
    }

    /// "READ" or "WRITE".
    #[getter]
    fn op(&self) -> &'static str {
        match self.op {
            XferOp::Read => "READ",
            XferOp::Write => "WRITE",
        }
    }

    /// The notification sent on completion, if any.
    #[getter]
    fn notif<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.notif.as_deref().map(|n| PyBytes::new(py, n))
    }

    fn __repr__(&self) -> String {
        let req = self.current();
        format!(
            "XferRequest(op='{}', transport='{}', total_bytes={}, status={:?})",
            self.op(),
            req.transport().name(),
            req.total_bytes(),
            req.status()
                .map(|s| format!("{s:?}"))
                .unwrap_or_else(|e| format!("failed: {e}"))
        )
    }
}

/// Benchmark helper (`benches/python_overhead.py`): posts `request` `iters` times from Rust, each post followed by
/// a wait until done, and returns each iteration's time in ns. The same loop in Python, on the same request, minus
/// this one is the per-call overhead of the Python API. GIL released throughout.
#[pyfunction]
#[pyo3(name = "_bench_post_loop")]
pub fn bench_post_loop(py: Python<'_>, request: &XferRequest, iters: usize) -> PyResult<Vec<u64>> {
    let req = request.current();
    py.detach(move || {
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            if req.post()? != XferStatus::Done {
                req.wait(None)?;
            }
            times.push(t.elapsed().as_nanos() as u64);
        }
        Ok(times)
    })
    .py_err()
}
