#!/usr/bin/env bash
# Every GPU check of protoad-edge in one run, well inside 10 minutes on one GPU:
#   1. the tests marked gpu or tensorrt (they skip, and say so, where CUDA or TensorRT is missing);
#   2. benchmarks/gpu_check.py: the cuda-python memory layer, the PyTorch CUDA path, TensorRT builds,
#      FINCH of 627,200 x 1792 vectors on the GPU (the issue asks for about a minute),
#      with the figures they measure and a summary of what ran, what was skipped here and why.
# Python: $PYTHON, else ./.venv/bin/python, else python3 (a GPU image's own, with torch and CUDA);
# the package is used from this checkout through PYTHONPATH, so nothing needs installing (or a network).
# With $OUT set (the device tool's output folder) the whole log is also written to $OUT/gpu_check.log.
set -u -o pipefail
cd "$(dirname "$0")/.."
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu_check.log") 2>&1
fi
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

echo "== protoad-edge GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), python: $PY"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
"$PY" - <<'EOF'
import importlib
for name in ("torch", "cuda.bindings", "tensorrt", "onnx", "onnxruntime", "cupy"):
    try:
        module = importlib.import_module(name)
        print(f"  {name:14} {getattr(module, '__version__', 'installed')}")
    except ImportError:
        print(f"  {name:14} not installed")
EOF

echo "== pytest -m 'gpu or tensorrt'"
timeout 240 "$PY" -m pytest -q -rs -m "gpu or tensorrt" --continue-on-collection-errors -p no:cacheprovider tests
PYTEST_RC=$?

echo "== checks and figures"
timeout 330 "$PY" benchmarks/gpu_check.py
CHECK_RC=$?

echo "== done: pytest exit $PYTEST_RC, gpu_check.py exit $CHECK_RC (5 = pytest selected nothing)"
[ "$PYTEST_RC" -eq 0 ] || [ "$PYTEST_RC" -eq 5 ] || exit 1
exit "$CHECK_RC"
