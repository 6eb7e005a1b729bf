"""CROSSHEAD_CUDA_EMULATOR=1: the CUDA kernel sources of csrc/cuda, compiled for the CPU against
the SIMT emulator (csrc/emu), serve the CPU dispatch key of every crosshead op.

What this proves and what it cannot is in csrc/cuda/README.md ("The CPU harness"). It is a
development and CI tool: it needs a source checkout and a host C++ compiler, builds once per source
change (cached under build/emu), and runs kernels thousands of times slower than a GPU.
"""

from __future__ import annotations

import os

import torch

ENV = "CROSSHEAD_CUDA_EMULATOR"
library = None  # path of the loaded emulator library, when enabled


def requested() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0")


def load() -> str:
    """Builds (or reuses) and loads the emulator library; returns its path."""
    global library
    from . import _emulator_build

    csrc = os.environ.get("CROSSHEAD_EMULATOR_CSRC")  # another copy of the sources (tests of the harness)
    if not (_emulator_build.CSRC / "cuda").is_dir() and not csrc:
        raise RuntimeError(f"{ENV}=1 needs a source checkout: the kernel sources are not at "
                           f"{_emulator_build.CSRC / 'cuda'}")
    path = _emulator_build.build(csrc or _emulator_build.CSRC,
                                 verbose=os.environ.get("CROSSHEAD_EMULATOR_VERBOSE") == "1")
    torch.ops.load_library(str(path))
    library = str(path)
    return library


def tensor_cores() -> bool:
    """Whether half-type inputs take the tensor-core (mma.sync) path, as csrc/cuda/common.cuh decides."""
    return os.environ.get("CROSSHEAD_CUDA_TENSOR_CORES") != "0"
