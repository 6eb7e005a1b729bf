#!/usr/bin/env bash
# One go on a GPU machine (about 15-20 minutes on an H100/H200): build the CUDA extension for sm_90,
# run the CUDA tests (stopping at the first failure), compute-sanitizer memcheck and racecheck on small
# shapes, the targets benchmark (bench/cuda_targets.py) and ncu on the slowest forward kernel, and keep
# everything they print, with the device name, under bench/results/.
#
#   bash bench/run_gpu.sh            # pip install --no-build-isolation -e . (the packaged build)
#   BUILD=jit bash bench/run_gpu.sh  # JIT-build csrc/ instead (CROSSHEAD_JIT=1)
#   PYTHON=/path/to/python, TORCH_CUDA_ARCH_LIST (default "9.0"), BENCH_ARGS="--n 3136" also apply.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
BUILD=${BUILD:-pip}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"9.0"}
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
  echo "== tests: tests/test_ops_cuda.py tests/test_ops_cuda_mma.py (-x)"
  "$PYTHON" -m pytest tests/test_ops_cuda.py tests/test_ops_cuda_mma.py -x -q -rs || status=1
  if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer --tool $tool bench/sanitize_case.py"
      compute-sanitizer --tool "$tool" --error-exitcode 1 "$PYTHON" bench/sanitize_case.py || status=1
    done
  else
    echo "== compute-sanitizer: not found, skipped"
  fi
  echo "== benchmark: bench/cuda_targets.py ${BENCH_ARGS:-}"
  "$PYTHON" bench/cuda_targets.py --out bench/results ${BENCH_ARGS:-} || status=1
  if command -v ncu >/dev/null; then
    echo "== ncu: the forward's kernels at N = 3136 (one launch each)"
    ncu --set full -k "regex:key_z|key_stats|query_forward" -c 3 -o "bench/results/ncu_forward_${slug}" -f \
      "$PYTHON" -c "
import torch, crosshead
B, h, N, d = 32, 8, 3136, 64
q, k, v = (torch.randn(B, h, N, d, device='cuda', dtype=torch.bfloat16) for _ in range(3))
ql, kl = (crosshead.landmarks(t, grid=(56, 56), size=(7, 7)) for t in (q, k))
w = torch.eye(h, device='cuda')
torch.ops.crosshead.imhsa(q, k, v, ql, kl, w, w, 'post', d ** -0.5)
torch.cuda.synchronize()" || status=1
    ncu --import "bench/results/ncu_forward_${slug}.ncu-rep" --page details > "bench/results/ncu_forward_${slug}.txt" || true
  else
    echo "== ncu: not found, skipped"
  fi
  echo "== exit status $status"
  exit $status
} 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo "log written to $log"
exit "$status"
