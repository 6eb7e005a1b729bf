"""``python -m bench.quality``: train the grid of a configuration, then write its results.

    python -m bench.quality --config cpu                      # the CPU grid, resumable; then the report
    python -m bench.quality --config cpu --report-only        # the report from the runs done so far
    python -m bench.quality --config gpu                      # one H100/H200, 8 runs sharing it
    python -m bench.quality --list --config cpu               # the runs and their state, nothing trained

Runs go to ``--runs`` (default ``runs/quality-<config>``), results to ``--out`` (default
``docs/results/quality-<config>``): ``summary.json``, ``table.md``, the plots, ``logs/`` (each run's
``log.jsonl``) and ``command.txt`` (the training calls).
Stop it at any time: a new call skips the runs done and resumes the one in flight from its last epoch.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path

from . import configs, grid, presets, report


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", default="cpu", choices=sorted(presets.CONFIGS), help="the grid")
    ap.add_argument("--runs", default=None, help="run folders (default runs/quality-<config>)")
    ap.add_argument("--out", default=None, help="results folder (default docs/results/quality-<config>)")
    ap.add_argument("--jobs", type=int, default=None, help="runs at once (default: the configuration's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the configuration's)")
    ap.add_argument("--study", action="append", default=None, help="only the runs of this study (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds")
    ap.add_argument("--limit", type=int, default=None, help="run at most this many runs, then report")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep last.pt of finished runs")
    ap.add_argument("--report-only", action="store_true", help="train nothing; report the runs done")
    ap.add_argument("--list", action="store_true", help="print the runs and their state; train nothing")
    return ap


def _positive(ap, name, value):
    if value is not None and value < 1:
        ap.error(f"{name} must be >= 1, got {value}")


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    for name in ("jobs", "threads", "limit"):
        _positive(ap, f"--{name}", getattr(args, name))
    cfg = presets.CONFIGS[args.config]
    studies = {s.name for s in cfg.studies}
    for s in args.study or ():
        if s not in studies:
            ap.error(f"--study {s!r} is not a study of --config {cfg.name}: {sorted(studies)}")
    for s in args.seeds or ():
        if s not in cfg.seeds:
            ap.error(f"--seeds {s} is not a seed of --config {cfg.name}: {list(cfg.seeds)}")
    runs_dir = Path(args.runs or f"runs/quality-{cfg.name}")
    out = Path(args.out or f"docs/results/quality-{cfg.name}")
    chosen = presets.selector(cfg, args.study, args.seeds)
    if args.list:
        for r in configs.runs(cfg):
            if chosen(r):
                print(f"{grid.status(r, runs_dir / r.key):8s} {r.key}")
        return 0
    if not args.report_only:
        # SIGTERM (a time limit, a scheduler) stops the grid like Ctrl-C: the runs in flight too
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        t0 = time.perf_counter()
        print(f"config {cfg.name}: {cfg.note}", flush=True)
        grid.run_grid(cfg, runs_dir, jobs=args.jobs, threads=args.threads, only=chosen, limit=args.limit,
                      keep_checkpoints=args.keep_checkpoints, log=lambda m: print(m, flush=True))
        print(f"grid call took {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    summary = report.write(cfg, runs_dir, out)
    if not args.report_only:  # the command that trained; a report-only call leaves it
        with open(out / "command.txt", "a") as f:
            f.write("python -m bench.quality " + shlex.join(sys.argv[1:] if argv is None else argv) + "\n")
    done = {r["key"] for st in summary["studies"] for c in st["cells"] for r in c.get("runs", ())}
    print(f"report: {out}/table.md ({len(done)} runs)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
