#!/usr/bin/env bash
# The main job: runs the iMHSA op and module on whatever device is present and prints what it did.
# Usage: bash tools/demo.sh [demo arguments...]    (python -m crosshead.demo --help)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
flavor=cpu
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then flavor=cuda; fi
py=$(bash "$root/tools/venv.sh" "$flavor" | tail -n 1)
cd "$root"
exec "$py" -m crosshead.demo "$@"
