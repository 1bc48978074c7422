#!/usr/bin/env bash
# Builds what benches/gpu/run.sh needs on the GPU host (which has CUDA 13 and nvcc but no Rust toolchain) and
# copies it into .gpu/ (git-ignored; carry it to the GPU machine with the working tree):
#   .gpu/pdx            release CLI (pdx bench kernels, pdx bench kv --mem device|pinned)
#   .gpu/pdx-cuda-gpu   the GPU tests of crates/pdx-cuda/tests/gpu.rs
#   .gpu/pdx-cuda-unit  pdx-cuda's unit tests; .gpu/pdx-kvlayout  the CPU reference tests
#   .gpu/pdx-transfer-gpu  the transfer engine's GPU tests (crates/pdx-transfer/tests/gpu.rs)
# Binaries are stripped of debug info to stay small. Run from anywhere: benches/gpu/prepare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release --locked -p pdx
mkdir -p .gpu
cp "$target/release/pdx" .gpu/pdx
# `cargo test --no-run` names each test executable in its JSON messages.
cargo test --release --locked -p pdx-cuda -p pdx-kvlayout -p pdx-transfer --no-run --message-format=json \
  | python3 -c '
import json, sys, shutil
names = {("pdx-cuda", "gpu"): "pdx-cuda-gpu", ("pdx-cuda", "pdx_cuda"): "pdx-cuda-unit",
         ("pdx-kvlayout", "pdx_kvlayout"): "pdx-kvlayout", ("pdx-transfer", "gpu"): "pdx-transfer-gpu"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    # package_id: "path+file:///…/crates/pdx-cuda#0.1.0" or "path+file:///…/dir#name@0.1.0"
    where, _, frag = m["package_id"].partition("#")
    pkg = frag.split("@")[0] if "@" in frag else where.rstrip("/").split("/")[-1]
    key = (pkg, m["target"]["name"])
    if key in names:
        shutil.copy(m["executable"], ".gpu/" + names[key])
        print("copied", m["executable"], "->", ".gpu/" + names[key])
'
for f in .gpu/*; do objcopy --strip-debug "$f"; done
ls -la .gpu
du -sh .gpu
