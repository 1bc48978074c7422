#!/usr/bin/env bash
# Replays the same Mooncake conversation slice through each router in PD mode, in front of the same pdx mock
# workers (1 prefill, 1 decode, timed model, real KV moved by pdx-transfer where the router uses vLLM's
# NixlConnector flow), and prints one table.
#   benches/compare_replay.sh [OUT_DIR]        (needs ../shared/peers/install.sh; ~4 minutes)
# Routers: pdx serve (when the binary has it), vllm-router, sglang-router (../shared/peers/routers.sh).
# Knobs (env): REQUESTS=200 SCALE=0.1 SPEED=4 SLO_TTFT_MS=500 SLO_ITL_MS=30
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/compare-replay}; mkdir -p "$OUT"
SHARED=${SHARED_DIR:-../shared/peers}
REQUESTS=${REQUESTS:-200}; SCALE=${SCALE:-0.1}; SPEED=${SPEED:-4}
SLO_TTFT_MS=${SLO_TTFT_MS:-500}; SLO_ITL_MS=${SLO_ITL_MS:-30}
cargo build --release --locked -q
PDX=./target/release/pdx
P=18501; D=18502; R=18500
pids=()
cleanup() { "$SHARED/routers.sh" stop >/dev/null 2>&1 || true; for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
start_workers() {
  # Wait for the old workers to exit: a new `pdx mock` refuses a port another process still holds.
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=()
  # --bootstrap-port 8998: the port routers.sh gives sglang-router; the decode asks it for the KV of each room.
  $PDX mock --role prefill --host 127.0.0.1 --port $P --num-blocks 16384 --bootstrap-port 8998 >"$OUT/prefill.log" 2>&1 & pids+=($!)
  $PDX mock --role decode --host 127.0.0.1 --port $D --num-blocks 16384 >"$OUT/decode.log" 2>&1 & pids+=($!)
  for port in $P $D; do for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done; done
}
replay() { # name url
  $PDX replay --url "$2" --max-requests "$REQUESTS" --scale-tokens "$SCALE" --speed "$SPEED" \
    --slo-ttft-ms "$SLO_TTFT_MS" --slo-itl-ms "$SLO_ITL_MS" --max-failed-fraction 1 --json --quiet >"$OUT/$1.json"
  curl -s "http://127.0.0.1:$P/metrics" >"$OUT/$1.prefill.metrics"; curl -s "http://127.0.0.1:$D/metrics" >"$OUT/$1.decode.metrics"
}
names=()
if $PDX serve --help >/dev/null 2>&1; then
  start_workers
  $PDX serve --host 127.0.0.1 --port $R --prefill "http://127.0.0.1:$P" --decode "http://127.0.0.1:$D" >"$OUT/pdx-serve.log" 2>&1 & pids+=($!)
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$R/health" >/dev/null && break; sleep 0.1; done
  replay pdx "http://127.0.0.1:$R"; names+=(pdx)
fi
start_workers
"$SHARED/routers.sh" start "http://127.0.0.1:$P" "http://127.0.0.1:$D" >/dev/null
replay vllm-router http://127.0.0.1:18100; names+=(vllm-router)
start_workers   # fresh caches for the next router
"$SHARED/routers.sh" stop >/dev/null; "$SHARED/routers.sh" start "http://127.0.0.1:$P" "http://127.0.0.1:$D" >/dev/null
replay sglang-router http://127.0.0.1:18000; names+=(sglang-router)
python3 - "$OUT" "${names[@]}" <<'PY' | tee "$OUT/compare.md"
import json, re, sys
out, names = sys.argv[1], sys.argv[2:]
def metric(path, name):
    try:
        return sum(float(l.rsplit(" ", 1)[1]) for l in open(path) if l.startswith(name + "{"))
    except OSError:
        return float("nan")
print("| router | ok / sent | TTFT p50 / p99 ms | ITL p50 / p99 ms | e2e p50 / p99 ms | req/s | out tok/s | SLO attainment | goodput req/s | decode prefix hits | KV transfer errors |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for n in names:
    r = json.load(open(f"{out}/{n}.json"))
    hits = metric(f"{out}/{n}.decode.metrics", "vllm:prefix_cache_hits_total")
    q = metric(f"{out}/{n}.decode.metrics", "vllm:prefix_cache_queries_total")
    kverr = metric(f"{out}/{n}.decode.metrics", "pdx:kv_transfer_errors_total")
    print(f"| {n} | {r['succeeded']} / {r['requests']} | {r['ttft_ms']['p50']:.1f} / {r['ttft_ms']['p99']:.1f} | "
          f"{r['itl_ms']['p50']:.2f} / {r['itl_ms']['p99']:.2f} | {r['e2e_ms']['p50']:.0f} / {r['e2e_ms']['p99']:.0f} | "
          f"{r['request_throughput']:.2f} | {r['output_token_throughput']:.0f} | {100*r['slo_attainment']:.1f}% | "
          f"{r['goodput_rps']:.2f} | {hits/q if q else float('nan'):.2f} | {kverr:.0f} |")
PY
