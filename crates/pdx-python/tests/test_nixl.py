"""pdx_transfer.nixl: NIXL's Python API, its return values and exceptions, in one process and in two."""

import multiprocessing as mp
import pickle
import time

import numpy as np
import pytest

import pdx_transfer as pt
from pdx_transfer import nixl
from pdx_transfer.nixl import nixl_agent, nixl_agent_config

from conftest import pattern
import nixl_peer

BLOCK = 16 << 10
N = 32


@pytest.fixture
def pair():
    tgt = nixl_agent("target", nixl_agent_config(backends=["UCX"]))
    ini = nixl_agent("initiator", nixl_agent_config(backends=["UCX"]))
    rbuf, lbuf = pattern(N * BLOCK, 2), np.zeros(N * BLOCK, dtype=np.uint8)
    treg = tgt.register_memory([(rbuf.ctypes.data, rbuf.nbytes, 0, "")], "DRAM")
    ireg = ini.register_memory(np.array([[lbuf.ctypes.data, lbuf.nbytes, 0]], dtype=np.uint64), "DRAM")
    yield tgt, ini, rbuf, lbuf
    ini.deregister_memory(ireg)
    tgt.deregister_memory(treg)


def rows(base, idx, dev=0):
    return np.array([(base + i * BLOCK, BLOCK, dev) for i in idx], dtype=np.uint64)


def test_return_values_follow_nixl(pair):
    tgt, ini, rbuf, lbuf = pair
    name = ini.add_remote_agent(tgt.get_agent_metadata())
    assert name == b"target"  # NIXL's binding returns the name as bytes
    assert ini.add_remote_agent(tgt.get_agent_metadata()) == b"target"  # loading again is fine
    assert ini.check_remote_metadata("target") and ini.check_remote_metadata(b"target")
    assert not ini.check_remote_metadata("other")
    assert isinstance(tgt.get_agent_metadata(), bytes)
    local = ini.get_xfer_descs(rows(lbuf.ctypes.data, range(4)), "DRAM")
    remote = ini.get_xfer_descs([(rbuf.ctypes.data + i * BLOCK, BLOCK, 0) for i in range(4)], "DRAM")
    assert isinstance(local, nixl.nixlXferDList) and local.descCount() == 4 and not local.isEmpty()
    assert local.getType() == nixl.nixl_mem_t.DRAM_SEG and local[1] == (lbuf.ctypes.data + BLOCK, BLOCK, 0)
    assert ini.check_remote_metadata("target", remote)
    h = ini.initialize_xfer("READ", local, remote, name, b"tag-1")
    assert isinstance(h, nixl.nixl_xfer_handle)
    with pytest.raises(nixl.nixlNotPostedError):
        ini.check_xfer_state(h)
    st = ini.transfer(h)
    assert st in ("DONE", "PROC")
    while ini.check_xfer_state(h) == "PROC":
        pass
    assert ini.check_xfer_state(h) == "DONE"
    assert np.array_equal(lbuf[:4 * BLOCK], rbuf[:4 * BLOCK])
    notifs = tgt.get_new_notifs()
    assert notifs == {"initiator": [b"tag-1"]} and isinstance(next(iter(notifs)), str)
    assert tgt.get_new_notifs() == {}
    # transfer(h, msg) replaces the notification from then on; an empty message keeps it (NIXL).
    ini.transfer(h, "tag-2")
    ini.transfer(h)
    ini.send_notif(name, b"standalone")
    got = {}
    deadline = time.monotonic() + 5
    while sum(map(len, got.values())) < 3 and time.monotonic() < deadline:
        for k, v in tgt.get_new_notifs().items():
            got.setdefault(k, []).extend(v)
    assert got == {"initiator": [b"tag-2", b"tag-2", b"standalone"]}
    assert ini.release_xfer_handle(h) is None
    with pytest.raises(nixl.nixlInvalidParamError):
        ini.transfer(h)
    assert ini.remove_remote_agent(name) is None
    assert not ini.check_remote_metadata("target")


