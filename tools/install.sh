#!/usr/bin/env bash
# Creates the virtual environment with the pinned stack (requirements.txt). Idempotent: a second
# run only checks. mmcv 2.1.0 has no wheel for torch 2.14, so it is built once from its sdist
# (torch 2.14 headers need C++20, the sdist hard-codes C++14/17; its setup.py needs
# pkg_resources, gone from setuptools 81), with its CUDA ops when a GPU is visible or
# FORCE_CUDA=1 (for TORCH_CUDA_ARCH_LIST, else the visible GPUs' archs; needs nvcc), else its CPU
# ops only. The wheel is cached outside the repository, keyed by the torch and Python versions
# and by the CUDA version and archs, or cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
REQ=requirements.txt
pin() { grep -E "^$1==" "$REQ" | head -n 1; }

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY=$VENV/bin/python
"$PY" -m pip install -q "$(pin torch)" "$(pin torchvision)" "$(pin mmengine)" 'setuptools<81' \
  wheel ninja

MMCV=$(pin mmcv)
if ! "$PY" -c "import mmcv, sys; sys.exit(mmcv.__version__ != '${MMCV#*==}')" 2>/dev/null; then
  # The cache key, and the archs for the CUDA ops (none for a CPU build).
  target=$("$PY" - <<'PY'
import os, sys, torch
key = f'torch{torch.__version__.split("+")[0]}-cp{sys.version_info[0]}{sys.version_info[1]}'
if not (torch.cuda.is_available() or os.getenv('FORCE_CUDA') == '1'):
    print(f'{key}-cpu')
    sys.exit()
if not torch.version.cuda:
    sys.exit(f'FORCE_CUDA=1 but torch {torch.__version__} is a build without CUDA')
archs = os.getenv('TORCH_CUDA_ARCH_LIST') or ';'.join('%d.%d' % capability for capability in
    sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))
if not archs:
    sys.exit('FORCE_CUDA=1 without a visible GPU: set TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0"')
sm = '_'.join(arch.replace('.', '').replace('+PTX', 'ptx')
              for arch in archs.replace(';', ' ').split())
print(f'{key}-cu{torch.version.cuda.replace(".", "")}-sm{sm}', archs)
PY
)
  read -r key archs <<<"$target"
  cache=${ACTNN_MM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/actnn_mm}/wheels/$key
  wheel=$(find "$cache" -name "mmcv-${MMCV#*==}-*.whl" 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    if [ -n "$archs" ]; then
      # shellcheck source=tools/cuda_home.sh
      . tools/cuda_home.sh
      if [ -z "${CUDA_HOME:-}" ]; then
        echo "error: a GPU is visible (or FORCE_CUDA=1) but nvcc is not on PATH and CUDA_HOME is" \
             "not set: mmcv's CUDA ops need the CUDA toolkit of torch's CUDA version" >&2
        exit 1
      fi
      ops=(FORCE_CUDA=1 "TORCH_CUDA_ARCH_LIST=$archs" "CUDA_HOME=$CUDA_HOME")
      echo "Building $MMCV from source with its CUDA ops for $key (far longer than the CPU" \
           "ops alone); cached in $cache"
    else
      ops=(FORCE_CUDA=0)
      echo "Building $MMCV from source for $key (about 10 minutes on 2 cores); cached in $cache"
    fi
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: "$MMCV" -d "$work"
    tar -xzf "$work"/mmcv-*.tar.gz -C "$work"
    src=$(ls -d "$work"/mmcv-*/)
    sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$src/setup.py"
    mkdir -p "$cache"
    env MMCV_WITH_OPS=1 "${ops[@]}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$cache" "$src"
    wheel=$(find "$cache" -name "mmcv-${MMCV#*==}-*.whl" | head -n 1)
  fi
  "$PY" -m pip install -q "$wheel"
fi

"$PY" -m pip install -q -r "$REQ"
