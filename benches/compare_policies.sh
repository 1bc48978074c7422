#!/usr/bin/env bash
# Scheduling quality: goodput at SLO of every pdx routing policy and of the peer routers' policies, in front of the
# same PD cluster of `pdx mock` workers (timed model), fresh workers for every row, on two traces. Issue 17, item 6.
#   benches/compare_policies.sh [OUT_DIR]     (default target/compare-policies; ~40 minutes on 2 cores)
# Cluster: 4 prefill workers of two speeds (--speed 0.1 0.1 0.2 0.2: a tenth and a fifth of the modelled H100) and
# 3 decode workers (--speed 0.2), each --num-blocks 32768 --kv-scale-down 256, prefix cache on (the mock always
# caches prefixes), KV events on when `pdx mock --help` lists --kv-events-config.
# Traces:
#   mooncake: the first REQUESTS (400) requests of ../shared/traces/conversation_trace.jsonl (shared prefixes),
#             `pdx replay --scale-tokens 0.25 --speed 6`;
#   decode:   a decode-bound trace generated here (decode_trace.jsonl in OUT_DIR, Mooncake jsonl format):
#             DB_REQUESTS (400) requests, Poisson arrivals at DB_RATE (10) req/s, prompts log-normal around 1000 tokens
#             (128..4096) with no shared prefix (every request its own hash_ids), outputs uniform 200..1000 tokens,
#             seeded (DB_SEED 17); replayed at --speed 1 --scale-tokens 1.
# SLO: TTFT 500 ms, ITL 30 ms. Rows: every policy `pdx serve --policy` accepts (read from the binary), sglang-router
# cache_aware and round_robin (SGLang bootstrap flow: the decode mock waits for the prefill's KV), vllm-router's
# policies (vLLM NixlConnector flow, KV read over pdx-transfer). Columns: goodput at SLO, SLO attainment, TTFT
# p50/p99, ITL p99, prefix-cache hit rate of the prefill pool (vllm:prefix_cache_hits_total / queries_total summed
# over the prefill mocks after the row).
# Writes OUT_DIR/compare.json (one object per row: router, policy, goodput_rps, slo_attainment, ttft_p50_ms,
# ttft_p99_ms, itl_p99_ms, prefix_hit_rate, trace, plus succeeded/requests) and OUT_DIR/compare.md.
# Knobs (env): REQUESTS=400 SCALE=0.25 SPEED=6 SLO_TTFT_MS=500 SLO_ITL_MS=30
#   PREFILL_SPEEDS="0.1 0.1 0.2 0.2" DECODE_SPEEDS="0.2 0.2 0.2"  SPREAD=5 (prefill speeds 5x apart: 0.05 0.05 0.25 0.25)
#   TRACES="mooncake decode" DB_REQUESTS=400 DB_RATE=10 DB_SEED=17 DB_SPEED=1 DB_SCALE=1
#   PDX_POLICIES (default: all the binary accepts) SGL_POLICIES="cache_aware round_robin"
#   VLLM_POLICIES (default: every vllm-router --policy choice) PEERS=0 (pdx rows only) PDX_SERVE_EXTRA (more flags)
#   PDX_PREFILL_POOL / PDX_DECODE_POOL (TOML lines added to pdx's prefill / decode pool, e.g.
#   'score = { alpha = 1, delta = 0 }'; with KV events on)
#   A pdx policy written `POLICY+itl` (e.g. PDX_POLICIES="round_robin score score+itl") is a row of POLICY with
#   the decode pool's admission shaped by ITL at the SLO's target (--admission-itl-target-ms SLO_ITL_MS).
# Needs ../shared/peers/install.sh (~/.cache/pdx-peers) for the peer rows.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/compare-policies}; mkdir -p "$OUT"
PEERS_DIR=${PEERS_DIR:-$HOME/.cache/pdx-peers}
TRACE_DIR=${TRACE_DIR:-../shared/traces}
REQUESTS=${REQUESTS:-400}; SCALE=${SCALE:-0.25}; SPEED=${SPEED:-6}
SLO_TTFT_MS=${SLO_TTFT_MS:-500}; SLO_ITL_MS=${SLO_ITL_MS:-30}
if [ "${SPREAD:-}" = 5 ]; then PREFILL_SPEEDS=${PREFILL_SPEEDS:-"0.05 0.05 0.25 0.25"}; fi
PREFILL_SPEEDS=${PREFILL_SPEEDS:-"0.1 0.1 0.2 0.2"}; DECODE_SPEEDS=${DECODE_SPEEDS:-"0.2 0.2 0.2"}
TRACES=${TRACES:-"mooncake decode"}
DB_REQUESTS=${DB_REQUESTS:-400}; DB_RATE=${DB_RATE:-10}; DB_SEED=${DB_SEED:-17}; DB_SPEED=${DB_SPEED:-1}; DB_SCALE=${DB_SCALE:-1}
SGL_POLICIES=${SGL_POLICIES:-"cache_aware round_robin"}
PEERS=${PEERS:-1}
cargo build --release --locked -q
PDX=./target/release/pdx
R=18600; SGL_PORT=18640; VLR_PORT=18650
read -r -a pspeeds <<<"$PREFILL_SPEEDS"; read -r -a dspeeds <<<"$DECODE_SPEEDS"
pports=(); for i in "${!pspeeds[@]}"; do pports+=($((18601 + i))); done
dports=(); for i in "${!dspeeds[@]}"; do dports+=($((18611 + i))); done

