#!/usr/bin/env bash
# Scale-out (issue 16): replays the Mooncake conversation trace through one `pdx serve` and through two (the
# requests in turn, as a Service in front of two replicas spreads them), at the same load, in front of the same
# workers: 2 prefill + 2 decode `pdx mock` (timed model), registered in etcd (`--register-etcd`), routers
# with `--discovery etcd://…` and `--policy kv_aware`. Each case runs twice: KV events off (each router's
# approximate prefix index knows only the requests it routed) and on (every router subscribes to every
# worker's events: one exact index). Workers and routers restart between cases (cold caches).
#   benches/scale_out.sh [OUT_DIR]          (needs etcd; about 5 minutes)
# Knobs (env): REQUESTS=1000 SCALE=0.1 SPEED=6 SLO_TTFT_MS=500 SLO_ITL_MS=30
#              TRACE=../shared/traces/conversation_trace.jsonl PDX=./target/release/pdx
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/scale-out}; mkdir -p "$OUT"
REQUESTS=${REQUESTS:-1000}; SCALE=${SCALE:-0.1}; SPEED=${SPEED:-6}
SLO_TTFT_MS=${SLO_TTFT_MS:-500}; SLO_ITL_MS=${SLO_ITL_MS:-30}
TRACE=${TRACE:-../shared/traces/conversation_trace.jsonl}
PDX=${PDX:-./target/release/pdx}
[ -x "$PDX" ] || cargo build --release --locked -q --bin pdx
command -v etcd >/dev/null || { echo "etcd not installed (apt-get install etcd-server)"; exit 1; }
EC=18590; EP=18591; A=18500; B=18501
pids=(); etcd_pid=""
DATA=$(mktemp -d)
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=(); }
cleanup() { stop_all; [ -n "$etcd_pid" ] && kill "$etcd_pid" 2>/dev/null; rm -rf "$DATA"; }
trap cleanup EXIT
wait_http() { for _ in $(seq 100); do curl -sf "http://127.0.0.1:$1$2" >/dev/null && return 0; sleep 0.1; done; echo "no answer on :$1$2"; exit 1; }

etcd --name b --data-dir "$DATA/etcd" --listen-client-urls "http://127.0.0.1:$EC" \
  --advertise-client-urls "http://127.0.0.1:$EC" --listen-peer-urls "http://127.0.0.1:$EP" \
  --initial-advertise-peer-urls "http://127.0.0.1:$EP" --initial-cluster "b=http://127.0.0.1:$EP" \
  >"$OUT/etcd.log" 2>&1 & etcd_pid=$!
wait_http $EC /health

run() { # name events(0|1) routers(1|2)
  local name=$1 events=$2 routers=$3 i=0
  stop_all
  # The same ports every case: a new worker puts the same key as the one it replaces.
  for role in prefill prefill decode decode; do
    local port=$((18510 + i)) ev=()
    if [ "$events" = 1 ]; then
      ev=(--kv-events-config "{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"tcp://127.0.0.1:$((18530 + i))\",\"replay_endpoint\":\"tcp://127.0.0.1:$((18540 + i))\",\"topic\":\"kv-events\"}")
    fi
    $PDX mock --role $role --host 127.0.0.1 --port $port --num-blocks 16384 --model mock \
      --register-etcd "etcd://127.0.0.1:$EC" "${ev[@]}" >"$OUT/$name.w$i.log" 2>&1 & pids+=($!)
    i=$((i + 1))
  done
  local urls=()
  for r in $(seq "$routers"); do
    local rp=$((A + r - 1))
    $PDX serve --host 127.0.0.1 --port $rp --threads 1 --discovery "etcd://127.0.0.1:$EC" --policy kv_aware \
      >"$OUT/$name.r$r.log" 2>&1 & pids+=($!)
    wait_http $rp /health
    for _ in $(seq 100); do
      [ "$(curl -s "http://127.0.0.1:$rp/v1/workers" | grep -o '"url"' | wc -l)" -ge 4 ] && break; sleep 0.1
    done
    urls+=("http://127.0.0.1:$rp")
  done
  wait_http $A /ready
  local joined; joined=$(IFS=,; echo "${urls[*]}")
  $PDX replay --url "$joined" --trace "$TRACE" --max-requests "$REQUESTS" --scale-tokens "$SCALE" \
    --speed "$SPEED" --slo-ttft-ms "$SLO_TTFT_MS" --slo-itl-ms "$SLO_ITL_MS" --max-failed-fraction 1 \
    --json --quiet >"$OUT/$name.json"
  for w in 0 1; do curl -s "http://127.0.0.1:$((18510 + w))/metrics" >"$OUT/$name.prefill$w.metrics"; done
  for r in $(seq "$routers"); do curl -s "http://127.0.0.1:$((A + r - 1))/metrics" >"$OUT/$name.router$r.metrics"; done
}

run one-router 0 1
run two-routers 0 2
run one-router-events 1 1
run two-routers-events 1 2

python3 - "$OUT" one-router two-routers one-router-events two-routers-events <<'PY' | tee "$OUT/scale_out.md"
import json, sys
out, names = sys.argv[1], sys.argv[2:]
def metric(path, name):
    try:
        return sum(float(l.rsplit(" ", 1)[1]) for l in open(path) if l.startswith(name + "{") or l.startswith(name + " "))
    except OSError:
        return float("nan")
print("| case | ok / sent | TTFT p50 / p99 ms | ITL p50 / p99 ms | e2e p50 / p99 ms | req/s | SLO attainment | goodput req/s | prefill prefix hits | event batches per router |")
print("|---|---|---|---|---|---|---|---|---|---|")
def batches(n):
    out_ = []
    for i in (1, 2):
        v = metric(f"{out}/{n}.router{i}.metrics", "pdx_kv_events_batches_total")
        if v == v:  # not NaN: that router ran
            out_.append(f"{v:.0f}")
    return " / ".join(out_)
for n in names:
    r = json.load(open(f"{out}/{n}.json"))
    hits = sum(metric(f"{out}/{n}.prefill{w}.metrics", "vllm:prefix_cache_hits_total") for w in (0, 1))
    q = sum(metric(f"{out}/{n}.prefill{w}.metrics", "vllm:prefix_cache_queries_total") for w in (0, 1))
    print(f"| {n} | {r['succeeded']} / {r['requests']} | {r['ttft_ms']['p50']:.1f} / {r['ttft_ms']['p99']:.1f} | "
          f"{r['itl_ms']['p50']:.2f} / {r['itl_ms']['p99']:.2f} | {r['e2e_ms']['p50']:.0f} / {r['e2e_ms']['p99']:.0f} | "
          f"{r['request_throughput']:.2f} | {100*r['slo_attainment']:.1f}% | {r['goodput_rps']:.2f} | "
          f"{hits/q if q else float('nan'):.3f} | {batches(n)} |")
PY
