#!/usr/bin/env bash
# The test suite on this machine, in a fresh or refreshed virtual environment.
# Usage: bash tools/test.sh [cpu|cuda] [pytest arguments...]
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
exec "$py" -m pytest tests -q -rs "$@"
