#!/usr/bin/env python3
"""Builds the table of benches/compare_ucx.sh from its output folder: python3 compare_ucx.py OUT "shm,self tcp"."""
import json, re, sys
from pathlib import Path

out, tls_list = Path(sys.argv[1]), sys.argv[2].split()
fmt = lambda v: "—" if v is None else f"{v:.2f}"
print("| UCX_TLS | op | block | pdx ucx GB/s | ucx_perftest GB/s | pdx/perftest | NIXL (UCX) GB/s | pdx/NIXL | pdx p50 µs/batch |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")
foot = "\n\\* NIXL with its default UCX_TLS: it refuses UCX_TLS=shm,self (UCX 1.13 shared memory has no peer-failure handling)."
for tls in tls_list:
    tag = tls.replace(",", "+")
    # UCX prints its log (e.g. the shm "no peer failure handler" notice) on stdout: skip to the JSON array.
    text = (out / f"pdx-{tag}.json").read_text()
    pdx = json.loads(text[text.index("\n[\n") + 1 if not text.startswith("[\n") else 0:])
    perf = {}
    for line in (out / f"perftest-{tag}.txt").read_text().splitlines():
        f = line.split()
        if len(f) >= 9 and f[2] == "Final:":
            # Final: iters, 50%ile, avg, overall overhead (us), avg, overall bandwidth (MB/s = MiB/s), msg rates.
            perf[(f[0], int(f[1]))] = float(f[8]) * 1024 * 1024 / 1e9
    def nixl_rows(name):
        rows, p = {}, out / name
        if p.exists():
            for line in p.read_text().splitlines():
                m = re.match(r"(READ|WRITE)\s+block=\s*(\d+) B .*?([\d.]+) GB/s", line)
                if m:
                    rows[(m[1].lower(), int(m[2]))] = float(m[3])
        return rows

    # NIXL cannot run with UCX_TLS=shm,self (no peer-failure handling there): use its default UCX_TLS, marked *.
    nixl, mark = nixl_rows(f"nixl-{tag}.txt"), ""
    if not nixl:
        nixl, mark = nixl_rows("nixl-default.txt"), "*"

    for op, test in (("write", "ucp_put_bw"), ("read", "ucp_get")):
        for r in sorted((r for r in pdx if r["op"] == op), key=lambda r: r["block_size"]):
            bs = r["block_size"]
            pt, nx = perf.get((test, bs)), nixl.get((op, bs))
            print(f"| {tls} | {op} ({test}) | {bs // 1024} KiB | {fmt(r['gbps'])} | {fmt(pt)}"
                  f" | {fmt(r['gbps'] / pt if pt else None)} | {fmt(nx)}{mark if nx else ''} | {fmt(r['gbps'] / nx if nx else None)}"
                  f" | {r['p50_us']:.0f} |")
print(foot)
