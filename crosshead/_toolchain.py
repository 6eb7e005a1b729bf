"""Finds the CUDA toolkit for builds (setup.py and the JIT path). Imports nothing of crosshead, so
setup.py can load it by path before torch.utils.cpp_extension fixes its CUDA_HOME."""

import os
import shutil
from pathlib import Path


def find_cuda_home():
    """CUDA_HOME if set; else the first toolkit with headers among nvcc's parent (torch's guess) and
    /usr/local/cuda. A wrapper script on PATH (e.g. /usr/local/bin/nvcc) makes torch guess a folder
    with no CUDA headers or libraries; this looks past it."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent] if nvcc else []
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "include" / "cuda_runtime.h").exists():
            return str(home)
    return None


def export_cuda_home():
    """Sets CUDA_HOME for torch.utils.cpp_extension (call before importing it)."""
    home = find_cuda_home()
    if home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home
    return home
