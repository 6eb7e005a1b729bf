#!/usr/bin/env bash
# One go on a GPU machine: build the CUDA extension, run the CUDA tests and the issue-3 benchmark,
# and keep everything they print, with the device name, under bench/results/.
#
#   bash bench/run_gpu.sh            # pip install --no-build-isolation -e . (the packaged build)
#   BUILD=jit bash bench/run_gpu.sh  # JIT-build csrc/ instead (CROSSHEAD_JIT=1)
#   PYTHON=/path/to/python, TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), BENCH_ARGS="--n 3136" also apply.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
BUILD=${BUILD:-pip}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
mkdir -p bench/results
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
slug=$(echo "${device:-unknown}" | tr -cs 'A-Za-z0-9' '_' | sed 's/_*$//' | tr 'A-Z' 'a-z')
log="bench/results/gpu_run_${slug}.log"
status=0
{
  echo "== $(date -u +%FT%TZ) crosshead GPU run on: ${device:-no nvidia-smi}"
  echo "== git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  nvidia-smi || true
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'device', torch.cuda.get_device_name())"
  if [ "$BUILD" = "jit" ]; then
    echo "== build: CROSSHEAD_JIT=1 (JIT of csrc/)"
    export CROSSHEAD_JIT=1 CROSSHEAD_JIT_VERBOSE=1
    "$PYTHON" -c "import crosshead._library as l, crosshead; print('library mode', l.mode, l.detail)" || status=1
  else
    echo "== build: pip install --no-build-isolation -e ."
    "$PYTHON" -m pip install --no-build-isolation -v -e . || status=1
    "$PYTHON" -c "import crosshead._library as l, crosshead; print('library mode', l.mode, l.detail)" || status=1
  fi
  echo "== tests: tests/test_ops_cuda.py"
  "$PYTHON" -m pytest tests/test_ops_cuda.py -v -rs || status=1
  echo "== benchmark: bench/cuda_targets.py ${BENCH_ARGS:-}"
  "$PYTHON" bench/cuda_targets.py --out bench/results ${BENCH_ARGS:-} || status=1
  echo "== exit status $status"
  exit $status
} 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo "log written to $log"
exit "$status"
