"""Where the fused-kernel tests run: on a GPU when there is one, else on the SIMT emulator
(CROSSHEAD_CUDA_EMULATOR=1: the same CUDA kernel sources serve the CPU key), else nowhere (skipped).
On the emulator the shapes are small: it runs the kernels thread by thread."""

import pytest
import torch

from crosshead import _library

GPU = torch.cuda.is_available()
EMULATED = not GPU and _library.emulated
DEVICE = "cuda" if GPU else "cpu"
KEY = "CUDA" if GPU else "CPU"  # the dispatch key the kernels serve
WHERE = "GPU" if GPU else "CPU harness (SIMT emulator)"

skip_without_kernels = pytest.mark.skipif(
    not (GPU or EMULATED),
    reason="no CUDA device and the emulator is off: run with CROSSHEAD_CUDA_EMULATOR=1 (tools/test.sh does)")
gpu_only = pytest.mark.skipif(not GPU, reason="needs a real GPU (streams / hardware behaviour)")


def sized(gpu, emulated):
    """A size (or list of shapes) for the GPU and a smaller one for the emulator."""
    return gpu if GPU else emulated


def fused_kernel_registered(op):
    """True when op's kernel for KEY is compiled from a .cu file, not the pure-torch reference."""
    if not _library.has_kernel(op, KEY):
        return False
    dump = torch._C._dispatch_dump(f"crosshead::{op}")
    line = next((ln for ln in dump.splitlines() if ln.startswith(f"{KEY}:")), "")
    return ".cu:" in line
