"""pdx's own Python API: registration, metadata, READ/WRITE with notifications (every byte checked), errors."""

import threading
import time

import numpy as np
import pytest

import pdx_transfer as pt
from conftest import MiB, pattern

BLOCK = 64 << 10
BLOCKS = 16


def scattered(base: int, idx) -> list:
    return [(base + i * BLOCK, BLOCK) for i in idx]


@pytest.mark.parametrize("transport", [None, "local", "cma", "tcp"])
def test_read_and_write_every_byte(agents, transport):
    tgt, ini = agents
    remote = pattern(BLOCKS * BLOCK, 1)
    local = np.zeros(BLOCKS * BLOCK, dtype=np.uint8)
    rr, lr = tgt.register(remote), ini.register(local)
    assert ini.load_remote(tgt.metadata()) == "target"
    # READ remote blocks 0..7 into local blocks 15..8 (reversed: a misplaced block shows).
    req = ini.xfer("READ", scattered(lr.addr, range(15, 7, -1)), "target", scattered(rr.addr, range(8)),
                   notif=b"read-1", transport=transport)
    assert req.transport == (transport or "local")
    assert req.total_bytes == 8 * BLOCK
    assert req.status() == "IDLE"
    assert req.post() in ("DONE", "PROC")
    assert req.wait(10.0) is True
    assert req.status() == "DONE"
    for k, i in enumerate(range(15, 7, -1)):
        assert np.array_equal(local[i * BLOCK:(i + 1) * BLOCK], remote[k * BLOCK:(k + 1) * BLOCK])
    assert not local[:8 * BLOCK].any()
    assert tgt.wait_notifications(5.0) == [("initiator", b"read-1")]
    # WRITE local blocks 8..15 (what was read) into remote blocks 8..15, then compare.
    expected = remote.copy()
    expected[8 * BLOCK:] = local[8 * BLOCK:]
    w = ini.xfer("WRITE", scattered(lr.addr, range(8, 16)), "target", scattered(rr.addr, range(8, 16)),
                 notif=b"write-1", transport=transport)
    w.post()
    assert w.wait(10.0)
    assert np.array_equal(remote, expected)
    assert tgt.wait_notifications(5.0) == [("initiator", b"write-1")]
    # Re-posting runs the same request again; a new notification replaces the old one from then on.
    remote[:] = pattern(remote.size, 9)
    req.post(b"read-2")
    assert req.wait(10.0)
    assert np.array_equal(local[15 * BLOCK:], remote[:BLOCK])
    assert req.notif == b"read-2"
    assert tgt.wait_notifications(5.0) == [("initiator", b"read-2")]


def test_pdx_allocated_memory_moves_over_shm(agents):
    tgt, ini = agents
    rr = tgt.allocate(4 * MiB)
    assert rr.shareable and rr.kind == "host" and rr.length == 4 * MiB
    data = pattern(MiB, 3).tobytes()
    rr.write(data, MiB)
    lr = ini.allocate(4 * MiB)
    ini.load_remote(tgt.metadata())
    req = ini.xfer("READ", [lr.desc(0, MiB)], "target", [rr.desc(MiB, MiB)], transport="shm")
    assert req.post() == "DONE"
    assert lr.read(0, MiB) == data


def test_prepared_lists_and_indices(agents):
    tgt, ini = agents
    remote, local = pattern(BLOCKS * BLOCK, 5), np.zeros(BLOCKS * BLOCK, dtype=np.uint8)
    rr, lr = tgt.register(remote), ini.register(local)
    ini.load_remote(tgt.metadata())
    pl = ini.prep_local(pt.descs(scattered(lr.addr, range(BLOCKS))))
    pr = ini.prep_remote("target", pt.descs(np.array([(rr.addr + i * BLOCK, BLOCK, 0) for i in range(BLOCKS)])))
    assert len(pl) == len(pr) == BLOCKS and pr.agent == "target"
    req = ini.make_xfer("READ", pl, [0, 1, 2], pr, [5, 9, 15])
    req.post()
    assert req.wait(5.0)
    for l_i, r_i in ((0, 5), (1, 9), (2, 15)):
        assert np.array_equal(local[l_i * BLOCK:(l_i + 1) * BLOCK], remote[r_i * BLOCK:(r_i + 1) * BLOCK])
    with pytest.raises(pt.nixlInvalidParamError):
        ini.make_xfer("READ", pl, [0], pr, [BLOCKS])


def test_buffers_and_registration_lifetime(agents):
    tgt, ini = agents
    buf = bytearray(b"\x11" * BLOCK)
    reg = tgt.register(buf)
    assert reg.length == BLOCK and reg.registered
    with pytest.raises(BufferError):
        buf.extend(b"x")  # the registration holds a buffer export: no resize under it
    local = np.zeros(BLOCK, dtype=np.uint8)
    lr = ini.register(local)
    ini.load_remote(tgt.metadata())
    req = ini.xfer("READ", [(lr.addr, BLOCK)], "target", [(reg.addr, BLOCK)], transport="cma")
    # In use by a request: strict deregistration refuses and keeps the region.
    with pytest.raises(pt.nixlNotAllowedError):
        reg.deregister()
    assert reg.registered
    req.post()
    assert (local == 0x11).all()
    del req
    reg.deregister()
    assert not reg.registered
    with pytest.raises(pt.nixlInvalidParamError):
        reg.read()
    buf.extend(b"x")  # the export is gone with the registration
    # A new request for the deregistered range is refused.
    with pytest.raises(pt.nixlNotFoundError):
        ini.load_remote(tgt.metadata())
        ini.xfer("READ", [(lr.addr, BLOCK)], "target", [(reg.addr, BLOCK)])


