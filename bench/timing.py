"""Repeated timing after warm-up: time.perf_counter on CPU (or, with clock="cpu", the calling
thread's CPU time, time.thread_time), CUDA events on GPU.

Each sample times `inner` back-to-back calls (inner is chosen so a sample lasts at least
MIN_SAMPLE_S, which keeps timer resolution and launch latency out of microsecond calls) and is
divided by inner. Sampling stops at max_reps, or once min_reps samples and budget_s seconds are in.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

MIN_SAMPLE_S = 1e-3


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(samples: list[float]) -> dict:
    return {"median_s": statistics.median(samples), "p20_s": quantile(samples, 0.2),
            "p80_s": quantile(samples, 0.8), "reps": len(samples)}


def _timer(device: str, clock: str = "wall"):
    if device == "cuda":
        def run(fn, inner, reset):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
                reset()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
    else:
        now = time.thread_time if clock == "cpu" else time.perf_counter

        def run(fn, inner, reset):
            t0 = now()
            for _ in range(inner):
                fn()
                reset()
            return (now() - t0) / inner
    return run


def once(fn: Callable[[], None], device: str, reset: Callable[[], None] = lambda: None,
         clock: str = "wall") -> float:
    """Seconds of one call (synchronised)."""
    return _timer(device, clock)(fn, 1, reset)


def measure(fn: Callable[[], None], *, device: str, warmup: int, min_reps: int, max_reps: int,
            budget_s: float, reset: Callable[[], None] = lambda: None, first: float | None = None,
            samples: list[float] | None = None, clock: str = "wall") -> dict:
    """Times fn (reset runs after each call, inside the sample: keep it trivial). `first`: the
    time of a warm-up call the caller already made (it counts as one of the warm-ups); `samples`:
    samples the caller already took. Returns summary() of the per-call samples plus the warm-up
    time and the calls per sample."""
    run = _timer(device, clock)
    t0 = time.perf_counter()
    for _ in range(max(1, warmup) - (first is not None)):
        t = run(fn, 1, reset)
        first = t if first is None else min(first, t)
    warm_s = time.perf_counter() - t0 + (first or 0.0)
    inner = max(1, math.ceil(MIN_SAMPLE_S / max(first, 1e-9))) if first < MIN_SAMPLE_S else 1
    samples = list(samples or [])
    t0 = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - t0 < budget_s):
        samples.append(run(fn, inner, reset))
    return {**summary(samples), "inner": inner, "warmup_s": warm_s}
