"""Checkpoints with exact resume: model, optimizer, scheduler, grad scaler, epoch and every rank's RNG."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from . import distributed

FORMAT = 1


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(path: str | os.PathLike, d: distributed.Dist, *, model, optimizer, scheduler, scaler, epoch: int,
         args: dict, extra: dict | None = None) -> None:
    """Collective (every rank must call it: RNG states are gathered); rank 0 writes atomically."""
    rngs = distributed.all_gather_object(d, rng_state())
    if not d.main:
        return
    ckpt = {"format": FORMAT, "epoch": epoch, "args": args, "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "rng": rngs, "world_size": d.world_size, "extra": extra or {}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load(path: str | os.PathLike) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def restore(ckpt: dict, d: distributed.Dist, *, model, optimizer=None, scheduler=None, scaler=None,
            rng: bool = True) -> int:
    """Loads the state into the given objects; returns the epoch the checkpoint ended (next = +1)."""
    model.load_state_dict(ckpt["model"])
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if rng:
        states = ckpt["rng"]
        if len(states) != d.world_size and d.main:
            print(f"warning: checkpoint from {len(states)} ranks resumed on {d.world_size}: RNG streams of "
                  "rank 0 reused, so the run is not bit-exact")
        set_rng_state(states[d.rank] if d.rank < len(states) else states[0])
    return int(ckpt["epoch"])
