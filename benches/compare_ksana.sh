#!/usr/bin/env bash
# KsanaLLM routers side by side: KsanaLLM's own simple_router (Python, FastAPI + SQLite; the peer) and
# `pdx serve --orchestration ksana`, each in front of the same two `pdx mock` nodes (a prefill on :18401 and a
# decode on :18402, `--instant --kv-noop`: no KV moves, so only the routers differ) that register with it through
# the node API (`--ksana-router`). Same load for both: wrk, one connection for the added latency (router p50 minus
# the p50 of the same request sent straight to the decode), 64 connections for throughput, with the router's CPU
# time read from /proc/<pid>/stat over the run (requests per router CPU-second). Prints the numbers of
# docs/benchmarks.md "## KsanaLLM".
# Needs: wrk; the peer's source and venv (/work/shared/peers/install.sh; PEERS_DIR, KSANA_ROUTER_DIR as in
# ksana.sh); release builds of
#   cargo build --release -p pdx-mock --example mock && cargo build --release -p pdx-router --example serve
# pdx is measured when that `serve` knows `--orchestration ksana` (PDX_KSANA_ARGS: its flags).
# Nodes heartbeat every HEARTBEAT_MS (5000, KsanaLLM's heartbeat_interval_ms): the peer writes each heartbeat to
# SQLite, so a faster one costs it more. Requests still in flight when wrk stops count in the CPU but not in the
# requests; DURATION (20 s) keeps that small next to the requests done.
# Pinning: the router under test on core 0 (the peer: one uvicorn worker, its default event loop), mocks and wrk on
# core 1. Workloads: `/generate` not streamed, `/generate` streamed (the router merges the prefill's first chunk with
# the decode's, `\0`-delimited), `/v1/chat/completions` not streamed; 9-token prompt, 16 output tokens.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
T=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples
PEERS_DIR=${PEERS_DIR:-$HOME/.cache/pdx-peers}
SRC=${KSANA_ROUTER_DIR:-$PEERS_DIR/KsanaLLM/src/ksana_llm/python/simple_router}
PY=$PEERS_DIR/venv-ksana/bin/python
D=${DURATION:-20}
HB=${HEARTBEAT_MS:-5000}
PEER_PORT=18480 PDX_PORT=18490 PP=18401 DP=18402
for f in "$T/mock" "$T/serve" "$PY" "$SRC/main.py"; do [ -e "$f" ] || { echo "missing: $f (see the header)" >&2; exit 1; }; done
command -v wrk >/dev/null || { echo "wrk is not installed" >&2; exit 1; }
tmp=$(mktemp -d)
PDX_KSANA_ARGS=${PDX_KSANA_ARGS:---orchestration ksana --ksana-db $tmp/pdx.db}
pids=()
nodes=()
cleanup() {
  for p in "${nodes[@]}" "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
wait_up() { for _ in $(seq 150); do curl -sf -o /dev/null "$1" && return 0; sleep 0.2; done; echo "not up: $1" >&2; return 1; }
ready_groups() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^pdx:ksana_comm_groups_ready/{print $NF}'; }

# start_nodes ROUTER_URL: the prefill and the decode, registered with ROUTER_URL, their comm group ready.
start_nodes() {
  local m="--instant --kv-noop --host 127.0.0.1 --kv-listen 127.0.0.1:0 --ksana-router $1 --ksana-heartbeat-ms $HB"
  taskset -c 1 "$T/mock" --role prefill $m --port $PP >"$tmp/prefill.log" 2>&1 & nodes+=($!)
  taskset -c 1 "$T/mock" --role decode $m --port $DP >"$tmp/decode.log" 2>&1 & nodes+=($!)
  wait_up "http://127.0.0.1:$PP/health"; wait_up "http://127.0.0.1:$DP/health"
  for _ in $(seq 300); do
    [ "$(ready_groups $PP)" = 1 ] && [ "$(ready_groups $DP)" = 1 ] && return 0
    sleep 0.2
  done
  echo "the comm group did not become ready behind $1: prefill $(ready_groups $PP), decode $(ready_groups $DP)" >&2
  tail -n 5 "$tmp/prefill.log" "$tmp/decode.log" >&2
  return 1
}
stop_nodes() { for p in "${nodes[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; nodes=(); }

BODY='"prompt":"the quick brown fox jumps over the lazy dog","sampling_config":{"max_new_tokens":16}'
lua() { printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = %s\n' "'$1'" >"$tmp/$2.lua"; }
lua "{$BODY,\"stream\":false}" gen
lua "{$BODY,\"stream\":true}" gen_stream
lua '{"model":"mock","messages":[{"role":"user","content":"the quick brown fox jumps over the lazy dog"}],"max_tokens":16}' chat
WORK="gen=/generate gen_stream=/generate chat=/v1/chat/completions"

tck=$(getconf CLK_TCK)
div() { awk "BEGIN { b = $2; print (b == 0) ? 0 : ($1) / b }"; }     # div EXPR EXPR (0 when the divisor is 0)
cpu() { awk '{print $14+$15}' /proc/"$1"/stat; }          # utime+stime of all threads, ticks
us() { awk '{v=$1; if (v ~ /us$/) {sub(/us/,"",v); print v} else if (v ~ /ms$/) {sub(/ms/,"",v); print v*1000} else {sub(/s/,"",v); print v*1e6}}'; }
p50() { taskset -c 1 wrk -t1 -c1 -d"$D"s --latency -s "$2" "$1" | awk '$1=="50%"{print $2}' | us; }
mocks_cpu() { local t=0; for m in "${nodes[@]}"; do t=$((t + $(cpu "$m"))); done; echo $t; }
# run URL CONNS SCRIPT PID -> "requests cpu_seconds wall_seconds mock_cpu_seconds"
run() {
  local c0 m0 out; c0=$(cpu "$4"); m0=$(mocks_cpu)
  out=$(taskset -c 1 wrk -t1 -c"$2" -d"$D"s --timeout 30s -s "$3" "$1")
  local c1 m1; c1=$(cpu "$4"); m1=$(mocks_cpu)
  local n w e
  n=$(echo "$out" | awk '/requests in/{print $1}')
  w=$(echo "$out" | awk '/requests in/{gsub(/s,/,"",$4); print $4}')
  e=$(echo "$out" | awk '/Non-2xx|Socket errors/{print}' | tr '\n' ' ')
  [ -n "$e" ] && echo "  ($1 c=$2: $e)" >&2
  echo "$n $(div "$c1-$c0" "$tck") $w $(div "$m1-$m0" "$tck")"
}
# measure NAME PORT PID: one line per workload.
measure() {
  for wl in $WORK; do
    IFS== read -r s path <<<"$wl"
    local url=http://127.0.0.1:$2$path p n c w m
    p=$(p50 "$url" "$tmp/$s.lua"); p=${p:-0}
    read -r n c w m < <(run "$url" 64 "$tmp/$s.lua" "$3")
    printf "%-6s %-11s %9.0f %9.0f %9.1f %9.2f %10.1f %11.1f\n" "$1" "$s" "$p" "$(div "$p-${direct[$s]}" 1)" \
      "$(div "$n" "$w")" "$c" "$(div "$n" "$c")" "$(div "$m*1000000" "$n")"
  done
}

# The peer, from a copy of its source (it imports its modules by bare name), fresh SQLite, one worker.
cp -r "$SRC" "$tmp/app"
cat >"$tmp/config.ini" <<INI
[general]
log_level = WARNING
log_dir = $tmp/log
cluster_name = default_cluster
heartbeat_timeout_seconds = 60
[name_service]
name_service_provider = name_service.auto_provider
[database]
storage_mode = sqlite
sqlite_path = $tmp/peer.db
INI
(cd "$tmp/app" && exec taskset -c 0 "$PY" main.py --host 127.0.0.1 --port $PEER_PORT --workers 1 --config "$tmp/config.ini" \
  >"$tmp/peer.log" 2>&1) & pids+=($!)
PEER=${pids[-1]}
wait_up "http://127.0.0.1:$PEER_PORT/docs"
start_nodes "http://127.0.0.1:$PEER_PORT"

declare -A direct
for wl in $WORK; do
  IFS== read -r s path <<<"$wl"
  direct[$s]=$(p50 "http://127.0.0.1:$DP$path" "$tmp/$s.lua")
done
echo "direct p50 (1 conn, the decode alone): generate ${direct[gen]} us, generate stream ${direct[gen_stream]} us, chat ${direct[chat]} us"
printf "%-6s %-11s %9s %9s %9s %9s %10s %11s\n" router workload p50_us added_us rps_c64 cpu_s req/cpu_s mock_us/req
measure peer $PEER_PORT "$PEER"
stop_nodes
kill "$PEER" 2>/dev/null || true

if "$T/serve" --help 2>&1 | grep -q ksana; then
  taskset -c 0 "$T/serve" --host 127.0.0.1 --port $PDX_PORT --threads 1 $PDX_KSANA_ARGS >"$tmp/pdx.log" 2>&1 & pids+=($!)
  PDX=${pids[-1]}
  wait_up "http://127.0.0.1:$PDX_PORT/health" || wait_up "http://127.0.0.1:$PDX_PORT/metrics"
  start_nodes "http://127.0.0.1:$PDX_PORT"
  measure pdx $PDX_PORT "$PDX"
  stop_nodes
else
  echo "pdx: $T/serve has no --orchestration ksana (not built from a tree with the router side); not measured"
fi
echo "(added = p50 through the router - p50 of the same request to the decode alone; req/cpu_s: requests per CPU-second" \
     "of the router process at 64 connections; mock_us/req: CPU of both nodes per request)"
