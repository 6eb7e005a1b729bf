#!/usr/bin/env bash
# Creates (or refreshes) .venv-<flavor> in the repository root with torch and crosshead installed
# in development mode, the compiled library built against that torch. Both flavors build in place,
# each its own library (crosshead/_C_<torch tag>.*.so, README "Install"), so neither breaks the other.
#   cpu:  torch 2.13.0, the CPU build (no CUDA kernels are compiled)
#   cuda: torch 2.14.1 + torchvision 0.29.1, the CUDA 13.0 builds, and timm and transformers (CUDA
#         kernels compiled for TORCH_CUDA_ARCH_LIST, default "8.0;9.0", whenever nvcc is found; they
#         run only on a GPU)
# Usage: bash tools/venv.sh [cpu|cuda]      prints the venv's python as its last line
set -euo pipefail
flavor=${1:-cpu}
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-$flavor"
case "$flavor" in
  cpu) torch_pkgs=(torch==2.13.0); extras="test,train,baselines,bench" ;;
  cuda) torch_pkgs=(torch==2.14.1 torchvision==0.29.1); extras="test,train,baselines,bench,timm,hf" ;;
  *) echo "unknown flavor '$flavor' (cpu or cuda)" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "${torch_pkgs[@]}" 2> >(grep -v "^WARNING: Location" >&2)
"${pip[@]}" setuptools wheel ninja 2> >(grep -v "^WARNING: Location" >&2)
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
"${pip[@]}" --no-build-isolation -e "$root[$extras]" 2> >(grep -v "^WARNING: Location" >&2)
echo "$venv/bin/python"
