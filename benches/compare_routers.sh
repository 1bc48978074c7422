#!/usr/bin/env bash
# Side-by-side router benchmark: pdx serve (vllm-nixl, and sglang-bootstrap as row pdx-sgl) vs sglang-router vs
# vllm-router in PD mode, and the floor (examples/pd_floor: only the socket work of a sequential PD router, with no
# HTTP library, routing or JSON; what no router on kernel TCP sockets can go below) and the same floor on io_uring
# (examples/pd_floor_uring, row floor-uring: monoio's native operations, one thread) and on a ring of pdx's own
# (examples/pd_floor_ring, row floor-ring: multishot receive into provided buffers, fixed files), and the epoll and
# monoio floors doing pdx's JSON work as well (rows floor-work, floor-uring-work), in front of the same
# `--instant` mock prefill (:18201) and decode (:18202) workers. Prints the numbers of docs/benchmarks.md "## Router".
# Needs: wrk, the peers installed by /work/shared/peers/routers.sh (~/.cache/pdx-peers), release builds of
#   cargo build --release -p pdx-mock --example mock &&
#   cargo build --release -p pdx-router --example serve --example stream_mem --example pd_floor --example pd_floor_uring \
#     --example pd_floor_ring
# Pinning: each router (pdx with 1 thread; the peers' threads) on core 0, measured one at a time; mocks and wrk on
# core 1. The worker side is the same for all three routers: the mocks run with `--kv-noop` (no KV read on the
# decode for kv_transfer_params, as on SGLang's bootstrap path) and the decode emits one SSE event per HTTP chunk
# (`--instant-tokens-per-chunk 1`). Besides wall-clock numbers (bounded by core 1), every router's CPU time is read
# from /proc/<pid>/stat over the same runs: requests (or chunks) per router CPU-second is the normalized throughput.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
T=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples
PEERS=${PEERS_SCRIPT:-/work/shared/peers/routers.sh}
D=${DURATION:-10}
N=${STREAMS:-500}
pids=()
tmp=$(mktemp -d)
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; "$PEERS" stop >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap cleanup EXIT
M="--instant --host 127.0.0.1 --kv-noop"
taskset -c 1 "$T/mock" --role prefill $M --port 18201 >/dev/null 2>&1 & pids+=($!)
taskset -c 1 "$T/mock" --role decode $M --port 18202 --instant-tokens-per-chunk 1 >/dev/null 2>&1 & pids+=($!)
taskset -c 1 "$T/mock" --role decode $M --port 18203 --num-blocks 65536 --fault-stall-after-tokens 1 >/dev/null 2>&1 & pids+=($!)
wait_up() { for _ in $(seq 100); do curl -sf "$1" >/dev/null && return 0; sleep 0.2; done; echo "not up: $1" >&2; return 1; }
for port in 18201 18202 18203; do wait_up "http://127.0.0.1:$port/health"; done
taskset -c 0 "$T/serve" --host 127.0.0.1 --port 18300 --threads 1 --prefill http://127.0.0.1:18201 --decode http://127.0.0.1:18202 & pids+=($!)
PDX=$!
taskset -c 0 "$T/serve" --host 127.0.0.1 --port 18302 --threads 1 --orchestration sglang-bootstrap --prefill http://127.0.0.1:18201 --decode http://127.0.0.1:18202 & pids+=($!)
PDXB=$!
taskset -c 0 "$T/serve" --host 127.0.0.1 --port 18301 --threads 1 --prefill http://127.0.0.1:18201 --decode http://127.0.0.1:18203 & pids+=($!)
STALL=$!
taskset -c 0 "$T/pd_floor" --port 18304 --prefill http://127.0.0.1:18201 --decode http://127.0.0.1:18202 2>/dev/null & pids+=($!)
FLOOR=$!
taskset -c 0 "$T/pd_floor_uring" --port 18305 --prefill http://127.0.0.1:18201 --decode http://127.0.0.1:18202 2>/dev/null & pids+=($!)
URING=$!
taskset -c 0 "$T/pd_floor_ring" --port 18306 --prefill http://127.0.0.1:18201 --decode http://127.0.0.1:18202 2>/dev/null & pids+=($!)
RING=$!
# The floors doing pdx's JSON work per request as well (PD_FLOOR_WORK=1: the client body parsed, the prefill and
# decode bodies built, the prefill answer's kv_transfer_params read, with pdx's own code): rows floor-work (epoll)
# and floor-uring-work (monoio's io_uring), the lowest a router that does that work could reach on each.
PD_FLOOR_WORK=1 taskset -c 0 "$T/pd_floor" --port 18307 --prefill http://127.0.0.1:18201 --decode http://127.0.0.1:18202 2>/dev/null & pids+=($!)
FLOORW=$!
PD_FLOOR_WORK=1 taskset -c 0 "$T/pd_floor_uring" --port 18308 --prefill http://127.0.0.1:18201 --decode http://127.0.0.1:18202 2>/dev/null & pids+=($!)
URINGW=$!
"$PEERS" start http://127.0.0.1:18201 http://127.0.0.1:18202 >/dev/null
SGL=$(cat ~/.cache/pdx-peers/logs/sglang-router.pid); VLR=$(cat ~/.cache/pdx-peers/logs/vllm-router.pid)
for p in "$SGL" "$VLR"; do taskset -a -cp 0 "$p" >/dev/null || true; done
for port in 18300 18301 18302; do wait_up "http://127.0.0.1:$port/ready"; done

