#!/usr/bin/env bash
# System calls and io_uring enters per request: pdx serve (vllm-nixl, 1 thread), the epoll floor (examples/pd_floor)
# the io_uring floor on monoio (examples/pd_floor_uring) and on a ring of pdx's own (examples/pd_floor_ring), each at 1 and 64 connections of non-streaming chat
# (crates/pdx-mock/bench/chat.lua) in front of `--instant --kv-noop` mocks. Prints the numbers of docs/benchmarks.md
# "### The floor on io_uring and system calls per request (issue 19)".
#
# Two counts per router and connection count, each over its own fixed wrk run of DURATION seconds, divided by the
# requests wrk reports (the counts include the router's idle work during the run: timers, health checks):
# * `strace -c -f -p PID` (every thread): calls per system call, and failed calls (EAGAIN reads). strace stops
#   the router at every call, so it runs slower and, at 64 connections, batches more per io_uring enter than it
#   would untraced.
# * `perf stat -p PID` on tracepoints, where the kernel has them (it reads tracefs: needs root or
#   perf_event_paranoid <= -1 with a readable /sys/kernel/tracing; skipped with a note otherwise): all system
#   calls (`raw_syscalls:sys_enter`), `io_uring_enter` calls, io_uring entries submitted
#   (`io_uring:io_uring_submit_req`) and entries that found no data and armed a poll (`io_uring:io_uring_poll_arm`),
#   at close to full speed.
# Needs: wrk, strace, release builds of
#   cargo build --release -p pdx-mock --example mock &&
#   cargo build --release -p pdx-router --example serve --example pd_floor --example pd_floor_uring \
#     --example pd_floor_ring
# Pinning as in compare_routers.sh: the router on core 0, mocks and wrk on core 1. Ports 18501-18513.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
T=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples
D=${DURATION:-5}
pids=()
tmp=$(mktemp -d)
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
M="--instant --host 127.0.0.1 --kv-noop"
taskset -c 1 "$T/mock" --role prefill $M --port 18501 >/dev/null 2>&1 & pids+=($!)
taskset -c 1 "$T/mock" --role decode $M --port 18502 --instant-tokens-per-chunk 1 >/dev/null 2>&1 & pids+=($!)
wait_up() { for _ in $(seq 100); do curl -sf "$1" >/dev/null && return 0; sleep 0.2; done; echo "not up: $1" >&2; return 1; }
for port in 18501 18502; do wait_up "http://127.0.0.1:$port/health"; done
UP="--prefill http://127.0.0.1:18501 --decode http://127.0.0.1:18502"
taskset -c 0 "$T/serve" --host 127.0.0.1 --port 18510 --threads 1 $UP >/dev/null 2>&1 & pids+=($!)
PDX=$!
taskset -c 0 "$T/pd_floor" --port 18511 $UP 2>/dev/null & pids+=($!)
FLOOR=$!
taskset -c 0 "$T/pd_floor_uring" --port 18512 $UP 2>/dev/null & pids+=($!)
URING=$!
taskset -c 0 "$T/pd_floor_ring" --port 18513 $UP 2>/dev/null & pids+=($!)
RING=$!
wait_up http://127.0.0.1:18510/ready
CHAT="$ROOT/crates/pdx-mock/bench/chat.lua"
for port in 18511 18512 18513; do # the floors answer any request: one warm-up request each opens their upstreams
  curl -sf --retry 50 --retry-connrefused --retry-delay 0 -X POST -d '{}' "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
done

# wrk_run PORT CONNS -> requests
wrk_run() {
  taskset -c 1 wrk -t1 -c"$2" -d"$D"s --timeout 10s -s "$CHAT" "http://127.0.0.1:$1/v1/chat/completions" |
    awk '/requests in/{print $1}'
}
# per COUNT REQUESTS -> COUNT / REQUESTS, 2 decimals
per() { echo "$1 $2" | awk '{printf "%.2f", ($2 > 0 ? $1 / $2 : 0)}'; }

perf_ok=1
perf stat -e raw_syscalls:sys_enter,syscalls:sys_enter_io_uring_enter,io_uring:io_uring_submit_req,io_uring:io_uring_poll_arm \
  -- true >/dev/null 2>"$tmp/perfcheck" || perf_ok=0
[ $perf_ok = 1 ] || echo "perf stat: tracepoints not readable here, perf columns skipped: $(head -3 "$tmp/perfcheck" | tr '\n' ' ')"

echo "per request; strace: counts of a traced run (slower); perf: tracepoint counts of an untraced run"
printf "%-11s %5s | %8s %8s %8s %8s %8s %8s %8s %8s | %8s %8s %8s %8s %8s\n" router conns \
  st_req syscalls uring_ent sendto recvfrom EAGAIN writev epoll_w pf_req syscalls uring_ent sqes poll_arm
for r in pdx=18510=$PDX floor=18511=$FLOOR floor-uring=18512=$URING floor-ring=18513=$RING; do
  IFS== read -r name port pid <<<"$r"
  for c in 1 64; do
    # strace: `% time, seconds, usecs/call, calls, [errors], syscall` rows.
    strace -c -f -p "$pid" -o "$tmp/strace" 2>/dev/null & st=$!
    sleep 0.5
    n=$(wrk_run "$port" "$c")
    kill -INT $st; wait $st || true
    read -r tot ent snd rcv eag wv ew < <(awk '
      $1 ~ /^[0-9.]+$/ && NF >= 5 {
        calls = $4; err = (NF == 6 ? $5 : 0); name = $NF
        if (name == "total") next
        tot += calls; c[name] += calls; e[name] += err
      }
      END { printf "%d %d %d %d %d %d %d\n", tot, c["io_uring_enter"], c["sendto"], c["recvfrom"], e["recvfrom"],
            c["writev"], c["epoll_wait"] + c["epoll_pwait"] }' "$tmp/strace")
    line=$(printf "%-11s %5s | %8s %8s %8s %8s %8s %8s %8s %8s |" "$name" "$c" "$n" "$(per "$tot" "$n")" \
      "$(per "$ent" "$n")" "$(per "$snd" "$n")" "$(per "$rcv" "$n")" "$(per "$eag" "$n")" "$(per "$wv" "$n")" \
      "$(per "$ew" "$n")")
    if [ $perf_ok = 1 ]; then
      perf stat -x, -o "$tmp/perf" -p "$pid" \
        -e raw_syscalls:sys_enter,syscalls:sys_enter_io_uring_enter,io_uring:io_uring_submit_req,io_uring:io_uring_poll_arm \
        2>/dev/null & ps_=$!
      sleep 0.5
      pn=$(wrk_run "$port" "$c")
      kill -INT $ps_; wait $ps_ || true
      read -r sy en sq pa < <(awk -F, '$3 ~ /:/ {v[$3] = $1}
        END { printf "%d %d %d %d\n", v["raw_syscalls:sys_enter"], v["syscalls:sys_enter_io_uring_enter"],
              v["io_uring:io_uring_submit_req"], v["io_uring:io_uring_poll_arm"] }' "$tmp/perf")
      line="$line $(printf "%8s %8s %8s %8s %8s" "$pn" "$(per "$sy" "$pn")" "$(per "$en" "$pn")" "$(per "$sq" "$pn")" \
        "$(per "$pa" "$pn")")"
    fi
    echo "$line"
  done
done
echo "(st_req / pf_req: requests wrk reported in the strace / perf run; EAGAIN: failed recvfrom calls; epoll_w:" \
  "epoll_wait + epoll_pwait; sqes: io_uring entries submitted; poll_arm: entries that found no data and waited)"
