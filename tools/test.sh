#!/usr/bin/env bash
# The test suite on this machine, in a fresh or refreshed virtual environment.
# Usage: bash tools/test.sh [cpu|cuda] [pytest arguments...]
# The cpu flavor then runs the CPU harness: the CUDA kernel sources on the SIMT emulator
# (CROSSHEAD_CUDA_EMULATOR=1, csrc/emu): its own tests, the fused-kernel tests and the deliberately
# broken kernels that must fail them. CROSSHEAD_SKIP_EMULATOR=1 leaves that part out.
set -euo pipefail
flavor=${1:-cpu}
shift || true
root=$(cd "$(dirname "$0")/.." && pwd)
py=$(bash "$root/tools/venv.sh" "$flavor" | tail -n 1)
# Say what the build must have produced, so a build that fell back to pure torch fails the tests.
export CROSSHEAD_EXPECT_LIBRARY=compiled
if [ "$flavor" = cuda ] && command -v nvcc >/dev/null && compgen -G "$root/csrc/cuda/*.cu" >/dev/null; then
  export CROSSHEAD_EXPECT_FUSED_CUDA=1
fi
cd "$root"
"$py" -m crosshead.info
"$py" -m pytest tests -q -rs "$@"
if [ "$flavor" = cpu ] && [ "${CROSSHEAD_SKIP_EMULATOR:-0}" != 1 ]; then
  echo "=== CPU harness: the CUDA kernels on the SIMT emulator (CROSSHEAD_CUDA_EMULATOR=1) ==="
  export CROSSHEAD_CUDA_EMULATOR=1
  "$py" -m crosshead.info
  "$py" -m pytest tests/test_emulator.py tests/test_op_checks.py tests/test_ops_cuda.py tests/test_ops_cuda_mma.py tests/test_emulator_mutations.py -q -rs "$@"
fi
