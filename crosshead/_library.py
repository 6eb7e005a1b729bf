"""Makes torch.ops.crosshead.* exist, one way or another, and records which way.

Order: already registered in this process → JIT build of csrc/ (opt-in, CROSSHEAD_JIT=1) → the
installed compiled library for the running torch, crosshead._C_<tag> (one checkout can hold one
library per torch build: crosshead/_toolchain.py) → schemas declared from Python. With
CROSSHEAD_CUDA_EMULATOR=1 the CUDA kernel sources, built for the CPU on the SIMT emulator
(crosshead._emulator), then serve the CPU key. Finally the pure-torch reference is registered as the
CPU kernel where none is, and as the CUDA kernel when no compiled CUDA kernel exists.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import re
import warnings
from pathlib import Path

import torch

from . import _toolchain

NAMESPACE = "crosshead"

# Mirror of csrc/crosshead.cpp (the declaration the compiled library uses); tests/test_packaging.py
# checks that the two stay identical.
SCHEMAS = {
    "landmarks": "landmarks(Tensor x, SymInt[] grid, int[] size, SymInt prefix) -> Tensor",
    "landmarks_backward": "landmarks_backward(Tensor grad, SymInt num_tokens, SymInt[] grid, int[] size, SymInt prefix) -> Tensor",
    "imhsa": "imhsa(Tensor q, Tensor k, Tensor v, Tensor q_land, Tensor k_land, Tensor? w_q, Tensor? w_k, str mix, float scale) -> (Tensor out, Tensor z, Tensor lse_k, Tensor lse_q)",
    "imhsa_backward": "imhsa_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor q_land, Tensor k_land, Tensor? w_q, Tensor? w_k, Tensor z, Tensor lse_k, Tensor lse_q, str mix, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_q_land, Tensor grad_k_land, Tensor grad_w_q, Tensor grad_w_k)",
}

PACKAGE = Path(__file__).resolve().parent  # where the compiled libraries lie, installed or in place
CSRC = PACKAGE.parent / "csrc"

mode = "unloaded"  # "compiled", "jit", "python" or "preloaded"
detail = ""  # why this mode (for python -m crosshead.info)
library: str | None = None  # path of the loaded compiled or JIT-built library
_libraries: list[torch.library.Library] = []  # keep Python registrations alive
python_kernels: set[tuple[str, str]] = set()  # (op, dispatch key) served by crosshead.reference
emulated = False  # the CPU key is served by the CUDA kernel sources on the SIMT emulator


def is_defined(op: str = "imhsa") -> bool:
    return hasattr(getattr(torch.ops, NAMESPACE), op)


def has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", dispatch_key)


def has_fused_cuda(op: str = "imhsa") -> bool:
    """True when a compiled CUDA kernel (not the pure-torch path) serves `op` on CUDA."""
    return has_kernel(op, "CUDA") and (op, "CUDA") not in python_kernels


def running_torch() -> tuple[str, str | None, str | None]:
    return torch.__version__, torch.version.cuda, getattr(torch.version, "hip", None)


def library_name() -> str:
    """The compiled library for the running torch: crosshead.<library_name()> (setup.py names the
    library it builds with the same function of the torch it builds against)."""
    return _toolchain.library_name(*running_torch())


def compiled_libraries(directory: Path = PACKAGE) -> list[Path]:
    """Every compiled library in `directory`, whatever torch and Python it was built for: _C_<tag>
    and the untagged _C of builds before libraries were named after their torch."""
    return sorted(p for p in directory.glob("_C*")
                  if re.fullmatch(r"_C(_torch\w+)?", p.name.split(".")[0]) and p.suffix in (".so", ".pyd"))


def _built_for(path: Path) -> str:
    return _toolchain.read_built_for(path) or ("an unknown torch (no build record: an older crosshead "
                                               "build, from before libraries were named after their torch)")


def _rebuild_hint() -> str:
    fused = ", without the fused CUDA kernels" if torch.version.cuda else ""
    return ("Rebuild for this torch with `pip install --no-build-isolation .` (in a source checkout: "
            "`pip install --no-build-isolation -e .`, or `bash tools/venv.sh cpu` / `bash tools/venv.sh "
            f"cuda`). Until then the ops run on the pure-torch path{fused}.")


def mismatch_message(name: str, others: list[Path], directory: Path = PACKAGE) -> str:
    """The warning when `directory` holds compiled libraries, none of them for the running torch."""
    expected = name + importlib.machinery.EXTENSION_SUFFIXES[0]
    found = "; ".join(f"{p.name} is built for {_built_for(p)}" for p in others)
    return (f"crosshead: no compiled library for the running torch in {directory}, only for others: "
            f"{found}. This is {_toolchain.describe_torch(*running_torch())}, whose library would be "
            f"{expected}. {_rebuild_hint()}")


def _jit_load() -> str:
    from ._toolchain import export_cuda_home

    export_cuda_home()
    from torch.utils import cpp_extension

    sources = [str(CSRC / "crosshead.cpp")]
    cuda_sources = sorted(str(p) for p in (CSRC / "cuda").glob("*.cu"))
    if torch.version.cuda and cpp_extension.CUDA_HOME and os.environ.get("CROSSHEAD_JIT_CUDA", "1") != "0":
        sources += cuda_sources
    # one build directory per torch build: environments sharing the checkout neither overwrite each
    # other's library nor rebuild it each time they take turns
    build_dir = Path(os.environ.get("CROSSHEAD_JIT_DIR") or CSRC.parent / "build" / "jit") / \
        _toolchain.torch_tag(*running_torch())
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="crosshead_jit", sources=sources, is_python_module=False, build_directory=str(build_dir),
        extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"],
        extra_include_paths=[str(CSRC)] + _wheel_cuda_headers(), verbose=os.environ.get("CROSSHEAD_JIT_VERBOSE") == "1")
    problem = _toolchain.cxx_runtime_problem(build_dir / "crosshead_jit.so")
    if problem:  # loaded already: say so before its first error message brings the process down
        raise RuntimeError(f"crosshead JIT build: {problem}")
    return str(build_dir)


def _wheel_cuda_headers() -> list[str]:
    """CUDA builds of torch ship headers (e.g. cusparse.h) that a local toolkit may lack."""
    return [str(p) for p in (Path(torch.__file__).parent.parent / "nvidia").glob("cu*/include")]


def _define_from_python() -> None:
    lib = torch.library.Library(NAMESPACE, "DEF")
    for schema in SCHEMAS.values():
        lib.define(schema)
    _libraries.append(lib)


def load() -> None:
    global mode, detail, library
    if is_defined():
        mode, detail = "preloaded", "torch.ops.crosshead was already registered in this process"
        return
    if os.environ.get("CROSSHEAD_JIT") == "1":
        if not CSRC.is_dir():
            raise RuntimeError(f"CROSSHEAD_JIT=1 but the sources are not at {CSRC}: JIT-loading "
                               "needs a source checkout")
        library = _jit_load()
        mode, detail = "jit", f"JIT-built from {CSRC} into {library}"
        return
    name = library_name()
    files = {name + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES}  # its possible file names
    try:
        module = importlib.import_module(f"{__package__}.{name}")
        library = module.__file__
        mode, detail = "compiled", f"the compiled library crosshead.{name}: {library}"
        return
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == f"{__package__}.{name}":
            others = [p for p in compiled_libraries() if p.name not in files]
            reason = f"no crosshead.{name} for the running torch {torch.__version__}"
            if others:  # built, but for another torch: say so loudly
                reason += "; " + ", ".join(f"{p.name} is built for {_built_for(p)}" for p in others)
                warnings.warn(mismatch_message(name, others), stacklevel=2)
        else:  # there, but broken: say so loudly
            path = next((p for p in compiled_libraries() if p.name in files), None)
            built = f", built for {_built_for(path)}," if path else ""
            reason = f"crosshead.{name}{built} failed to load: {e}"
            warnings.warn(f"crosshead: the compiled library {path or name}{built} failed to load with "
                          f"{_toolchain.describe_torch(*running_torch())} ({e}). {_rebuild_hint()}",
                          stacklevel=2)
    _define_from_python()
    mode = "python"
    detail = f"compiled library not available ({reason}); ops declared from Python and served by the pure-torch path"


def load_emulator() -> None:
    """CROSSHEAD_CUDA_EMULATOR=1: the emulated CUDA kernels serve the CPU key of every op."""
    global emulated
    from . import _emulator

    if not _emulator.requested() or emulated:
        return
    _emulator.load()
    emulated = True


def _without_autocast(kernel, device_type: str):
    """The pure-torch kernels compute in float32 (float64) as documented, and return float32 z and
    lse as the schema's fake kernel says: autocast, when on, must not recast the matmuls inside."""

    def run(*args):
        if not torch.is_autocast_enabled(device_type):
            return kernel(*args)
        with torch.autocast(device_type, enabled=False):
            return kernel(*args)

    run.__name__ = run.__qualname__ = kernel.__name__
    run.__doc__ = kernel.__doc__
    return run


def register_reference_kernels() -> None:
    """The pure-torch kernels, behind the ops' argument checks (_op_checks), serve CPU always, and
    CUDA where no compiled kernel does."""
    from . import _op_checks, reference

    lib = torch.library.Library(NAMESPACE, "IMPL")
    for op in SCHEMAS:
        for key in ("CPU", "CUDA"):
            if not has_kernel(op, key):
                kernel = _without_autocast(getattr(reference, op), key.lower())
                lib.impl(op, _op_checks.checked(op, kernel), key)
                python_kernels.add((op, key))
    _libraries.append(lib)
