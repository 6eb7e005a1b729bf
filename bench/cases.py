"""What every contender is built from: a Case (one timed call and the tensors whose gradients it
fills) and the benchmark's random inputs, seeded per grid side so that every contender of a run
sees the same q, k, v and output gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import Config


@dataclass
class Case:
    """One (contender, N) point, built: forward() runs the call with autograd enabled; leaves are
    the tensors (inputs and parameters) whose .grad a forward+backward fills."""
    forward: Callable[[], torch.Tensor]
    leaves: list
    grad_out: torch.Tensor
    compiles: bool = False  # the first call compiles: the worker makes it before timing anything


def _dtype(cfg: Config) -> torch.dtype:
    return getattr(torch, cfg.dtype)


def _gen(cfg: Config, side: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(1000 + side)


def _randn(cfg, *shape, gen, requires_grad=True, scale=1.0):
    t = (torch.randn(*shape, generator=gen) * scale).to(device=cfg.device, dtype=_dtype(cfg))
    return t.requires_grad_(requires_grad)


def _qkv(cfg: Config, side: int):
    gen = _gen(cfg, side)
    shape = (cfg.batch, cfg.heads, side * side, cfg.head_dim)
    q, k, v = (_randn(cfg, *shape, gen=gen) for _ in range(3))
    return q, k, v, _randn(cfg, *shape, gen=gen, requires_grad=False)


def _no_gpu(cfg: Config) -> str | None:
    if cfg.device != "cuda":
        return "needs a CUDA GPU (this run is on CPU)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None
