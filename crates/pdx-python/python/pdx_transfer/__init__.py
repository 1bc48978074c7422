"""pdx's KV transfer engine from Python.

Two APIs over one native module (``pdx_transfer._native``, Rust through PyO3):

* this module, pdx's own: :class:`Agent` registers memory (NumPy arrays, tensors, buffers, raw ranges, or memory
  pdx allocates), exchanges metadata, and makes :class:`XferRequest` objects that are posted, polled and waited
  on; notifications are ``(sender, payload)`` tuples;
* :mod:`pdx_transfer.nixl`, NIXL's Python API (``nixl_agent``, ``nixl_agent_config``, ...) with NIXL's
  semantics and return values, so code written for NIXL runs with its import line changed.

Every call that can block (a copy, a socket, a wait) releases the GIL. Errors are :class:`TransferError`
subclasses named after NIXL's statuses (``nixlNotFoundError``, ``nixlInvalidParamError``, ...), with a
``retryable`` attribute.

Example (two agents in one process; across processes, send ``metadata()`` over any channel)::

    import numpy as np, pdx_transfer as pt
    prefill, decode = pt.Agent("prefill"), pt.Agent("decode")
    kv_p = np.full(1 << 20, 7, dtype=np.uint8); kv_d = np.zeros(1 << 20, dtype=np.uint8)
    rp, rd = prefill.register(kv_p), decode.register(kv_d)
    decode.load_remote(prefill.metadata())
    req = decode.xfer("READ", [(rd.addr, 4096)], "prefill", [(rp.addr, 4096)], notif=b"req-1")
    req.post(); req.wait(5.0)
    assert kv_d[:4096].tolist() == [7] * 4096
    assert prefill.wait_notifications(1.0) == [("decode", b"req-1")]
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from . import _native
from ._buffers import Region, region_of, rows_of
from ._native import (
    MAX_NOTIF_BYTES,
    DescList,
    PreparedLocal,
    PreparedRemote,
    Registration,
    TransferError,
    XferRequest,
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

__all__ = [
    "Agent",
    "DescList",
    "PreparedLocal",
    "PreparedRemote",
    "Registration",
    "XferRequest",
    "TransferError",
    "MAX_NOTIF_BYTES",
    "descs",
    "region_of",
    "Region",
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

DescsLike = Union[DescList, Iterable[tuple], Any]


def descs(ranges: DescsLike, kind: str = "host") -> DescList:
    """A :class:`DescList` from ``(addr, len)`` or ``(addr, len, dev_id)`` tuples, an N×3 integer NumPy array of
    ``(addr, len, dev_id)`` rows, or a :class:`DescList` (returned as is). ``kind``: "host" (DRAM), "device"
    (VRAM) or "pinned". Raises :class:`nixlInvalidParamError` for malformed input."""
    if isinstance(ranges, DescList):
        return ranges
    rows = rows_of(ranges)
    if rows is not None:
        return DescList.from_u64_rows(kind, rows)
    return DescList(kind, [r if len(r) != 2 else (r[0], r[1], 0) for r in ranges])


class Agent(_native.Agent):
    """A pdx KV-transfer agent (NIXL ``nixlAgent``).

    ``Agent(name, listen="127.0.0.1:0", *, advertise_host=None, transports=None, secret=None,
    peer_timeout=2.0, populate=True)``: ``listen`` is the "host:port" of its listener (metadata side channel,
    ``tcp`` transport, notifications; None for none); ``transports`` restricts the transports it may use as
    initiator (``local``, ``shm``, ``cma``, ``tcp``, ``ucx``, ``cuda``; default: automatic choice among all);
    ``secret`` (16-1024 bytes) makes every connection prove it holds the same secret; ``peer_timeout`` is in
    seconds. Use it as a context manager, or call :meth:`close`.

    Native methods: ``register_host(addr, length, owner=None)``, ``register_device(addr, length, device)``,
    ``allocate(length, kind="host", device=0)``, ``metadata()``, ``load_remote(md)``, ``fetch_metadata(addr)``,
    ``fetch_remote(addr)``, ``invalidate_remote(name)``, ``has_remote(name)``, ``prep_local(descs)``,
    ``prep_remote(agent, descs)``, ``create_xfer(op, local, remote_agent, remote, notif=None, transport=None)``,
    ``make_xfer(op, local, local_idx, remote, remote_idx, notif=None, transport=None)``,
    ``notify(agent, payload)``, ``take_notifications()``, ``wait_notifications(timeout)``, ``close()``.
    """

    def register(self, obj: Any) -> Registration:
        """Registers the memory of ``obj`` in place: a NumPy array, a torch tensor, or a writable buffer
        (``bytearray``, ``mmap``, ``memoryview``), which the registration keeps alive. Same-host peers reach host
        memory with ``cma``, others with ``tcp``; CUDA tensors move over ``cuda`` (CUDA IPC between processes).
        Raises ValueError (non-contiguous, read-only, empty), TypeError (no memory),
        :class:`nixlNotSupportedError` (a CUDA tensor on a machine without CUDA)."""
        r = region_of(obj)
        if r.kind == "device":
            return self.register_device(r.addr, r.length, r.device, r.owner)
        return self.register_host(r.addr, r.length, r.owner)

    def register_raw(self, addr: int, length: int, kind: str = "host", device: int = 0) -> Registration:
        """Registers ``length`` bytes at ``addr`` as they are. The caller keeps the memory valid until the
        registration is closed (pdx neither frees nor pins it), as with NIXL."""
        if kind in ("device", "VRAM", "cuda"):
            return self.register_device(addr, length, device)
        return self.register_host(addr, length)

    def xfer(
        self,
        op: str,
        local: DescsLike,
        remote_agent: str,
        remote: DescsLike,
        notif: Optional[bytes] = None,
        transport: Optional[str] = None,
        kind: str = "host",
    ) -> XferRequest:
        """A READ (remote → local) or WRITE (local → remote) request between two lists of ranges, in any form
        :func:`descs` takes, paired in order. Post it with ``req.post()``; ``req.wait(timeout)`` blocks."""
        return self.create_xfer(op, descs(local, kind), remote_agent, descs(remote, kind), notif, transport)

    def __repr__(self) -> str:
        return f"pdx_transfer.Agent(name={self.name!r}, listen_addr={self.listen_addr!r})"
