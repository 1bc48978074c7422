#!/usr/bin/env bash
# Stream migration under load (issue 17, item 5): a decode worker is killed (SIGKILL) mid-replay; how many client
# requests fail, and how many get a token count other than the one they asked for, with migration on (the
# default) and off (`--migration-max-moves 0`), fresh workers for each row.
#   benches/migration_kill.sh [OUT_DIR]     (default target/migration-kill; ~2 minutes)
# Cluster: 1 prefill and 3 decode `pdx mock` workers (timed, --speed 0.2, --num-blocks 32768 --kv-scale-down 256),
# `pdx serve` (vllm-nixl, round robin). Load: `pdx replay` of the first REQUESTS (300) requests of the Mooncake
# conversation trace, --scale-tokens 0.25 --speed 6 (streamed chat, ignore_eos: every answer must have exactly the
# requested tokens). The first decode worker is killed KILL_AFTER (6) seconds into the replay.
# Prints one markdown row per setting: requests, failed, length mismatches, the router's pdx_migrations_total.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/migration-kill}; mkdir -p "$OUT"
REQUESTS=${REQUESTS:-300}; KILL_AFTER=${KILL_AFTER:-6}
TRACE=${TRACE:-../shared/traces/conversation_trace.jsonl}
cargo build --release --locked -q
PDX=./target/release/pdx
R=18700; P=18701; D=(18711 18712 18713)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_up() { for _ in $(seq 150); do curl -sf "$1" >/dev/null && return 0; sleep 0.2; done; echo "not up: $1" >&2; return 1; }
row() { # name, extra serve flags...
  local name=$1; shift
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=()
  local common="--host 127.0.0.1 --num-blocks 32768 --kv-scale-down 256"
  $PDX mock --role prefill $common --port $P >"$OUT/$name.prefill.log" 2>&1 & pids+=($!)
  local victim=
  for d in "${D[@]}"; do
    $PDX mock --role decode $common --port "$d" --speed 0.2 >"$OUT/$name.decode-$d.log" 2>&1 & pids+=($!)
    [ -n "$victim" ] || victim=$!
  done
  for port in $P "${D[@]}"; do wait_up "http://127.0.0.1:$port/health"; done
  $PDX serve --host 127.0.0.1 --port $R --prefill "http://127.0.0.1:$P" \
    --decode "http://127.0.0.1:${D[0]}" --decode "http://127.0.0.1:${D[1]}" --decode "http://127.0.0.1:${D[2]}" \
    "$@" >"$OUT/$name.serve.log" 2>&1 & pids+=($!)
  wait_up "http://127.0.0.1:$R/ready"
  $PDX replay --url "http://127.0.0.1:$R" --trace "$TRACE" --max-requests "$REQUESTS" --scale-tokens 0.25 \
    --speed 6 --max-failed-fraction 1 --json --quiet >"$OUT/$name.json" 2>"$OUT/$name.replay.log" &
  local replay=$!
  sleep "$KILL_AFTER"
  local running; running=$(curl -s "http://127.0.0.1:${D[0]}/metrics" | awk '/^vllm:num_requests_running/ {s+=$2} END {print s+0}')
  { kill -9 "$victim"; wait "$victim"; } 2>/dev/null || true
  wait "$replay" || true
  local moved; moved=$(curl -s "http://127.0.0.1:$R/metrics" | awk '/^pdx_migrations_total/ {s+=$2} END {print s+0}')
  python3 - "$OUT/$name.json" "$name" "$running" "$moved" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"| {sys.argv[2]} | {r['requests']} | {r['requests'] - r['succeeded']} | {r['length_mismatches']} | "
      f"{sys.argv[3]} | {sys.argv[4]} | {r['ttft_ms']['p99']:.0f} | {r['itl_ms']['p99']:.1f} |")
PY
}
echo "| migration | requests | failed | length mismatches | streams on the killed worker | pdx_migrations_total | TTFT p99 ms | ITL p99 ms |"
echo "|---|---|---|---|---|---|---|---|"
row on
row off --migration-max-moves 0
