"""NIXL's Python API (``nixl._api``) on pdx's transfer engine.

Code written for NIXL runs with its import changed::

    from nixl._api import nixl_agent, nixl_agent_config          # before
    from pdx_transfer.nixl import nixl_agent, nixl_agent_config  # after

The classes, method names, arguments, defaults and return values follow NIXL's ``src/api/python/_api.py``
(NIXL 1.x): ``transfer`` and ``check_xfer_state`` return "DONE" or "PROC", ``add_remote_agent`` returns the
peer's name as bytes, ``get_new_notifs`` returns ``{agent name: [bytes, ...]}``, descriptor lists come from
``get_xfer_descs`` / ``get_reg_descs``, and failures raise the exception classes NIXL's bindings raise
(``nixlNotFoundError``, ``nixlInvalidParamError``, ...). Where pdx differs (backends, listener, loopback,
storage memory), docs/python.md says how.
"""

from __future__ import annotations

import logging
import os
import pickle
from enum import Enum, IntEnum
from typing import Any, Optional, Union

from . import Agent
from ._buffers import is_ndarray, is_tensor, region_of, rows_of
from ._native import (
    DescList,
    TransferError,
    nixlBackendError,
    nixlCancelledError,
    nixlInvalidParamError,
    nixlMismatchError,
    nixlNoTelemetryError,
    nixlNotAllowedError,
    nixlNotFoundError,
    nixlNotPostedError,
    nixlNotSupportedError,
    nixlRemoteDisconnectError,
    nixlRepostActiveError,
    nixlUnknownError,
)

logger = logging.getLogger(__name__)

#: NIXL's default port of the metadata listener (``nixl_agent_config.listen_port``).
DEFAULT_COMM_PORT = 8888
#: The agent name that marks a local descriptor list in ``prep_xfer_dlist`` (NIXL's value: "").
NIXL_INIT_AGENT = ""

# Backends pdx stands in for: NIXL transfer backends between agents. pdx chooses its own transport per request
# (local, shm, cma, tcp, ucx, cuda), whatever was asked. Storage backends (POSIX, GDS, OBJ, ...) are not offered.
_STAND_IN = ("UCX", "UCX_MO", "LIBFABRIC", "UCCL", "MOONCAKE", "GPUNETIO")

__all__ = [
    "DEFAULT_COMM_PORT",
    "NIXL_INIT_AGENT",
    "nixl_agent",
    "nixl_agent_config",
    "nixl_backend_handle",
    "nixl_mem_t",
    "nixl_prepped_dlist_handle",
    "nixl_thread_sync_t",
    "nixl_xfer_handle",
    "nixlXferDList",
    "nixlRegDList",
    "TransferError",
    "nixlBackendError",
    "nixlCancelledError",
    "nixlInvalidParamError",
    "nixlMismatchError",
    "nixlNoTelemetryError",
    "nixlNotAllowedError",
    "nixlNotFoundError",
    "nixlNotPostedError",
    "nixlNotSupportedError",
    "nixlRemoteDisconnectError",
    "nixlRepostActiveError",
    "nixlUnknownError",
]


class nixl_mem_t(IntEnum):
    """NIXL's memory segment types (``getType()`` of a descriptor list)."""

    DRAM_SEG = 0
    VRAM_SEG = 1
    BLK_SEG = 2
    OBJ_SEG = 3
    FILE_SEG = 4


class nixl_thread_sync_t(Enum):
    """NIXL's thread synchronization modes. pdx agents are always thread-safe; the mode is accepted and
    ignored."""

    NIXL_THREAD_SYNC_NONE = 0
    NIXL_THREAD_SYNC_STRICT = 1
    NIXL_THREAD_SYNC_RW = 2
    NIXL_THREAD_SYNC_DEFAULT = 3


# NIXL memory-type names → (pdx kind, segment type). "cpu"/"cuda" are NIXL's deprecated aliases.
_MEMS = {
    "DRAM": ("host", nixl_mem_t.DRAM_SEG),
    "cpu": ("host", nixl_mem_t.DRAM_SEG),
    "VRAM": ("device", nixl_mem_t.VRAM_SEG),
    "cuda": ("device", nixl_mem_t.VRAM_SEG),
    "FILE": (None, nixl_mem_t.FILE_SEG),
    "BLOCK": (None, nixl_mem_t.BLK_SEG),
    "OBJ": (None, nixl_mem_t.OBJ_SEG),
}
_SEG_NAMES = {v[1]: k for k, v in reversed(list(_MEMS.items()))}


