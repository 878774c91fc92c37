#!/usr/bin/env bash
# Creates the virtual environment with the pinned stack (requirements.txt). Idempotent: a second
# run only checks. mmcv 2.1.0 has no wheel for torch 2.14, so it is built once from its sdist
# (torch 2.14 headers need C++20, the sdist hard-codes C++14/17; its setup.py needs
# pkg_resources, gone from setuptools 81) and the wheel is cached outside the repository, keyed
# by the mmcv, torch and Python versions.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
REQ=requirements.txt
pin() { grep -E "^$1==" "$REQ" | head -n 1; }

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q "$(pin torch)" "$(pin torchvision)" "$(pin mmengine)" 'setuptools<81' wheel ninja

MMCV=$(pin mmcv)
if ! $VENV/bin/python -c "import mmcv, sys; sys.exit(mmcv.__version__ != '${MMCV#*==}')" 2>/dev/null; then
  key=$($VENV/bin/python -c "import sys, torch; print(f'torch{torch.__version__.split(\"+\")[0]}-cp{sys.version_info[0]}{sys.version_info[1]}')")
  cache=${ACTNN_MM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/actnn_mm}/wheels/$key
  wheel=$(ls "$cache"/mmcv-"${MMCV#*==}"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    echo "Building $MMCV from source for $key (about 10 minutes on 2 cores); cached in $cache"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    $PIP download -q --no-deps --no-binary :all: "$MMCV" -d "$work"
    tar -xzf "$work"/mmcv-*.tar.gz -C "$work"
    src=$(ls -d "$work"/mmcv-*/)
    sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$src/setup.py"
    mkdir -p "$cache"
    MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
      $PIP wheel -q --no-deps --no-build-isolation -w "$cache" "$src"
    wheel=$(ls "$cache"/mmcv-"${MMCV#*==}"-*.whl | head -n 1)
  fi
  $PIP install -q "$wheel"
fi

$PIP install -q -r "$REQ"
