//! The agent (NIXL `nixlAgent`) as a Python class.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyList};

use pdx_transfer::{AgentConfig, AgentSecret, Notification};

use crate::errors::{invalid, to_py, IntoPy};
use crate::memory::{self, Registration};
use crate::xfer::{
    parse_kind, parse_op, parse_transport, DescList, PreparedLocal, PreparedRemote, Recipe,
    XferRequest,
};

/// A pdx KV-transfer agent: registers memory, publishes metadata, loads peers' metadata, creates transfer
/// requests and exchanges notifications. Its listener (default `127.0.0.1:0`) serves the metadata side
/// channel, the `tcp` transport and notifications; same-host peers reach it through its Unix socket.
#[pyclass(frozen, subclass, module = "pdx_transfer")]
pub struct Agent {
    inner: Mutex<Option<Arc<pdx_transfer::Agent>>>,
    name: String,
}

impl Agent {
    fn get(&self) -> PyResult<Arc<pdx_transfer::Agent>> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| to_py(pdx_transfer::TransferError::Shutdown))
    }
}

/// A notification as Python sees it: `(sender name, payload)`.
fn notif_tuples<'py>(py: Python<'py>, notifs: Vec<Notification>) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    for n in notifs {
        out.append((n.from, PyBytes::new(py, &n.payload)))?;
    }
    Ok(out)
}

fn seconds(what: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| invalid(format!("{what}: {s} is not a valid number of seconds")))
}

