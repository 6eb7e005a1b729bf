"""Checkpoints with exact resume: model, optimizer, scheduler, grad scaler, epoch and every rank's RNG.

A checkpoint is a ``torch.save`` dict written atomically (temporary file, fsync, rename). Format 2
adds ``sha256``: a digest of the content (every tensor's dtype, shape and bytes, every other value's
repr, dict keys sorted), so it does not depend on how torch lays out the file. ``load`` recomputes it
and refuses a checkpoint whose content changed on disk; ``restore`` refuses non-finite parameters or
optimizer moments. Format 1 (no digest) is still read, with a warning.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from . import distributed

FORMAT = 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, unreadable, altered on disk, or non-finite."""


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


def _feed(h, x) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(x, np.ndarray):
        h.update(f"A{x.dtype.str}{x.shape}\0".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    elif isinstance(x, dict):
        h.update(f"D{len(x)}\0".encode())
        for k in sorted(x, key=repr):
            _feed(h, k)
            _feed(h, x[k])
    elif isinstance(x, (list, tuple)):
        h.update(f"{type(x).__name__}{len(x)}\0".encode())
        for v in x:
            _feed(h, v)
    else:  # None, bool, int, float (repr round-trips), str, bytes, numpy scalars, torch.Size/dtype...
        h.update(f"{type(x).__name__}:{x!r}\0".encode())


def digest(content: dict) -> str:
    """SHA-256 of a checkpoint's content (all keys but ``sha256``)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in content.items() if k != "sha256"})
    return h.hexdigest()


def nonfinite(model, optimizer=None) -> list[str]:
    """Names of parameters and optimizer state tensors holding NaN or inf (buffers, e.g. masks, may)."""
    bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    if optimizer is not None:
        names = {p: n for n, p in model.named_parameters()}
        for p, st in optimizer.state.items():
            for k, v in st.items():
                if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
                    bad.append(f"optimizer {k} of {names.get(p, '?')}")
    return bad


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
    ckpt["sha256"] = digest(ckpt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | os.PathLike) -> dict:
    """The checkpoint's content, verified against its digest; CheckpointError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or damaged zip/pickle: torch raises many types
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupted?): "
                              f"{type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"{path} is not a crosshead.train checkpoint")
    if ckpt["format"] == FORMAT and "sha256" in ckpt:
        if digest(ckpt) != ckpt["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: its content does not match the SHA-256 "
                                  "stored when it was written (changed on disk); use an intact copy")
    elif ckpt["format"] == 1 and "sha256" not in ckpt:
        print(f"warning: checkpoint {path} has format 1, which carries no checksum: it cannot be verified",
              flush=True)
    else:
        raise CheckpointError(f"checkpoint {path}: format {ckpt['format']!r} "
                              f"{'without' if 'sha256' not in ckpt else 'with'} a checksum is not one this "
                              f"version reads (1 without, {FORMAT} with)")
    return ckpt


def restore(ckpt: dict, d: distributed.Dist, *, model, optimizer=None, scheduler=None, scaler=None,
            rng: bool = True, path: str | os.PathLike = "checkpoint") -> int:
    """Loads the state into the given objects; returns the epoch the checkpoint ended (next = +1)."""
    model.load_state_dict(ckpt["model"])
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    bad = nonfinite(model, optimizer)
    if bad:
        raise CheckpointError(f"{path} holds non-finite values in {', '.join(bad[:5])}"
                              f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}")
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
