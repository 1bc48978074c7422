#!/usr/bin/env python3
"""Per-call overhead of pdx's Python API over its Rust API: a 64 × 4 KiB READ batch, post → done, the same
request of the same two agents (two processes, the target in a spawned child), timed three ways in one run:

  rust    the loop in Rust (pdx_transfer._native._bench_post_loop: XferRequest::post, then wait if needed)
  python  pdx_transfer's API: `if req.post() != "DONE": req.wait()`
  nixl    pdx_transfer.nixl: `if agent.transfer(h) != "DONE": while agent.check_xfer_state(h) != "DONE": pass`

for each transport the target's memory allows: `cma` (NumPy memory, the caller's) and `shm` (memory pdx
allocated). Overhead = p50(python or nixl) − p50(rust). Runs alternate in rounds so drift hits all three alike.

  crates/pdx-python/tests/run.sh   # once: builds and installs pdx_transfer into target/venv-pdx-python
  target/venv-pdx-python/bin/python benches/python_overhead.py [--iters 20000] [--rounds 5] [--json]
"""
import argparse
import json
import multiprocessing as mp
import time

import numpy as np

BLOCK, BATCH, STRIDE = 4096, 64, 64 << 10


def target(conn):
    import pdx_transfer as pt

    agent = pt.Agent("target")
    arr = np.full(BATCH * STRIDE, 7, dtype=np.uint8)
    caller = agent.register(arr)
    pdx_mem = agent.allocate(BATCH * STRIDE)
    pdx_mem.write(b"\x07" * (BATCH * STRIDE))
    conn.send((agent.metadata(), caller.addr, pdx_mem.addr))
    conn.recv()  # "quit"
    conn.send("bye")


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p / 100 * len(v)))] / 1000.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import pdx_transfer as pt
    from pdx_transfer import _native
    from pdx_transfer.nixl import nixl_agent

    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=target, args=(b,), daemon=True)
    proc.start()
    md, caller_base, pdx_base = a.recv()
    # One NIXL-API agent; its pdx agent (`.agent`) serves the Rust and Pythonic loops: same agents throughout.
    ini = nixl_agent("initiator")
    lbuf = np.zeros(BATCH * STRIDE, dtype=np.uint8)
    ini.register_memory([(lbuf.ctypes.data, lbuf.nbytes, 0, "")], "DRAM")
    name = ini.add_remote_agent(md)
    local = ini.get_xfer_descs([(lbuf.ctypes.data + i * STRIDE, BLOCK, 0) for i in range(BATCH)], "DRAM")
    rows = []
    for transport, base in (("cma", caller_base), ("shm", pdx_base)):
        remote = ini.get_xfer_descs([(base + i * STRIDE, BLOCK, 0) for i in range(BATCH)], "DRAM")
        h = ini.initialize_xfer("READ", local, remote, name)
        req = h._handle
        assert req.transport == transport, (req.transport, transport)
        lbuf[:] = 0
        times = {"rust": [], "python": [], "nixl": []}
        clock = time.perf_counter_ns
        for _ in range(args.rounds):
            times["rust"] += _native._bench_post_loop(req, args.iters)
            t = times["python"]
            for _ in range(args.iters):
                t0 = clock()
                if req.post() != "DONE":
                    req.wait()
                t.append(clock() - t0)
            t = times["nixl"]
            transfer, check = ini.transfer, ini.check_xfer_state
            for _ in range(args.iters):
                t0 = clock()
                if transfer(h) != "DONE":
                    while check(h) != "DONE":
                        pass
                t.append(clock() - t0)
        assert lbuf[0] == 7 and lbuf[(BATCH - 1) * STRIDE + BLOCK - 1] == 7
        r50 = pct(times["rust"], 50)
        for api in ("rust", "python", "nixl"):
            v = times[api]
            rows.append({"transport": transport, "api": api, "p50_us": pct(v, 50), "p99_us": pct(v, 99),
                         "overhead_p50_us": pct(v, 50) - r50, "samples": len(v)})
        ini.release_xfer_handle(h)
    a.send("quit")
    a.recv()
    proc.join(10)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"64 × {BLOCK // 1024} KiB READ, post → done, {args.rounds} rounds × {args.iters} per API, one run")
    print("| transport | API | p50 µs | p99 µs | overhead over Rust, p50 µs |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['transport']} | {r['api']} | {r['p50_us']:.2f} | {r['p99_us']:.2f} | "
              f"{'—' if r['api'] == 'rust' else format(r['overhead_p50_us'], '.2f')} |")


if __name__ == "__main__":
    main()
