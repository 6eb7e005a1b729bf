"""Argument checks for the public API, with errors that name the argument."""

from __future__ import annotations

import math
import numbers

import torch

from ._op_checks import FLOAT_DTYPES as DTYPES, MIX_MODES


def _tensor(name, t, rank):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        shape = "(B, h, N, d)" if name in ("q", "k", "v", "x") else "(B, h, L, d)"
        raise ValueError(f"{name} must have {rank} dimensions {shape}, got shape {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
    if t.shape[3] < 1:  # d = 0: no features to pool or attend with (and d^-1/2 is infinite)
        raise ValueError(f"{name} has head dim d = 0 (shape {tuple(t.shape)}); d must be at least 1")


def _positive_ints(name, value, count):
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    if not (isinstance(value, (tuple, list, torch.Size)) and len(value) == count
            and all(isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, bool)
                    for v in value)):
        raise ValueError(f"{name} must be {'an int' if count == 1 else f'{count} ints'}, got {value!r}")
    if any(v < 1 for v in value):
        raise ValueError(f"{name} must be positive, got {tuple(value)}")
    return list(value)


def landmark_args(x, grid, size, prefix):
    """Checks landmarks() arguments; returns (grid, size) as the op's int lists."""
    _tensor("x", x, 4)
    if not isinstance(prefix, (numbers.Integral, torch.SymInt)) or isinstance(prefix, bool) or prefix < 0:
        raise ValueError(f"prefix must be a non-negative int, got {prefix!r}")
    n_grid = x.shape[2] - prefix
    if n_grid < 1:
        raise ValueError(f"prefix={prefix} leaves no grid tokens in x of shape {tuple(x.shape)}")
    if grid is None:
        if not isinstance(size, numbers.Integral):
            raise ValueError("with grid=None the tokens are a 1-D sequence and size must be an int L, "
                             f"got {size!r}; pass grid=(H, W) for 2-D landmarks")
        size = _positive_ints("size", size, 1)
        if size[0] > n_grid:
            raise ValueError(f"landmark size L={size[0]} is larger than the {n_grid} tokens to pool")
        return [], size
    grid = _positive_ints("grid", grid, 2)
    size = _positive_ints("size", size, 2)
    if grid[0] * grid[1] != n_grid:
        raise ValueError(f"grid {tuple(grid)} has {grid[0] * grid[1]} tokens but x has N - prefix = "
                         f"{x.shape[2]} - {prefix} = {n_grid}")
    if size[0] > grid[0] or size[1] > grid[1]:
        raise ValueError(f"landmark size {tuple(size)} is larger than the grid {tuple(grid)}")
    return grid, size


def imhsa_args(q, k, v, q_land, k_land, w_q, w_k, mix, scale):
    """Checks imhsa() arguments; returns the scale as a float."""
    for name, t in (("q", q), ("k", k), ("v", v), ("q_land", q_land), ("k_land", k_land)):
        _tensor(name, t, 4)
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)} (B, h, N, d), got {tuple(t.shape)}")
    if q_land.shape[:2] != q.shape[:2] or q_land.shape[3] != q.shape[3]:
        raise ValueError(f"q_land must be (B, h, L, d) = ({q.shape[0]}, {q.shape[1]}, L, {q.shape[3]}), "
                         f"got {tuple(q_land.shape)}")
    if k_land.shape != q_land.shape:
        raise ValueError(f"k_land must have q_land's shape {tuple(q_land.shape)}, got {tuple(k_land.shape)}")
    if q_land.shape[2] < 1 or q.shape[2] < 1:
        raise ValueError(f"need at least one token and one landmark, got N={q.shape[2]}, L={q_land.shape[2]}")
    for name, t in (("k", k), ("v", v), ("q_land", q_land), ("k_land", k_land)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all of q, k, v, q_land, "
                             "k_land must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    h = q.shape[1]
    for name, w in (("w_q", w_q), ("w_k", w_k)):
        if w is None:
            continue
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(w).__name__}")
        if tuple(w.shape) != (h, h):
            raise ValueError(f"{name} must be (h, h) = ({h}, {h}), got {tuple(w.shape)}")
        if w.dtype not in (torch.float32, q.dtype):
            raise ValueError(f"{name} has dtype {w.dtype}; it must be float32 or q's dtype {q.dtype}")
        if w.device != q.device:
            raise ValueError(f"{name} is on {w.device} but q is on {q.device}")
    if mix not in MIX_MODES:
        raise ValueError(f"mix must be 'post' or 'pre', got {mix!r}")
    if scale is None:
        return q.shape[3] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def out_of_scope(attn_mask, dropout_p, is_causal):
    """The design document puts masks, dropout and causal use out of scope: refuse, don't ignore."""
    if attn_mask is not None:
        raise NotImplementedError("attn_mask is not supported by iMHSA (masks and padding are out of scope)")
    if dropout_p:
        raise NotImplementedError("dropout_p must be 0: dropout inside iMHSA is out of scope")
    if is_causal:
        raise NotImplementedError("is_causal=True is not supported: iMHSA is not causal (out of scope)")
