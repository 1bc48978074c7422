#!/usr/bin/env bash
# Side-by-side KV-transfer benchmark: pdx (shm, cma, tcp) vs NIXL (UCX) and Mooncake's transfer engine (TCP),
# two processes, batch 64, the same block sizes and layout (blocks at a stride of the largest size), one run.
# NIXL's own script, nixl_bench.py, also runs on pdx through its Python API (pdx_transfer.nixl, the import line
# changed and nothing else): the rows "pdx (Python, nixl API)" beside NIXL through Python.
#   benches/compare_transfer.sh [OUT_DIR]      (needs ../shared/peers/install.sh done; ~3 minutes)
# Needs Debian's libibverbs1 for Mooncake's wheel (apt-get install libibverbs1).
# Writes pdx.json, pdx-caller.json, nixl.txt, nixl-tcp.txt, pdx-py.txt, mooncake.txt and compare.md (the tables) into
# OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/compare-transfer}; mkdir -p "$OUT"
PEERS=${PEERS_DIR:-$HOME/.cache/pdx-peers}
SHARED=${SHARED_DIR:-../shared/peers}
SECS=${SECS:-2}
SIZES=4096,65536,1048576,16777216
cargo build --release --locked -q
./target/release/pdx bench kv --procs 2 --batch-size 64 --block-size 4KiB,64KiB,1MiB,16MiB \
  --transport shm,cma,tcp --duration "$SECS" --json >"$OUT/pdx.json"
# Caller memory on both sides (each maps its own, registered by pointer, no memfd): the kind NIXL's NumPy buffers are.
./target/release/pdx bench kv --procs 2 --batch-size 64 --block-size 4KiB,64KiB,1MiB,16MiB \
  --transport cma,tcp --mem caller --duration "$SECS" --json >"$OUT/pdx-caller.json"
# Peers: a crash after the rows are printed (NIXL has segfaulted at teardown here) is recorded, not fatal.
peer() { local out=$1; shift; "$@" >"$out" 2>&1 || echo "(exited with status $?)" >>"$out"; }
peer "$OUT/nixl.txt" "$PEERS/venv-nixl/bin/python" "$SHARED/nixl_bench.py" --procs 2 --batch 64 --sizes $SIZES --secs "$SECS"
UCX_TLS=tcp peer "$OUT/nixl-tcp.txt" "$PEERS/venv-nixl/bin/python" "$SHARED/nixl_bench.py" --procs 2 --batch 64 --sizes $SIZES --secs "$SECS"
# pdx through NIXL's Python API: nixl_bench.py with its import line changed (checked: exactly one line differs),
# in a venv with pdx_transfer built from this tree (`pip install ./crates/pdx-python`, as the README says).
VENV=target/venv-pdx-python
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c 'import numpy' 2>/dev/null || "$VENV/bin/pip" install -q numpy
"$VENV/bin/pip" install -q --force-reinstall --no-deps ./crates/pdx-python
sed 's/from nixl\._api import/from pdx_transfer.nixl import/' "$SHARED/nixl_bench.py" >"$OUT/pdx_nixl_bench.py"
changed=$(diff "$SHARED/nixl_bench.py" "$OUT/pdx_nixl_bench.py" | grep -c '^>' || true)
[ "$changed" = 1 ] && grep -q 'from pdx_transfer.nixl import' "$OUT/pdx_nixl_bench.py" \
  || { echo "compare_transfer.sh: expected exactly one changed import line in nixl_bench.py, got $changed" >&2; exit 1; }
peer "$OUT/pdx-py.txt" "$VENV/bin/python" "$OUT/pdx_nixl_bench.py" --procs 2 --batch 64 --sizes $SIZES --secs "$SECS"
peer "$OUT/mooncake.txt" "$PEERS/venv-mc/bin/python" "$SHARED/mooncake_bench.py" --procs 2 --batch 64 --sizes $SIZES --secs "$SECS"
python3 benches/compare_transfer.py "$OUT" | tee "$OUT/compare.md"
