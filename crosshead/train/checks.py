"""Refusals before any work: flag values (argparse errors, exit 2), then what depends on files (the
checkpoint, ``--out``, the data): ``Refusal`` (a SystemExit with the message, exit 1).

Nothing here writes anything; every check runs before the first byte of a run is written.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from . import checkpoint, distributed
from . import data as datasets

# integer flag: lowest allowed value (None, where a flag defaults to it, means unset)
INTS = {"epochs": 1, "batch_size": 1, "train_size": 1, "test_size": 1, "image_size": 1, "limit_test": 1,
        "max_steps_per_epoch": 1, "workers": 0, "log_every": 0}
# flag: (low, high, low inclusive, high inclusive); every float must also be finite
FLOATS = {"lr": (0, math.inf, False, False), "weight_decay": (0, math.inf, True, False),
          "min_lr_ratio": (0, 1, True, True), "warmup_epochs": (0, math.inf, True, False),
          "clip_grad": (0, math.inf, False, False), "smoothing": (0, 1, True, False),
          "drop_path": (0, 1, True, False)}
PATHFINDER_ONLY = ("cache_dir",)
FOLDER_DATA = ("cifar10", "cifar100", "imagefolder")


class Refusal(SystemExit):
    """A run refused before any work; the message says why and what to do instead."""

    def __init__(self, msg: str):
        super().__init__(f"python -m crosshead.train: error: {msg}")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def validate(ap: argparse.ArgumentParser, args) -> None:
    """``ap.error`` (exit 2, naming the flag) for values that cannot mean anything; ``None`` is "unset"
    where a flag has no default (e.g. no --clip-grad: no clipping; no --limit-test: the whole test set)."""
    for dest, low in INTS.items():
        v = getattr(args, dest)
        if v is not None and v < low:
            ap.error(f"{_flag(dest)} must be {'positive' if low == 1 else '>= 0'}, got {v}")
    for dest, (lo, hi, lo_in, hi_in) in FLOATS.items():
        v = getattr(args, dest)
        if v is None:
            continue
        ok = math.isfinite(v) and (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
        if not ok:
            rng = f"{'[' if lo_in else '('}{lo}, {hi if math.isfinite(hi) else 'inf'}{']' if hi_in else ')'}"
            ap.error(f"{_flag(dest)} must be a finite number in {rng}, got {v}"
                     + (" (leave it out for no clipping)" if dest == "clip_grad" else ""))
    if args.landmarks is not None and min(args.landmarks) < 1:
        ap.error(f"--landmarks must be positive, got {args.landmarks}")
    if args.model_kwargs is not None and not isinstance(args.model_kwargs, dict):
        ap.error(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    _device(ap, args.device)
    if args.eval_only:
        if not (args.checkpoint or args.resume):
            ap.error("--eval-only needs --checkpoint PATH")
        if args.checkpoint and args.resume and args.checkpoint != args.resume:
            ap.error("--eval-only with both --checkpoint and --resume: give one")
    elif args.checkpoint:
        ap.error("--checkpoint is read by --eval-only only; to continue training from it use --resume")


def _device(ap, device: str) -> None:
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        ap.error(f"--device {device!r} is not a device (auto, cpu, cuda or cuda:N)")
    if dev.type == "cpu":
        return
    backend = getattr(torch, dev.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        why = (f"torch {torch.__version__} is a CPU-only build" if dev.type == "cuda" and not torch.version.cuda
               else f"no {dev.type} device is available")
        ap.error(f"--device {device}: {why}; use --device cpu (or auto)")
    if dev.index is not None and dev.index >= backend.device_count():
        ap.error(f"--device {device}: only {backend.device_count()} {dev.type} device(s)")


def given(make_parser, argv) -> set[str]:
    """The dests of the flags written on the command line (whatever their values)."""
    probe = make_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def adopt(args, saved: dict, keys, given_: set[str], path) -> None:
    """Takes ``keys`` (the model and data flags) from a checkpoint's arguments; refuses a flag written on
    the command line with another value, since the checkpoint's model and data cannot change."""
    for k in keys:
        if k in given_ and getattr(args, k) != saved.get(k):
            raise Refusal(f"{_flag(k)} {getattr(args, k)!r} differs from checkpoint {path}'s {saved.get(k)!r}: the "
                          "model and data flags come from the checkpoint; leave the flag out (or write the "
                          "checkpoint's value), or start a new run in a new --out")
        if k in saved:
            setattr(args, k, saved[k])


def data_flags(args) -> None:
    """Flags that the data set would silently ignore."""
    if args.data_dir and args.dataset not in FOLDER_DATA:
        raise Refusal(f"--data-dir is not read by --dataset {args.dataset} (only by {', '.join(FOLDER_DATA)})")
    for dest in PATHFINDER_ONLY:
        if getattr(args, dest) and not args.dataset.startswith("pathfinder"):
            raise Refusal(f"{_flag(dest)} is read by the pathfinder data sets only, not {args.dataset}")


def epochs_left(args, done: int, path) -> None:
    if args.epochs <= done:
        raise Refusal(f"checkpoint {path} has finished {done} epoch(s) and --epochs is the total: --epochs "
                      f"{args.epochs} leaves nothing to train; give a total above {done}")


def out_dir(out: Path, resume: str | None) -> None:
    """Never overwrite or delete another run's log or checkpoint."""
    ours = [p.name for p in (out / "log.jsonl", out / "last.pt") if p.exists()]
    if not ours:
        return
    held = " and ".join(ours)
    if resume is None:
        raise Refusal(f"--out {out} already holds {held} of an earlier run, which this run would overwrite; "
                      f"nothing was changed. Pass --resume {out / 'last.pt'} to continue that run, or a new or "
                      "empty --out (or move the files away yourself)")
    last = out / "last.pt"
    if not (last.exists() and os.path.samefile(last, resume)):
        raise Refusal(f"--out {out} holds {held}, which this run from checkpoint {resume} would overwrite or "
                      f"mix into; resume with --out set to that checkpoint's directory (its last.pt), or a new "
                      "or empty --out")


def gather(d: distributed.Dist, fn):
    """Runs the checks in ``fn`` on every rank; all refuse if any does (before anyone writes)."""
    result, problem = None, None
    try:
        result = fn()
    except Refusal as e:
        problem = e.code
    first = next((p for p in distributed.all_gather_object(d, problem) if p), None)
    if first:
        raise SystemExit(first)
    return result


def load(path) -> dict:
    """The verified checkpoint (checkpoint.load), or a Refusal naming the file."""
    try:
        return checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise Refusal(str(e)) from e


def data(args) -> None:
    """Data flags that would be ignored, and what can be checked of the data set before loading it."""
    data_flags(args)
    try:
        datasets.check(args.dataset, args.data_dir)
    except datasets.DataError as e:
        raise Refusal(str(e)) from e


def restore(ckpt, path, d, **objects) -> int:
    """checkpoint.restore, or a Refusal if the checkpoint's parameters or moments are not finite."""
    try:
        return checkpoint.restore(ckpt, d, path=path, **objects)
    except checkpoint.CheckpointError as e:
        raise Refusal(str(e)) from e