#[pymethods]
impl Agent {
    /// Starts an agent named `name` (1..=256 bytes, unique among agents that talk to each other).
    ///
    /// `listen`: "host:port" of its listener, or None for none (then peers can neither reach it over `tcp` nor
    /// send it notifications). `transports`: the transports it may use as initiator, in order (default: all
    /// that the build has). `secret`: 16–1024 bytes shared by every agent that may connect (mutual
    /// HMAC-SHA256 challenge–response). `peer_timeout`: seconds without progress before a peer is declared
    /// dead. `populate`: fault in memory pdx allocates or maps up front. The GIL is released while it starts.
    #[new]
    #[pyo3(signature = (name, listen=Some("127.0.0.1:0".to_string()), *, advertise_host=None, transports=None,
                        secret=None, peer_timeout=2.0, populate=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        name: String,
        listen: Option<String>,
        advertise_host: Option<String>,
        transports: Option<Vec<String>>,
        secret: Option<Vec<u8>>,
        peer_timeout: f64,
        populate: bool,
    ) -> PyResult<Agent> {
        let mut cfg = AgentConfig::new(name.clone());
        cfg.listen = listen
            .map(|l| {
                l.parse::<SocketAddr>()
                    .map_err(|e| invalid(format!("listen address `{l}`: {e}")))
            })
            .transpose()?;
        cfg.advertise_host = advertise_host;
        if let Some(t) = transports {
            cfg.transports = t
                .iter()
                .map(|n| parse_transport(Some(n)).map(|k| k.into_iter().collect::<Vec<_>>()))
                .collect::<PyResult<Vec<_>>>()?
                .concat();
        }
        if let Some(s) = secret {
            cfg.secret = Some(AgentSecret::new(s).py_err()?);
        }
        cfg.peer_timeout = seconds("peer_timeout", peer_timeout)?;
        cfg.populate = populate;
        let agent = py.detach(|| pdx_transfer::Agent::new(cfg)).py_err()?;
        Ok(Agent {
            inner: Mutex::new(Some(Arc::new(agent))),
            name,
        })
    }

    /// The agent's name.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// "ip:port" of the listener (None without one, or once closed).
    #[getter]
    fn listen_addr(&self) -> Option<String> {
        self.get().ok()?.listen_addr().map(|a| a.to_string())
    }

    /// Registers `length` bytes of host memory at `addr` (an address in this process). `owner`, the object the
    /// memory belongs to (array, tensor, buffer), is kept alive while the region is registered or in use.
    /// Without one the caller keeps the memory alive until it deregisters, as with NIXL.
    /// Errors: `nixlInvalidParamError` for zero length or a range not mapped read-write here.
    #[pyo3(signature = (addr, length, owner=None))]
    fn register_host(
        &self,
        py: Python<'_>,
        addr: u64,
        length: u64,
        owner: Option<Py<PyAny>>,
    ) -> PyResult<Registration> {
        let agent = self.get()?;
        let mem = py.detach(|| {
            // The owner moves into the registration without the GIL: a `Py` may be moved, not used.
            memory::register_host(&agent, addr, length, owner)
        })?;
        Ok(Registration::new(mem))
    }

    /// Registers `length` bytes of GPU `device`'s memory at device address `addr` (engine-owned VRAM), validated
    /// with `cuPointerGetAttributes`. `owner` (the tensor) is kept alive while the returned object lives. GIL
    /// released. Errors: `nixlNotSupportedError` without CUDA; `nixlInvalidParamError` for a range that is not
    /// device memory of GPU `device`.
    #[pyo3(signature = (addr, length, device, owner=None))]
    fn register_device(
        &self,
        py: Python<'_>,
        addr: u64,
        length: u64,
        device: u32,
        owner: Option<Py<PyAny>>,
    ) -> PyResult<Registration> {
        let agent = self.get()?;
        let mem = py.detach(|| memory::register_device(&agent, addr, length, device))?;
        Ok(Registration::with_owner(mem, owner))
    }

    /// Allocates and registers `length` bytes: `kind="host"` is a memfd arena (zero-filled) that same-host
    /// peers map (`shm`, no system call per transfer); "device"/"pinned" go through CUDA (`nixlNotSupportedError`
    /// without it). The GIL is released while it allocates.
    #[pyo3(signature = (length, kind="host", device=0))]
    fn allocate(
        &self,
        py: Python<'_>,
        length: usize,
        kind: &str,
        device: u32,
    ) -> PyResult<Registration> {
        let agent = self.get()?;
        let kind = parse_kind(kind, device)?;
        let mem = py.detach(|| memory::allocate(&agent, kind, length))?;
        Ok(Registration::new(mem))
    }

    /// This agent's metadata (versioned bytes, at most 1 MiB), for peers' `load_remote`.
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let agent = self.get()?;
        let md = py.detach(|| agent.local_metadata()).py_err()?;
        Ok(PyBytes::new(py, &md))
    }

    /// Loads a peer's metadata (untrusted bytes) and returns its name. Same-host peers are vouched for over
    /// their Unix socket. Errors: `nixlMismatchError` for malformed metadata. GIL released.
    fn load_remote(&self, py: Python<'_>, metadata: PyBackedBytes) -> PyResult<String> {
        let agent = self.get()?;
        py.detach(|| agent.load_remote(&metadata)).py_err()
    }

    /// Fetches a peer's metadata from its listener ("host:port") without loading it. GIL released.
    fn fetch_metadata<'py>(&self, py: Python<'py>, addr: String) -> PyResult<Bound<'py, PyBytes>> {
        let agent = self.get()?;
        let md = py.detach(|| agent.fetch_metadata(&addr)).py_err()?;
        Ok(PyBytes::new(py, &md))
    }

    /// Fetches a peer's metadata from its listener ("host:port") and loads it; returns its name. GIL released.
    fn fetch_remote(&self, py: Python<'_>, addr: String) -> PyResult<String> {
        let agent = self.get()?;
        py.detach(|| agent.fetch_remote(&addr)).py_err()
    }

    /// Forgets a remote agent: its connection closes and its outstanding transfers fail. Returns whether it was
    /// loaded.
    fn invalidate_remote(&self, py: Python<'_>, name: String) -> PyResult<bool> {
        let agent = self.get()?;
        Ok(py.detach(|| agent.invalidate_remote(&name)))
    }

    /// True when `name`'s metadata is loaded and the peer is not known to be gone.
    fn has_remote(&self, name: &str) -> PyResult<bool> {
        Ok(self.get()?.remote_metadata(name).is_ok())
    }

    /// Validates a local descriptor list against this agent's registrations (NIXL `prep_xfer_dlist` with
    /// `NIXL_INIT_AGENT`). Errors: `nixlNotFoundError` naming the first descriptor outside every region.
    fn prep_local(&self, descs: &DescList) -> PyResult<PreparedLocal> {
        let p = self.get()?.prep_local(&descs.list).py_err()?;
        Ok(PreparedLocal { inner: Arc::new(p) })
    }

    /// Validates a descriptor list against remote agent `agent`'s metadata. Errors: `nixlNotFoundError` for an
    /// unknown agent or a descriptor outside its regions.
    fn prep_remote(&self, agent: &str, descs: &DescList) -> PyResult<PreparedRemote> {
        let p = self.get()?.prep_remote(agent, &descs.list).py_err()?;
        Ok(PreparedRemote { inner: Arc::new(p) })
    }

    /// Creates a transfer request `op` ("READ": remote → local; "WRITE": local → remote) between `local` and
    /// `remote_agent`'s `remote`, paired in order, with an optional notification (≤ 64 KiB) for the peer and
    /// an optional forced transport. GIL released (it may connect to the peer).
    /// Errors: `nixlNotFoundError` (unknown agent, unregistered memory), `nixlInvalidParamError` (counts or
    /// lengths differ), `nixlNotSupportedError` (no transport can serve it).
    #[pyo3(signature = (op, local, remote_agent, remote, notif=None, transport=None))]
    #[allow(clippy::too_many_arguments)]
    fn create_xfer(
        &self,
        py: Python<'_>,
        op: &str,
        local: &DescList,
        remote_agent: String,
        remote: &DescList,
        notif: Option<PyBackedBytes>,
        transport: Option<&str>,
    ) -> PyResult<XferRequest> {
        let agent = self.get()?;
        let notif = notif.map(|n| n.to_vec());
        let (op, transport) = (parse_op(op)?, parse_transport(transport)?);
        let recipe = Recipe::Descs {
            local: local.list.clone(),
            remote_agent,
            remote: remote.list.clone(),
        };
        py.detach(|| XferRequest::create(&agent, recipe, op, notif, transport))
            .py_err()
    }

    /// Creates a transfer request moving `local[local_idx[i]]` ↔ `remote[remote_idx[i]]` for every `i` (NIXL
    /// `make_prepped_xfer`). Errors: as `create_xfer`, and `nixlInvalidParamError` for indices out of range.
    #[pyo3(signature = (op, local, local_idx, remote, remote_idx, notif=None, transport=None))]
    #[allow(clippy::too_many_arguments)]
    fn make_xfer(
        &self,
        py: Python<'_>,
        op: &str,
        local: &PreparedLocal,
        local_idx: Vec<usize>,
        remote: &PreparedRemote,
        remote_idx: Vec<usize>,
        notif: Option<PyBackedBytes>,
        transport: Option<&str>,
    ) -> PyResult<XferRequest> {
        let agent = self.get()?;
        let notif = notif.map(|n| n.to_vec());
        let (op, transport) = (parse_op(op)?, parse_transport(transport)?);
        let recipe = Recipe::Prepped {
            local: local.inner.clone(),
            local_idx,
            remote: remote.inner.clone(),
            remote_idx,
        };
        py.detach(|| XferRequest::create(&agent, recipe, op, notif, transport))
            .py_err()
    }

    /// Sends a notification (≤ 64 KiB) to a loaded remote agent. GIL released.
    fn notify(&self, py: Python<'_>, agent: String, payload: PyBackedBytes) -> PyResult<()> {
        let me = self.get()?;
        py.detach(|| me.notify(&agent, payload.to_vec())).py_err()
    }

    /// Takes every notification received so far, oldest first, as `(sender, payload)` tuples.
    fn take_notifications<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let notifs = self.get()?.take_notifications();
        notif_tuples(py, notifs)
    }

    /// Waits up to `timeout` seconds (GIL released) for at least one notification, then takes all of them.
    fn wait_notifications<'py>(
        &self,
        py: Python<'py>,
        timeout: f64,
    ) -> PyResult<Bound<'py, PyList>> {
        let agent = self.get()?;
        let timeout = seconds("timeout", timeout.max(0.0))?;
        let notifs = py.detach(|| agent.wait_notifications(timeout));
        notif_tuples(py, notifs)
    }

    /// Stops the agent: its listener and connections close, peers' transfers with it fail. Registrations stay
    /// valid objects but can no longer be reached by peers. Closing twice is a no-op.
    fn close(&self, py: Python<'_>) {
        let agent = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        py.detach(move || drop(agent));
    }

    /// True once closed.
    #[getter]
    fn closed(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
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
            "Agent(name={:?}, listen_addr={:?})",
            self.name,
            self.listen_addr()
        )
    }
}