# The policies of `pdx serve`: its error for an unknown one lists them all.
if [ -z "${PDX_POLICIES:-}" ]; then
  PDX_POLICIES=$(timeout 10 $PDX serve --host 127.0.0.1 --port 0 --policy '?' --prefill http://127.0.0.1:9 --decode http://127.0.0.1:9 2>&1 \
    | sed -n 's/.*unknown routing policy `[^`]*` (\(.*\)).*/\1/p' | tr -d ',' | head -1 || true)
  [ -n "$PDX_POLICIES" ] || PDX_POLICIES="round_robin least_loaded power_of_two kv_aware"
fi
if [ -z "${VLLM_POLICIES:-}" ]; then
  VLLM_POLICIES=$("$PEERS_DIR/venv-vrouter/bin/vllm-router" --help 2>/dev/null \
    | sed -n 's/.*\[--policy {\([a-z_,]*\)}\].*/\1/p' | head -1 | tr ',' ' ' || true)
fi
KV_EVENTS=0; $PDX mock --help 2>/dev/null | grep -q -- '--kv-events-config' && KV_EVENTS=1

pids=(); router_pid=; row=
stop_router() { [ -n "$router_pid" ] && { kill "$router_pid" 2>/dev/null || true; wait "$router_pid" 2>/dev/null || true; }; router_pid=; }
stop_workers() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=(); }
cleanup() { stop_router; stop_workers; }
trap cleanup EXIT
wait_up() { for _ in $(seq 150); do curl -sf "$1" >/dev/null && return 0; sleep 0.2; done; echo "not up: $1" >&2; return 1; }

