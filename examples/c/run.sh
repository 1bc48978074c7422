#!/usr/bin/env bash
# Builds libpdx (cargo build -p pdx-capi), compiles xfer.c against libpdx.so with gcc, and runs a target and an
# initiator process twice: metadata through a file with the automatic transport choice (same host: cma), then over
# the target's listener (the side channel) with the initiator held to tcp. Exits non-zero on any failure; each run
# is bounded by `timeout`, and a target left behind is killed on exit.
#
#   examples/c/run.sh                         # builds the dev profile
#   PDX_PROFILE=release examples/c/run.sh     # builds the release profile
#   PDX_LIB_DIR=target/debug/deps examples/c/run.sh
#       uses the libpdx.so already there (CI: `cargo test` leaves it in target/debug/deps; `cargo build -p pdx-capi`
#       would build pdx-transfer's dependency tree again under pdx-capi's own feature set)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

profile="${PDX_PROFILE:-dev}"
case "$profile" in
  dev) cargo_flags=(); sub=debug ;;
  release) cargo_flags=(--release); sub=release ;;
  *) echo "PDX_PROFILE must be dev or release" >&2; exit 2 ;;
esac
if [ -n "${PDX_LIB_DIR:-}" ]; then
  libdir="$(cd "$PDX_LIB_DIR" && pwd)"
  [ -f "$libdir/libpdx.so" ] || { echo "no libpdx.so in $libdir" >&2; exit 1; }
else
  cargo build -p pdx-capi --locked ${cargo_flags[@]+"${cargo_flags[@]}"}
  libdir="${CARGO_TARGET_DIR:-$root/target}/$sub"
fi

work="$(mktemp -d)"
target_pid=""
cleanup() {
  if [ -n "$target_pid" ]; then kill "$target_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

cc="${CC:-gcc}"
# The header is C and C++ (cbindgen's cpp_compat): check both compile it cleanly.
"$cc" -std=c11 -Wall -Wextra -Werror -pedantic -I crates/pdx-capi/include \
  -o "$work/xfer" examples/c/xfer.c -L "$libdir" -lpdx -Wl,-rpath,"$libdir"
if command -v g++ >/dev/null; then
  printf '#include "pdx.h"\nint main(void) { return pdx_status_is_retryable(PDX_OK); }\n' >"$work/cxx.cc"
  g++ -std=c++17 -Wall -Wextra -Werror -I crates/pdx-capi/include -fsyntax-only "$work/cxx.cc"
fi

run_pair() {
  local label="$1"; shift
  local dir="$work/$label"
  mkdir -p "$dir"
  echo "== $label"
  timeout 30 "$work/xfer" target "$dir" &
  target_pid=$!
  if ! env "$@" timeout 30 "$work/xfer" initiator "$dir"; then
    echo "FAILED: initiator ($label)" >&2
    exit 1
  fi
  if ! wait "$target_pid"; then
    target_pid=""
    echo "FAILED: target ($label)" >&2
    exit 1
  fi
  target_pid=""
}

run_pair file-auto PDX_XFER_FETCH=0
run_pair fetch-tcp PDX_XFER_FETCH=1 PDX_XFER_TRANSPORTS=tcp
echo "examples/c: 2 passed, 0 failed"
