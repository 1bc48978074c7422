#!/usr/bin/env bash
# pdx over UCX vs ucx_perftest (ucp_put_bw / ucp_get, the UCX ceiling) vs NIXL (UCX), two processes, batch 64,
# in one run, for each UCX_TLS setting.
#   benches/compare_ucx.sh [OUT_DIR]     (needs libucx-dev + ucx-utils, and ../shared/peers/install.sh for NIXL)
# Writes pdx-<tls>.json (pdx memfd target), pdx-ucxmem-<tls>.json (UCX-allocated target), pdx-reused-<tls>.json
# (perftest's footprint: 64 puts of the same block per request), pdx-one-<tls>.json (one block per request), perftest-<tls>.txt, nixl-<tls>.txt, nixl-default.txt and compare.md
# (the tables) into OUT_DIR.
# Env: TLS_LIST (default "shm,self tcp"), SIZES (bytes, default 4096,65536,1048576,16777216), SECS (default 2),
# BENCH_LOCK (a lock file: each measurement step holds it, so other benchmarks on the host never overlap one).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/compare-ucx}; mkdir -p "$OUT"
PEERS=${PEERS_DIR:-$HOME/.cache/pdx-peers}
SHARED=${SHARED_DIR:-../shared/peers}
SECS=${SECS:-2}
SIZES=${SIZES:-4096,65536,1048576,16777216}
TLS_LIST=${TLS_LIST:-"shm,self tcp"}
PORT=${PORT:-13537}
cargo build --release --locked -q --features ucx
PDX=${CARGO_TARGET_DIR:-target}/release/pdx
if [ -n "${BENCH_LOCK:-}" ]; then exec 9>>"$BENCH_LOCK"; fi
lock() { if [ -n "${BENCH_LOCK:-}" ]; then flock 9; fi; }
unlock() { if [ -n "${BENCH_LOCK:-}" ]; then flock -u 9; fi; }
bsizes=$(echo "$SIZES" | tr ',' '\n' | sed 's/$/B/' | paste -sd, -)
perftest() { # tls test size -> appends the "Final:" line
  local tls=$1 test=$2 size=$3 n
  n=$(( 4000000000 / size )); (( n < 200 )) && n=200; (( n > 1000000 )) && n=1000000
  UCX_TLS=$tls ucx_perftest -p "$PORT" >/dev/null 2>&1 &
  local srv=$!
  sleep 0.5
  local line
  line=$(UCX_TLS=$tls timeout 120 ucx_perftest 127.0.0.1 -p "$PORT" -t "$test" -s "$size" -n "$n" -w $(( n / 10 + 1 )) 2>&1 | grep '^Final:' || true)
  kill "$srv" 2>/dev/null || true; wait "$srv" 2>/dev/null || true
  echo "$test $size $line"
}
for tls in $TLS_LIST; do
  tag=${tls//,/+}
  lock
  UCX_TLS=$tls "$PDX" bench kv --procs 2 --batch-size 64 --block-size "$bsizes" --op read,write \
    --transport ucx --duration "$SECS" --json >"$OUT/pdx-$tag.json"
  # The same with the target's memory allocated by UCX (as ucx_perftest's buffers are): direct RMA over shm.
  UCX_TLS=$tls "$PDX" bench kv --procs 2 --batch-size 64 --block-size "$bsizes" --op read,write \
    --transport ucx --remote-memory ucx --duration "$SECS" --json >"$OUT/pdx-ucxmem-$tag.json"
  # perftest's footprint and pattern: every block of the batch is the same block-sized buffer on each side.
  UCX_TLS=$tls "$PDX" bench kv --procs 2 --batch-size 64 --block-size "$bsizes" --op read,write \
    --transport ucx --remote-memory ucx --layout reused --duration "$SECS" --json >"$OUT/pdx-reused-$tag.json"
  # perftest's footprint, one block per request.
  : >"$OUT/pdx-one-$tag.json"
  for size in ${SIZES//,/ }; do
    UCX_TLS=$tls "$PDX" bench kv --procs 2 --batch-size 1 --block-size "${size}B" --op read,write \
      --transport ucx --remote-memory ucx --duration "$SECS" --json >>"$OUT/pdx-one-$tag.json"
  done
  unlock; lock
  : >"$OUT/perftest-$tag.txt"
  for size in ${SIZES//,/ }; do
    for t in ucp_put_bw ucp_get; do perftest "$tls" "$t" "$size" >>"$OUT/perftest-$tag.txt"; done
  done
  unlock; lock
  if [ -x "$PEERS/venv-nixl/bin/python" ]; then
    UCX_TLS=$tls "$PEERS/venv-nixl/bin/python" "$SHARED/nixl_bench.py" --procs 2 --batch 64 --sizes "$SIZES" \
      --secs "$SECS" >"$OUT/nixl-$tag.txt" 2>&1 || echo "(exited with status $?)" >>"$OUT/nixl-$tag.txt"
  fi
  unlock
done
# NIXL refuses UCX_TLS=shm,self (it needs peer-failure handling, which UCX 1.13 shared memory lacks): its default
# UCX_TLS is the same-host reference then.
if [ -x "$PEERS/venv-nixl/bin/python" ]; then
  lock
  "$PEERS/venv-nixl/bin/python" "$SHARED/nixl_bench.py" --procs 2 --batch 64 --sizes "$SIZES" --secs "$SECS" \
    >"$OUT/nixl-default.txt" 2>&1 || echo "(exited with status $?)" >>"$OUT/nixl-default.txt"
  unlock
fi
python3 benches/compare_ucx.py "$OUT" "$TLS_LIST" | tee "$OUT/compare.md"
