"""Build helpers shared by setup.py, the JIT path and the loader: where the CUDA toolkit is, and which
torch a compiled library is for. Imports nothing of crosshead (nor torch), so setup.py can load it by
path before torch.utils.cpp_extension fixes its CUDA_HOME.

One checkout serves several environments (tools/venv.sh makes .venv-cpu and .venv-cuda, each with
its own torch, both building in place), so every compiled artefact is named after the torch it was
built against: setup.py builds the extension module crosshead._C_<tag> (e.g. _C_torch2_13_0_cpu,
_C_torch2_14_1_cu130) and the loader imports the one whose tag is the running torch's.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import struct
import sys
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


def torch_tag(version: str, cuda: str | None = None, hip: str | None = None) -> str:
    """The torch build a compiled library is for, as a Python identifier: torch.__version__ and the
    toolkit of that build (torch.version.cuda / torch.version.hip, or none: cpu). E.g.
    ("2.13.0+cpu", None) -> "torch2_13_0_cpu", ("2.14.1+cu130", "13.0") -> "torch2_14_1_cu130",
    ("2.14.0a0+gitabc", "12.8") -> "torch2_14_0a0_gitabc_cu128"."""
    public, _, local = str(version).partition("+")
    variant = f"cu{cuda.replace('.', '')}" if cuda else f"rocm{hip}" if hip else "cpu"
    parts = [public] + ([local] if local and local != variant else []) + [variant]
    return "torch" + re.sub(r"[^0-9A-Za-z]+", "_", "_".join(parts)).strip("_")


def library_name(version: str, cuda: str | None = None, hip: str | None = None) -> str:
    """The module name (in the crosshead package) of the compiled library for that torch."""
    return f"_C_{torch_tag(version, cuda, hip)}"


def describe_torch(version: str, cuda: str | None = None, hip: str | None = None,
                   python: str | None = None) -> str:
    """Human-readable: "torch 2.14.1+cu130 (CUDA 13.0), Python 3.11"."""
    toolkit = f"CUDA {cuda}" if cuda else f"ROCm {hip}" if hip else "CPU-only build"
    python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"torch {version} ({toolkit}), Python {python}"


# setup.py embeds "<BUILT_FOR_MARKER><describe_torch(...)>" in the library (csrc/python_module.cpp),
# so the loader can say which torch a library is for without loading it (which may crash or, worse,
# register kernels compiled against another torch's ABI).
BUILT_FOR_MARKER = "crosshead-built-for: "


def built_for_flag(description: str) -> str:
    """The compiler flag that embeds `description`. Passed as byte values, not a string literal: a
    quoted literal would need quoting that differs between ninja builds (a shell) and plain ones."""
    return "-DCROSSHEAD_BUILT_FOR=" + ",".join(str(b) for b in (BUILT_FOR_MARKER + description).encode())


def read_built_for(path) -> str | None:
    """The description setup.py embedded in the library at `path`, or None (an older build, or not a
    crosshead library)."""
    marker = BUILT_FOR_MARKER.encode()
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start = data.find(marker)
            if start < 0:
                return None
            end = data.find(b"\0", start, start + 4096)
            return data[start + len(marker):end if end >= 0 else start + 4096].decode(errors="replace")
    except (OSError, ValueError):  # unreadable, or empty (mmap of an empty file)
        return None


def needed_libraries(path) -> list[str] | None:
    """The DT_NEEDED entries (shared libraries it loads) of the 64-bit little-endian ELF file at
    `path`, or None when it is not one (another platform's library format, say)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    # section header: name, type, flags, addr, offset, size, link, info, addralign, entsize
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for _, sh_type, _, _, offset, size, link, *_ in sections:
        if sh_type != 6:  # SHT_DYNAMIC: (tag, value) pairs; DT_NEEDED values index its string table
            continue
        strtab = sections[link][4]
        for pos in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                start = strtab + value
                needed.append(data[start:data.index(b"\0", start)].decode())
    return needed


def cxx_runtime_problem(path) -> str | None:
    """Why the compiled library at `path` must not be loaded next to torch, or None. A library that
    does not load the C++ runtime as a shared library carries a private copy of it (a compiler
    configured with -static-libstdc++ links one in): two runtimes in one process, and the first
    error message that formats a number crashes the process (std::locale facets of the other copy;
    seen on an H200 machine whose image set CXX to such a g++, issue #10)."""
    needed = needed_libraries(path)
    if needed is None or any(name.startswith(("libstdc++", "libc++")) for name in needed):
        return None
    return (f"{path} does not load the C++ runtime (libstdc++.so) as a shared library: its compiler "
            "linked a private copy into it (e.g. a g++ that passes -static-libstdc++). Next to torch's "
            "runtime that copy crashes the process at the first error message with a number in it. "
            "Rebuild with a compiler that links libstdc++ dynamically, e.g. CC=/usr/bin/gcc "
            "CXX=/usr/bin/g++ (shared libraries it needs: " + ", ".join(needed) + ")")
