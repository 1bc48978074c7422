#!/usr/bin/env python3
"""Builds the tables of benches/compare_ucx.sh from its output folder: python3 compare_ucx.py OUT "shm,self tcp"."""
import json, re, sys
from pathlib import Path

out, tls_list = Path(sys.argv[1]), sys.argv[2].split()
fmt = lambda v: "—" if v is None else f"{v:.2f}"
ratio = lambda a, b: fmt(a / b if a is not None and b else None)


def pdx_rows(path):
    """Every JSON array in the file (UCX may log before it; pdx-one files hold one array per size)."""
    rows, text = {}, path.read_text() if path.exists() else ""
    dec, i = json.JSONDecoder(), 0
    while True:
        i = text.find("[", i)
        if i < 0:
            return rows
        try:
            arr, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        for r in arr if isinstance(arr, list) else []:
            if isinstance(r, dict) and "op" in r:
                rows[(r["op"], r["block_size"])] = r
        i = end


def nixl_rows(path):
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            m = re.match(r"(READ|WRITE)\s+block=\s*(\d+) B .*?([\d.]+) GB/s", line)
            if m:
                rows[(m[1].lower(), int(m[2]))] = float(m[3])
    return rows


main = ["| UCX_TLS | op | block | pdx ucx GB/s | pdx ucx, UCX-allocated target GB/s | ucx_perftest GB/s"
        " | pdx/perftest | pdx (UCX-allocated)/perftest | NIXL (UCX) GB/s | pdx/NIXL | pdx p50 µs/batch |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
one = ["| UCX_TLS | op | block | pdx ucx, 64 × the same block per request GB/s | pdx/perftest"
       " | pdx ucx, 1 block per request GB/s | pdx/perftest | ucx_perftest GB/s | pdx p50 µs (64 / 1 block) |",
       "|---|---|---|---:|---:|---:|---:|---:|---:|"]
for tls in tls_list:
    tag = tls.replace(",", "+")
    pdx, pdxu, pdx1, pdxr = (pdx_rows(out / f"{n}-{tag}.json")
                             for n in ("pdx", "pdx-ucxmem", "pdx-one", "pdx-reused"))
    perf = {}
    for line in (out / f"perftest-{tag}.txt").read_text().splitlines():
        f = line.split()
        if len(f) >= 9 and f[2] == "Final:":
            # Final: iters, 50%ile, avg, overall overhead (us), avg, overall bandwidth (MB/s = MiB/s), msg rates.
            perf[(f[0], int(f[1]))] = float(f[8]) * 1024 * 1024 / 1e9
    # NIXL cannot run with UCX_TLS=shm,self (no peer-failure handling there): use its default UCX_TLS, marked *.
    nixl, mark = nixl_rows(out / f"nixl-{tag}.txt"), ""
    if not nixl:
        nixl, mark = nixl_rows(out / "nixl-default.txt"), "*"
    for op, test in (("write", "ucp_put_bw"), ("read", "ucp_get")):
        for bs in sorted({k[1] for k in pdx if k[0] == op}):
            r, ru, r1, rr = (rows.get((op, bs)) for rows in (pdx, pdxu, pdx1, pdxr))
            g, gu, g1, gr = (x["gbps"] if x else None for x in (r, ru, r1, rr))
            pt, nx = perf.get((test, bs)), nixl.get((op, bs))
            main.append(f"| {tls} | {op} ({test}) | {bs // 1024} KiB | {fmt(g)} | {fmt(gu)} | {fmt(pt)} | {ratio(g, pt)}"
                        f" | {ratio(gu, pt)} | {fmt(nx)}{mark if nx else ''} | {ratio(g, nx)} | {r['p50_us']:.0f} |")
            if r1 or rr:
                lat = " / ".join(f"{x['p50_us']:.1f}" if x else "—" for x in (rr, r1))
                one.append(f"| {tls} | {op} ({test}) | {bs // 1024} KiB | {fmt(gr)} | {ratio(gr, pt)} | {fmt(g1)}"
                           f" | {ratio(g1, pt)} | {fmt(pt)} | {lat} |")
print("\n".join(main))
print("\n\\* NIXL with its default UCX_TLS: it refuses UCX_TLS=shm,self (UCX 1.13 shared memory has no peer-failure handling).\n")
print("Same footprint as ucx_perftest (one block-sized buffer on each side, UCX-allocated target; `--layout reused`"
      " posts 64 puts or gets of that block per request, as perftest streams them):\n")
print("\n".join(one))
