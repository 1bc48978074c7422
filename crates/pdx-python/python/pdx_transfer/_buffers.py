"""Where a Python object's memory is: NumPy arrays (and anything with ``__array_interface__``), torch tensors,
and writable buffers (``bytearray``, ``mmap``, ``memoryview``). No import of NumPy or torch happens here: an
object can only be a tensor if torch is already imported."""

from __future__ import annotations

import ctypes
import sys
from typing import Any, NamedTuple, Optional


class Region(NamedTuple):
    """A contiguous range of an object's memory: start address, length in bytes, memory kind ("host" or
    "device"), device id (the GPU for device memory, else 0), and the object that keeps it alive."""

    addr: int
    length: int
    kind: str
    device: int
    owner: Any


def is_tensor(obj: object) -> bool:
    """True if ``obj`` is a torch tensor (torch already imported: importing it here would cost a second)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def is_ndarray(obj: object) -> bool:
    """True if ``obj`` is a NumPy array (NumPy already imported)."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(obj, np.ndarray)


def region_of(obj: Any) -> Region:
    """The memory of ``obj``. Raises ValueError for non-contiguous, read-only or empty objects and TypeError for
    objects that expose no memory."""
    if is_tensor(obj):
        if not obj.is_contiguous():
            raise ValueError("only contiguous tensors can be registered")
        length = obj.numel() * obj.element_size()
        dev = obj.get_device()
        kind = "host" if dev < 0 else "device"
        return _nonempty(Region(obj.data_ptr(), length, kind, max(dev, 0), obj))
    iface = getattr(obj, "__array_interface__", None)
    if iface is not None:
        addr, readonly = iface["data"]
        if readonly:
            raise ValueError("read-only arrays cannot be registered (peers write into registered memory)")
        flags = getattr(obj, "flags", None)
        contiguous = flags.c_contiguous if flags is not None else iface.get("strides") is None
        if not contiguous:
            raise ValueError("only C-contiguous arrays can be registered")
        return _nonempty(Region(addr, int(obj.nbytes), "host", 0, obj))
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(
            f"cannot register a {type(obj).__name__}: pass a NumPy array, a torch tensor, a writable buffer, "
            "or an (addr, length) range"
        ) from None
    if view.readonly:
        raise ValueError("read-only buffers cannot be registered (peers write into registered memory)")
    if not view.c_contiguous:
        raise ValueError("only contiguous buffers can be registered")
    if view.nbytes == 0:
        raise ValueError("cannot register an empty buffer")
    # A ctypes view holds a buffer export: while it lives, a bytearray cannot be resized under the registration.
    export = (ctypes.c_char * view.nbytes).from_buffer(view)
    return Region(ctypes.addressof(export), view.nbytes, "host", 0, (export, view, obj))


def _nonempty(r: Region) -> Region:
    if r.length == 0:
        raise ValueError("cannot register an empty array or tensor")
    return r


def rows_of(descs: Any) -> Optional[bytes]:
    """The bytes of an N×3 integer NumPy array as native-endian u64 rows, or None if ``descs`` is not one."""
    if not is_ndarray(descs) or descs.ndim != 2 or descs.shape[1] != 3:
        return None
    np = sys.modules["numpy"]
    if descs.dtype.kind not in "iu":
        raise ValueError(f"an N×3 descriptor array must hold integers, not {descs.dtype}")
    return np.ascontiguousarray(descs, dtype=np.uint64).tobytes()
