#!/usr/bin/env bash
# One go on a GPU machine (an H100/H200), in stages, each under its own time limit and all of them
# under one deadline, every stage's output kept in a log:
#
#   info      nvidia-smi (device, driver, clocks), torch, nvcc, compute-sanitizer, ncu
#   build     python setup.py build_ext --inplace for TORCH_CUDA_ARCH_LIST (default 9.0), ptxas -v kept
#   tests     the fused-kernel tests (tests/test_ops_cuda_mma.py, tests/test_ops_cuda.py, -x) and the
#             baselines' CUDA tests
#   debug     cuda-gdb's backtrace of a host-side crash in the test DEBUG_TEST
#   sanitize  compute-sanitizer memcheck, racecheck and synccheck on bench/sanitize_case.py
#   targets   bench/cuda_targets.py (TARGETS_ARGS, e.g. "--n 784 3136 --contenders fused,torch,sdpa")
#   ncu       Nsight Compute (--set full, --clock-control none) on the crosshead kernels of one
#             forward+backward at B=32, h=8, N=3136, d=64, L=49, bf16
#   sweep     python -m bench on the GPU with every peer (SWEEP_ARGS)
#   pytests   pytest PYTEST_ARGS (chosen files)
#   alltests  the whole test suite with the GPU present (pytest -n 8)
#   train     python -m crosshead.train --amp bf16 --compile (TRAIN_ARGS)
#   quality   python -m bench.quality --config gpu (resumable: runs in QUALITY_RUNS, default
#             /tmp/quality-runs, which a warm machine keeps between calls; results in LOGDIR/quality-gpu)
#
#   STAGES="info build tests" LOGDIR=/tmp/gpu_logs DEADLINE=570 bash bench/run_gpu.sh
#
# PYTHON (default python3), MAX_JOBS (16), DEADLINE (seconds from the start; a stage gets at most what
# is left of it, less a margin) also apply. Exits non-zero when a stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAGES=${STAGES:-"info build tests sanitize targets ncu"}
LOGDIR=${LOGDIR:-bench/results/gpu_logs}
DEADLINE=${DEADLINE:-3600}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # bench/*.py import crosshead from the checkout
mkdir -p "$LOGDIR"
failed=""

# stage NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, time left before DEADLINE - 15 s).
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS - 15))
  ((left < limit)) && limit=$left
  if ((limit < 5)); then
    echo "== [$name] not run: deadline reached"
    failed="$failed $name(deadline)"
    return
  fi
  echo "== [$name] $(date -u +%T) limit ${limit}s"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$LOGDIR/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$LOGDIR/$name.log"
  echo "== [$name] rc=$rc in $((SECONDS - t0))s"
  ((rc != 0)) && failed="$failed $name(rc=$rc)"
}

for s in $STAGES; do
  case $s in
    info)
      stage info 60 bash -c "type -a gcc g++ c++; g++ --version | head -1; /usr/bin/g++ --version | head -1; file \$(readlink -f \$(type -P g++)); nvidia-smi; nvidia-smi -q -d CLOCK | head -40; $PYTHON -c \"import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))\"; nvcc --version | tail -2; which compute-sanitizer ncu; git log --oneline -1" ;;
    build)
      # The library must share the process's C++ runtime: a compiler that links libstdc++ statically
      # (this workplace's /opt/gcc did) gives two runtimes in one process, and the first error
      # message with a number in it crashes (std::locale facets of the other copy). CXX/CC are the
      # system compiler when there is one (the image sets CXX=/opt/gcc/bin/g++; KEEP_CXX=1 keeps
      # CC/CXX as they are); the build fails if the result does not need libstdc++.so.
      if [ -z "${KEEP_CXX:-}" ] && [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
      stage build 300 bash -c "echo CC=\${CC:-unset} CXX=\${CXX:-unset}; rm -rf build/torch2_*cu*; CROSSHEAD_NVCC_FLAGS='-Xptxas -v' $PYTHON setup.py build_ext --inplace || exit 1; $PYTHON -m crosshead.info; readelf -d crosshead/_C_*cu*.so | grep NEEDED && readelf -d crosshead/_C_*cu*.so | grep -q 'libstdc++' || { echo 'the library does not link libstdc++.so dynamically'; exit 1; }" ;;
    tests)
      stage tests_mma 120 "$PYTHON" -m pytest tests/test_ops_cuda_mma.py -x -q -rs -p no:cacheprovider
      stage tests_ops 240 "$PYTHON" -m pytest tests/test_ops_cuda.py -q -rs -p no:cacheprovider ${TESTS_ARGS:--x}
      stage tests_baselines 120 "$PYTHON" -m pytest tests/test_baselines.py -q -rs -k cuda -p no:cacheprovider ;;
    debug)  # a host-side crash, under cuda-gdb: DEBUG_TEST names the test
      stage debug 120 cuda-gdb -batch -ex run -ex bt -ex "info threads" --args "$PYTHON" -m pytest -x -q -p no:cacheprovider "$DEBUG_TEST" ;;
    sanitize)
      for tool in memcheck racecheck synccheck; do
        stage "sanitize_$tool" 150 compute-sanitizer --tool "$tool" --error-exitcode 1 "$PYTHON" bench/sanitize_case.py
      done ;;
    targets)
      stage targets 400 "$PYTHON" bench/cuda_targets.py --out "$LOGDIR" ${TARGETS_ARGS:-} ;;
    ncu)
      stage ncu 200 ncu --set full --clock-control none -k "regex:key_|query_|reduce_" -c 12 \
        -o "$LOGDIR/ncu_fwdbwd" -f "$PYTHON" bench/profile_case.py
      stage ncu_report 60 ncu --import "$LOGDIR/ncu_fwdbwd.ncu-rep" --page details --print-units base ;;
    sweep)
      stage sweep 500 "$PYTHON" -m bench --device cuda --out "$LOGDIR" ${SWEEP_ARGS:-} ;;
    pytests)  # chosen test files: PYTEST_ARGS
      stage pytests 300 "$PYTHON" -m pytest -q -rfs -p no:cacheprovider $PYTEST_ARGS ;;
    alltests)
      stage alltests 400 "$PYTHON" -m pytest tests -q -n 8 --maxfail=20 -rfs -p no:cacheprovider ;;
    train)
      stage train 400 "$PYTHON" -m crosshead.train ${TRAIN_ARGS:---amp bf16 --compile} ;;
    quality)
      stage quality 560 "$PYTHON" -m bench.quality --config gpu --runs "${QUALITY_RUNS:-/tmp/quality-runs}" \
        --out "$LOGDIR/quality-gpu" ${QUALITY_ARGS:-} ;;
    *) echo "unknown stage $s"; failed="$failed $s(unknown)" ;;
  esac
done
echo "== failed stages:${failed:- none}"
[ -z "$failed" ]
