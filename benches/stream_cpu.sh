#!/usr/bin/env bash
# Forwarded SSE chunks per router CPU-second of one `pdx serve` build, alone: the streaming part of
# benches/compare_routers.sh (the same `--instant --kv-noop` mocks, one token event per HTTP chunk, router on core 0,
# mocks and wrk on core 1, `wrk -c16` 1000-token completions), for comparing two builds alternately.
#   SERVE=path/to/serve benches/stream_cpu.sh          # default: target/release/examples/serve
#   FLOOR=1 ...                                        # the stream floor instead (examples/pd_floor_uring with
#                                                      # PD_FLOOR_STREAM=1: relays the decode's answer read by read)
#   PERF=1 ...                                         # also `perf record -g` the router into /tmp/perf.stream.data
#   STAT=1 ...                                         # also ring entries, context switches and system calls per
#                                                      # chunk (`perf stat` tracepoints on the router)
# Needs: wrk; `cargo build --release -p pdx-mock --example mock && cargo build --release -p pdx-router --example serve --example pd_floor_uring`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
T=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples
M="--instant --host 127.0.0.1 --kv-noop"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
taskset -c 1 "$T/mock" --role prefill $M --port 18201 >/dev/null 2>&1 & pids+=($!)
taskset -c 1 "$T/mock" --role decode $M --port 18202 --instant-tokens-per-chunk 1 >/dev/null 2>&1 & pids+=($!)
if [ "${FLOOR:-0}" = 1 ]; then
  PD_FLOOR_STREAM=1 taskset -c 0 "$T/pd_floor_uring" --port 18300 --prefill http://127.0.0.1:18201 \
    --decode http://127.0.0.1:18202 >/dev/null 2>&1 & S=$!; pids+=($S)
else
  taskset -c 0 "${SERVE:-$T/serve}" --host 127.0.0.1 --port 18300 --threads 1 --prefill http://127.0.0.1:18201 \
    --decode http://127.0.0.1:18202 >/dev/null 2>&1 & S=$!; pids+=($S)
fi
sleep 1.5
LUA="$ROOT/benches/router_stream.lua"
taskset -c 1 wrk -t1 -c16 -d2s -s "$LUA" http://127.0.0.1:18300/v1/completions >/dev/null # warm-up
c0=$(awk '{print $14+$15}' /proc/$S/stat)
if [ -n "${PERF:-}" ]; then perf record -g -o /tmp/perf.stream.data -p $S -- sleep 4 >/dev/null 2>&1 & PP=$!; fi
if [ -n "${STAT:-}" ]; then
  perf stat -x, -o /tmp/stat.stream.txt -e io_uring:io_uring_submit_req,io_uring:io_uring_poll_arm \
    -e sched:sched_switch,raw_syscalls:sys_enter -p $S -- sleep 4 >/dev/null 2>&1 & SP=$!
fi
out=$(taskset -c 1 wrk -t1 -c16 -d4s -s "$LUA" http://127.0.0.1:18300/v1/completions)
c1=$(awk '{print $14+$15}' /proc/$S/stat)
if [ -n "${PERF:-}" ]; then wait $PP; fi
n=$(echo "$out" | awk '/requests in/{print $1}')
if [ -n "${STAT:-}" ]; then
  wait $SP || true
  awk -F, -v c=$((n * 1000)) '$3 ~ /:/ {printf "  %s per chunk %.3f\n", $3, $1 / c}' /tmp/stat.stream.txt
fi
tck=$(getconf CLK_TCK)
echo "streams $n router_cpu_s $(echo "($c1-$c0)/$tck" | bc -l | cut -c1-5) chunks/cpu_s $(( n * 1000 * tck / (c1 - c0) ))"
