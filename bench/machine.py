"""The machine header of a run, and the two rates its roofline columns are measured against:
copy bandwidth (a large tensor copy, bytes read + written per second) and the matmul rate in the
run's dtype (and in bfloat16 on GPU)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

from . import timing

PACKAGES = ("timm", "performer-pytorch", "nystrom-attention", "linformer", "numpy", "triton")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def header(device: str, threads: int) -> dict:
    import crosshead
    from crosshead import _library

    from . import memory

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "threads": threads,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "device": device,
        "crosshead": crosshead.__version__,
        "crosshead_backend": _library.mode,
        "crosshead_backend_detail": _library.detail,
        "crosshead_fused_cuda": bool(_library.mode in ("compiled", "jit") and _library.has_kernel("imhsa", "CUDA")),
        "git_commit": _git_commit(),
        "packages": {p: _version(p) for p in PACKAGES},
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_capability=f"{p.major}.{p.minor}", gpu_memory_bytes=p.total_memory,
                    gpu_sms=p.multi_processor_count, memory_method="torch.cuda.max_memory_allocated "
                    "after reset_peak_memory_stats, minus memory_allocated before the call")
    else:
        info["memory_method"] = memory.cpu_method()
    return info


def _rate(fn, device: str, clock: str = "wall") -> float:
    return timing.measure(fn, device=device, warmup=2, min_reps=5, max_reps=30, budget_s=0.5,
                          clock=clock)["median_s"]


def copy_bandwidth(device: str, clock: str = "wall") -> float:
    """Bytes per second of y.copy_(x) on a tensor far larger than the caches (read + write)."""
    nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    t = _rate(lambda: y.copy_(x), device, clock)
    return 2 * nbytes / t


def matmul_rate(device: str, dtype: torch.dtype, clock: str = "wall") -> float:
    """FLOP/s of an n×n×n matmul (n = 8192 on GPU, 1024 on CPU)."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t = _rate(lambda: torch.matmul(a, b, out=c), device, clock)
    return 2 * n ** 3 / t


def rooflines(device: str, dtype: str, clock: str = "wall") -> dict:
    dt = getattr(torch, dtype)
    out = {"copy_bandwidth_Bps": copy_bandwidth(device, clock),
           "matmul_flops": matmul_rate(device, dt, clock), "matmul_dtype": dtype}
    if device == "cuda" and dt != torch.bfloat16:
        out["matmul_bf16_flops"] = matmul_rate(device, torch.bfloat16)
    elif device == "cuda":
        out["matmul_bf16_flops"] = out["matmul_flops"]
    if device == "cuda":
        torch.cuda.empty_cache()
    return out
