#!/usr/bin/env bash
# One device call: GPU tests, per-op benchmark, end-to-end benchmark. Logs under $OUT.
# Usage: bash benchmarks/gpu_check.sh "<ops>" "<train args>"
# PYTEST_TARGETS narrows the GPU tests (default: tests). Stage limits in seconds (PYTEST_S, OPS_S, TRAIN_S; 0 skips the stage) keep the call inside 10 min.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())
try:
    import liger_kernel; print("liger ok")
except Exception as e: print("liger missing", e)
PY
# the entry point needs the package metadata: install it without dependencies
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
if [ "${PYTEST_S:-240}" != 0 ]; then echo "== pytest (gpu) =="; timeout ${PYTEST_S:-240} python3 -m pytest -q -p no:warnings -rf --tb=short -m gpu ${PYTEST_TARGETS:-tests} --junitxml "$OUT/junit.xml" 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -15; fi
if [ -n "$1" ]; then echo "== ops =="; timeout ${OPS_S:-300} python3 -m benchmarks.ops --ops $1 --json "$OUT/ops.json" 2>&1 | tee "$OUT/ops.txt" | grep -v Warning; fi
if [ -n "$2" ]; then echo "== train =="; timeout ${TRAIN_S:-420} python3 -m chronicals_fx.bench $2 --json "$OUT/train.json" 2>&1 | tee "$OUT/train.txt" | grep -v Warning; fi