start_workers() { # fresh workers: empty caches, no state from the previous row
  stop_workers
  local common="--host 127.0.0.1 --num-blocks 32768 --kv-scale-down 256" i
  for i in "${!pports[@]}"; do
    local ev=(); [ $KV_EVENTS = 1 ] && ev=(--kv-events-config "{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"tcp://127.0.0.1:$((pports[i] + 1000))\",\"topic\":\"kv-events\"}")
    $PDX mock --role prefill $common --port "${pports[i]}" --speed "${pspeeds[i]}" "${ev[@]}" >"$OUT/$row.prefill-$i.log" 2>&1 & pids+=($!)
  done
  for i in "${!dports[@]}"; do
    local ev=(); [ $KV_EVENTS = 1 ] && ev=(--kv-events-config "{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"tcp://127.0.0.1:$((dports[i] + 1000))\",\"topic\":\"kv-events\"}")
    $PDX mock --role decode $common --port "${dports[i]}" --speed "${dspeeds[i]}" "${ev[@]}" >"$OUT/$row.decode-$i.log" 2>&1 & pids+=($!)
  done
  for p in "${pports[@]}" "${dports[@]}"; do wait_up "http://127.0.0.1:$p/health"; done
  # Each worker is ours and up (a port another process held would have made ours exit).
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || { echo "a worker of row $row exited at start (see $OUT/$row.*.log)" >&2; return 1; }; done
}

start_router() { # router policy; sets router_pid and url (not in a subshell: the pid must stay known)
  local router=$1 policy=$2 args=() p
  case $router in
  pdx)
    if [[ $policy == *+itl ]]; then policy=${policy%+itl}; args+=(--admission-itl-target-ms "$SLO_ITL_MS"); fi
    if [ $KV_EVENTS = 1 ]; then
      # A config file, so that pdx subscribes to every worker's KV events (flags carry no event endpoints).
      { echo '[[models]]'; echo 'name = "*"'
        for role in prefill decode; do
          echo '[[models.pools]]'; echo "name = \"$role\""; echo "role = \"$role\""; echo "policy = \"$policy\""
          extra="PDX_${role^^}_POOL"; [ -n "${!extra:-}" ] && echo "${!extra}"
          echo 'workers = ['
          if [ $role = prefill ]; then ps=("${pports[@]}"); else ps=("${dports[@]}"); fi
          for p in "${ps[@]}"; do echo "  { url = \"http://127.0.0.1:$p\", kv_events_endpoint = \"tcp://127.0.0.1:$((p + 1000))\" },"; done
          echo ']'
        done; } >"$OUT/$row.pdx.toml"
      args+=(--config "$OUT/$row.pdx.toml")
    else
      for p in "${pports[@]}"; do args+=(--prefill "http://127.0.0.1:$p"); done
      for p in "${dports[@]}"; do args+=(--decode "http://127.0.0.1:$p"); done
    fi
    # shellcheck disable=SC2086
    $PDX serve --host 127.0.0.1 --port $R --policy "$policy" "${args[@]}" ${PDX_SERVE_EXTRA:-} >"$OUT/$row.router.log" 2>&1 &
    router_pid=$!; url=http://127.0.0.1:$R;;
  sglang-router)
    # Each prefill mock serves SGLang's bootstrap route on its own HTTP port: that is its bootstrap port.
    for p in "${pports[@]}"; do args+=(--prefill "http://127.0.0.1:$p" "$p"); done
    for p in "${dports[@]}"; do args+=(--decode "http://127.0.0.1:$p"); done
    "$PEERS_DIR/venv-sgl/bin/python" -m sglang_router.launch_router --host 127.0.0.1 --port $SGL_PORT \
      --pd-disaggregation "${args[@]}" --policy "$policy" --worker-startup-check-interval 1 --log-level warn \
      --prometheus-port $((SGL_PORT + 11000)) >"$OUT/$row.router.log" 2>&1 &
    router_pid=$!; url=http://127.0.0.1:$SGL_PORT;;
  vllm-router)
    for p in "${pports[@]}"; do args+=(--prefill "http://127.0.0.1:$p"); done
    for p in "${dports[@]}"; do args+=(--decode "http://127.0.0.1:$p"); done
    # vllm-router refuses static KV event sources without a model identity ("static KV event sources require
    # worker URLs and model identity"); VLLM_KV_EVENTS=1 passes them anyway.
    if [ "$policy" = kv_aware ] && [ $KV_EVENTS = 1 ] && [ "${VLLM_KV_EVENTS:-0}" = 1 ]; then
      for p in "${pports[@]}"; do args+=(--kv-event-source "http://127.0.0.1:$p=tcp://127.0.0.1:$((p + 1000))"); done
    fi
    "$PEERS_DIR/venv-vrouter/bin/vllm-router" --host 127.0.0.1 --port $VLR_PORT --vllm-pd-disaggregation \
      "${args[@]}" --policy "$policy" --worker-startup-check-interval 1 --log-level warning \
      --prometheus-port $((VLR_PORT + 11000)) >"$OUT/$row.router.log" 2>&1 &
    router_pid=$!; url=http://127.0.0.1:$VLR_PORT;;
  esac
  wait_up "$url/health" && sleep 1
}

make_decode_trace() { # Mooncake jsonl: timestamp ms, input_length, output_length, hash_ids (512-token blocks)
  python3 - "$OUT/decode_trace.jsonl" "$DB_REQUESTS" "$DB_RATE" "$DB_SEED" <<'PY'
import json, math, random, sys
path, n, rate, seed = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
t, next_block = 0.0, 0
with open(path, "w") as f:
    for _ in range(n):
        t += rng.expovariate(rate)                       # Poisson arrivals
        inp = int(min(4096, max(128, rng.lognormvariate(math.log(1000), 0.6))))
        out = rng.randint(200, 1000)
        blocks = math.ceil(inp / 512)
        ids = list(range(next_block, next_block + blocks)); next_block += blocks  # no shared prefix
        f.write(json.dumps({"timestamp": int(t * 1000), "input_length": inp, "output_length": out, "hash_ids": ids}) + "\n")
PY
}

