#!/usr/bin/env bash
# The `openai` Python SDK against `pdx serve` (tests/python/test_openai_sdk.py).
# Makes a venv in target/venv-sdk with openai and pytest (once), builds the pdx binary unless PDX_BIN names
# one, and runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=target/venv-sdk
if [ ! -x "$venv/bin/pytest" ] || ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q openai pytest
fi
if [ -z "${PDX_BIN:-}" ]; then
  cargo build -q --bin pdx
  export PDX_BIN="$PWD/target/debug/pdx"
fi
exec "$venv/bin/pytest" -q tests/python "$@"