def test_prepped_transfers_with_indices_and_strides(pair):
    tgt, ini, rbuf, lbuf = pair
    name = ini.add_remote_agent(tgt.get_agent_metadata())
    lp = ini.prep_xfer_dlist("NIXL_INIT_AGENT", rows(lbuf.ctypes.data, range(N)), "DRAM")
    # An N×5 strided list: N blocks of BLOCK bytes, BLOCK apart, from the start of the remote buffer.
    rp = ini.prep_xfer_dlist(name, np.array([[rbuf.ctypes.data, BLOCK, 0, BLOCK, N]], dtype=np.uint64), "DRAM")
    assert isinstance(lp, nixl.nixl_prepped_dlist_handle)
    h = ini.make_prepped_xfer("READ", lp, np.array([3, 4], dtype=np.int32), rp, [30, 31], b"pp")
    ini.transfer(h)
    while ini.check_xfer_state(h) != "DONE":
        pass
    assert np.array_equal(lbuf[3 * BLOCK:5 * BLOCK], rbuf[30 * BLOCK:32 * BLOCK])
    lbuf[:] = 0xEE
    w = ini.make_prepped_xfer("WRITE", lp, [0], rp, [0])
    ini.transfer(w)
    while ini.check_xfer_state(w) != "DONE":
        pass
    assert (rbuf[:BLOCK] == 0xEE).all() and not (rbuf[BLOCK:2 * BLOCK] == 0xEE).all()
    with pytest.raises(nixl.nixlInvalidParamError):
        ini.make_prepped_xfer("READ", lp, [N], rp, [0])
    with pytest.raises(KeyError):
        ini.make_prepped_xfer("COPY", lp, [0], rp, [0])
    with pytest.raises(nixl.nixlNotSupportedError):  # loopback
        ini.prep_xfer_dlist("initiator", rows(lbuf.ctypes.data, range(1)), "DRAM")
    ini.release_dlist_handle(lp)
    ini.release_xfer_handle(w)


def test_descriptor_lists_and_registration_inputs(pair):
    tgt, ini, rbuf, lbuf = pair
    # NIXL returns None (and logs) for input it refuses.
    assert ini.get_xfer_descs([(1, 2, 0)]) is None
    assert ini.get_xfer_descs([(1, 2, 0, "")], "DRAM") is None
    assert ini.get_reg_descs([(1, 2, 0)], "DRAM") is None
    assert ini.get_xfer_descs(np.zeros((2, 4), dtype=np.uint64), "DRAM") is None
    with pytest.raises(KeyError):
        ini.get_xfer_descs([(1, 2, 0)], "XRAM")
    with pytest.raises(nixl.nixlNotSupportedError):
        ini.get_xfer_descs([(1, 2, 0)], "FILE")
    x = ini.get_xfer_descs([(lbuf.ctypes.data, 8, 0), (lbuf.ctypes.data + 8, 8, 0)], "DRAM")
    assert ini.get_xfer_descs(x) is x
    assert pickle.loads(pickle.dumps(x)) == x
    assert ini.deserialize_descs(ini.get_serialized_descs(x)) == x
    r = ini.get_reg_descs([(lbuf.ctypes.data, 64, 0, "meta")], "DRAM")
    assert r[0] == (lbuf.ctypes.data, 64, 0, b"meta") and r.descCount() == 1
    assert r.trim()[0] == (lbuf.ctypes.data, 64, 0)
    # NumPy arrays themselves (pdx), alone or in a list; deregistering twice fails as in NIXL.
    a, b = np.ones(4096, dtype=np.uint8), np.ones((16, 16), dtype=np.float32)
    reg = ini.register_memory([a, b])
    assert [d[:2] for d in reg] == [(a.ctypes.data, a.nbytes), (b.ctypes.data, b.nbytes)]
    ini.deregister_memory(reg)
    with pytest.raises(nixl.nixlNotFoundError):
        ini.deregister_memory(reg)
    with pytest.raises(nixl.nixlInvalidParamError):  # nothing mapped there
        ini.register_memory([(4096, 4096, 0, "")], "DRAM")
    with pytest.raises(nixl.nixlInvalidParamError):
        ini.register_memory([(1, 2, 0)], "DRAM")


