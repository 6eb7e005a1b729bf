"""Peak memory of one call, beyond what was allocated before it (inputs, parameters, caches).

GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
memory_allocated() before the call: the caching allocator's exact count of live tensor bytes.

CPU: torch has no CPU allocator statistics, so the process's resident set is used, made exact
for this purpose on Linux: glibc is told to serve every allocation of 64 KiB or more with its own
mmap (mallopt M_MMAP_THRESHOLD) and to hand free heap memory back (M_TRIM_THRESHOLD, malloc_trim),
so freed tensors leave the resident set at once and nothing freed earlier is silently reused; then
the kernel's peak-RSS counter is reset (write "5" to /proc/self/clear_refs) and the call's peak is
VmHWM after it minus VmRSS before it. This counts everything the call touches (tensors,
oneDNN/BLAS scratch, outputs) at page granularity. Each contender runs in its own worker process,
so nothing of another contender is in the picture. Where clear_refs or mallopt is unavailable (not
Linux/glibc), the figure is the ru_maxrss growth over the call, which is exact only for a call
that raises the process's peak, and the method says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from typing import Callable

import torch

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
STRICT_THRESHOLD = 64 * 1024
TIMING_THRESHOLD = 32 * 1024 * 1024  # glibc's own upper bound for its dynamic threshold


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timing_mode() -> None:
    """Large, fixed mmap threshold while timing, and the trim threshold glibc pairs with it (twice
    the mmap threshold): what a long-running glibc process converges to. Setting the mmap threshold
    alone would leave the trim threshold at its 128 KiB default, so every call would hand the top
    of the heap back to the system and fault it in again on the next call: timings would then
    depend on the order in which a contender happens to free its buffers."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, TIMING_THRESHOLD)
        _LIBC.mallopt(M_TRIM_THRESHOLD, 2 * TIMING_THRESHOLD)


def cpu_method() -> str:
    exact = _LIBC is not None and _status_kib("VmHWM") is not None and _reset_hwm()
    return ("peak RSS of the call: VmHWM after minus VmRSS before, with mallopt(M_MMAP_THRESHOLD = "
            "M_TRIM_THRESHOLD = 64 KiB) + malloc_trim and the peak reset through /proc/self/clear_refs"
            if exact else
            "ru_maxrss growth over the call (approximate: misses memory reused from earlier calls)")


def peak_cpu(fn: Callable[[], None]) -> int:
    """Bytes above the pre-call resident set at the call's peak."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, STRICT_THRESHOLD)
        _LIBC.mallopt(M_TRIM_THRESHOLD, STRICT_THRESHOLD)
        _LIBC.malloc_trim(0)
    try:
        before = _status_kib("VmRSS")
        if before is not None and _reset_hwm():
            fn()
            return max(0, (_status_kib("VmHWM") - before) * 1024)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return max(0, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    finally:
        timing_mode()


def peak_cuda(fn: Callable[[], None]) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - before)


def peak(fn: Callable[[], None], device: str) -> int:
    return peak_cuda(fn) if device == "cuda" else peak_cpu(fn)


def rss_bytes(pid: int) -> int:
    """Resident set of another process (the driver's watchdog over its workers)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
