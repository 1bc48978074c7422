#!/usr/bin/env bash
# The floors alone, alternated for tight ratios (docs/benchmarks.md "### The floor on a ring of our own (issue 19)"):
# the epoll floor (examples/pd_floor), the io_uring floor on monoio (examples/pd_floor_uring) and the floor on a
# ring of pdx's own (examples/pd_floor_ring) with its variants, in front of the same `--instant --kv-noop` mocks
# as benches/compare_routers.sh. Each round runs every floor once, in order, for DURATION seconds at each of
# CONNS connections of non-streaming chat (crates/pdx-mock/bench/chat.lua), reading the floor's CPU time from
# /proc/PID/stat; it prints requests per floor CPU-second, the ratio to the epoll floor of the same round and
# wrk's p50 latency (µs; at 64 connections mostly the mocks' queueing on core 1).
# Pinning as in compare_routers.sh: floors on core 0, mocks and wrk on core 1.
# Needs: wrk, release builds of
#   cargo build --release -p pdx-mock --example mock &&
#   cargo build --release -p pdx-router --example pd_floor --example pd_floor_uring --example pd_floor_ring
# Env: DURATION (s, default 3), ROUNDS (default 3), CONNS (default "64 1"), VARIANTS (default: all below;
# name=binary=VAR=value,VAR=value).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
T=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples
D=${DURATION:-3}
R=${ROUNDS:-3}
CONNS=${CONNS:-"64 1"}
# name=binary=environment (the ring's variants: see examples/pd_floor_ring.rs)
VARIANTS=${VARIANTS:-"floor=pd_floor= floor-uring=pd_floor_uring= ring=pd_floor_ring= ring-noskip=pd_floor_ring=PD_FLOOR_RING_SKIP=0 ring-nofixed=pd_floor_ring=PD_FLOOR_RING_FIXED=0 ring-coop=pd_floor_ring=PD_FLOOR_RING_SETUP=coop ring-plain=pd_floor_ring=PD_FLOOR_RING_SETUP=plain"}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
M="--instant --host 127.0.0.1 --kv-noop"
taskset -c 1 "$T/mock" --role prefill $M --port 18601 >/dev/null 2>&1 & pids+=($!)
taskset -c 1 "$T/mock" --role decode $M --port 18602 --instant-tokens-per-chunk 1 >/dev/null 2>&1 & pids+=($!)
wait_up() { for _ in $(seq 100); do curl -sf "$1" >/dev/null && return 0; sleep 0.2; done; echo "not up: $1" >&2; return 1; }
for port in 18601 18602; do wait_up "http://127.0.0.1:$port/health"; done
UP="--prefill http://127.0.0.1:18601 --decode http://127.0.0.1:18602"
names=(); ports=(); fpids=()
port=18610
for v in $VARIANTS; do
  IFS== read -r name bin envv <<<"$v"
  env ${envv//,/ } taskset -c 0 "$T/$bin" --port $port $UP 2>"/tmp/floors-$name.log" & pids+=($!)
  names+=("$name"); ports+=($port); fpids+=($!)
  port=$((port + 1))
done
for p in "${ports[@]}"; do # one warm-up request each opens the upstreams
  curl -sf --retry 50 --retry-connrefused --retry-delay 0 -X POST -d '{}' "http://127.0.0.1:$p/v1/chat/completions" >/dev/null
done
for n in "${names[@]}"; do [ "${n#ring}" != "$n" ] && echo "$n: $(head -1 "/tmp/floors-$n.log")"; done
CHAT="$ROOT/crates/pdx-mock/bench/chat.lua"
tck=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/"$1"/stat; }
printf "%-5s %5s" round conns; for n in "${names[@]}"; do printf " %20s" "$n"; done; echo "   (req/CPU-s, ratio to floor, p50 us)"
for round in $(seq "$R"); do
  for c in $CONNS; do
    printf "%-5s %5s" "$round" "$c"
    base=""
    for i in "${!names[@]}"; do
      c0=$(cpu "${fpids[$i]}")
      out=$(taskset -c 1 wrk -t1 -c"$c" -d"$D"s --timeout 10s --latency -s "$CHAT" "http://127.0.0.1:${ports[$i]}/v1/chat/completions")
      n=$(echo "$out" | awk '/requests in/{print $1}')
      p50=$(echo "$out" | awk '$1=="50%"{v=$2; if (v ~ /us$/) {sub(/us/,"",v); print v} else if (v ~ /ms$/) {sub(/ms/,"",v); print v*1000} else {sub(/s/,"",v); print v*1e6}}')
      c1=$(cpu "${fpids[$i]}")
      rps=$(echo "$n $c0 $c1 $tck" | awk '{printf "%.0f", ($3 > $2 ? $1 * $4 / ($3 - $2) : 0)}')
      [ -z "$base" ] && base=$rps
      printf " %7s %5s %6.0f" "$rps" "$(echo "$rps $base" | awk '{printf "%.2f", $1 / $2}')" "$p50"
    done
    echo
  done
done