def _mem(mem_type: Union[str, nixl_mem_t]) -> tuple:
    """(pdx kind, segment) of a NIXL memory type; KeyError for unknown names, as NIXL's dict lookup."""
    if isinstance(mem_type, nixl_mem_t):
        mem_type = _SEG_NAMES[mem_type]
    kind, seg = _MEMS[mem_type]
    if kind is None:
        raise nixlNotSupportedError(f"pdx moves DRAM and VRAM, not {mem_type} (storage backends are NIXL's)")
    return kind, seg


def _name(agent: Union[str, bytes]) -> str:
    return agent.decode() if isinstance(agent, (bytes, bytearray)) else agent


def _msg(notif: Union[bytes, str, None]) -> Optional[bytes]:
    """A notification as bytes, None when empty (NIXL: an empty message is no notification)."""
    if not notif:
        return None
    return notif.encode() if isinstance(notif, str) else bytes(notif)


class nixlXferDList:
    """A transfer descriptor list, ``(addr, len, dev_id)`` per entry (NIXL ``nixlXferDList``)."""

    __slots__ = ("_d", "_seg")

    def __init__(self, mem_type: Union[str, nixl_mem_t], descs: Any = (), *, _native_list: Optional[DescList] = None):
        kind, self._seg = _mem(mem_type)
        if _native_list is not None:
            self._d = _native_list
            return
        rows = rows_of(descs)
        if rows is not None:
            self._d = DescList.from_u64_rows(kind, rows)
        else:
            for t in descs:
                if not isinstance(t, tuple) or len(t) != 3:
                    raise ValueError("each transfer descriptor must be a tuple (addr, len, dev_id)")
            self._d = DescList(kind, descs)

    def getType(self) -> nixl_mem_t:
        return self._seg

    def descCount(self) -> int:
        return len(self._d)

    def isEmpty(self) -> bool:
        return len(self._d) == 0

    def __len__(self) -> int:
        return len(self._d)

    def __getitem__(self, i: int) -> tuple:
        return self._d[i]

    def __iter__(self):
        return (self._d[i] for i in range(len(self._d)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, nixlXferDList) and self._seg == other._seg and self._d == other._d

    def __getstate__(self):
        return (int(self._seg), list(self))

    def __setstate__(self, state):
        seg, rows = state
        self._seg = nixl_mem_t(seg)
        self._d = DescList(_mem(self._seg)[0], rows)

    def __repr__(self) -> str:
        return f"nixlXferDList({self._seg.name}, {len(self._d)} descriptors)"


class nixlRegDList:
    """A registration descriptor list, ``(addr, len, dev_id, meta_info)`` per entry (NIXL ``nixlRegDList``).
    Lists made from arrays, tensors or buffers also hold those objects, so registering keeps them alive."""

    __slots__ = ("_rows", "_seg", "_owners")

    def __init__(self, mem_type: Union[str, nixl_mem_t], descs: Any = (), _owners: Optional[list] = None):
        _, self._seg = _mem(mem_type)
        rows = rows_of(descs)
        if rows is not None:
            arr = descs
            self._rows = [(int(a), int(n), int(d), b"") for a, n, d in arr.tolist()]
        else:
            self._rows = []
            for t in descs:
                if not isinstance(t, tuple) or len(t) != 4:
                    raise ValueError("each registration descriptor must be a tuple (addr, len, dev_id, meta_info)")
                meta = t[3].encode() if isinstance(t[3], str) else bytes(t[3])
                self._rows.append((int(t[0]), int(t[1]), int(t[2]), meta))
        self._owners = _owners if _owners is not None else [None] * len(self._rows)

    def getType(self) -> nixl_mem_t:
        return self._seg

    def descCount(self) -> int:
        return len(self._rows)

    def isEmpty(self) -> bool:
        return not self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> tuple:
        return self._rows[i]

    def __iter__(self):
        return iter(self._rows)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, nixlRegDList) and self._seg == other._seg and self._rows == other._rows

    def trim(self) -> nixlXferDList:
        """The same ranges as a transfer descriptor list."""
        kind = _mem(self._seg)[0]
        return nixlXferDList(self._seg, _native_list=DescList(kind, [r[:3] for r in self._rows]))

    def __getstate__(self):
        return (int(self._seg), self._rows)

    def __setstate__(self, state):
        seg, rows = state
        self._seg, self._rows, self._owners = nixl_mem_t(seg), list(rows), [None] * len(rows)

    def __repr__(self) -> str:
        return f"nixlRegDList({self._seg.name}, {len(self._rows)} descriptors)"


