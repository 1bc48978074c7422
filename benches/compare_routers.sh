#!/usr/bin/env bash
# Side-by-side router benchmark: pdx serve vs sglang-router vs vllm-router in PD mode, in front of the same
# `--instant` mock prefill (:18201) and decode (:18202) workers. Prints the numbers of docs/benchmarks.md "## Router".
# Needs: wrk, the peers installed by /work/shared/peers/routers.sh (~/.cache/pdx-peers), release builds of
#   cargo build --release -p pdx-mock --example mock && cargo build --release -p pdx-router --example serve
# Pinning: pdx (1 thread) and the peers on core 0; mocks and wrk on core 1.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
T=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples
PEERS=${PEERS_SCRIPT:-/work/shared/peers/routers.sh}
D=${DURATION:-10}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; "$PEERS" stop >/dev/null 2>&1 || true; }
trap cleanup EXIT
taskset -c 1 "$T/mock" --role prefill --instant --host 127.0.0.1 --port 18201 >/dev/null 2>&1 & pids+=($!)
taskset -c 1 "$T/mock" --role decode --instant --host 127.0.0.1 --port 18202 >/dev/null 2>&1 & pids+=($!)
taskset -c 1 "$T/mock" --role decode --instant --host 127.0.0.1 --port 18203 --fault-stall-after-tokens 1 >/dev/null 2>&1 & pids+=($!)
sleep 1
taskset -c 0 "$T/serve" --host 127.0.0.1 --port 18300 --threads 1 --prefill http://127.0.0.1:18201 --decode http://127.0.0.1:18202 & pids+=($!)
PDX=$!
taskset -c 0 "$T/serve" --host 127.0.0.1 --port 18301 --threads 1 --prefill http://127.0.0.1:18201 --decode http://127.0.0.1:18203 & pids+=($!)
STALL=$!
"$PEERS" start http://127.0.0.1:18201 http://127.0.0.1:18202 >/dev/null
for f in sglang-router vllm-router; do
  pid=$(cat ~/.cache/pdx-peers/logs/$f.pid); taskset -a -cp 0 "$pid" >/dev/null || true
done
CHAT="$ROOT/crates/pdx-mock/bench/chat.lua"
p50() { taskset -c 1 wrk -t1 -c1 -d"$D"s --latency -s "$CHAT" "$1/v1/chat/completions" | awk '$1=="50%"{print $2}'; }
rps() { taskset -c 1 wrk -t1 -c"$2" -d"$D"s -s "$3" "$1" | awk '/Requests\/sec/{print $2}'; }
echo "direct decode p50 (1 conn): $(p50 http://127.0.0.1:18202)"
for r in pdx=http://127.0.0.1:18300 sglang=http://127.0.0.1:18000 vllm=http://127.0.0.1:18100; do
  name=${r%%=*}; url=${r#*=}
  echo "$name p50 (1 conn): $(p50 "$url")   rps (64 conns): $(rps "$url/v1/chat/completions" 64 "$CHAT")"
done
# Streaming: 1000-token SSE responses through pdx; token events per router CPU-second.
cpu() { awk '{print $14+$15}' /proc/"$1"/stat; }
c0=$(cpu "$PDX"); t0=$(date +%s.%N)
srps=$(rps http://127.0.0.1:18300/v1/completions 16 "$ROOT/benches/router_stream.lua")
c1=$(cpu "$PDX"); t1=$(date +%s.%N)
tck=$(getconf CLK_TCK)
echo "pdx stream: $srps req/s x 1000 tokens; router CPU $(echo "($c1-$c0)/$tck" | bc -l | cut -c1-5) s over $(echo "$t1-$t0" | bc -l | cut -c1-5) s;" \
     "token events per router CPU-second: $(echo "$srps*1000*$D/(($c1-$c0)/$tck)" | bc -l | cut -d. -f1)"
# Memory per in-flight stream: N streams stalled after 1 token on :18203.
N=${STREAMS:-1000}
rss() { awk '/VmRSS/{print $2}' /proc/"$1"/status; }
r0=$(rss "$STALL")
taskset -c 1 wrk -t1 -c"$N" -d8s --timeout 30s -s "$ROOT/benches/router_stream.lua" http://127.0.0.1:18301/v1/completions >/dev/null 2>&1 &
W=$!
sleep 5
inflight=$(curl -s http://127.0.0.1:18301/v1/workers | grep -o '"in_flight":[0-9]*' | cut -d: -f2 | paste -sd+ | bc)
r1=$(rss "$STALL")
wait $W || true
echo "pdx memory: RSS $r0 KiB idle, $r1 KiB with $inflight in-flight streams -> $(( (r1-r0)*1024/ (inflight>0?inflight:1) )) bytes per stream"
