"""How the ops get registered: compiled library, JIT build, or Python; schemas in one place; one
compiled library per torch build in the same checkout."""

import importlib.machinery
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import crosshead  # noqa: F401  (registers the ops)
from crosshead import _library, _toolchain

ROOT = Path(__file__).resolve().parent.parent
CXX = shutil.which("c++") or shutil.which("g++")
RUNNING = _library.running_torch()


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


def test_the_loaded_library_is_the_one_built_for_the_running_torch():
    """setup.py names and marks the library after the torch it builds against, the loader looks for
    the running torch's: the two must agree (same function, crosshead/_toolchain.py)."""
    if _library.mode != "compiled":
        pytest.skip(f"no compiled library loaded ({_library.mode}: {_library.detail})")
    path = Path(_library.library)
    assert path.name.split(".")[0] == _toolchain.library_name(*RUNNING) == _library.library_name()
    assert path.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert _toolchain.read_built_for(path) == _toolchain.describe_torch(*RUNNING)
    assert f"crosshead.{_library.library_name()}" in sys.modules


def test_torch_tags_tell_torch_builds_apart():
    assert _toolchain.torch_tag("2.13.0+cpu") == "torch2_13_0_cpu"
    assert _toolchain.torch_tag("2.14.1+cu130", "13.0") == "torch2_14_1_cu130"
    assert _toolchain.torch_tag("2.14.1", "13.0") == "torch2_14_1_cu130"  # the same build, from PyPI
    builds = [("2.13.0+cpu", None), ("2.13.0+cu130", "13.0"), ("2.14.1+cu130", "13.0"), ("2.14.1+cu128", "12.8"),
              ("2.14.1", None), ("2.1.41", None), ("2.14.0a0+gitabc123", "12.8"), ("2.14.0a0+gitdef456", "12.8"),
              ("2.14.1+rocm6.4", None, "6.4.1")]
    tags = {_toolchain.torch_tag(*b) for b in builds}
    assert len(tags) == len(builds), sorted(tags)
    assert all(t.isidentifier() for t in tags)


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env}, cwd=ROOT)


