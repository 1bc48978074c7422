#!/usr/bin/env bash
# UCX over foreign memory (docs/benchmarks.md, "UCX over foreign memory"): pdx's `ucx` transport on memory UCX did
# not allocate (caller memory, `--mem caller`: each side maps its own and registers it by pointer) against memory
# UCX allocated (`--remote-memory ucx`), pdx's own `cma` on the same caller memory, and ucx_perftest (which lets UCX
# allocate), UCX_TLS=shm,self, two processes, batch 64, in one run; both layouts (`scattered`: KV-cache blocks at a
# stride in large buffers; `reused`: every block of a batch is the same block, ucx_perftest's footprint); and NIXL's
# nixl_bench.py on its NumPy buffers (the same kind of memory; its wheel bundles a newer UCX; default UCX_TLS, as it
# refuses shm,self) when ../shared/peers/install.sh has made its venv.
#   benches/ucx_foreign.sh [OUT_DIR]     (needs libucx-dev + ucx-utils; about 3 minutes)
# Env: SIZES (default 65536,1048576), SECS (default 2), BENCH_LOCK (a lock file held while measuring).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/ucx-foreign}; mkdir -p "$OUT"
SECS=${SECS:-2}
SIZES=${SIZES:-65536,1048576}
PORT=${PORT:-13539}
PEERS=${PEERS_DIR:-$HOME/.cache/pdx-peers}
SHARED=${SHARED_DIR:-../shared/peers}
cargo build --release --locked -q --features ucx
PDX=${CARGO_TARGET_DIR:-target}/release/pdx
if [ -n "${BENCH_LOCK:-}" ]; then exec 9>>"$BENCH_LOCK"; flock 9; fi
export UCX_TLS=shm,self
bsizes=$(echo "$SIZES" | tr ',' '\n' | sed 's/$/B/' | paste -sd, -)
run() { # name, then bench kv arguments
  local name=$1; shift
  "$PDX" bench kv --procs 2 --batch-size 64 --block-size "$bsizes" --op read,write --duration "$SECS" --json "$@" \
    >"$OUT/$name.json"
}
for layout in scattered reused; do
  run "ucx-caller-$layout" --transport ucx --mem caller --layout "$layout"
  run "ucx-ucxmem-$layout" --transport ucx --remote-memory ucx --layout "$layout"
  run "cma-caller-$layout" --transport cma --mem caller --layout "$layout"
done
: >"$OUT/perftest.txt"
for size in ${SIZES//,/ }; do
  for t in ucp_get ucp_put_bw; do
    n=$(( 4000000000 / size )); (( n < 200 )) && n=200
    ucx_perftest -p "$PORT" >/dev/null 2>&1 &
    srv=$!
    sleep 0.5
    line=$(timeout 120 ucx_perftest 127.0.0.1 -p "$PORT" -t "$t" -s "$size" -n "$n" -w $(( n / 10 + 1 )) 2>&1 | grep '^Final:' || true)
    kill "$srv" 2>/dev/null || true; wait "$srv" 2>/dev/null || true
    echo "$t $size $line" >>"$OUT/perftest.txt"
  done
done
: >"$OUT/nixl.txt"
if [ -x "$PEERS/venv-nixl/bin/python" ]; then
  env -u UCX_TLS "$PEERS/venv-nixl/bin/python" "$SHARED/nixl_bench.py" --procs 2 --batch 64 --sizes "$SIZES" \
    --secs "$SECS" >"$OUT/nixl.txt" 2>&1 || echo "(exited with status $?)" >>"$OUT/nixl.txt"
fi
python3 - "$OUT" "$SIZES" <<'PY' | tee "$OUT/table.md"
import json, re, sys
from pathlib import Path
out, sizes = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")]
fmt = lambda v: "—" if v is None else f"{v:.2f}"
def rows(name):
    p = out / f"{name}.json"
    text = p.read_text() if p.exists() else ""
    i = text.find("[")
    return {(r["op"], r["block_size"]): r for r in (json.loads(text[i:]) if i >= 0 else [])}
perf = {}
for line in (out / "perftest.txt").read_text().splitlines():
    f = line.split()
    if len(f) >= 9 and f[2] == "Final:":
        perf[(f[0], int(f[1]))] = float(f[8]) * 1024 * 1024 / 1e9  # MiB/s -> GB/s
nixl = {}
for line in (out / "nixl.txt").read_text().splitlines():
    m = re.match(r"(READ|WRITE)\s+block=\s*(\d+) B .*?([\d.]+) GB/s", line)
    if m:
        nixl[(m[1].lower(), int(m[2]))] = float(m[3])
print("| layout | op | block | pdx ucx, caller memory GB/s | pdx ucx, UCX-allocated target GB/s | pdx cma, caller memory GB/s"
      " | ucx_perftest GB/s | NIXL (NumPy, scattered) GB/s | ucx caller / UCX-allocated | cma caller / ucx caller"
      " | memcpy GB/s |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for layout in ("scattered", "reused"):
    uc, uu, cc = (rows(f"{n}-{layout}") for n in ("ucx-caller", "ucx-ucxmem", "cma-caller"))
    for op, test in (("read", "ucp_get"), ("write", "ucp_put_bw")):
        for bs in sizes:
            a, b, c = (r.get((op, bs)) for r in (uc, uu, cc))
            g = lambda r: r and r["gbps"]
            n = nixl.get((op, bs)) if layout == "scattered" else None
            print(f"| {layout} | {op} | {bs // 1024} KiB | {fmt(g(a))} | {fmt(g(b))} | {fmt(g(c))} | {fmt(perf.get((test, bs)))}"
                  f" | {fmt(n)}"
                  f" | {fmt(g(a) / g(b) if a and b else None)} | {fmt(g(c) / g(a) if a and c else None)}"
                  f" | {fmt(a and a['memcpy_gbps'])} |")
PY
