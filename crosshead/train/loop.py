"""One training epoch and one evaluation pass (loss, accuracy, throughput), DDP-aware."""

from __future__ import annotations

import contextlib
import math
import sys
import time

import torch
import torch.nn.functional as F

from . import distributed

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def train_one_epoch(model, loader, optimizer, scheduler, scaler, d: distributed.Dist, *, epoch: int, amp: str = "none",
                    clip_grad: float | None = None, smoothing: float = 0.0, progress: bool = True,
                    log_every: int = 0, log_fn=None, max_steps: int | None = None) -> dict:
    model.train()
    dev = d.device
    loss_sum = correct = seen = 0.0
    t0 = time.perf_counter()
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    bar = _progress(loader, steps, f"epoch {epoch}", progress and d.main)
    for step, (x, y) in enumerate(bar):
        if step >= steps:
            break
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with autocast(dev, amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {step}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = y.shape[0]
        loss_sum += loss.item() * n
        correct += (logits.argmax(-1) == y).sum().item()
        seen += n
        if bar is not loader:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}",
                            img_s=f"{seen * d.world_size / (time.perf_counter() - t0):.0f}",
                            lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if log_every and log_fn and (step + 1) % log_every == 0:
            log_fn({"kind": "step", "epoch": epoch, "step": step + 1, "loss": loss.item(),
                    "lr": scheduler.get_last_lr()[0]})
    elapsed = time.perf_counter() - t0
    loss_sum, correct, seen = distributed.all_reduce_sum(d, [loss_sum, correct, seen])
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "train_images": int(seen), "train_img_per_s": seen / elapsed, "train_time_s": elapsed,
            "lr": scheduler.get_last_lr()[0]}


@torch.no_grad()
def evaluate(model, loader, d: distributed.Dist, *, amp: str = "none", progress: bool = True) -> dict:
    """Each rank evaluates its own shard (no padding); sums are reduced, so the result is exact."""
    model.eval()
    dev = d.device
    loss_sum = correct = seen = 0.0
    t0 = time.perf_counter()
    for x, y in _progress(loader, len(loader), "eval", progress and d.main):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with autocast(dev, amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        seen += y.shape[0]
    elapsed = time.perf_counter() - t0
    loss_sum, correct, seen = distributed.all_reduce_sum(d, [loss_sum, correct, seen])
    return {"test_loss": loss_sum / max(seen, 1), "test_acc": correct / max(seen, 1), "test_images": int(seen),
            "test_img_per_s": seen / max(elapsed, 1e-9)}