def _stand_in(package: Path, version, cuda=None, name=None, marked=True) -> Path:
    """The compiled library setup.py would build for another torch, down to its name and build record,
    but from csrc/python_module.cpp alone: it imports fine anywhere (it needs nothing of torch) and
    registers no op, so a loader that imports it instead of the running torch's library is caught.
    name="_C", marked=False: the untagged library of builds before libraries carried their torch."""
    name = name or _toolchain.library_name(version, cuda)
    out = package / (name + importlib.machinery.EXTENSION_SUFFIXES[0])
    assert not out.exists(), f"two torch builds, one library name: {out.name}"
    cmd = [CXX, "-shared", "-fPIC", "-O0", f"-I{sysconfig.get_paths()['include']}",
           f"-DTORCH_EXTENSION_NAME={name}", str(ROOT / "csrc" / "python_module.cpp"), "-o", str(out)]
    if marked:
        cmd.insert(-3, _toolchain.built_for_flag(_toolchain.describe_torch(version, cuda)))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def _package_copy(tmp_path: Path) -> Path:
    """The crosshead package without any compiled library, importable from tmp_path."""
    shutil.copytree(ROOT / "crosshead", tmp_path / "crosshead",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    return tmp_path / "crosshead"


def _other_builds():
    """Torch builds that are not the running one: this project's other environment (tools/venv.sh),
    the same torch version built for another toolkit, an older torch."""
    version, cuda, _ = RUNNING
    other_flavour = ("2.14.1+cu130", "13.0") if cuda is None else ("2.13.0+cpu", None)
    if other_flavour[0] == version:
        other_flavour = ("2.12.0+cpu", None)
    public = version.split("+")[0]
    other_toolkit = (f"{public}+cpu", None) if cuda else (f"{public}+cu128", "12.8")
    return [other_flavour, other_toolkit, ("2.4.0+cpu", None)]


IMPORT_AND_REPORT = """
import json, sys, warnings
# the crosshead under test is the copy on PYTHONPATH: drop an editable install's finder, which would
# look up crosshead's modules in the checkout
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import crosshead
import torch
from crosshead import _library
from crosshead.info import report
q = torch.randn(1, 2, 16, 4, requires_grad=True)
ql = crosshead.landmarks(q, (4, 4), (2, 2))
crosshead.imhsa(q, q, q, ql, ql).sum().backward()
assert q.grad.isfinite().all()
print(report())
print(json.dumps(dict(file=crosshead.__file__, mode=_library.mode, library=_library.library,
                      detail=_library.detail, fused=_library.has_fused_cuda(),
                      imported=sorted(m for m in sys.modules if m.startswith("crosshead._C")),
                      warnings=[str(w.message) for w in caught if "crosshead" in str(w.message)])))
"""


def _import_from(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSHEAD_")}
    proc = subprocess.run([sys.executable, "-c", IMPORT_AND_REPORT], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path, env={**env, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    *report, result = proc.stdout.strip().splitlines()
    result = json.loads(result)
    assert Path(result["file"]).parent == tmp_path / "crosshead", result["file"]  # the copy, not the checkout
    return result, "\n".join(report)


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_each_torch_build_keeps_its_own_library(tmp_path):
    """The libraries built for several torch builds lie side by side in one package directory (one
    checkout, one venv per torch, each installing it in place): the loader takes the running torch's,
    without a warning, and nothing of the others."""
    if _library.mode != "compiled":
        pytest.skip(f"needs this environment's compiled library ({_library.mode}: {_library.detail})")
    package = _package_copy(tmp_path)
    own = Path(_library.library)
    (package / own.name).symlink_to(own)
    others = [_stand_in(package, *build) for build in _other_builds()]
    others.append(_stand_in(package, None, name="_C", marked=False))
    result, report = _import_from(tmp_path)
    assert result["mode"] == "compiled", result["detail"]
    assert result["library"] == str(package / own.name)
    assert result["imported"] == [f"crosshead.{_library.library_name()}"]
    assert result["warnings"] == []
    assert result["fused"] == _library.has_fused_cuda()
    assert f"compiled library built for: {_toolchain.describe_torch(*RUNNING)}" in report
    assert all(p.name in report for p in others)  # listed as present and not loaded


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_a_library_built_for_another_torch_is_named_in_the_warning(tmp_path):
    """Only libraries of other torch builds: the ops fall back to the pure-torch path, with a warning
    that says which torch each library is for, which one is running, and how to rebuild."""
    package = _package_copy(tmp_path)
    builds = _other_builds()[:2]
    others = [_stand_in(package, *build) for build in builds]
    legacy = _stand_in(package, None, name="_C", marked=False)
    result, report = _import_from(tmp_path)
    assert result["mode"] == "python" and result["imported"] == [] and not result["fused"]
    assert len(result["warnings"]) == 1, result["warnings"]
    message = result["warnings"][0]
    for path, build in zip(others, builds):
        assert f"{path.name} is built for {_toolchain.describe_torch(*build)}" in message, message
    assert f"{legacy.name} is built for an unknown torch" in message
    expected = _library.library_name() + importlib.machinery.EXTENSION_SUFFIXES[0]
    assert f"This is {_toolchain.describe_torch(*RUNNING)}, whose library would be {expected}" in message
    assert "pip install --no-build-isolation ." in message
    assert "operator library: python" in report and all(p.name in report for p in others)


def test_import_without_the_compiled_library():
    code = (f"import sys; sys.modules['crosshead.{_library.library_name()}'] = None\n"
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
    # built in a directory of its own torch build, which another environment's JIT build leaves alone
    assert list(tmp_path.iterdir()) == [tmp_path / _toolchain.torch_tag(*RUNNING)]
    assert list((tmp_path / _toolchain.torch_tag(*RUNNING)).glob("crosshead_jit*.so"))


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


# ------------------------------------------------------------------ one C++ runtime in the process

def test_the_loaded_library_shares_torchs_cxx_runtime():
    """A library carrying its own copy of libstdc++ crashed the first GPU run at the first error
    message with a number in it (issue #10); setup.py and the JIT build now refuse one."""
    if _library.mode not in ("compiled", "jit"):
        pytest.skip(f"no compiled library loaded (mode {_library.mode!r})")
    path = _library.library
    if Path(path).is_dir():  # the JIT build directory
        path = Path(path) / "crosshead_jit.so"
    needed = _toolchain.needed_libraries(path)
    assert needed is not None and any(n.startswith("libstdc++") for n in needed), needed
    assert _toolchain.cxx_runtime_problem(path) is None


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_the_cxx_runtime_check_refuses_a_library_with_a_private_runtime(tmp_path):
    source = tmp_path / "fmt.cpp"
    source.write_text('#include <sstream>\n#include <string>\n'
                      'extern "C" int fmt(int x) { std::ostringstream s; s << x; return int(s.str().size()); }\n')
    built = {}
    for kind, flags in (("shared", []), ("private", ["-static-libstdc++"])):
        out = tmp_path / f"lib{kind}.so"
        run = subprocess.run([CXX, "-shared", "-fPIC", *flags, str(source), "-o", str(out)], capture_output=True,
                             text=True)
        if run.returncode != 0:
            pytest.skip(f"{CXX} cannot build a {kind}-runtime library here: {run.stderr.strip()[:200]}")
        built[kind] = out
    assert "libstdc++.so.6" in _toolchain.needed_libraries(built["shared"])
    assert _toolchain.cxx_runtime_problem(built["shared"]) is None
    assert not any(n.startswith("libstdc++") for n in _toolchain.needed_libraries(built["private"]))
    problem = _toolchain.cxx_runtime_problem(built["private"])
    assert problem is not None and "CXX=/usr/bin/g++" in problem and str(built["private"]) in problem


def test_needed_libraries_is_none_for_what_is_not_an_elf_library(tmp_path):
    text = tmp_path / "not_a_library.so"
    text.write_bytes(b"MZ\x90\x00 a Windows DLL header, or anything else")
    assert _toolchain.needed_libraries(text) is None
    assert _toolchain.cxx_runtime_problem(text) is None
