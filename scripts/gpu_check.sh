#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: install dqdeploy with TensorRT and onnxruntime-gpu,
# run the GPU tests, then the TensorRT latency/accuracy benchmark (bench/results/trt_latency.json).
#
#   bash scripts/gpu_check.sh            # from the repository root, in a fresh virtual environment
#   SKIP_INSTALL=1 bash scripts/gpu_check.sh
#   BENCH_ARGS="--batch 16 --iters 200" bash scripts/gpu_check.sh
#
# Needs: Python 3.10+, an NVIDIA driver, network access to PyPI (TensorRT wheels come from PyPI/NVIDIA),
# and a CUDA build of torch (install it first if the default wheel for your platform is CPU-only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python}"
export HF_HUB_OFFLINE=1

if [[ -z "${SKIP_INSTALL:-}" ]]; then
  # The 'dev' extra pins the CPU 'onnxruntime'; it and 'onnxruntime-gpu' both own the onnxruntime
  # package and must not share an environment, so take pytest alone and keep only onnxruntime-gpu.
  "$PY" -m pip install -e '.[trt,gpu]' pytest
  if "$PY" -m pip show onnxruntime >/dev/null 2>&1; then
    "$PY" -m pip uninstall -y onnxruntime
    "$PY" -m pip install --force-reinstall --no-deps 'onnxruntime-gpu>=1.18'
  fi
fi

"$PY" - <<'PYCHECK'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device visible to torch {torch.__version__} (a CPU build?): install a CUDA build of torch")
import tensorrt
import onnxruntime
print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
      f"TensorRT {tensorrt.__version__} | onnxruntime {onnxruntime.__version__} {onnxruntime.get_available_providers()}")
PYCHECK

"$PY" -m pytest tests/gpu -v -rs
"$PY" bench/trt_latency.py ${BENCH_ARGS:-}
echo "GPU check done: bench/results/trt_latency.json"