CHAT="$ROOT/crates/pdx-mock/bench/chat.lua"
STREAM="$ROOT/benches/router_stream.lua"
# The prefill request a PD router sends (max_tokens 1, kv_transfer_params do_remote_decode).
cat >"$tmp/prefill.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"mock","messages":[{"role":"user","content":"the quick brown fox jumps over the lazy dog"}],"max_tokens":1,"stream":false,"kv_transfer_params":{"do_remote_decode":true,"do_remote_prefill":false}}'
EOF
tck=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/"$1"/stat; }          # utime+stime of all threads, ticks
us() { awk '{v=$1; if (v ~ /us$/) {sub(/us/,"",v); print v} else if (v ~ /ms$/) {sub(/ms/,"",v); print v*1000} else {sub(/s/,"",v); print v*1e6}}'; }
p50() { taskset -c 1 wrk -t1 -c1 -d"$D"s --latency -s "$2" "$1" | awk '$1=="50%"{print $2}' | us; }
MOCKS="${pids[0]} ${pids[1]}"
mocks_cpu() { local t=0; for m in $MOCKS; do t=$((t + $(cpu "$m"))); done; echo $t; }
# run URL CONNS SCRIPT PID -> "requests cpu_seconds wall_seconds mock_cpu_seconds"
run() {
  local c0 m0 out; c0=$(cpu "$4"); m0=$(mocks_cpu)
  out=$(taskset -c 1 wrk -t1 -c"$2" -d"$D"s --timeout 10s -s "$3" "$1")
  local c1 m1; c1=$(cpu "$4"); m1=$(mocks_cpu)
  local n; n=$(echo "$out" | awk '/requests in/{print $1}')
  local w; w=$(echo "$out" | awk '/requests in/{gsub(/s,/,"",$4); print $4}')
  local e; e=$(echo "$out" | awk '/Non-2xx|Socket errors/{print}' | tr '\n' ' ')
  [ -n "$e" ] && echo "  ($1: $e)" >&2
  echo "$n $(echo "($c1-$c0)/$tck" | bc -l) $w $(echo "($m1-$m0)/$tck" | bc -l)"
}
dp=$(p50 http://127.0.0.1:18201/v1/chat/completions "$tmp/prefill.lua")
dd=$(p50 http://127.0.0.1:18202/v1/chat/completions "$CHAT")
echo "direct p50 (1 conn): prefill ${dp} us, decode ${dd} us; sum $(echo "$dp+$dd" | bc) us"
printf "%-16s %9s %9s %9s %10s %10s %11s %12s %11s %12s\n" router p50_us added_us rps_c64 cpu_s req/cpu_s mock_us/req \
  stream_rps cpu_s chunks/cpu_s
# Every row as name=port=pid, in table order (the one-core p50s and the re-pinning below use the same list).
ROWS=(pdx=18300=$PDX pdx-sgl=18302=$PDXB sglang=18000=$SGL vllm=18100=$VLR floor=18304=$FLOOR floor-uring=18305=$URING
  floor-ring=18306=$RING floor-work=18307=$FLOORW floor-uring-work=18308=$URINGW)
for r in "${ROWS[@]}"; do
  IFS== read -r name port pid <<<"$r"; url=http://127.0.0.1:$port
  p=$(p50 "$url/v1/chat/completions" "$CHAT")
  read -r n c w m < <(run "$url/v1/chat/completions" 64 "$CHAT" "$pid")
  line=$(printf "%-16s %9.0f %9.0f %9.0f %10.2f %10.0f %11.1f" "$name" "$p" "$(echo "$p-$dp-$dd" | bc -l)" \
    "$(echo "$n/$w" | bc -l)" "$c" "$(echo "$n/$c" | bc -l)" "$(echo "$m*1000000/$n" | bc -l)")
  if [ "${name#floor}" != "$name" ]; then echo "$line  (no streaming: the floor relays one response)"; continue; fi
  read -r sn sc sw _ < <(run "$url/v1/completions" 16 "$STREAM" "$pid")
  printf "%s %12.1f %11.2f %12.0f\n" "$line" "$(echo "$sn/$sw" | bc -l)" "$sc" "$(echo "$sn*1000/$sc" | bc -l)"
done
echo "(added = p50 - direct prefill p50 - direct decode p50; mock_us/req: CPU of both mocks per request; stream: 1000-token SSE completions, 16 connections," \
     "one token event per HTTP chunk, chunks counted as 1000 per response)"

# The same p50s with every process on core 1: no cross-core wakeups, which on this VM cost about 18 µs each (a
# sequential PD router crosses cores 6 times per request, sglang-router's parallel flow 4 times).
for p in "${pids[@]}" "$SGL" "$VLR"; do taskset -a -cp 1 "$p" >/dev/null 2>&1 || true; done
dp1=$(p50 http://127.0.0.1:18201/v1/chat/completions "$tmp/prefill.lua")
dd1=$(p50 http://127.0.0.1:18202/v1/chat/completions "$CHAT")
printf "one core: direct prefill %s us + decode %s us;" "$dp1" "$dd1"
for r in "${ROWS[@]}"; do
  IFS== read -r name port _ <<<"$r"
  p=$(p50 "http://127.0.0.1:$port/v1/chat/completions" "$CHAT")
  printf " %s p50 %.0f added %.0f;" "$name" "$p" "$(echo "$p-$dp1-$dd1" | bc -l)"
done
echo
for r in "${ROWS[@]}" "stall==$STALL"; do taskset -a -cp 0 "${r##*=}" >/dev/null 2>&1 || true; done
for p in "${pids[@]:0:3}"; do taskset -a -cp 1 "$p" >/dev/null 2>&1 || true; done

# Memory per in-flight stream: N streams stalled after 1 token on :18203 (wrk, all at once).
rss() { awk '/VmRSS/{print $2}' /proc/"$1"/status; }
r0=$(rss "$STALL")
taskset -c 1 wrk -t1 -c"$N" -d8s --timeout 30s -s "$STREAM" http://127.0.0.1:18301/v1/completions >/dev/null 2>&1 &
W=$!
sleep 5
inflight=$(curl -s http://127.0.0.1:18301/v1/workers | grep -o '"in_flight":[0-9]*' | cut -d: -f2 | paste -sd+ | bc)
r1=$(rss "$STALL")
wait $W || true
echo "pdx memory (wrk): RSS $r0 KiB idle, $r1 KiB with $inflight in-flight streams -> $(( (r1-r0)*1024/ (inflight>0?inflight:1) )) bytes per stream"
# The same with allocator statistics (router in the stream_mem process; client without heap use).
if [ -x "$T/stream_mem" ]; then
  for mode in --sequential ""; do
    taskset -c 0 "$T/stream_mem" --prefill http://127.0.0.1:18201 --decode http://127.0.0.1:18203 --streams "$N" $mode | grep "in flight"
  done
fi
