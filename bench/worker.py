"""Worker process: measures one contender over a list of (grid side, pass) points and prints one
JSON line per event, prefixed with TAG, for the driver (bench/run.py) to read. A worker that dies
(out of memory, killed by the driver's watchdog, timeout) loses only the point it was on.

    python -m bench.worker '{"config": {...}, "contender": "sdpa-math", "points": [[14, "fwd"], ...]}'
"""

from __future__ import annotations

import json
import sys
import time
import traceback

TAG = "@@bench "
SLOW_S = 2.0  # a call this slow is measured with the fewest calls: 1 warm-up + min_reps


def emit(**event) -> None:
    sys.stdout.write(TAG + json.dumps(event) + "\n")
    sys.stdout.flush()


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def measure_point(cfg, contender, side: int, pass_: str) -> dict:
    import torch

    from . import memory, timing

    case = contender.build(cfg, side)
    leaves = case.leaves

    def reset():
        for t in leaves:
            t.grad = None

    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                case.forward()
    else:
        def call():
            case.forward().backward(case.grad_out)

    t0 = time.perf_counter()
    compile_s = timing.once(call, cfg.device, reset) if case.compiles else None
    first = timing.once(call, cfg.device, reset, cfg.clock)
    common = dict(device=cfg.device, warmup=cfg.warmup, min_reps=cfg.min_reps, budget_s=cfg.budget_s,
                  reset=reset, first=first, clock=cfg.clock)
    if first >= SLOW_S:
        # a slow call: its tensors are far above glibc's mmap threshold, so the strict memory mode
        # does not change its timing, and the memory call doubles as the first timed sample
        holder = {}

        def timed():
            holder["t"] = timing.once(call, cfg.device, clock=cfg.clock)
        peak = memory.peak(timed, cfg.device)
        reset()
        stats = timing.measure(call, max_reps=cfg.min_reps, samples=[holder["t"]], **common)
    else:
        stats = timing.measure(call, max_reps=cfg.max_reps, **common)
        reset()
        _sync(cfg.device)
        peak = memory.peak(call, cfg.device)
        reset()
    stats["peak_bytes"] = peak
    if compile_s is not None:
        stats["first_call_s"] = compile_s  # includes torch.compile's compilation
    stats["wall_s"] = time.perf_counter() - t0
    return stats


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    import torch

    from . import contenders, memory
    from .config import Config

    cfg = Config.from_dict(spec["config"])
    torch.set_num_threads(cfg.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if cfg.device == "cpu":
        memory.timing_mode()
    import crosshead  # noqa: F401  (registers the ops before any contender is built)

    contender = contenders.get(spec["contender"])
    for side, pass_ in spec["points"]:
        emit(event="start", side=side, pass_=pass_)
        try:
            stats = measure_point(cfg, contender, side, pass_)
        except torch.OutOfMemoryError as e:
            emit(event="fail", side=side, pass_=pass_,
                 reason=f"out of GPU memory: {str(e).splitlines()[0]}", fatal=True)
            torch.cuda.empty_cache()
            continue
        except MemoryError:
            emit(event="fail", side=side, pass_=pass_, reason="out of memory (MemoryError)", fatal=True)
            continue
        except Exception as e:  # noqa: BLE001  (a contender that fails gets a row saying why)
            line = (str(e).splitlines() or [""])[0][:300]
            emit(event="fail", side=side, pass_=pass_, reason=f"{type(e).__name__}: {line}", fatal=False,
                 traceback=traceback.format_exc()[-2000:])
            continue
        emit(event="result", side=side, pass_=pass_, **stats)
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
