"""Running a grid: each run in its own ``python -m crosshead.train`` process, resumable, skipped when done.

A run's folder is ``RUNS/<task>/<attention>-h<heads>/seed<seed>/`` with ``log.jsonl`` (crosshead.train's
records), ``stdout.log`` and, while it is unfinished, ``last.pt``. A run is *done* when its log holds
an epoch record for every planned epoch and it was made with the planned flags; a done run is
skipped. An unfinished one with a checkpoint is resumed from it (``--resume``, exact: the same
weights, optimiser and RNG state as an uninterrupted run); one without a checkpoint (stopped inside
its first epoch) starts again. A folder holding a run made with other flags (the number of epochs
included) is refused, not overwritten: the grid's configuration changed under it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import configs


class GridError(RuntimeError):
    pass


_live: set = set()  # the crosshead.train processes in flight
_live_lock = threading.Lock()


def stop_runs() -> None:
    """Terminates every run in flight (a stopped grid leaves no process behind; each run resumes from
    its last checkpoint)."""
    with _live_lock:
        procs = list(_live)
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def _planned_args(run: configs.Run) -> dict:
    """The crosshead.train arguments of the run as its config record stores them."""
    from crosshead.train import cli

    return vars(cli.parser().parse_args(configs.train_argv(run)))


_COMPARED = ("model", "attn", "model_kwargs", "landmarks", "dataset", "image_size", "seed", "epochs", "batch_size",
             "lr", "warmup_epochs", "weight_decay", "train_size", "test_size", "drop_path", "min_lr_ratio",
             "smoothing", "clip_grad", "amp", "max_steps_per_epoch", "no_augment", "limit_test")


def mismatch(run: configs.Run, records: list[dict]) -> dict:
    """Flags of the run's first config record that differ from the grid's plan (empty: it is this run)."""
    cfg = next((r for r in records if r.get("kind") == "config"), None)
    if cfg is None:
        return {}
    planned, made = _planned_args(run), cfg["args"]
    return {k: {"made": made.get(k), "planned": planned[k]} for k in _COMPARED if made.get(k) != planned[k]}


def epochs_logged(records: list[dict]) -> set[int]:
    return {r["epoch"] for r in records if r.get("kind") == "epoch"}


def status(run: configs.Run, folder: Path) -> str:
    """``done``, ``resume`` (checkpoint to continue from), ``start`` (nothing usable) or ``refused``."""
    records = read_log(folder / "log.jsonl")
    if records and mismatch(run, records):
        return "refused"
    if set(range(run.task.epochs)) <= epochs_logged(records):
        return "done"
    return "resume" if (folder / "last.pt").exists() else "start"


def command(run: configs.Run, runs_dir: Path, state: str) -> list[str]:
    """The run's crosshead.train process: its flags, its folder, the shared data cache, and --resume
    when it continues."""
    folder = runs_dir / run.key
    argv = [sys.executable, "-m", "crosshead.train", *configs.train_argv(run), "--out", str(folder)]
    if state == "resume":
        argv += ["--resume", str(folder / "last.pt")]
    if run.task.dataset.startswith("pathfinder"):
        argv += ["--cache-dir", str(runs_dir / "data")]
    return argv


def execute(run: configs.Run, runs_dir: Path, *, threads: int, keep_checkpoints: bool = False) -> dict:
    """Brings one run to done; returns its last epoch's test accuracy, its epochs and ``state`` (what was
    done: ``start``, ``resume`` or ``done`` when there was nothing to do)."""
    folder = runs_dir / run.key
    state = status(run, folder)
    if state == "refused":
        diff = mismatch(run, read_log(folder / "log.jsonl"))
        raise GridError(f"{folder} holds a run made with other flags than this grid's {diff}; move it away "
                        "or use another --runs folder")
    if state == "start" and folder.exists():
        shutil.rmtree(folder)  # stopped inside its first epoch: nothing to resume from
    if state != "done":
        folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   PYTHONUNBUFFERED="1")
        with open(folder / "stdout.log", "a") as out:
            proc = subprocess.Popen(command(run, runs_dir, state), stdout=out, stderr=subprocess.STDOUT, env=env)
            with _live_lock:
                _live.add(proc)
            try:
                proc.wait()
            finally:
                with _live_lock:
                    _live.discard(proc)
        if proc.returncode != 0:
            tail = (folder / "stdout.log").read_text().splitlines()[-5:]
            raise GridError(f"{run.key}: crosshead.train exited {proc.returncode}:\n  " + "\n  ".join(tail))
        if status(run, folder) != "done":
            raise GridError(f"{run.key}: crosshead.train finished but its log lacks epochs of the "
                            f"{run.task.epochs} planned")
    if not keep_checkpoints and (folder / "last.pt").exists():
        (folder / "last.pt").unlink()
    last = max((r for r in read_log(folder / "log.jsonl") if r.get("kind") == "epoch"), key=lambda r: r["epoch"])
    return {"test_acc": last["test_acc"], "epochs": last["epoch"] + 1, "state": state}


def _pathfinder_splits(selected: list[configs.Run]) -> list[tuple]:
    out = []
    for r in selected:
        t = r.task
        if t.dataset.startswith("pathfinder"):
            size = int(t.dataset[len("pathfinder"):])
            for split, n in (("train", t.train_size), ("test", t.test_size)):
                if (n, size, r.seed, split) not in out:
                    out.append((n, size, r.seed, split))
    return out


def prepare_data(runs_dir: Path, selected: list[configs.Run], jobs: int) -> None:
    """Generates each Pathfinder split the runs need once into the shared cache (``jobs`` processes),
    before runs race to make it."""
    from crosshead.train import pathfinder

    splits = _pathfinder_splits(selected)
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, min(jobs, len(splits) or 1))) as pool:
        for f in [pool.submit(pathfinder.cached, *s, runs_dir / "data") for s in splits]:
            f.result()


def run_grid(cfg: configs.Config, runs_dir: Path, *, jobs: int | None = None, threads: int | None = None,
             only=None, limit: int | None = None, keep_checkpoints: bool = False, log=print) -> list[dict]:
    """Runs every selected run of ``cfg`` not yet done, ``jobs`` at a time; prints progress and an ETA.

    ``only``: a predicate on runs; ``limit``: stop after starting this many (to split a grid by time).
    """
    jobs = jobs or cfg.jobs
    threads = threads or cfg.threads
    selected = [r for r in configs.runs(cfg) if only is None or only(r)]
    todo = [r for r in selected if status(r, runs_dir / r.key) != "done"]
    refused = {r.key: mismatch(r, read_log(runs_dir / r.key / "log.jsonl")) for r in todo
               if status(r, runs_dir / r.key) == "refused"}
    if refused:
        raise GridError(f"run folders made with other flags than this grid's (made vs planned): {refused}; "
                        "move them away or use another --runs folder")
    if limit is not None:
        todo = todo[:limit]
    log(f"{len(selected)} runs selected, {len(selected) - len(todo)} done or left for later, {len(todo)} to run "
        f"({jobs} at a time, {threads} thread(s) each)")
    prepare_data(runs_dir, todo, jobs)
    results, lock, t0 = [], threading.Lock(), time.perf_counter()

    def one(r):
        started = time.perf_counter()
        res = execute(r, runs_dir, threads=threads, keep_checkpoints=keep_checkpoints)
        with lock:
            results.append(res)
            k = len(results)
            elapsed = time.perf_counter() - t0
            eta = elapsed / k * (len(todo) - k)
            log(f"[{k}/{len(todo)}] {r.key}: {res['state']} -> test acc {res['test_acc']:.4f} in "
                f"{time.perf_counter() - started:.0f}s | elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min")
        return res

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(one, r) for r in todo]
    try:
        for f in concurrent.futures.as_completed(futures):
            f.result()
    except BaseException as e:
        pool.shutdown(wait=False, cancel_futures=True)  # the first failure stops the grid: no new run starts
        if not isinstance(e, GridError):  # interrupted (Ctrl-C, SIGTERM): the runs in flight stop too
            stop_runs()
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)
    return results