class _Released:
    """Stands in for the native object of a released handle: every use is a clear error."""

    def __getattr__(self, name):
        raise nixlInvalidParamError("the handle was released")


_RELEASED = _Released()


class nixl_prepped_dlist_handle:
    """Opaque handle of a prepared descriptor list (``prep_xfer_dlist``). ``release()`` frees it."""

    __slots__ = ("_handle", "_agent", "_released")

    def __init__(self, agent: "nixl_agent", value: Any):
        self._handle = value
        self._agent = agent
        self._released = False

    def release(self):
        self._handle = _RELEASED
        self._released = True

    def __repr__(self) -> str:
        return f"nixl_prepped_dlist_handle(0x{id(self._handle):x}, released={self._released})"


class nixl_xfer_handle:
    """Opaque handle of a transfer request (``initialize_xfer`` / ``make_prepped_xfer``). ``release()`` frees it;
    a transfer still in flight finishes in the background (pdx never leaves memory it uses unreferenced). The
    native request is ``handle._handle`` (a :class:`pdx_transfer.XferRequest`: ``transport``, ``wait()``)."""

    __slots__ = ("_handle", "_agent", "_released")

    def __init__(self, agent: "nixl_agent", value: Any):
        self._handle = value
        self._agent = agent
        self._released = False

    def release(self):
        self._handle = _RELEASED
        self._released = True

    def __repr__(self) -> str:
        return f"nixl_xfer_handle(0x{id(self._handle):x}, released={self._released})"


#: NIXL: an opaque backend handle is an int.
nixl_backend_handle = int


class nixl_agent_config:
    """Configuration of a :class:`nixl_agent`, with NIXL's arguments and defaults.

    pdx's mapping: ``backends`` names NIXL transfer backends (UCX, LIBFABRIC, ...); pdx serves them all with its
    automatic transport choice (same process ``local``, same host ``shm`` or ``cma``, else ``tcp``), so the
    names are recorded and not used to choose. ``enable_listen_thread`` with ``listen_port`` puts the agent's
    listener on ``0.0.0.0:listen_port`` (NIXL's metadata listener); without it the listener is on
    ``127.0.0.1`` with an ephemeral port (pdx needs one for notifications and same-host peers).
    ``enable_prog_thread``, ``num_threads``, ``sync_mode`` and ``capture_telemetry`` are accepted and ignored.

    pdx-only keywords: ``pdx_listen`` ("host:port", overrides the above; env ``PDX_LISTEN``),
    ``pdx_advertise_host`` (host named in metadata when listening on 0.0.0.0; env ``PDX_ADVERTISE_HOST``),
    ``pdx_transports`` (restrict the transports, e.g. ``["cma", "tcp"]``), ``pdx_secret`` (bytes, 16-1024: the
    agent protocol's shared secret; env ``PDX_AGENT_SECRET``), ``pdx_peer_timeout`` (seconds).
    """

    def __init__(
        self,
        enable_prog_thread: bool = True,
        enable_listen_thread: bool = False,
        listen_port: int = DEFAULT_COMM_PORT,
        capture_telemetry: bool = False,
        num_threads: int = 0,
        backends: list = ["UCX"],  # noqa: B006 (NIXL's default, never mutated)
        sync_mode: Optional[nixl_thread_sync_t] = None,
        *,
        pdx_listen: Optional[str] = None,
        pdx_advertise_host: Optional[str] = None,
        pdx_transports: Optional[list] = None,
        pdx_secret: Optional[bytes] = None,
        pdx_peer_timeout: float = 2.0,
    ):
        if sync_mode is not None and not isinstance(sync_mode, nixl_thread_sync_t):
            raise TypeError(f"sync_mode must be a nixl_thread_sync_t (got {type(sync_mode).__name__!r})")
        self.backends = backends
        self.enable_pthread = enable_prog_thread
        self.enable_listen = enable_listen_thread
        self.port = listen_port
        self.capture_telemetry = capture_telemetry
        self.num_threads = num_threads
        self.sync_mode = sync_mode
        self.pdx_listen = pdx_listen
        self.pdx_advertise_host = pdx_advertise_host
        self.pdx_transports = pdx_transports
        self.pdx_secret = pdx_secret
        self.pdx_peer_timeout = pdx_peer_timeout


