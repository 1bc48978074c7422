#!/usr/bin/env bash
# What engine telemetry costs the router (issue 17): compare_routers.sh's pdx row (vllm-nixl, 1 thread on core 0,
# `--instant --kv-noop` mocks and wrk on core 1, the same chat and 1000-token stream runs) with scraping off
# (--telemetry-interval-ms 0), on (the default, 250 ms), and on with the `score` policy (telemetry read on every
# pick), each measured $ROUNDS times in turn: requests and stream chunks per router CPU-second (utime+stime from
# /proc). BASE=/path/to/an/older/pdx adds a row for that binary (its defaults). Needs wrk and
# `cargo build --release -p pdx --bin pdx`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PDX=${PDX:-${CARGO_TARGET_DIR:-$ROOT/target}/release/pdx}
D=${DURATION:-5}
ROUNDS=${ROUNDS:-2}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_up() { for _ in $(seq 100); do curl -sf "$1" >/dev/null && return 0; sleep 0.2; done; echo "not up: $1" >&2; return 1; }
M="--instant --host 127.0.0.1 --kv-noop"
taskset -c 1 "$PDX" mock --role prefill $M --port 18201 >/dev/null 2>&1 & pids+=($!)
taskset -c 1 "$PDX" mock --role decode $M --port 18202 --instant-tokens-per-chunk 1 >/dev/null 2>&1 & pids+=($!)
for port in 18201 18202; do wait_up "http://127.0.0.1:$port/health"; done
CHAT="$ROOT/crates/pdx-mock/bench/chat.lua"
STREAM="$ROOT/benches/router_stream.lua"
tck=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/"$1"/stat; }
# run URL CONNS SCRIPT PID -> "requests cpu_seconds"
run() {
  local c0 out c1
  c0=$(cpu "$4")
  out=$(taskset -c 1 wrk -t1 -c"$2" -d"$D"s --timeout 10s -s "$3" "$1")
  c1=$(cpu "$4")
  echo "$(echo "$out" | awk '/requests in/{print $1}') $(echo "($c1-$c0)/$tck" | bc -l)"
}
printf "%-22s %10s %8s %10s %12s %8s %12s\n" variant chat_req cpu_s req/cpu_s stream_resp cpu_s chunks/cpu_s
for round in $(seq "$ROUNDS"); do
  variants=("scrape-off|$PDX|--telemetry-interval-ms 0" "scrape-on|$PDX|" "scrape-on,score|$PDX|--policy score")
  [ -n "${BASE:-}" ] && variants=("base|$BASE|" "${variants[@]}")
  for v in "${variants[@]}"; do
    IFS='|' read -r name bin flags <<<"$v"
    # shellcheck disable=SC2086
    taskset -c 0 "$bin" serve --host 127.0.0.1 --port 18300 --threads 1 --prefill http://127.0.0.1:18201 \
      --decode http://127.0.0.1:18202 $flags >/dev/null 2>&1 &
    pid=$!
    wait_up http://127.0.0.1:18300/ready
    sleep 1
    read -r n c < <(run http://127.0.0.1:18300/v1/chat/completions 64 "$CHAT" "$pid")
    read -r sn sc < <(run http://127.0.0.1:18300/v1/completions 16 "$STREAM" "$pid")
    printf "%-22s %10d %8.2f %10.0f %12d %8.2f %12.0f\n" "$name" "$n" "$c" "$(echo "$n/$c" | bc -l)" "$sn" "$sc" \
      "$(echo "$sn*1000/$sc" | bc -l)"
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