def test_errors_are_nixl_exceptions(pair):
    tgt, ini, rbuf, lbuf = pair
    local = ini.get_xfer_descs(rows(lbuf.ctypes.data, range(1)), "DRAM")
    remote = ini.get_xfer_descs(rows(rbuf.ctypes.data, range(1)), "DRAM")
    with pytest.raises(nixl.nixlNotFoundError):
        ini.initialize_xfer("READ", local, remote, "target")  # not added yet
    with pytest.raises(nixl.nixlMismatchError):
        ini.add_remote_agent(b"garbage")
    name = ini.add_remote_agent(tgt.get_agent_metadata())
    with pytest.raises(nixl.nixlNotFoundError):
        ini.initialize_xfer("READ", ini.get_xfer_descs([(12345, 10, 0)], "DRAM"), remote, name)
    with pytest.raises(nixl.nixlInvalidParamError):
        ini.initialize_xfer("READ", local, ini.get_xfer_descs(rows(rbuf.ctypes.data, range(2)), "DRAM"), name)
    with pytest.raises(KeyError):
        ini.initialize_xfer("FOO", local, remote, name)
    with pytest.raises(nixl.nixlNotFoundError):
        ini.send_notif("nobody", b"x")
    with pytest.raises(nixl.nixlNoTelemetryError):
        ini.get_xfer_telemetry(None)
    h = ini.initialize_xfer("READ", local, remote, name)
    ini.remove_remote_agent(name)
    with pytest.raises(nixl.nixlNotFoundError):
        ini.transfer(h)
    assert issubclass(nixl.nixlNotFoundError, pt.TransferError)


def test_backends_are_recorded_not_required():
    a = nixl_agent("a", nixl_agent_config(backends=["UCX", "POSIX"]))
    assert list(a.backends) == ["UCX"]  # POSIX (storage) is skipped with a warning, as a missing NIXL plugin
    assert "UCX" in a.get_plugin_list() and a.get_backend_mem_types("UCX") == ["DRAM", "VRAM"]
    with pytest.raises(nixl.nixlNotFoundError):
        a.create_backend("GDS", {})
    b = nixl_agent("b", nixl_agent_config(enable_listen_thread=True, listen_port=0))
    assert b.agent.listen_addr.startswith("0.0.0.0:")


def test_torch_tensors():
    torch = pytest.importorskip("torch", reason="skipped: torch not installed")
    a = nixl_agent("t", nixl_agent_config(backends=["UCX"]))
    t = torch.arange(1024, dtype=torch.int32)
    reg = a.register_memory(t)
    assert reg[0][:2] == (t.data_ptr(), 4096)
    assert a.get_xfer_descs([t[:512], t[512:]])[1] == (t.data_ptr() + 2048, 2048, 0)
    a.deregister_memory(reg)


def test_vram_tensors_move_between_agents():
    torch = pytest.importorskip("torch", reason="skipped: torch not installed (VRAM tensors)")
    if not torch.cuda.is_available():
        pytest.skip("skipped: no CUDA device")
    src = torch.arange(1 << 20, dtype=torch.uint8, device="cuda")
    dst = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
    tgt, ini = nixl_agent("gpu-target"), nixl_agent("gpu-initiator")
    tgt.register_memory(src)
    ini.register_memory(dst)
    name = ini.add_remote_agent(tgt.get_agent_metadata())
    h = ini.initialize_xfer("READ", ini.get_xfer_descs(dst), ini.get_xfer_descs(src), name, b"gpu")
    if ini.transfer(h) != "DONE":
        while ini.check_xfer_state(h) != "DONE":
            time.sleep(0.001)
    torch.cuda.synchronize()
    assert torch.equal(src, dst)
    with pytest.raises(nixl.nixlInvalidParamError):  # host memory named as VRAM
        ini.register_memory([(dst.data_ptr() + (2 << 20), 4096, 0, "")], "VRAM")


def test_vram_without_cuda_is_not_supported():
    a = pt.Agent("no-gpu")
    arr = np.zeros(4096, dtype=np.uint8)
    try:
        import torch  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("skipped: a CUDA device is present (test_vram_tensors_move_between_agents covers it)")
    except ImportError:
        pass
    with pytest.raises(pt.nixlNotSupportedError):
        a.register_device(arr.ctypes.data, arr.nbytes, 0)
    with pytest.raises(pt.nixlNotSupportedError):
        a.allocate(4096, kind="device")


