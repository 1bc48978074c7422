#!/usr/bin/env bash
# The pdx_transfer pytest suite (crates/pdx-python/tests): makes a venv in target/venv-pdx-python (once),
# installs the package the way the README says (`pip install ./crates/pdx-python`, a release build of the abi3
# wheel through maturin) with pytest and numpy, and runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../../.."

venv=target/venv-pdx-python
if [ ! -x "$venv/bin/pytest" ] || ! "$venv/bin/python" -c 'import numpy' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q pytest numpy
fi
# Always reinstall: the package is built from the working tree.
"$venv/bin/pip" install -q --force-reinstall --no-deps ./crates/pdx-python
# -rs prints why each skipped test was skipped ("skipped: no CUDA device", ...).
exec "$venv/bin/pytest" -q -rs crates/pdx-python/tests "$@"
