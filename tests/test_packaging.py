"""How the ops get registered: compiled library, JIT build, or Python; schemas in one place."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crosshead  # noqa: F401  (registers the ops)
from crosshead import _library

ROOT = Path(__file__).resolve().parent.parent


def cpp_schemas():
    text = (ROOT / "csrc" / "crosshead.cpp").read_text()
    return re.findall(r'm\.def\("([^"]+)"\)', text)


def test_python_schema_mirror_matches_the_cpp_declaration():
    assert cpp_schemas() == list(_library.SCHEMAS.values())
    assert all(s.startswith(name + "(") for name, s in _library.SCHEMAS.items())


def test_registered_schemas_are_the_declared_ones():
    for name, schema in _library.SCHEMAS.items():
        assert str(getattr(torch.ops.crosshead, name).default._schema) == f"crosshead::{schema}"


def test_every_op_has_cpu_and_cuda_kernels_and_the_cpu_one_is_the_reference():
    for name in _library.SCHEMAS:
        assert _library.has_kernel(name, "CPU") and _library.has_kernel(name, "CUDA"), name
        assert (name, "CPU") in _library.python_kernels


def test_expected_library_was_loaded():
    """CI says what it built (CROSSHEAD_EXPECT_LIBRARY, CROSSHEAD_EXPECT_FUSED_CUDA): a build that
    silently fell back to the pure-torch path must fail here, not pass."""
    expected = os.environ.get("CROSSHEAD_EXPECT_LIBRARY")
    if expected is None:
        pytest.skip("CROSSHEAD_EXPECT_LIBRARY not set: nothing to compare the loaded library with")
    assert _library.mode == expected, _library.detail
    if os.environ.get("CROSSHEAD_EXPECT_FUSED_CUDA") == "1":
        assert all(_library.has_fused_cuda(op) for op in _library.SCHEMAS)


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env}, cwd=ROOT)


def test_import_without_the_compiled_library():
    code = ("import sys; sys.modules['crosshead._C'] = None\n"
            "import torch, crosshead, crosshead._library as l\n"
            "assert l.mode == 'python', l.mode\n"
            "q = torch.randn(1, 2, 16, 4, requires_grad=True)\n"
            "ql = crosshead.landmarks(q, (4, 4), (2, 2))\n"
            "crosshead.imhsa(q, q, q, ql, ql).sum().backward()\n"
            "assert q.grad.isfinite().all()\n"
            "from crosshead.info import report; print(report())\n")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert "operator library: python" in proc.stdout


def test_info_command():
    proc = subprocess.run([sys.executable, "-m", "crosshead.info"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"torch {torch.__version__}" in out and "operator library:" in out
    for dev, dtype in (("cpu", "float32"), ("cpu", "bfloat16"), ("cuda", "float16"), ("cuda", "float64")):
        assert re.search(rf"^\s+{dev}\s+{dtype}\s+\S", out, re.M), (dev, dtype)
    if not torch.cuda.is_available():
        assert re.search(r"cuda\s+float32\s+unavailable: ", out)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_jit_load_from_sources(tmp_path):
    code = ("import torch, crosshead, crosshead._library as l\n"
            "assert l.mode == 'jit', (l.mode, l.detail)\n"
            "q = torch.randn(1, 2, 9, 4)\n"
            "ql = crosshead.landmarks(q, (3, 3), (2, 2))\n"
            "print(crosshead.imhsa(q, q, q, ql, ql).shape)\n")
    proc = _run(code, CROSSHEAD_JIT="1", CROSSHEAD_JIT_CUDA="0", CROSSHEAD_JIT_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.Size([1, 2, 9, 4])" in proc.stdout


def test_without_the_emulator_variable_the_cpu_runs_the_pure_torch_path():
    """CROSSHEAD_CUDA_EMULATOR unset (or 0): nothing of the CPU harness is loaded."""
    code = ("import torch, crosshead, crosshead._library as l\n"
            "assert not l.emulated\n"
            "line = [s for s in torch._C._dispatch_dump('crosshead::imhsa').splitlines() if s.startswith('CPU:')][0]\n"
            "assert '_library.py' in line, line\n"
            "from crosshead.info import report; print(report())\n")
    for value in ("", "0"):
        proc = _run(code, CROSSHEAD_CUDA_EMULATOR=value)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "SIMT emulator" not in proc.stdout and "pure-torch (crosshead.reference)" in proc.stdout
