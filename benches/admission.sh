#!/usr/bin/env bash
# Admission shaping at twice a prefill pool's capacity (issue 17): 2 prefill mocks (timed, --speed $SPEED) and 1
# decode mock behind `pdx serve`, prompts of $ISL tokens (all distinct: no prefix-cache hits), $OSL output tokens.
# 1. capacity: $CAP_N requests at once, at most 64 in flight (closed loop): completed requests per second;
# 2. open loop at twice that rate for $SECS seconds, without admission and with --admission-ttft-target-ms
#    $TARGET_MS, fresh workers per row: TTFT p50/p99 of the requests that got an answer, how many met the target
#    (and that per second of the offered load: goodput), 429s and 503s with how long their clients waited (p99).
# ADMISSION_FLAGS adds router flags to the admission row. Needs a release build: cargo build --release -p pdx --bin pdx.
# Prints a markdown table.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PDX=${PDX:-${CARGO_TARGET_DIR:-$ROOT/target}/release/pdx}
SPEED=${SPEED:-0.02}
ISL=${ISL:-1000}
OSL=${OSL:-8}
TARGET_MS=${TARGET_MS:-1000}
SECS=${SECS:-20}
CAP_N=${CAP_N:-200}
tmp=$(mktemp -d)
pids=()
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap 'stop_all; rm -rf "$tmp"' EXIT
wait_up() { for _ in $(seq 150); do curl -sf "$1" >/dev/null && return 0; sleep 0.2; done; echo "not up: $1" >&2; return 1; }

# trace FILE N RATE: N requests of ISL/OSL tokens, RATE per second (0: all at once), distinct prompts.
trace() {
  python3 - "$1" "$2" "$3" "$ISL" "$OSL" <<'EOF'
import json, sys
path, n, rate, isl, osl = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
blocks = (isl + 511) // 512
with open(path, "w") as f:
    for i in range(n):
        t = 0 if rate == 0 else int(i * 1000 / rate)
        f.write(json.dumps({"timestamp": t, "input_length": isl, "output_length": osl,
                            "hash_ids": list(range(i * blocks, (i + 1) * blocks))}) + "\n")
EOF
}

# cluster ROUTER_FLAGS...: fresh mocks and a router on 18410.
cluster() {
  stop_all
  local kv="--kv-listen 127.0.0.1:0 --kv-scale-down 256 --num-blocks 32768 --host 127.0.0.1"
  "$PDX" mock --role prefill --port 18401 --speed "$SPEED" $kv >/dev/null 2>&1 & pids+=($!)
  "$PDX" mock --role prefill --port 18402 --speed "$SPEED" $kv >/dev/null 2>&1 & pids+=($!)
  "$PDX" mock --role decode --port 18403 $kv >/dev/null 2>&1 & pids+=($!)
  for p in 18401 18402 18403; do wait_up "http://127.0.0.1:$p/health"; done
  "$PDX" serve --host 127.0.0.1 --port 18410 --threads 1 --policy least_loaded \
    --prefill http://127.0.0.1:18401 --prefill http://127.0.0.1:18402 --decode http://127.0.0.1:18403 "$@" \
    >/dev/null 2>&1 & pids+=($!)
  wait_up http://127.0.0.1:18410/ready
}

# replay TRACE EXPORT [FLAGS...]: the report as JSON on stdout.
replay() {
  local t=$1 o=$2
  shift 2
  "$PDX" replay --url http://127.0.0.1:18410 --trace "$t" --endpoint completions --json --quiet \
    --slo-ttft-ms "$TARGET_MS" --timeout-secs 120 --max-failed-fraction 1 --export "$o" "$@"
}

cluster
trace "$tmp/cap.jsonl" "$CAP_N" 0
cap=$(replay "$tmp/cap.jsonl" "$tmp/cap.out" --concurrency-limit 64 | python3 -c 'import json,sys; print(json.load(sys.stdin)["request_throughput"])')
rate=$(python3 -c "print(2 * $cap)")
n=$(python3 -c "print(int(2 * $cap * $SECS))")
echo "capacity of the prefill pool (2 workers, speed $SPEED, $ISL-token prompts): $cap req/s; offered: $rate req/s for ${SECS}s ($n requests)"
trace "$tmp/load.jsonl" "$n" "$rate"
echo
echo "| admission | answered (200) | TTFT p50 / p99 of answered, ms | within ${TARGET_MS} ms (goodput) | 429 (answered within, p99) | 503 (after, p99) |"
echo "|---|---|---|---|---|---|"
for row in off on; do
  # shellcheck disable=SC2086
  if [ "$row" = on ]; then cluster --admission-ttft-target-ms "$TARGET_MS" ${ADMISSION_FLAGS:-}; else cluster; fi
  replay "$tmp/load.jsonl" "$tmp/$row.out" >"$tmp/$row.json" || true
  python3 - "$tmp/$row.json" "$tmp/$row.out" "$row" "$TARGET_MS" <<'EOF'
import json, sys
rep = json.load(open(sys.argv[1]))
rows = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
row, target = sys.argv[3], float(sys.argv[4])
ok = [r for r in rows if not r.get("error")]
met = sum(1 for r in ok if r.get("ttft_ms") is not None and r["ttft_ms"] <= target)
def p99(xs):
    xs = sorted(xs)
    return f"{xs[min(len(xs) - 1, int(0.99 * len(xs)))]:.0f} ms" if xs else "-"
r429 = [r["e2e_ms"] for r in rows if r.get("error") == "http_429"]
r503 = [r["e2e_ms"] for r in rows if r.get("error") == "http_503"]
t = rep["ttft_ms"]
secs = max(r["sent_s"] for r in rows) if rows else 1
print(f"| {row} | {len(ok)} | {t['p50']:.0f} / {t['p99']:.0f} | {met} ({met / secs:.1f} req/s) | "
      f"{len(r429)} ({p99(r429)}) | {len(r503)} ({p99(r503)}) |")
EOF
done
