"""python -m bench: speed, peak memory and scaling in N of crosshead's iMHSA and its alternatives,
side by side in one run. See bench/README.md, or --help.

The driver builds nothing itself: each contender runs in a worker process (bench/worker.py) that
measures its points in ascending N and reports them line by line, under a watchdog that kills it
when its resident memory passes the cap or a point passes the timeout. A point that fails gets a
reason, and so do the larger points of that contender and pass it would have failed too.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
GiB = 1 << 30


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())


def parse_args(argv=None) -> argparse.Namespace:
    from .config import PASSES

    from . import contenders

    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: grids 14 and 28, few repeats (under 3 minutes on 2 cores)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--grids", type=_ints, default=None,
                   help="token grid sides, N = side²; default 14..128 on CPU, 14..224 on GPU")
    p.add_argument("--batch", type=int, default=None, help="default 1 on CPU, 4 on GPU")
    p.add_argument("--heads", type=int, default=None, help="default 4 on CPU, 8 on GPU")
    p.add_argument("--head-dim", type=int, default=None, help="default 32 on CPU, 64 on GPU")
    p.add_argument("--landmarks", type=_ints, default=(7, 7), help="iMHSA landmark grid Lh,Lw")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="default float32 on CPU, bfloat16 on GPU")
    p.add_argument("--mix", choices=("post", "pre"), default="post")
    p.add_argument("--passes", default=",".join(PASSES), help="fwd and/or fwdbwd")
    p.add_argument("--contenders", default="all",
                   help=f"comma list from: {', '.join(contenders.names())}, baselines/<name>")
    p.add_argument("--with-baselines", action="store_true",
                   help="add every crosshead.baselines mechanism as a module-level contender")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads; default: every core (1 with --quick)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole sweep this many times, contenders in turn, and report per "
                        "point the round with the median time (steadier ratios on a shared machine)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="CPU timer: wall time, or the timing thread's CPU time (needs --threads 1; "
                        "on a shared machine it leaves out the time other processes hold the core)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--min-reps", type=int, default=None)
    p.add_argument("--max-reps", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="seconds of repeats per point")
    p.add_argument("--timeout", type=float, default=None, help="seconds per point before it is killed")
    p.add_argument("--mem-cap", type=float, default=None,
                   help="GiB of resident memory a CPU worker may reach; default 75%% of what is available")
    p.add_argument("--performer-features", type=int, default=0)
    p.add_argument("--nystrom-landmarks", type=int, default=0)
    p.add_argument("--linformer-k", type=int, default=256)
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    p.add_argument("--tag", default=None, help="file name prefix; default cpu / cuda-<gpu>, +-quick")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def make_config(args):
    import torch

    from . import contenders, memory
    from .config import CPU_GRIDS, GPU_GRIDS, Config

    device = args.device
    if device == "auto":
        device = "cuda" if (torch.cuda.is_available() and not args.quick) else "cpu"
    gpu = device == "cuda"
    quick = args.quick

    def pick(value, cpu, cuda, quick_value=None):
        if value is not None:
            return value
        if quick and quick_value is not None:
            return quick_value
        return cuda if gpu else cpu

    names = contenders.names() if args.contenders == "all" else [
        n.strip() for n in args.contenders.split(",") if n.strip()]
    if args.with_baselines:
        names += [n for n in contenders.baseline_contenders() if n not in names]
    for n in names:
        contenders.get(n)  # unknown names fail here, before anything runs
    cap = args.mem_cap * GiB if args.mem_cap else int(0.75 * memory.available_bytes())
    threads = args.threads or (1 if quick else len(os.sched_getaffinity(0)))
    if args.clock == "cpu" and (gpu or threads != 1):
        raise SystemExit("--clock cpu times one CPU thread: it needs --device cpu and --threads 1")
    return Config(
        device=device, dtype=pick(args.dtype, "float32", "bfloat16"),
        batch=pick(args.batch, 1, 4), heads=pick(args.heads, 4, 8), head_dim=pick(args.head_dim, 32, 64),
        landmarks=tuple(args.landmarks), mix=args.mix,
        grids=tuple(sorted(pick(args.grids, CPU_GRIDS, GPU_GRIDS, (14, 28)))),
        passes=tuple(p.strip() for p in args.passes.split(",") if p.strip()),
        threads=threads, clock=args.clock, rounds=max(1, args.rounds),
        warmup=pick(args.warmup, 1, 3, 1), min_reps=pick(args.min_reps, 3, 10, 3),
        max_reps=pick(args.max_reps, 20, 50, 10), budget_s=pick(args.budget, 1.0, 1.0, 0.2),
        timeout_s=pick(args.timeout, 420.0, 240.0, 60.0), mem_cap_bytes=int(cap),
        contenders=tuple(names), performer_features=args.performer_features,
        nystrom_landmarks=args.nystrom_landmarks, linformer_k=args.linformer_k)


# ------------------------------------------------------------------------------------ the driver


class Worker:
    """One worker process and a thread that forwards its tagged stdout lines to a queue."""

    def __init__(self, cfg, name: str, points: list):
        from .worker import TAG

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        spec = json.dumps({"config": cfg.to_dict(), "contender": name, "points": points})
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.worker", spec], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.events: queue.Queue = queue.Queue()

        def pump():
            for line in self.proc.stdout:
                if line.startswith(TAG):
                    self.events.put(json.loads(line[len(TAG):]))
            self.events.put(None)
        threading.Thread(target=pump, daemon=True).start()

    def stderr_tail(self, n: int = 400) -> str:
        self.stderr.seek(0)
        text = self.stderr.read().strip()
        return " ".join(text[-n:].split())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _points_record(cfg, c, side, pass_, **fields) -> dict:
    from . import contenders

    return {"contender": c.name, "level": c.level, "what": contenders.describe(c, cfg), "side": side,
            "n": side * side, "pass": pass_, **fields}


def run_contender(cfg, c, on_point) -> list[dict]:
    """Every (side, pass) point of one contender: a figure or a reason each."""
    records: dict[tuple, dict] = {}
    reason = c.why_not(cfg)
    points = [(s, p) for s in cfg.grids for p in cfg.passes]
    if reason:
        for s, p in points:
            records[(s, p)] = _points_record(cfg, c, s, p, status="unavailable", reason=reason)
            on_point()
        return [records[k] for k in points]

    e = 4  # maps are float32 whatever the input dtype (math SDPA on CPU; conservative on GPU)
    pending = []
    for s, p in points:
        maps = c.maps[0 if p == "fwd" else 1]
        need = maps * cfg.batch * cfg.heads * (s * s) ** 2 * e
        if cfg.mem_cap_bytes and need > cfg.mem_cap_bytes:
            records[(s, p)] = _points_record(
                cfg, c, s, p, status="skipped",
                reason=f"needs about {need / GiB:.1f} GiB for its N×N maps ({maps:g} × B·h·N² float32), "
                       f"over the memory cap of {cfg.mem_cap_bytes / GiB:.1f} GiB")
            on_point()
        else:
            pending.append((s, p))

    def give_up(side, pass_, why):
        for s, p in list(pending):
            if p == pass_ and s > side:
                pending.remove((s, p))
                records[(s, p)] = _points_record(cfg, c, s, p, status="skipped",
                                                 reason=f"not tried: N={side * side} already failed ({why})")
                on_point()

    while pending:
        w = Worker(cfg, c.name, [list(x) for x in pending])
        current, started = None, time.monotonic()
        limit = cfg.timeout_s + 120  # the first point also pays for starting python and torch
        fail = None
        while True:
            try:
                ev = w.events.get(timeout=0.1)
            except queue.Empty:
                ev = "tick"
            if ev is None:  # stdout closed: the worker exited
                w.proc.wait()
                if current is not None:
                    rc = w.proc.returncode
                    why = ("killed by the operating system (out of memory?)" if rc in (-9, 137)
                           else f"worker exited with code {rc}: {w.stderr_tail()}")
                    fail = (current, why)
                break
            if ev != "tick":
                key = (ev["side"], ev["pass_"])
                if ev["event"] == "start":
                    current, started, limit = key, time.monotonic(), cfg.timeout_s
                    continue
                current = None
                pending.remove(key)
                if ev["event"] == "result":
                    fields = {k: v for k, v in ev.items() if k not in ("event", "side", "pass_")}
                    records[key] = _points_record(cfg, c, *key, status="ok", **fields)
                else:
                    records[key] = _points_record(cfg, c, *key, status="failed", reason=ev["reason"])
                    if ev.get("fatal"):
                        give_up(*key, ev["reason"])
                on_point()
                continue
            rss = 0 if cfg.device == "cuda" else _rss(w.proc.pid)
            if cfg.mem_cap_bytes and rss > cfg.mem_cap_bytes:
                fail = (current, f"resident memory passed the cap of {cfg.mem_cap_bytes / GiB:.1f} GiB "
                                 "(worker killed)")
            elif time.monotonic() - started > limit:
                fail = (current, f"timed out after {limit:.0f} s (worker killed)")
            if fail:
                w.kill()
                break
        w.kill()
        if fail:
            key, why = fail
            if key is None:  # died before its first point
                key = pending[0]
            pending.remove(key)
            records[key] = _points_record(cfg, c, *key, status="failed", reason=why)
            on_point()
            give_up(*key, why)
    return [records[k] for k in points]


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One record per point from the same point's record in every round: the round with the median
    time among those with a figure (its own p20/p80, repeats and memory), with every round's median
    in round_medians_s; the first round's record where no round has a figure."""
    if len(rounds) == 1:
        return rounds[0]
    out = []
    for same in zip(*rounds):
        ok = sorted((r for r in same if r["status"] == "ok"), key=lambda r: r["median_s"])
        if not ok:
            out.append(same[0])
            continue
        out.append({**ok[(len(ok) - 1) // 2], "round_medians_s": [r.get("median_s") for r in same]})
    return out


def _rss(pid: int) -> int:
    from .memory import rss_bytes
    return rss_bytes(pid)


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        return tqdm(total=total, unit="pt", disable=not enabled, file=sys.stderr, dynamic_ncols=True)

    class Plain:
        n = 0

        def update(self, k=1):
            self.n += k
            if enabled:
                print(f"  {self.n}/{total} points", file=sys.stderr, flush=True)

        def set_description(self, text):
            if enabled:
                print(text, file=sys.stderr, flush=True)

        def close(self):
            pass
    return Plain()


def add_costs(cfg, records: list[dict], roof: dict) -> None:
    from . import contenders, costs

    for r in records:
        kind = contenders.get(r["contender"]).cost_kind
        if kind is None:
            continue
        flops, nbytes = costs.cost(cfg, r["n"], kind, r["pass"])
        r["flops"], r["bytes"] = flops, nbytes
        if r["status"] == "ok":
            t = r["median_s"]
            r["tflops_per_s"] = flops / t / 1e12
            r["gbytes_per_s"] = nbytes / t / 1e9
            roof_t = max(flops / roof["matmul_flops"], nbytes / roof["copy_bandwidth_Bps"])
            r["roofline_s"] = roof_t
            r["roofline_fraction"] = roof_t / t


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from . import contenders, machine, report

    cfg = make_config(args)
    torch.set_num_threads(cfg.threads)
    tag = args.tag or ("cpu" if cfg.device == "cpu" else
                       "cuda-" + torch.cuda.get_device_name(0).lower().replace("nvidia", "").strip()
                       .replace(" ", "-")) + ("-quick" if args.quick else "")
    t_start = time.time()
    head = machine.header(cfg.device, cfg.threads)
    print(report.header_text(head, cfg), flush=True)
    roof = machine.rooflines(cfg.device, cfg.dtype, cfg.clock)
    print(report.roofline_text(roof), flush=True)

    if cfg.device == "cuda":  # the pre-flight estimates are against the GPU's memory (OOM is caught)
        cfg.mem_cap_bytes = int(args.mem_cap * GiB) if args.mem_cap else head["gpu_memory_bytes"]
    todo = [contenders.get(n) for n in cfg.contenders]
    bar = _progress(cfg.rounds * len(todo) * len(cfg.grids) * len(cfg.passes), not args.no_progress)
    rounds = []
    for r in range(cfg.rounds):
        rounds.append([])
        for c in todo:
            bar.set_description(c.name if cfg.rounds == 1 else f"round {r + 1}: {c.name}")
            rounds[-1] += run_contender(cfg, c, lambda: bar.update(1))
    bar.close()
    records = merge_rounds(rounds)
    add_costs(cfg, records, roof)
    results = {"machine": head, "config": cfg.to_dict(), "roofline": roof, "records": records,
               "comparison": report.comparison(records), "pure_torch": report.pure_torch(records),
               "wall_s": time.time() - t_start,
               "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])}
    paths = report.write_all(results, args.out, tag, plots=not args.no_plots)
    print(report.comparison_text(results["comparison"]))
    if results["pure_torch"]:
        print(report.pure_torch_text(results["pure_torch"]))
    print(f"wrote {', '.join(str(p) for p in paths)} in {results['wall_s']:.0f} s")
    return 0
