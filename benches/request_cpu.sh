#!/usr/bin/env bash
# Non-streamed PD requests per router CPU-second of one `pdx serve` build (or of the epoll floor with FLOOR=1), alone:
# the request part of benches/compare_routers.sh (the same `--instant --kv-noop` mocks, router on core 0, mocks and
# wrk on core 1, `wrk -t1 -cC` non-streaming chat from crates/pdx-mock/bench/chat.lua), with the router's user and
# system CPU per request from /proc/PID/stat, for comparing two builds alternately.
#   SERVE=path/to/serve benches/request_cpu.sh     # default: target/release/examples/serve
#   FLOOR=1 ...                                    # examples/pd_floor instead of pdx serve
#   FLOOR=1 PD_FLOOR_WORK=1 ...                    # the floor doing pdx's JSON work per request as well
#   C=64 D=5 ...                                   # connections, seconds (defaults)
#   PERF=1 ...                                     # also `perf record -g` the router into /tmp/pdx.perf.data
# Needs: wrk, curl; `cargo build --release -p pdx-mock --example mock &&
#   cargo build --release -p pdx-router --example serve --example pd_floor`. Ports 18601-18610.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
T=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples
SERVE=${SERVE:-$T/serve}
C=${C:-64}
D=${D:-5}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
M="--instant --host 127.0.0.1 --kv-noop"
UP="--prefill http://127.0.0.1:18601 --decode http://127.0.0.1:18602"
taskset -c 1 "$T/mock" --role prefill $M --port 18601 >/dev/null 2>&1 & pids+=($!)
taskset -c 1 "$T/mock" --role decode $M --port 18602 --instant-tokens-per-chunk 1 >/dev/null 2>&1 & pids+=($!)
wait_up() { for _ in $(seq 100); do curl -sf "$1" >/dev/null && return 0; sleep 0.2; done; echo "not up: $1" >&2; return 1; }
wait_up http://127.0.0.1:18601/health
wait_up http://127.0.0.1:18602/health
if [ "${FLOOR:-0}" = 1 ]; then
  taskset -c 0 "$T/pd_floor" --port 18610 $UP >/dev/null 2>&1 & R=$!; pids+=($R)
  # the floor answers any request: one opens its upstream connections
  curl -sf --retry 50 --retry-connrefused --retry-delay 0 -X POST -H 'Content-Type: application/json' \
    -d '{"model":"mock","messages":[{"role":"user","content":"hi"}],"max_tokens":16}' \
    http://127.0.0.1:18610/v1/chat/completions >/dev/null
else
  taskset -c 0 "$SERVE" --host 127.0.0.1 --port 18610 --threads 1 $UP >/dev/null 2>&1 & R=$!; pids+=($R)
  wait_up http://127.0.0.1:18610/ready
fi
CHAT="$ROOT/crates/pdx-mock/bench/chat.lua"
taskset -c 1 wrk -t1 -c"$C" -d2s -s "$CHAT" http://127.0.0.1:18610/v1/chat/completions >/dev/null # warm-up
read -r u0 s0 < <(awk '{print $14, $15}' /proc/$R/stat)
if [ "${PERF:-0}" = 1 ]; then
  perf record -F 4999 -g -p "$R" -o /tmp/pdx.perf.data -- sleep "$D" >/dev/null 2>&1 & pp=$!
fi
out=$(taskset -c 1 wrk -t1 -c"$C" -d"$D"s -s "$CHAT" http://127.0.0.1:18610/v1/chat/completions)
read -r u1 s1 < <(awk '{print $14, $15}' /proc/$R/stat)
if [ "${PERF:-0}" = 1 ]; then wait "$pp" || true; fi
n=$(echo "$out" | awk '/requests in/{print $1}')
echo "$n $((u1 - u0)) $((s1 - s0)) $(getconf CLK_TCK)" | awk '{
  printf "requests %d, per router CPU-second %.0f, user %.1f us and system %.1f us per request\n",
    $1, $1 / (($2 + $3) / $4), $2 * 1e6 / $4 / $1, $3 * 1e6 / $4 / $1 }'
