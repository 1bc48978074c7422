#!/usr/bin/env bash
# Runs fuzz targets for FUZZ_SECS seconds each (default 20) on their checked-in corpora (fuzz/corpus/TARGET), on
# the stable toolchain (RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z sanitizer flags). Targets: all, or those
# named. Exits non-zero on a crash; libFuzzer leaves the crashing input under fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")"
secs="${FUZZ_SECS:-20}"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
cargo fuzz build 2>&1 | tail -n 3
log="$(mktemp)"
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  # New inputs go to a scratch directory (listed first), so a CI run leaves the checked-in corpus as it is.
  scratch="$(mktemp -d)"
  if ! cargo fuzz run "$t" "$scratch" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 \
      -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz: $t crashed"
    exit 1
  fi
  runs="$(grep -m1 '^stat::number_of_executed_units' "$log" | awk '{print $2}')"
  echo "fuzz: $t ran ${secs}s, ${runs:-?} inputs, no crash"
  rm -rf "$scratch"
done
rm -f "$log"
echo "fuzz: ${#targets[@]} targets without a crash"
