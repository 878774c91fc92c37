#!/usr/bin/env bash
# Builds the extension with the CUDA kernels into a temporary folder and loads it: a missing
# nvcc, a CUDA compile or a link error fails. Needs nvcc, not a GPU. Compiles for
# TORCH_CUDA_ARCH_LIST, by default 8.0;9.0 (A100, H100).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(realpath "${VENV:-.venv}")/bin/python
# shellcheck source=tools/cuda_home.sh
. tools/cuda_home.sh
if [ -z "${CUDA_HOME:-}" ]; then
  echo "error: make cuda-build compiles the CUDA kernels and needs the CUDA toolkit: nvcc is not" \
       "on PATH and CUDA_HOME is not set" >&2
  exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "Building the CUDA extension with CUDA_HOME=$CUDA_HOME into $out"
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" setup.py -q build_ext --build-lib "$out/lib" --build-temp "$out/tmp"
so=$(ls "$out"/lib/actnn_mm/_C*.so)
# Load it alone (not beside the installed CPU build, whose op registrations would clash).
(cd "$out" && "$PY" - "$so" <<'PY'
import importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location('_C', sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert module.with_cuda == 1, 'built without the CUDA kernels'
x = torch.randn(2, 100)
bits, offsets = torch.full((2,), 2, dtype=torch.uint8), torch.tensor([0, 25, 50])
data, meta, sample_meta = torch.ops.actnn_mm.quantize(x, bits, offsets, 64, 0, True, 50)
y = torch.ops.actnn_mm.dequantize(data, meta, sample_meta, bits, offsets, 2, 100, 64,
                                  torch.float32)
assert y.shape == x.shape
print('CUDA extension built, linked and loaded:', sys.argv[1].rsplit('/', 1)[-1])
PY
)