def test_errors_raise_the_right_exceptions(agents):
    tgt, ini = agents
    arr = np.zeros(BLOCK, dtype=np.uint8)
    with pytest.raises(pt.nixlInvalidParamError, match="not mapped"):
        ini.register_raw(4096, 4096)  # nothing is mapped at page 1
    with pytest.raises(pt.nixlInvalidParamError):
        ini.register_raw(arr.ctypes.data, 0)
    with pytest.raises(ValueError):
        ini.register(np.zeros((8, 8), dtype=np.uint8)[:, ::2])  # not contiguous
    ro = np.zeros(16, dtype=np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        ini.register(ro)
    with pytest.raises(TypeError):
        ini.register(object())
    with pytest.raises(pt.nixlNotSupportedError):
        ini.register_raw(arr.ctypes.data, BLOCK, kind="device")
    lr = ini.register(arr)
    with pytest.raises(pt.nixlNotFoundError) as e:
        ini.xfer("READ", [(lr.addr, BLOCK)], "nobody", [(1 << 20, BLOCK)])
    assert isinstance(e.value, pt.TransferError) and e.value.retryable is False
    rr = tgt.register(np.zeros(BLOCK, dtype=np.uint8))
    ini.load_remote(tgt.metadata())
    with pytest.raises(pt.nixlNotFoundError):  # local range outside every registration
        ini.xfer("READ", [(lr.addr + BLOCK, BLOCK)], "target", [(rr.addr, BLOCK)])
    with pytest.raises(pt.nixlInvalidParamError):  # lengths differ
        ini.xfer("READ", [(lr.addr, BLOCK)], "target", [(rr.addr, BLOCK // 2)])
    with pytest.raises(pt.nixlInvalidParamError):
        ini.xfer("MOVE", [(lr.addr, BLOCK)], "target", [(rr.addr, BLOCK)])
    with pytest.raises(pt.nixlInvalidParamError):
        ini.xfer("READ", [(lr.addr, BLOCK)], "target", [(rr.addr, BLOCK)], transport="carrier-pigeon")
    with pytest.raises(pt.nixlInvalidParamError):  # notification over 64 KiB
        ini.xfer("READ", [(lr.addr, BLOCK)], "target", [(rr.addr, BLOCK)], notif=b"x" * (pt.MAX_NOTIF_BYTES + 1))
    with pytest.raises(pt.nixlInvalidParamError):
        pt.descs([(lr.addr, 0)])
    with pytest.raises(pt.nixlInvalidParamError):
        pt.descs([(2**64 - 1, 2)])
    with pytest.raises(pt.nixlMismatchError):
        ini.load_remote(b"\x00" * 64)
    with pytest.raises(pt.nixlMismatchError):
        ini.load_remote(ini.metadata())  # its own
    with pytest.raises(pt.nixlNotFoundError):
        ini.notify("nobody", b"x")
    req = ini.xfer("READ", [(lr.addr, BLOCK)], "target", [(rr.addr, BLOCK)])
    ini.close()
    assert ini.closed
    with pytest.raises(pt.nixlNotAllowedError):
        ini.metadata()
    ini.close()  # twice is fine
    # A request outlives its agent but does not keep it running: posting it then fails cleanly.
    with pytest.raises(pt.TransferError):
        req.post()
    with pytest.raises(pt.TransferError):
        req.post(b"new notification")


def test_notifications_and_gil_release(agents):
    tgt, ini = agents
    tgt.register(np.zeros(BLOCK, dtype=np.uint8))
    ini.load_remote(tgt.metadata())
    ticks = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    t = threading.Thread(target=spin)
    t.start()
    try:
        t0 = time.monotonic()
        assert tgt.wait_notifications(0.3) == []  # blocks ~0.3 s without holding the GIL
        assert time.monotonic() - t0 >= 0.25
        assert len(ticks) >= 20, "the waiting call held the GIL"
    finally:
        stop.set()
        t.join()
    for i in range(5):
        ini.notify("target", b"n%d" % i)
    got = []
    deadline = time.monotonic() + 5
    while len(got) < 5 and time.monotonic() < deadline:
        got += tgt.wait_notifications(1.0)
    assert got == [("initiator", b"n%d" % i) for i in range(5)]
    assert tgt.take_notifications() == []


def test_secret_mismatch_is_refused():
    with pt.Agent("a", secret=b"k" * 32) as a, pt.Agent("b", secret=b"j" * 32) as b:
        with pytest.raises(pt.TransferError):
            b.fetch_remote(a.listen_addr)
    with pytest.raises(pt.nixlInvalidParamError):
        pt.Agent("short-secret", secret=b"k")


def test_metadata_side_channel(agents):
    tgt, ini = agents
    rr = tgt.register(pattern(BLOCK, 7))
    assert ini.fetch_remote(tgt.listen_addr) == "target"
    assert ini.has_remote("target") and not ini.has_remote("other")
    local = np.zeros(BLOCK, dtype=np.uint8)
    lr = ini.register(local)
    r = ini.xfer("READ", [(lr.addr, BLOCK)], "target", [(rr.addr, BLOCK)])
    r.post()
    assert r.wait(5.0) and np.array_equal(local, pattern(BLOCK, 7))
    assert ini.invalidate_remote("target") is True
    assert ini.invalidate_remote("target") is False
    with pytest.raises(pt.TransferError):
        r.post()
