#!/usr/bin/env bash
# Install chronicals-fx and its test tools into the current Python environment.
# torch==2.13.0 first when no torch is present: a bare `torch` requirement would pull a
# multi-GB CUDA build; an existing torch (a user's own CUDA build) is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev]"
