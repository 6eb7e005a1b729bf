"""python -m crosshead.info: versions, how the ops were loaded, and which backend serves each
(device, dtype), with the reason where none does."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

import crosshead

from . import _emulator, _library, _toolchain

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda_unavailable_reason() -> str | None:
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no GPU or no driver)"
    return None


def _cpu_backend(dtype) -> str:
    if not _library.emulated:
        return "pure-torch (crosshead.reference)"
    if dtype not in FUSED_DTYPES:
        return ("unavailable: under CROSSHEAD_CUDA_EMULATOR=1 the CPU runs the CUDA kernels, which take float16, "
                "bfloat16 and float32 (unset it for the pure-torch path)")
    path = ""
    if dtype != torch.float32:
        path = ("; tensor-core (mma.sync) path at d in {32, 64, 128}" if _emulator.tensor_cores()
                else "; CUDA-core path (CROSSHEAD_CUDA_TENSOR_CORES=0)")
    return f"CUDA kernel sources on the SIMT emulator (CROSSHEAD_CUDA_EMULATOR=1){path}"


def backends() -> list[tuple[str, str, str]]:
    """(device, dtype, backend or 'unavailable: why') for every device and dtype."""
    rows = [("cpu", str(dtype).removeprefix("torch."), _cpu_backend(dtype)) for dtype in DTYPES]
    no_cuda = _cuda_unavailable_reason()
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")
        if no_cuda:
            built = "; the fused CUDA kernels are built" if _library.has_fused_cuda() else ""
            rows.append(("cuda", name, f"unavailable: {no_cuda}{built}"))
        elif not _library.has_fused_cuda():
            rows.append(("cuda", name, "pure-torch (crosshead.reference); fused kernels not built "
                                       f"(library: {_library.mode})"))
        elif dtype in FUSED_DTYPES:
            rows.append(("cuda", name, "fused CUDA kernels"))
        else:
            rows.append(("cuda", name, "unavailable: the fused kernels take float16, bfloat16 and float32; "
                                       "use the CPU for float64"))
    return rows


def report() -> str:
    lines = [
        f"crosshead {crosshead.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, CUDA (torch build) "
        f"{torch.version.cuda or 'none'}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    lines.append(f"operator library: {_library.mode} ({_library.detail})")
    if _library.mode == "compiled":
        built_for = _toolchain.read_built_for(_library.library) or "unknown (no build record)"
        lines.append(f"compiled library built for: {built_for}")
        loaded = Path(_library.library).resolve()
        others = [p.name for p in _library.compiled_libraries() if p.resolve() != loaded]
        if others:
            lines.append(f"not loaded, built for other torch or Python builds: {', '.join(others)}")
    if _library.emulated:
        lines.append(f"CUDA emulator: {_emulator.library} (serves the CPU key; csrc/cuda/README.md)")
    ops = ", ".join(f"{op} [{'+'.join(k for k in ('CPU', 'CUDA') if _library.has_kernel(op, k))}]"
                    for op in _library.SCHEMAS)
    lines.append(f"ops: {ops}")
    lines.append("backends:")
    lines += [f"  {dev:<5} {dtype:<9} {backend}" for dev, dtype, backend in backends()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