@pytest.mark.parametrize("transport", ["cma", "tcp"])
def test_two_processes_read_write_every_byte(transport):
    size = N * BLOCK
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=nixl_peer.target, args=(b, size, [transport]), daemon=True)
    proc.start()
    try:
        assert a.poll(60), "target process did not start"
        meta, rbase = a.recv()
        ini = nixl_agent("initiator", nixl_agent_config(backends=["UCX"], pdx_transports=[transport]))
        lbuf = np.zeros(size, dtype=np.uint8)
        reg = ini.register_memory([(lbuf.ctypes.data, size, 0, "")], "DRAM")
        name = ini.add_remote_agent(meta)
        remote = ini.get_xfer_descs(rows(rbase, range(N)), "DRAM")
        local = ini.get_xfer_descs(rows(lbuf.ctypes.data, reversed(range(N))), "DRAM")
        h = ini.initialize_xfer("READ", local, remote, name, b"read-done")
        assert h._handle.transport == transport
        if ini.transfer(h) != "DONE":
            while ini.check_xfer_state(h) != "DONE":
                time.sleep(0.0005)
        expected = pattern(size, 11).reshape(N, BLOCK)[::-1].reshape(-1)
        assert np.array_equal(lbuf, expected), "READ: bytes differ"
        a.send(("wait_notif", "initiator", b"read-done"))
        assert a.recv(), "READ notification not received"
        lbuf[:] = pattern(size, 12)
        w = ini.initialize_xfer("WRITE", local, remote, name, b"write-done")
        if ini.transfer(w) != "DONE":
            while ini.check_xfer_state(w) != "DONE":
                time.sleep(0.0005)
        a.send(("wait_notif", "initiator", b"write-done"))
        assert a.recv(), "WRITE notification not received"
        a.send("buffer")
        got = np.frombuffer(a.recv(), dtype=np.uint8)
        assert np.array_equal(got, pattern(size, 12).reshape(N, BLOCK)[::-1].reshape(-1)), "WRITE: bytes differ"
        a.send("quit")
        assert a.recv() == "bye"
        proc.join(30)
        assert proc.exitcode == 0
        # The peer is gone: posting again fails with a NIXL error instead of hanging or crashing.
        with pytest.raises(pt.TransferError):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if ini.transfer(h) != "DONE":
                    while ini.check_xfer_state(h) != "DONE":
                        time.sleep(0.001)
                time.sleep(0.01)
        ini.deregister_memory(reg)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)


def test_killed_peer_fails_transfers():
    size = N * BLOCK
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=nixl_peer.target, args=(b, size, None), daemon=True)
    proc.start()
    try:
        assert a.poll(60)
        meta, rbase = a.recv()
        ini = nixl_agent("initiator")
        lbuf = np.zeros(size, dtype=np.uint8)
        ini.register_memory([(lbuf.ctypes.data, size, 0, "")], "DRAM")
        name = ini.add_remote_agent(meta)
        h = ini.initialize_xfer("READ", ini.get_xfer_descs(rows(lbuf.ctypes.data, range(N)), "DRAM"),
                                ini.get_xfer_descs(rows(rbase, range(N)), "DRAM"), name)
        assert ini.transfer(h) == "DONE"  # cma: done inside the call
        proc.kill()
        proc.join(10)
        t0 = time.monotonic()
        with pytest.raises((nixl.nixlRemoteDisconnectError, nixl.nixlNotFoundError)):
            while time.monotonic() - t0 < 10:
                ini.transfer(h)
                time.sleep(0.01)
        assert time.monotonic() - t0 < 10
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)


def test_metadata_over_the_listener(pair):
    tgt, ini, rbuf, lbuf = pair
    host, port = tgt.agent.listen_addr.rsplit(":", 1)
    with pytest.raises(nixl.nixlNotSupportedError):
        ini.fetch_remote_metadata("target")  # no central metadata server
    with pytest.raises(nixl.nixlMismatchError):
        ini.fetch_remote_metadata("someone-else", host, int(port))
    assert not ini.check_remote_metadata("target")  # a mismatched answer is not kept
    ini.fetch_remote_metadata("target", host, int(port))
    assert ini.check_remote_metadata("target")
    ini.make_connection("target")
    with pytest.raises(nixl.nixlNotFoundError):
        ini.make_connection("nobody")
    with pytest.raises(nixl.nixlNotSupportedError):
        ini.send_local_metadata(host, int(port))
