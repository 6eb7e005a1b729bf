"""Makes torch.ops.crosshead.* exist, one way or another, and records which way.

Order: already registered in this process → JIT build of csrc/ (opt-in, CROSSHEAD_JIT=1) → the
installed compiled library crosshead._C → schemas declared from Python. With
CROSSHEAD_CUDA_EMULATOR=1 the CUDA kernel sources, built for the CPU on the SIMT emulator
(crosshead._emulator), then serve the CPU key. Finally the pure-torch reference is registered as the
CPU kernel where none is, and as the CUDA kernel when no compiled CUDA kernel exists.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

import torch

NAMESPACE = "crosshead"

# Mirror of csrc/crosshead.cpp (the declaration the compiled library uses); tests/test_packaging.py
# checks that the two stay identical.
SCHEMAS = {
    "landmarks": "landmarks(Tensor x, SymInt[] grid, int[] size, SymInt prefix) -> Tensor",
    "landmarks_backward": "landmarks_backward(Tensor grad, SymInt num_tokens, SymInt[] grid, int[] size, SymInt prefix) -> Tensor",
    "imhsa": "imhsa(Tensor q, Tensor k, Tensor v, Tensor q_land, Tensor k_land, Tensor? w_q, Tensor? w_k, str mix, float scale) -> (Tensor out, Tensor z, Tensor lse_k, Tensor lse_q)",
    "imhsa_backward": "imhsa_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor q_land, Tensor k_land, Tensor? w_q, Tensor? w_k, Tensor z, Tensor lse_k, Tensor lse_q, str mix, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_q_land, Tensor grad_k_land, Tensor grad_w_q, Tensor grad_w_k)",
}

CSRC = Path(__file__).resolve().parent.parent / "csrc"

mode = "unloaded"  # "compiled", "jit", "python" or "preloaded"
detail = ""  # why this mode (for python -m crosshead.info)
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


def _jit_load() -> None:
    from ._toolchain import export_cuda_home

    export_cuda_home()
    from torch.utils import cpp_extension

    sources = [str(CSRC / "crosshead.cpp")]
    cuda_sources = sorted(str(p) for p in (CSRC / "cuda").glob("*.cu"))
    if torch.version.cuda and cpp_extension.CUDA_HOME and os.environ.get("CROSSHEAD_JIT_CUDA", "1") != "0":
        sources += cuda_sources
    build_dir = Path(os.environ.get("CROSSHEAD_JIT_DIR", CSRC.parent / "build" / "jit"))
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="crosshead_jit", sources=sources, is_python_module=False, build_directory=str(build_dir),
        extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"],
        extra_include_paths=[str(CSRC)] + _wheel_cuda_headers(), verbose=os.environ.get("CROSSHEAD_JIT_VERBOSE") == "1")


def _wheel_cuda_headers() -> list[str]:
    """CUDA builds of torch ship headers (e.g. cusparse.h) that a local toolkit may lack."""
    return [str(p) for p in (Path(torch.__file__).parent.parent / "nvidia").glob("cu*/include")]


def _define_from_python() -> None:
    lib = torch.library.Library(NAMESPACE, "DEF")
    for schema in SCHEMAS.values():
        lib.define(schema)
    _libraries.append(lib)


def load() -> None:
    global mode, detail
    if is_defined():
        mode, detail = "preloaded", "torch.ops.crosshead was already registered in this process"
        return
    if os.environ.get("CROSSHEAD_JIT") == "1":
        if not CSRC.is_dir():
            raise RuntimeError(f"CROSSHEAD_JIT=1 but the sources are not at {CSRC}: JIT-loading "
                               "needs a source checkout")
        _jit_load()
        mode, detail = "jit", f"JIT-built from {CSRC}"
        return
    try:
        importlib.import_module("crosshead._C")
        mode, detail = "compiled", "the compiled library crosshead._C"
        return
    except ImportError as e:
        reason = str(e)
        if not isinstance(e, ModuleNotFoundError):  # built, but broken: say so loudly
            warnings.warn(f"crosshead._C failed to load ({e}); it was probably built against another "
                          f"torch than {torch.__version__}: rebuild with `pip install "
                          "--no-build-isolation .`. Falling back to the pure-torch path.", stacklevel=2)
    _define_from_python()
    mode = "python"
    detail = (f"compiled library not available ({reason}); ops declared from Python and served by "
              "the pure-torch path")


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
