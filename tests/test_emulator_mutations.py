"""The CPU harness can fail: deliberately broken copies of the kernel sources (a patch applied to a
temporary copy of csrc/) make the emulated kernel tests fail, each with the report it should give.

Each case builds the emulator library from the patched copy (only the changed sources recompile;
objects are cached by content) and runs a few tests of tests/test_ops_cuda.py against it in a fresh
process (CROSSHEAD_CUDA_EMULATOR=1, CROSSHEAD_EMULATOR_CSRC=<copy>). The unpatched sources pass
the same tests in the emulated run of tools/test.sh."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crosshead import _library

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not _library.emulated, reason="the SIMT emulator is off: run with "
                                "CROSSHEAD_CUDA_EMULATOR=1 (tools/test.sh does)")

# name: (file under csrc/, original text, broken text, tests to run (-k), what the failure must say)
MUTATIONS = {
    # the barrier between staging k into shared memory and the score product that reads it
    "missing_syncthreads": (
        "cuda/key_side.cu",
        "    stage_tokens(Xs, k + h * p.x.sh, p.x.sn, nv, p.d);\n    __syncthreads();\n",
        "    stage_tokens(Xs, k + h * p.x.sh, p.x.sn, nv, p.d);\n",
        "test_matches_float64_reference and float32 and post and no_w",
        r"race on dynamic shared memory|read of uninitialised dynamic shared memory"),
    # tf32 A fragment read with the roles of its register index swapped: a[1] and a[2] hold
    # A[g][t+4] and A[g+8][t] instead of A[g+8][t] and A[g][t+4] (row and column exchanged)
    "mma_fragment_row_col_swapped": (
        "cuda/common.cuh",
        "      const uint32_t a[4] = {v0 ? __float_as_uint(x0[k]) : 0u, v1 ? __float_as_uint(x1[k]) : 0u,\n"
        "                             v0 ? __float_as_uint(x0[k + 4]) : 0u, v1 ? __float_as_uint(x1[k + 4]) : 0u};\n",
        "      const uint32_t a[4] = {v0 ? __float_as_uint(x0[k]) : 0u, v0 ? __float_as_uint(x0[k + 4]) : 0u,\n"
        "                             v1 ? __float_as_uint(x1[k]) : 0u, v1 ? __float_as_uint(x1[k + 4]) : 0u};\n",
        "test_tensor_core_switch_matches_float64_reference and tensor_cores and bfloat16 and post and no_w",
        r"max abs error .* > "),
    # the last, partial tile of the query-side forward takes one token too many
    "partial_tile_off_by_one": (
        "cuda/query_side.cu",
        "const int b = blockIdx.y, n0 = blockIdx.x * p.tn, nv = min(p.tn, p.N - n0);",
        "const int b = blockIdx.y, n0 = blockIdx.x * p.tn, nv = min(p.tn, p.N - n0 + 1);",
        "test_several_tiles_per_split and float32 and post and B2h4N201",
        r"out-of-bounds (read|write)|race on global memory"),
    # the key statistics read their running sums one buffer too far: past the end of dynamic shared
    # memory (rs, H·L floats, is the last buffer)
    "shared_memory_out_of_bounds_read": (
        "cuda/key_side.cu",
        "      rs[e] = m == -INFINITY ? 0.f : rs[e] * __expf(rm[e] - m) + st * __expf(mt - m);",
        "      rs[e] = m == -INFINITY ? 0.f : rs[e + H * L] * __expf(rm[e] - m) + st * __expf(mt - m);",
        "test_matches_float64_reference and float32 and post and no_w",
        r"out-of-bounds read of 4 bytes at dynamic shared memory"),
    # second generation: the A fragment of Â_Q·Z with a[1] and a[2] exchanged (row g+8 and column
    # 2t+8 swapped), the mistake the PTX fragment table invites
    "mma_a_fragment_row_col_swapped": (
        "cuda/query_forward_mma.cu",
        "{mma::pack2<T>(v00.x, v00.y), mma::pack2<T>(v10.x, v10.y), mma::pack2<T>(v01.x, v01.y),",
        "{mma::pack2<T>(v00.x, v00.y), mma::pack2<T>(v01.x, v01.y), mma::pack2<T>(v10.x, v10.y),",
        "test_query_forward_within_its_error_bound and bfloat16 and post and no_w",
        r"out: max abs error .* > bound"),
    # second generation: the last landmark row of Z is zero-filled as if it were padding
    "mma_partial_landmark_tile_off_by_one": (
        "cuda/query_forward_mma.cu",
        "zb + g * L * D, D, lay.lp16, L, nthreads);",
        "zb + g * L * D, D, lay.lp16, L - 1, nthreads);",
        "test_query_forward_within_its_error_bound and float16 and pre and w",
        r"out: max abs error .* > bound"),
    # second generation: the last head's Z is read before its cp.async group is waited for
    "mma_cp_async_not_waited": (
        "cuda/query_forward_mma.cu",
        "      stage_z(g + 1, (g + 1) & 1);\n      ptx::cp_async_wait<1>();\n    } else {\n"
        "      ptx::cp_async_wait<0>();\n    }\n",
        "      stage_z(g + 1, (g + 1) & 1);\n      ptx::cp_async_wait<1>();\n    }\n",
        "test_query_forward_within_its_error_bound and bfloat16 and post and w",
        r"cp.async into it is still in flight"),
}
# the test file each mutation runs (default tests/test_ops_cuda.py)
MUTATION_TESTS = {name: "test_ops_cuda_mma.py" for name in MUTATIONS if "cuda/query_forward_mma.cu" == MUTATIONS[name][0]}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_broken_kernel_fails_the_emulated_tests(name, tmp_path):
    rel, original, broken, selection, expected = MUTATIONS[name]
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    path = csrc / rel
    text = path.read_text()
    assert text.count(original) == 1, f"{name}: the patch no longer applies to csrc/{rel}; update it"
    path.write_text(text.replace(original, broken))
    env = dict(os.environ, CROSSHEAD_CUDA_EMULATOR="1", CROSSHEAD_EMULATOR_CSRC=str(csrc))
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / MUTATION_TESTS.get(name, "test_ops_cuda.py")), "-q", "-x",
                           "-p", "no:cacheprovider", "-k", selection], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, f"{name}: the emulated tests did not fail (exit {proc.returncode}):\n{output[-3000:]}"
    assert " failed" in output and "no tests ran" not in output, output[-3000:]
    assert re.search(expected, output), f"{name}: the failure does not say /{expected}/:\n{output[-3000:]}"
