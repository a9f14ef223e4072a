#!/usr/bin/env bash
# One command from a fresh clone: install jgpt with its test extras (and the CPU torch wheel if
# no torch is present), then run the whole suite: unit tests (tests/) and parity (parity/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    # Unpinned torch resolves to a multi-GB CUDA build; 2.13.0 is the CPU wheel CI uses.
    "$PY" -m pip install -q "torch==${JGPT_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q -e ".[test]"
exec "$PY" -m pytest -q "$@"
