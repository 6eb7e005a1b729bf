"""AdamW with decoupled weight decay groups, and a per-step linear warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No decay for 1-D parameters (norms, biases, layer scales) and the model's ``no_weight_decay()``
    names (position table, CLS token, the identity-initialised cross-head maps w_q/w_k)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith((".w_q", ".w_k")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


DECAY_GROUP = 0  # index of the decayed group in param_groups()


def build(model, *, lr: float, weight_decay: float, betas=(0.9, 0.999), total_steps: int, warmup_steps: int,
          min_lr_ratio: float = 0.01):
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, sched


def restart_at(opt, sched, *, lr: float, weight_decay: float, step: int) -> None:
    """After a checkpoint's optimizer and scheduler state is loaded: this command's peak ``lr`` and
    ``weight_decay``, and the schedule (the command's warm-up, length and floor: the lambda is not
    saved) at ``step``. With the saved values and step it reproduces exactly the loaded state."""
    opt.param_groups[DECAY_GROUP]["weight_decay"] = weight_decay
    sched.base_lrs = [lr] * len(opt.param_groups)
    sched.last_epoch = step
    for group, factor in zip(opt.param_groups, sched.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(step)  # as LambdaLR.get_lr: base_lr * lmbda(last_epoch)
    sched._last_lr = [group["lr"] for group in opt.param_groups]
