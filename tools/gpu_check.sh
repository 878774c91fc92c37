#!/usr/bin/env bash
# Validates and measures actnn_mm on a bare GPU machine (torch, nvcc, ninja and pytest; no network,
# no OpenMMLab package) in at most 8 minutes:
#
#   tools/gpu_check.sh OUT_DIR [--cpu-dry-run]
#
# Stages, each under its own time limit in seconds (480 in all):
#   info       nvidia-smi, torch, nvcc (20)
#   build      the extension with its CUDA kernels for the local GPU's arch, in the tree (BUILD_S,
#              default 140)
#   load       actnn_mm._C imports and has the CUDA kernels (20)
#   tests      the CUDA cases of the codec, layer, allocation, conversion and hot-path tests
#              (TESTS_S, default 150)
#   benchmark  tools/benchmark.py gpu --out OUT_DIR (BENCH_S, default 150)
# Each stage's output is in OUT_DIR/<stage>.log, the tests' JUnit XML in OUT_DIR/tests.xml, the
# benchmark's results in OUT_DIR, the verdict of each stage in OUT_DIR/summary.txt. Every stage
# runs even if an earlier one failed, except after a failed build. The exit status is 0 when all
# passed. PYTHON (default python3) is the interpreter, MAX_JOBS (default: the cores) the compile
# jobs.
# --cpu-dry-run checks this script on a machine without a GPU: CPU build (in the tree too), the
# CUDA tests skip, the benchmark runs a small case on the CPU.
# shellcheck disable=SC2317  # the stages' functions run through bash -c
set -euo pipefail
usage="usage: $0 OUT_DIR [--cpu-dry-run]"
OUT=${1:?$usage}
case ${2:-} in
  '') DRY_RUN=0 ;;
  --cpu-dry-run) DRY_RUN=1 ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export OUT DRY_RUN PY=${PYTHON:-python3} MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # actnn_mm as built in the tree, for tools/ too
# shellcheck source=tools/cuda_home.sh
. tools/cuda_home.sh
: > "$OUT/summary.txt"
failed=0

info() {
  nvidia-smi || echo "nvidia-smi failed"
  "$PY" -c "
import sys, torch
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda)
for i in range(torch.cuda.device_count()):
    print(f'cuda:{i}', torch.cuda.get_device_name(i),
          'sm_%d%d' % torch.cuda.get_device_capability(i))
"
  echo "CUDA_HOME=${CUDA_HOME:-} MAX_JOBS=$MAX_JOBS $(nproc) cores"
  nvcc --version | tail -n 2 || echo "nvcc not found"
}

build() {
  if [ "$DRY_RUN" = 1 ]; then
    "$PY" setup.py build_ext --inplace
    return
  fi
  if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "error: torch sees no CUDA GPU (--cpu-dry-run checks this script without one)"
    return 1
  fi
  # setup.py compiles for the visible GPU's arch unless TORCH_CUDA_ARCH_LIST says otherwise.
  FORCE_CUDA=1 "$PY" setup.py build_ext --inplace
}

load() {
  "$PY" -c "
import os, sys
from actnn_mm import _C
print(_C.__file__, 'with_cuda =', _C.with_cuda)
sys.exit(_C.with_cuda != (os.environ['DRY_RUN'] == '0'))
"
}

tests() {
  local files=(tests/test_compress tests/test_layers tests/test_allocate tests/test_generic.py
               tests/test_convert.py tests/test_resnet18.py)
  [ ! -f tests/test_hot_path.py ] || files+=(tests/test_hot_path.py)
  # The CPU cases pass on torch 2.11 and 2.14 where CI runs them; here only the CUDA ones (and the
  # GPU steps under sync debug mode) fit the time.
  local select=(-k 'cuda or gpu')
  [ "$DRY_RUN" = 0 ] || select=()
  "$PY" -m pytest -q -rfEs -p no:cacheprovider --junitxml "$OUT/tests.xml" "${select[@]}" \
    "${files[@]}"
}

benchmark() {
  local dry_run=()
  [ "$DRY_RUN" = 0 ] || dry_run=(--device cpu --models resnet50 --methods FP32 L3 --batch 2
                                 --image-size 32 --max-batch 4 --warmup 1 --steps 2)
  # The study stops itself within --time-limit, leaving time to save what it measured.
  # A 20 GB budget keeps the max-batch searches short enough for ViT-B/16's turn to come.
  "$PY" tools/benchmark.py gpu --out "$OUT" --time-limit $((BENCH_S - 30)) --budget-gb 20 \
    "${dry_run[@]}"
}

# stage NAME LIMIT: runs the function NAME for at most LIMIT seconds and records its verdict.
stage() {
  local name=$1 limit=$2 start=$SECONDS rc=0 verdict=PASS
  echo "== $name (at most ${limit}s)"
  timeout -k 10 "$limit" bash -c "$name" > "$OUT/$name.log" 2>&1 || rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    verdict="FAIL: timed out"
  elif [ "$rc" != 0 ]; then
    verdict="FAIL: exit status $rc"
  fi
  [ "$name" != tests ] || verdict="$verdict ($(tail -n 1 "$OUT/tests.log"))"
  printf '%-10s %s in %ds\n' "$name" "$verdict" $((SECONDS - start)) | tee -a "$OUT/summary.txt"
  if [ "$rc" != 0 ]; then
    tail -n 30 "$OUT/$name.log"
    failed=1
  fi
  return "$rc"
}

export BENCH_S=${BENCH_S:-150}
export -f info build load tests benchmark
stage info 20 || true
cat "$OUT/info.log"
if stage build "${BUILD_S:-140}"; then
  stage load 20 || true
  stage tests "${TESTS_S:-150}" || true
  stage benchmark "$BENCH_S" || true
else
  printf '%-10s NOT RUN: the build failed\n' load tests benchmark | tee -a "$OUT/summary.txt"
fi
verdict=$([ "$failed" = 0 ] && echo PASS || echo FAIL)
echo "all        $verdict in ${SECONDS}s" | tee -a "$OUT/summary.txt"
exit "$failed"