class nixl_agent:
    """A NIXL agent on pdx: ``nixl_agent(agent_name, nixl_conf=None, instantiate_all=False)``.

    The pdx agent underneath is ``self.agent`` (a :class:`pdx_transfer.Agent`)."""

    def __init__(self, agent_name: str, nixl_conf: Optional[nixl_agent_config] = None, instantiate_all: bool = False):
        if nixl_conf and instantiate_all:
            instantiate_all = False
            logger.warning("Ignoring instantiate_all based on the provided config in agent creation.")
        conf = nixl_conf or nixl_agent_config()
        listen = conf.pdx_listen or os.environ.get("PDX_LISTEN")
        if listen is None:
            listen = f"0.0.0.0:{conf.port}" if conf.enable_listen else "127.0.0.1:0"
        secret = conf.pdx_secret
        if secret is None and os.environ.get("PDX_AGENT_SECRET"):
            secret = os.environ["PDX_AGENT_SECRET"].encode()
        if secret is None and not listen.startswith(("127.", "[::1]", "localhost")):
            # As with NIXL, every peer that reaches the listener is trusted with the registered memory.
            logger.warning(
                "agent %s listens on %s without a secret: anyone who reaches it can read and write its registered "
                "memory (set pdx_secret or PDX_AGENT_SECRET)", agent_name, listen
            )
        self.agent = Agent(
            agent_name,
            listen,
            advertise_host=conf.pdx_advertise_host or os.environ.get("PDX_ADVERTISE_HOST"),
            transports=conf.pdx_transports,
            secret=secret,
            peer_timeout=conf.pdx_peer_timeout,
        )
        self.name = agent_name
        self._leaked_xfer_handles: list = []
        self.notifs: dict = {}
        self.backends: dict = {}
        self.backend_mems: dict = {}
        self.backend_options: dict = {}
        self.plugin_list = ["PDX", *_STAND_IN]
        self.plugin_b_options: dict = {}
        self.plugin_mem_types: dict = {}
        # (addr, len, dev_id, kind) → registrations of that range, newest last.
        self._regs: dict = {}
        for bknd in self.plugin_list if instantiate_all else conf.backends:
            if bknd not in self.plugin_list:
                logger.warning("Skipping backend registration %s due to the missing plugin.", bknd)
            else:
                self.create_backend(bknd, {})
        self.nixl_mems = {k: v[1] for k, v in _MEMS.items()}
        self.nixl_ops = {"WRITE": "WRITE", "READ": "READ"}

    # --- plugins and backends -------------------------------------------------------------------------------

    def get_plugin_list(self) -> list:
        """The backend names pdx stands in for ("PDX" and NIXL's transfer backends)."""
        return self.plugin_list

    def get_plugin_mem_types(self, backend: str) -> list:
        return ["DRAM", "VRAM"] if backend in self.plugin_list else []

    def get_plugin_params(self, backend: str) -> dict:
        return {}

    def get_backend_mem_types(self, backend: str) -> list:
        return self.backend_mems.get(backend, [])

    def get_backend_params(self, backend: str) -> dict:
        return self.backend_options.get(backend, {})

    def create_backend(self, backend: str, initParams: dict = {}):  # noqa: B006 (NIXL's signature)
        """Records ``backend`` (pdx chooses transports itself). Raises :class:`nixlNotFoundError` for a backend
        pdx does not stand in for, as NIXL does for a missing plugin."""
        if backend not in self.plugin_list:
            raise nixlNotFoundError(f"backend {backend!r} is not available (pdx stands in for {self.plugin_list})")
        self.backends[backend] = len(self.backends) + 1
        self.backend_mems[backend] = ["DRAM", "VRAM"]
        self.backend_options[backend] = dict(initParams)

    # --- registration -----------------------------------------------------------------------------------------

    def register_memory(self, reg_list, mem_type: Optional[str] = None, backends: list = []) -> nixlRegDList:  # noqa: B006
        """Registers memory: a list of ``(addr, len, dev_id, meta_info)`` tuples with ``mem_type``, an N×3
        ``(addr, len, dev_id)`` NumPy array with ``mem_type``, a tensor or a list of tensors, or (pdx) NumPy
        arrays and writable buffers, or a list of them. Returns the :class:`nixlRegDList` to deregister with.
        Raises :class:`nixlInvalidParamError` (unmapped or empty ranges, VRAM that is not device memory of that
        GPU, malformed input), :class:`nixlNotSupportedError` (VRAM without CUDA, storage memory)."""
        reg = self.get_reg_descs(reg_list, mem_type)
        if reg is None:
            raise nixlInvalidParamError("nothing to register: see the logged error for what the list must be")
        kind = _mem(reg.getType())[0]
        done = []
        try:
            for (addr, length, dev, _meta), owner in zip(reg._rows, reg._owners):
                if kind == "device":
                    r = self.agent.register_device(addr, length, dev, owner)
                else:
                    r = self.agent.register_host(addr, length, owner)
                done.append(((addr, length, dev, kind), r))
        except BaseException:
            for _, r in done:
                r.close()
            raise
        for key, r in done:
            self._regs.setdefault(key, []).append(r)
        return reg

    def deregister_memory(self, dereg_list: nixlRegDList, backends: list = []):  # noqa: B006
        """Deregisters every range of ``dereg_list`` (as registered). Raises :class:`nixlNotFoundError`, and
        deregisters nothing, if one of them is not registered. Transfers in flight that use a range finish."""
        if not isinstance(dereg_list, nixlRegDList):
            raise TypeError("deregister_memory takes the nixlRegDList that register_memory returned")
        kind = _mem(dereg_list.getType())[0]
        keys = [(a, n, d, kind) for a, n, d, _ in dereg_list._rows]
        want: dict = {}
        for k in keys:
            want[k] = want.get(k, 0) + 1
            if len(self._regs.get(k, ())) < want[k]:
                raise nixlNotFoundError(f"memory {k[0]:#x}+{k[1]} (device {k[2]}) is not registered")
        for k in keys:
            self._regs[k].pop().close()
            if not self._regs[k]:
                del self._regs[k]

    def query_memory(self, reg_list, backend: str, mem_type: Optional[str] = None) -> list:
        """Storage queries are not offered (pdx has no storage backends)."""
        raise nixlNotSupportedError("query_memory: pdx has no storage backends")

    # --- connections and metadata -----------------------------------------------------------------------------

    def make_connection(self, remote_agent: str, backends: list = []):  # noqa: B006
        """Checks that ``remote_agent`` is loaded (pdx connects when the first request is made)."""
        if not self.agent.has_remote(_name(remote_agent)):
            raise nixlNotFoundError(f"unknown remote agent {_name(remote_agent)!r}")

    def get_agent_metadata(self) -> bytes:
        """This agent's metadata (bytes), for a peer's ``add_remote_agent``."""
        return self.agent.metadata()

    def get_partial_agent_metadata(self, descs, inc_conn_info: bool = False, backends: list = []) -> bytes:  # noqa: B006
        """pdx metadata is always complete: the same as ``get_agent_metadata()``."""
        return self.agent.metadata()

    def add_remote_agent(self, metadata: bytes) -> bytes:
        """Loads a peer's metadata; returns the peer's name (bytes, as NIXL's binding returns it; every method
        that takes an agent name takes bytes or str). Raises :class:`nixlMismatchError` for malformed metadata."""
        return self.agent.load_remote(bytes(metadata)).encode()

    def remove_remote_agent(self, agent: Union[str, bytes]):
        """Forgets a remote agent: its connection closes, its requests fail from now on."""
        self.agent.invalidate_remote(_name(agent))

    def check_remote_metadata(self, agent: Union[str, bytes], descs: Optional[nixlXferDList] = None) -> bool:
        """True when ``agent``'s metadata is loaded (and, with ``descs``, covers every descriptor)."""
        name = _name(agent)
        if not self.agent.has_remote(name):
            return False
        if descs is None or descs.isEmpty():
            return True
        try:
            self.agent.prep_remote(name, descs._d)
            return True
        except TransferError:
            return False

    def fetch_remote_metadata(self, remote_agent: str, ip_addr: str = "", port: int = DEFAULT_COMM_PORT, label: str = ""):
        """Fetches ``remote_agent``'s metadata from its listener at ``ip_addr:port`` and loads it (at once; NIXL
        does it in the background, so ``check_remote_metadata`` is then True). Raises
        :class:`nixlNotSupportedError` without ``ip_addr`` (no central metadata server),
        :class:`nixlMismatchError` when another agent answers."""
        if not ip_addr:
            raise nixlNotSupportedError("fetch_remote_metadata needs ip_addr: pdx has no central metadata server")
        md = self.agent.fetch_metadata(f"{ip_addr}:{port}")
        name = self.agent.load_remote(md)
        if name != _name(remote_agent):
            self.agent.invalidate_remote(name)
            raise nixlMismatchError(f"{ip_addr}:{port} is agent {name!r}, not {_name(remote_agent)!r}")

    def send_local_metadata(self, ip_addr: str = "", port: int = DEFAULT_COMM_PORT):
        """Not offered: pdx peers fetch metadata (``fetch_remote_metadata``); nothing is pushed."""
        raise nixlNotSupportedError("send_local_metadata: pdx peers fetch metadata with fetch_remote_metadata")

    def send_partial_agent_metadata(self, descs, inc_conn_info=False, backends=[], ip_addr="", port=DEFAULT_COMM_PORT, label=""):  # noqa: B006
        raise nixlNotSupportedError("send_partial_agent_metadata: pdx peers fetch metadata with fetch_remote_metadata")

    def invalidate_local_metadata(self, ip_addr: str = "", port: int = DEFAULT_COMM_PORT):
        raise nixlNotSupportedError("invalidate_local_metadata: pdx peers notice a closed agent by themselves")

    # --- descriptor lists -------------------------------------------------------------------------------------

    def get_xfer_descs(self, descs, mem_type: Optional[str] = None) -> Optional[nixlXferDList]:
        """A :class:`nixlXferDList` from ``(addr, len, dev_id)`` tuples with ``mem_type``, an N×3 NumPy array with
        ``mem_type``, a tensor, a list of tensors, or a :class:`nixlXferDList` (returned as is). None (with a
        logged error) for input NIXL refuses, as NIXL."""
        if isinstance(descs, nixlXferDList):
            return descs
        if isinstance(descs, nixlRegDList):
            logger.error("RegList type detected for transfer, please use XferList")
            return None
        if is_ndarray(descs):
            if mem_type is None:
                logger.error("Please specify a mem type if not using Tensors")
                return None
            if descs.ndim != 2 or descs.shape[1] != 3:
                logger.error("Nx3 shape required for transfer descriptor list from numpy array")
                return None
            return nixlXferDList(mem_type, descs)
        if is_tensor(descs) or (isinstance(descs, (list, tuple)) and descs and is_tensor(descs[0])):
            regions = self._tensor_regions(descs)
            if regions is None:
                return None
            mem = "DRAM" if regions[0].kind == "host" else "VRAM"
            return nixlXferDList(mem, [(r.addr, r.length, r.device) for r in regions])
        if isinstance(descs, (list, tuple)) and descs and isinstance(descs[0], tuple):
            if mem_type is None:
                logger.error("Please specify a mem type if not using Tensors")
                return None
            if len(descs[0]) != 3:
                logger.error("3-tuple list needed for transfer")
                return None
            return nixlXferDList(mem_type, descs)
        if isinstance(descs, (list, tuple)) and not descs and mem_type is not None:
            return nixlXferDList(mem_type, [])
        return None

    def get_reg_descs(self, descs, mem_type: Optional[str] = None) -> Optional[nixlRegDList]:
        """A :class:`nixlRegDList` from ``(addr, len, dev_id, meta_info)`` tuples with ``mem_type``, an N×3 NumPy
        array with ``mem_type``, a tensor or list of tensors, or (pdx) NumPy arrays / writable buffers or a list
        of them (``mem_type`` DRAM). None (with a logged error) for input NIXL refuses, as NIXL."""
        if isinstance(descs, nixlRegDList):
            return descs
        if isinstance(descs, nixlXferDList):
            logger.error("XferList type detected for registration, please use RegList")
            return None
        if is_ndarray(descs) and descs.ndim == 2 and descs.shape[1] == 3 and descs.dtype.kind in "iu":
            if mem_type is None:
                logger.error("Please specify a mem type if not using Tensors")
                return None
            return nixlRegDList(mem_type, descs)
        if is_tensor(descs) or (isinstance(descs, (list, tuple)) and descs and is_tensor(descs[0])):
            regions = self._tensor_regions(descs)
            if regions is None:
                return None
            mem = "DRAM" if regions[0].kind == "host" else "VRAM"
            return nixlRegDList(mem, [(r.addr, r.length, r.device, b"") for r in regions], [r.owner for r in regions])
        if isinstance(descs, (list, tuple)) and descs and isinstance(descs[0], tuple):
            if mem_type is None:
                logger.error("Please specify a mem type if not using Tensors")
                return None
            if len(descs[0]) != 4:
                logger.error("4-tuple list needed for registration")
                return None
            return nixlRegDList(mem_type, descs)
        # pdx: objects that own memory (NumPy arrays of any shape, writable buffers), alone or in a list.
        objs = descs if isinstance(descs, list) else [descs]
        if not objs:
            logger.error("empty registration list")
            return None
        try:
            regions = [region_of(o) for o in objs]
        except (TypeError, ValueError) as e:
            logger.error("cannot register %s: %s", type(descs).__name__, e)
            return None
        return nixlRegDList(mem_type or "DRAM", [(r.addr, r.length, r.device, b"") for r in regions], [r.owner for r in regions])

    def get_remote_descs(self, descs, mem_type: Optional[str] = None):
        """Remote descriptor lists (NIXL's memory views) are not offered."""
        raise nixlNotSupportedError("get_remote_descs: memory views are not offered by pdx")

    @staticmethod
    def _tensor_regions(descs) -> Optional[list]:
        tensors = [descs] if is_tensor(descs) else list(descs)
        device = tensors[0].device
        regions = []
        for t in tensors:
            if t.device != device:
                return None
            if not t.is_contiguous():
                logger.error("Please use a list of contiguous Tensors")
                return None
            regions.append(region_of(t))
        return regions

    def get_serialized_descs(self, descs) -> bytes:
        return pickle.dumps(descs)

    def deserialize_descs(self, serialized_descs: bytes):
        return pickle.loads(serialized_descs)

    # --- transfers --------------------------------------------------------------------------------------------

    def prep_xfer_dlist(self, agent_name, xfer_list, mem_type: Optional[str] = None, backends: list = []) -> nixl_prepped_dlist_handle:  # noqa: B006
        """Validates a descriptor list once, for ``make_prepped_xfer``: local with ``"NIXL_INIT_AGENT"`` or "",
        else against the named remote agent. ``xfer_list`` takes what ``get_xfer_descs`` takes, and N×5 NumPy
        arrays ``(addr, len, dev_id, stride, count)`` (``count`` blocks of ``len`` bytes ``stride`` apart).
        Raises :class:`nixlNotFoundError` (unknown agent, unregistered memory), :class:`nixlNotSupportedError`
        (loopback: this agent's own name)."""
        name = _name(agent_name)
        if is_ndarray(xfer_list) and xfer_list.ndim == 2 and xfer_list.shape[1] == 5:
            if mem_type is None:
                raise ValueError("Please specify a mem type for strided descriptors")
            rows = [
                (a + k * s, n, d)
                for a, n, d, s, c in (tuple(int(v) for v in row) for row in xfer_list.tolist())
                for k in range(c)
            ]
            descs = nixlXferDList(mem_type, rows)
        else:
            descs = self.get_xfer_descs(xfer_list, mem_type)
            if descs is None:
                raise nixlInvalidParamError("not a descriptor list: see the logged error")
        if name in ("NIXL_INIT_AGENT", NIXL_INIT_AGENT):
            return nixl_prepped_dlist_handle(self, self.agent.prep_local(descs._d))
        if name == self.name:
            raise nixlNotSupportedError("loopback transfers (an agent with itself) are not offered by pdx")
        return nixl_prepped_dlist_handle(self, self.agent.prep_remote(name, descs._d))

    def make_prepped_xfer(
        self,
        operation: str,
        local_xfer_side: nixl_prepped_dlist_handle,
        local_indices,
        remote_xfer_side: nixl_prepped_dlist_handle,
        remote_indices,
        notif_msg: bytes = b"",
        backends: list = [],  # noqa: B006
        skip_desc_merge: bool = False,
    ) -> nixl_xfer_handle:
        """A transfer request moving ``local[local_indices[i]]`` ↔ ``remote[remote_indices[i]]``. Raises KeyError
        for an operation other than "READ"/"WRITE" (as NIXL), :class:`nixlInvalidParamError` for indices out of
        range or unequal lengths."""
        op = self.nixl_ops[operation]
        li = local_indices.tolist() if is_ndarray(local_indices) else list(local_indices)
        ri = remote_indices.tolist() if is_ndarray(remote_indices) else list(remote_indices)
        req = self.agent.make_xfer(op, local_xfer_side._handle, li, remote_xfer_side._handle, ri, _msg(notif_msg))
        return nixl_xfer_handle(self, req)

    def initialize_xfer(
        self,
        operation: str,
        local_descs: nixlXferDList,
        remote_descs: nixlXferDList,
        remote_agent,
        notif_msg: bytes = b"",
        backends: list = [],  # noqa: B006
    ) -> nixl_xfer_handle:
        """A transfer request between two descriptor lists (from ``get_xfer_descs``), paired in order. Raises
        KeyError for an unknown operation, :class:`nixlNotFoundError` (unknown agent, unregistered memory),
        :class:`nixlInvalidParamError` (counts or lengths differ)."""
        op = self.nixl_ops[operation]
        if not isinstance(local_descs, nixlXferDList) or not isinstance(remote_descs, nixlXferDList):
            raise TypeError("initialize_xfer takes nixlXferDList descriptor lists (from get_xfer_descs)")
        req = self.agent.create_xfer(op, local_descs._d, _name(remote_agent), remote_descs._d, _msg(notif_msg))
        return nixl_xfer_handle(self, req)

    def transfer(self, handle: nixl_xfer_handle, notif_msg: bytes = b"") -> str:
        """Posts the request: "DONE" when it completed inside the call (same-host ``cma``/``shm``, same process),
        "PROC" when it completes later (``tcp``). A non-empty ``notif_msg`` replaces the request's notification.
        Failures raise (``nixlRemoteDisconnectError``, ``nixlRepostActiveError``, ...), as NIXL's binding."""
        if notif_msg:
            return handle._handle.post(_msg(notif_msg))
        return handle._handle.post()

    def check_xfer_state(self, handle: nixl_xfer_handle) -> str:
        """"DONE" or "PROC". A failed transfer raises its error; a request never posted raises
        :class:`nixlNotPostedError`, as NIXL's binding."""
        return handle._handle.state()

    def estimate_xfer_cost(self, req_handle: nixl_xfer_handle) -> tuple:
        raise nixlNotSupportedError("estimate_xfer_cost is not offered by pdx")

    def get_xfer_telemetry(self, handle: nixl_xfer_handle):
        """pdx keeps no per-request telemetry: raises :class:`nixlNoTelemetryError`, as NIXL without telemetry."""
        raise nixlNoTelemetryError("pdx keeps no per-request telemetry")

    def query_xfer_backend(self, handle: nixl_xfer_handle) -> str:
        """The first configured backend name (pdx's own transport is ``handle._handle.transport``)."""
        return next(iter(self.backends), "PDX")

    def release_xfer_handle(self, handle: nixl_xfer_handle):
        handle.release()

    def release_dlist_handle(self, handle: nixl_prepped_dlist_handle):
        handle.release()

    # --- notifications ----------------------------------------------------------------------------------------

    def get_new_notifs(self, backends: list = []) -> dict:  # noqa: B006
        """Notifications received since the last call: ``{sender name: [payload bytes, ...]}``, oldest first."""
        out: dict = {}
        for sender, payload in self.agent.take_notifications():
            out.setdefault(sender, []).append(payload)
        return out

    def update_notifs(self, backends: list = []) -> dict:  # noqa: B006
        """Adds new notifications to ``self.notifs`` and returns it (every unhandled notification)."""
        for sender, payload in self.agent.take_notifications():
            self.notifs.setdefault(sender, []).append(payload)
        return self.notifs

    def check_remote_xfer_done(self, remote_agent_name, lookup_tag: bytes, backends: list = [], tag_is_prefix=True) -> bool:  # noqa: B006
        """True (and that one notification removed) when ``remote_agent_name`` sent a notification starting with
        (or, with ``tag_is_prefix=False``, containing) ``lookup_tag``."""
        self.update_notifs()
        msgs = self.notifs.get(_name(remote_agent_name), [])
        for i, m in enumerate(msgs):
            if (tag_is_prefix and m.startswith(lookup_tag)) or (not tag_is_prefix and lookup_tag in m):
                del msgs[i]
                return True
        return False

    def send_notif(self, remote_agent_name, notif_msg: bytes, backend: Optional[str] = None):
        """Sends a notification (≤ 64 KiB; str is encoded) to a loaded remote agent. Raises
        :class:`nixlNotFoundError` for an unknown agent."""
        self.agent.notify(_name(remote_agent_name), _msg(notif_msg) or b"")