run_row() { # trace router policy
  local trace=$1 router=$2 policy=$3 name=$1.$2.$3 tfile speed scale n
  case $trace in
  mooncake) tfile=$TRACE_DIR/conversation_trace.jsonl; speed=$SPEED; scale=$SCALE; n=$REQUESTS;;
  decode) tfile=$OUT/decode_trace.jsonl; speed=$DB_SPEED; scale=$DB_SCALE; n=$DB_REQUESTS;;
  esac
  row=$name
  start_workers || { echo "skipped: $name: workers did not start" >&2; return 0; }
  start_router "$router" "$policy" || { echo "skipped: $router $policy did not start (see $OUT/$name.router.log)" >&2; stop_router; return 0; }
  echo "== $trace / $router / $policy" >&2
  $PDX replay --url "$url" --trace "$tfile" --max-requests "$n" --scale-tokens "$scale" --speed "$speed" \
    --slo-ttft-ms "$SLO_TTFT_MS" --slo-itl-ms "$SLO_ITL_MS" --max-failed-fraction 1 --json --quiet \
    >"$OUT/$name.json" 2>"$OUT/$name.replay.log" || true
  for i in "${!pports[@]}"; do curl -s "http://127.0.0.1:${pports[i]}/metrics" >"$OUT/$name.prefill-$i.metrics" || true; done
  local dead=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || dead=$((dead + 1)); done
  echo "$dead" >"$OUT/$name.dead"
  [ "$dead" = 0 ] || echo "warning: $dead worker(s) of row $name exited during the row (see $OUT/$name.*.log)" >&2
  stop_router
  rows+=("$name")
}

rows=()
[[ " $TRACES " == *" decode "* ]] && make_decode_trace
for trace in $TRACES; do
  for p in $PDX_POLICIES; do run_row "$trace" pdx "$p"; done
  if [ "$PEERS" = 1 ]; then
    for p in $SGL_POLICIES; do run_row "$trace" sglang-router "$p"; done
    for p in $VLLM_POLICIES; do run_row "$trace" vllm-router "$p"; done
  fi
done

python3 - "$OUT" "${#pports[@]}" "${rows[@]}" <<'PY' | tee "$OUT/compare.md"
import json, sys
out, nprefill, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def metric(path, name):
    try:
        return sum(float(l.rsplit(" ", 1)[1]) for l in open(path) if l.startswith(name + "{") or l.startswith(name + " "))
    except OSError:
        return 0.0
rows = []
for n in names:
    trace, router, policy = n.split(".", 2)
    try:
        r = json.load(open(f"{out}/{n}.json"))
    except (OSError, ValueError):
        continue
    hits = sum(metric(f"{out}/{n}.prefill-{i}.metrics", "vllm:prefix_cache_hits_total") for i in range(nprefill))
    q = sum(metric(f"{out}/{n}.prefill-{i}.metrics", "vllm:prefix_cache_queries_total") for i in range(nprefill))
    rows.append({"trace": trace, "router": router, "policy": policy,
                 "goodput_rps": r.get("goodput_rps"), "slo_attainment": r.get("slo_attainment"),
                 "ttft_p50_ms": r["ttft_ms"]["p50"], "ttft_p99_ms": r["ttft_ms"]["p99"],
                 "itl_p99_ms": r["itl_ms"]["p99"], "prefix_hit_rate": hits / q if q else None,
                 "succeeded": r["succeeded"], "requests": r["requests"],
                 "workers_died": int(open(f"{out}/{n}.dead").read().strip() or 0) if __import__("os").path.exists(f"{out}/{n}.dead") else None})
json.dump(rows, open(f"{out}/compare.json", "w"), indent=1)
f = lambda v, fmt: "–" if v is None else format(v, fmt)
for trace in dict.fromkeys(r["trace"] for r in rows):
    ours = [r for r in rows if r["trace"] == trace]
    rr = next((r["goodput_rps"] for r in ours if r["router"] == "pdx" and r["policy"] == "round_robin"), None)
    print(f"\n**{trace}**\n")
    print("| router | policy | goodput req/s | × pdx round_robin | SLO attainment | TTFT p50 / p99 ms | ITL p99 ms | prefill prefix hit rate | ok / sent |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in ours:
        rel = r["goodput_rps"] / rr if rr and r["goodput_rps"] is not None else None
        att = None if r["slo_attainment"] is None else 100 * r["slo_attainment"]
        print(f"| {r['router']} | {r['policy']} | {f(r['goodput_rps'], '.2f')} | {f(rel, '.2f')} | {f(att, '.0f')}% | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p99_ms']:.1f} | {f(r['prefix_hit_rate'], '.2f')} | "
              f"{r['succeeded']} / {r['requests']} |")
PY
