"""The target side of the two-process tests: a separate process (multiprocessing, spawn) with a NIXL-API agent
that registers a NumPy buffer, sends its metadata and address over a pipe, and answers commands."""

import numpy as np

from conftest import pattern


def target(conn, size: int, transports):
    from pdx_transfer.nixl import nixl_agent, nixl_agent_config

    agent = nixl_agent("target", nixl_agent_config(backends=["UCX"], pdx_transports=transports))
    buf = pattern(size, 11)
    reg = agent.register_memory(np.array([(buf.ctypes.data, size, 0)], dtype=np.uint64), "DRAM")
    conn.send((agent.get_agent_metadata(), buf.ctypes.data))
    while True:
        msg = conn.recv()
        if msg == "quit":
            break
        if msg == "buffer":
            conn.send(buf.tobytes())
        elif msg == "notifs":
            conn.send(agent.get_new_notifs())
        elif msg[0] == "wait_notif":  # ("wait_notif", sender, tag): poll up to 10 s
            import time

            deadline = time.monotonic() + 10
            found = False
            while not found and time.monotonic() < deadline:
                found = agent.check_remote_xfer_done(msg[1], msg[2])
                time.sleep(0.001)
            conn.send(found)
    agent.deregister_memory(reg)
    conn.send("bye")
