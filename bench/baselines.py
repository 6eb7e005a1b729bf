"""python -m bench.baselines: what every crosshead.baselines mechanism costs at ViT-S width.

One process, one thread (``--threads``), the timing thread's CPU time (``time.thread_time``, so
other processes on a shared machine do not inflate it), medians after a warm-up call. For each
mechanism built with ``baselines.create_for`` at each grid (ViT-S: dim 384, 6 heads, B = 1, one
CLS token): forward and forward+backward time and their ratio to softmax, peak memory of each
(bench/memory.py's exact CPU method), parameters and their difference from softmax MHSA, forward
FLOPs as torch's FlopCounterMode counts them (matrix products, convolutions, SDPA: the work that
dominates every mechanism here; elementwise work and FFTs are not counted), and the effective
density: the fraction of the N x N query-key pairs whose exact score enters the output.

A second part measures ripple's and rpe_linear's two evaluations (quadratic vs dynamic programme,
explicit vs FFT) over growing grids and reports where each crossover lies; beyond the largest
grid measured it is extrapolated from the last two points, the quadratic form growing as N^2
and the other as N (log N ignored), and marked so.

Writes <out>/baselines-cpu.md and .json (default docs/results/).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from . import memory, timing

ROOT = Path(__file__).resolve().parent.parent
DIM, HEADS, PREFIX, BATCH = 384, 6, 1, 1


def effective_density(m, name: str, n: int) -> tuple[float, str]:
    """(fraction of the N x N pairs scored exactly, what the approximation keeps)."""
    if name in ("softmax", "talking_heads", "context_pool"):
        return 1.0, "all pairs"
    if name == "ra":
        return 1.0, "all pairs, one sampled kernel"
    if name == "performer":
        return 0.0, f"rank {m.nb_features} (random features)"
    if name == "nystrom":
        return 0.0, f"rank {m.effective_landmarks(n)} (landmarks)"
    if name == "linformer":
        return 0.0, f"k = {m.k} projected keys"
    if name == "lara":
        return 0.0, f"{m.q_prop.num_landmarks} proposals"
    if name == "mra2":
        nb = math.ceil(n / m.block_size)
        kk = min(nb * m.block_per_row, nb * nb)
        return kk / nb ** 2, f"{kk} of {nb * nb} blocks exact, the rest at block means"
    if name == "ripple":
        return 0.0, f"rank {m.num_features}, {m.max_radius} rings ({m.chosen_impl(grid_of(n))})"
    if name == "rpe_linear":
        return 0.0, f"rank {m.head_dim} (relu), 2-D Toeplitz mask ({m.chosen_impl(grid_of(n))})"
    if name == "vars_d":
        return 0.0, f"{m.m} atoms, {m.num_step} ISTA steps"
    if name == "hypercube":
        from crosshead.baselines.hypercube import hypercube_layout
        bs = m.block_size
        nb = math.ceil(n / bs)
        sizes = [min(bs, n - i * bs) for i in range(nb)]
        pairs = sum(sizes[i] * sum(sizes[j] for j in row)
                    for i, row in enumerate(hypercube_layout(nb)))
        return pairs / n ** 2, f"{nb} blocks of {bs}, log2 neighbours"
    if name == "flash_gau":
        g = m.group_size
        groups = [min(g, n - i * g) for i in range(math.ceil(n / g))]
        return sum(s * s for s in groups) / n ** 2, f"{len(groups)} group(s) of <= {g} + linear term"
    return float("nan"), "?"


def grid_of(n: int):
    side = math.isqrt(n - PREFIX)
    return side, side


def _time(fn, reset=lambda: None) -> dict:
    first = timing.once(fn, "cpu", reset, "cpu")
    reps = 3 if first > 1.0 else 20
    return timing.measure(fn, device="cpu", warmup=1, min_reps=3, max_reps=reps, budget_s=1.0,
                          reset=reset, first=first, clock="cpu")


def measure_call(module, x, grid) -> dict:
    """Forward and forward+backward of module(x, grid): median seconds and peak bytes."""
    g = torch.randn_like(x)
    leaves = [x, *module.parameters()]

    def reset():
        for t in leaves:
            t.grad = None

    def fwd():
        with torch.no_grad():
            module(x, grid=grid)

    def fwdbwd():
        module(x, grid=grid).backward(g)

    out = {}
    for key, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        out[f"{key}_s"] = _time(fn, reset)["median_s"]
        reset()
        out[f"{key}_peak"] = memory.peak_cpu(fn)
        reset()
    return out


def flops(module, x, grid) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:  # (under no_grad its module tracker fails)
        module(x, grid=grid)
    return counter.get_total_flops()


def table_rows(grids, progress) -> list[dict]:
    from crosshead import baselines
    rows = []
    for side in grids:
        n = PREFIX + side * side
        for name in baselines.names():
            why = baselines.available()[name]
            if why is not None:
                rows.append(dict(name=name, n=n, side=side, status="unavailable", reason=why))
                continue
            torch.manual_seed(0)
            m = baselines.create_for(name, DIM, HEADS, grid=(side, side), num_prefix_tokens=PREFIX)
            m.train(name not in ("ra", "lara"))  # ra/lara: eval (no noise) for the table
            x = torch.randn(BATCH, n, DIM, requires_grad=True)
            row = dict(name=name, n=n, side=side, status="ok", module=repr(m).splitlines()[0],
                       params=sum(p.numel() for p in m.parameters()), flops=flops(m, x, (side, side)))
            row["density"], row["keeps"] = effective_density(m, name, n)
            row.update(measure_call(m, x, (side, side)))
            rows.append(row)
            progress(f"{name} {side}x{side}: fwd {row['fwd_s'] * 1e3:.1f} ms, "
                     f"fwd+bwd {row['fwdbwd_s'] * 1e3:.1f} ms")
    return rows


def crossover_rows(name: str, pair: tuple[str, str], grids, progress) -> list[dict]:
    from crosshead import baselines
    rows = []
    for side in grids:
        options = {"grid_size": (side, side)} if name == "rpe_linear" else {}
        torch.manual_seed(0)
        m = baselines.create(name, DIM, HEADS, num_prefix_tokens=PREFIX, **options)
        x = torch.randn(BATCH, PREFIX + side * side, DIM)
        q, k, v = (t.detach().requires_grad_() for t in m.qkv_heads(x))
        row = dict(name=name, side=side, n=side * side)
        for impl in pair:
            attend = getattr(m, f"attend_{impl}")
            call_mod = _Attend(attend, q, k, v)
            for key, value in measure_call(call_mod, q, (side, side)).items():
                row[f"{impl}_{key}"] = value
        rows.append(row)
        progress(f"{name} {side}x{side}: " + ", ".join(
            f"{impl} {row[f'{impl}_fwdbwd_s'] * 1e3:.0f} ms" for impl in pair))
    return rows


class _Attend(torch.nn.Module):
    """attend(q, k, v, grid) as a module of q (k and v fixed leaves) for measure_call."""

    def __init__(self, attend, q, k, v):
        super().__init__()
        self.attend, self.k, self.v = attend, k, v

    def forward(self, q, grid):
        return self.attend(q, self.k, self.v, grid)


def crossover(rows, quad: str, lin: str, key: str) -> tuple[float, bool]:
    """Grid tokens where lin's `key` (time or peak) meets quad's: (N, measured?)."""
    ratio = [(r["n"], r[f"{lin}_{key}"] / r[f"{quad}_{key}"]) for r in rows]
    for (n0, r0), (n1, r1) in zip(ratio, ratio[1:]):
        if r0 > 1 >= r1:  # interpolate in log-log between the bracketing grids
            t = math.log(r0) / (math.log(r0) - math.log(r1))
            return math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))), True
    n, r = ratio[-1]
    return (n * r if r > 1 else ratio[0][0]), False  # ratio ~ 1/N beyond the last grid


def _sides(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("--grids", default="14,56", help="token grid sides of the table")
    p.add_argument("--ripple-grids", default="14,28,42,56", help="grid sides of ripple's crossover sweep")
    p.add_argument("--rpe-grids", default="14,28,42",
                   help="grid sides of rpe_linear's crossover sweep (its FFT form needs ~4 GiB at 42)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--tag", default="baselines-cpu")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    memory.timing_mode()
    grids = _sides(args.grids)
    t0 = time.perf_counter()

    def progress(msg):
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    rows = table_rows(grids, progress)
    cross = {"ripple": crossover_rows("ripple", ("quadratic", "dp"), _sides(args.ripple_grids), progress),
             "rpe_linear": crossover_rows("rpe_linear", ("explicit", "fft"), _sides(args.rpe_grids),
                                          progress)}
    head = dict(torch=torch.__version__, threads=args.threads, cpu=platform.processor() or
                platform.machine(), command=" ".join(["python -m bench.baselines", *argv]),
                memory_method=memory.cpu_method(), dim=DIM, heads=HEADS, batch=BATCH, prefix=PREFIX)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps(
        {"head": head, "rows": rows, "crossover": cross}, indent=1))
    from .baselines_report import markdown
    (args.out / f"{args.tag}.md").write_text(markdown(head, rows, cross))
    progress(f"wrote {args.out / args.tag}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
