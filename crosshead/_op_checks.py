"""Argument checks of the registered ops (torch.ops.crosshead.*), run on every device.

The pure-torch kernels (CPU, and CUDA without the fused kernels) and the fake kernels (meta device,
torch.compile, torch.export) call these; the fused CUDA kernels run the same checks in C++
(csrc/op_checks.h), with the same messages, word for word, and the same exception type
(ValueError, C++ TORCH_CHECK_VALUE). tests/test_op_checks.py holds the two to each other on every
device it can reach. Device-specific capability limits (the CUDA kernels' largest h, d, L, their
dtypes) are not here: they stay with the kernels that have them.

torch._check_value keeps the checks symbolic under torch.compile and torch.export: a condition on
symbolic sizes becomes a guard or a runtime assertion, never a graph break.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MIX_MODES = ("post", "pre")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(t: torch.Tensor) -> str:
    return _name(t.dtype)


def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


def _check(cond, message) -> None:
    if cond is True:  # a concrete condition that holds (eager calls): skip torch's checking machinery
        return
    torch._check_value(cond, lambda: message() if callable(message) else message)


def _rank4(op: str, name: str, t: torch.Tensor, layout: str) -> None:
    _check(t.dim() == 4, lambda: f"crosshead::{op}: {name} must have 4 dimensions {layout}, got shape {_shape(t)}")


def _floating(op: str, name: str, t: torch.Tensor) -> None:
    _check(t.dtype in FLOAT_DTYPES,
           lambda: f"crosshead::{op}: {name} has dtype {_dtype(t)}; supported: float16, bfloat16, float32, float64")


def _like_q(op: str, name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    _check(t.device == q.device, lambda: f"crosshead::{op}: {name} is on {t.device} but q is on {q.device}")
    _check(t.dtype == q.dtype, lambda: f"crosshead::{op}: {name} has dtype {_dtype(t)} but q has {_dtype(q)}")


def imhsa(q, k, v, q_land, k_land, w_q, w_k, mix, scale, op: str = "imhsa") -> None:
    """crosshead::imhsa (and the part of crosshead::imhsa_backward they share)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("q_land", q_land), ("k_land", k_land)):
        _rank4(op, name, t, "(B, h, L, d)" if name.endswith("land") else "(B, h, N, d)")
    _floating(op, "q", q)
    for name, t in (("k", k), ("v", v), ("q_land", q_land), ("k_land", k_land)):
        _like_q(op, name, t, q)
    for name, t in (("k", k), ("v", v)):
        _check(t.shape == q.shape, lambda: f"crosshead::{op}: {name} must have q's shape {_shape(q)}, got {_shape(t)}")
    B, h, N, d = q.shape
    _check(q_land.shape[0] == B and q_land.shape[1] == h and q_land.shape[3] == d,
           lambda: f"crosshead::{op}: q_land must be (B, h, L, d) with q's B, h, d, got {_shape(q_land)} for q "
                   f"{_shape(q)}")
    _check(k_land.shape == q_land.shape,
           lambda: f"crosshead::{op}: k_land must have q_land's shape {_shape(q_land)}, got {_shape(k_land)}")
    L = q_land.shape[2]
    _check(h >= 1 and N >= 1 and d >= 1 and L >= 1,
           lambda: f"crosshead::{op}: need at least one head, token, channel and landmark, got (h, N, d, L) = "
                   f"({h}, {N}, {d}, {L})")
    for name, w in (("w_q", w_q), ("w_k", w_k)):
        if w is None:
            continue
        _check(w.device == q.device, lambda: f"crosshead::{op}: {name} is on {w.device} but q is on {q.device}")
        _check(w.dim() == 2 and w.shape[0] == h and w.shape[1] == h,
               lambda: f"crosshead::{op}: {name} must be (h, h) = ({h}, {h}), got shape {_shape(w)}")
        _check(w.dtype == torch.float32 or w.dtype == q.dtype,
               lambda: f"crosshead::{op}: {name} has dtype {_dtype(w)}; it must be float32 or q's dtype {_dtype(q)}")
    _check(mix in MIX_MODES, lambda: f"crosshead::{op}: mix must be 'post' or 'pre', got '{mix}'")
    _check(math.isfinite(scale), lambda: f"crosshead::{op}: scale must be finite, got {scale}")


def imhsa_backward(grad_out, q, k, v, q_land, k_land, w_q, w_k, z, lse_k, lse_q, mix, scale) -> None:
    op = "imhsa_backward"
    imhsa(q, k, v, q_land, k_land, w_q, w_k, mix, scale, op=op)
    _rank4(op, "grad_out", grad_out, "(B, h, N, d)")
    _like_q(op, "grad_out", grad_out, q)
    _check(grad_out.shape == q.shape,
           lambda: f"crosshead::{op}: grad_out must have q's shape {_shape(q)}, got {_shape(grad_out)}")
    B, h, N, d = q.shape
    L = q_land.shape[2]
    saved = torch.float64 if q.dtype == torch.float64 else torch.float32
    for name, t, shape in (("z", z, [B, h, L, d]), ("lse_k", lse_k, [B, h, L]), ("lse_q", lse_q, [B, h, N])):
        _check(t.device == q.device and t.dtype == saved and _shape(t) == shape,
               lambda: f"crosshead::{op}: {name} must be the {_name(saved)} {shape} tensor the forward returned "
                       f"on q's device, got {_dtype(t)} {_shape(t)} on {t.device}")


def _geometry(op: str, num_tokens, grid, size, prefix) -> int:
    """The pooling geometry shared by landmarks and landmarks_backward; returns L."""
    _check(prefix >= 0, lambda: f"crosshead::{op}: prefix must be in [0, N), got prefix={prefix} with N={num_tokens}")
    _check(prefix < num_tokens,
           lambda: f"crosshead::{op}: prefix must be in [0, N), got prefix={prefix} with N={num_tokens}")
    n = num_tokens - prefix
    if len(grid) == 0:
        _check(len(size) == 1, lambda: f"crosshead::{op}: with grid=[] (1-D tokens) size must be [L], got {list(size)}")
        dims = [n]
    else:
        _check(len(grid) == 2 and len(size) == 2,
               lambda: f"crosshead::{op}: grid must be [H, W] and size [Lh, Lw], got grid {list(grid)} and size "
                       f"{list(size)}")
        for cond in (grid[0] >= 1, grid[1] >= 1, grid[0] * grid[1] == n):
            _check(cond, lambda: f"crosshead::{op}: grid {list(grid)} must be positive and hold the N - prefix = "
                                 f"{n} grid tokens")
        dims = list(grid)
    for s, g in zip(size, dims):
        for cond in (s >= 1, s <= g):
            _check(cond, lambda: f"crosshead::{op}: size {list(size)} must be positive and no larger than the grid "
                                 f"{dims}")
    return math.prod(size)


def landmarks(x, grid, size, prefix) -> None:
    op = "landmarks"
    _rank4(op, "x", x, "(B, h, N, d)")
    _floating(op, "x", x)
    _geometry(op, x.shape[2], grid, size, prefix)


def landmarks_backward(grad, num_tokens, grid, size, prefix) -> None:
    op = "landmarks_backward"
    _rank4(op, "grad", grad, "(B, h, L, d)")
    _floating(op, "grad", grad)
    L = _geometry(op, num_tokens, grid, size, prefix)
    _check(grad.shape[2] == L,
           lambda: f"crosshead::{op}: grad has {grad.shape[2]} landmarks but size {list(size)} makes {L}")


BY_OP = {"imhsa": imhsa, "imhsa_backward": imhsa_backward, "landmarks": landmarks,
         "landmarks_backward": landmarks_backward}


def checked(op: str, kernel):
    """`kernel` with the op's checks run first (the pure-torch and fake kernels are wrapped so)."""
    check = BY_OP[op]

    def run(*args):
        check(*args)
        return kernel(*args)

    run.__name__ = run.__qualname__ = getattr(kernel, "__name__", op)
    run.__doc__ = kernel.__doc__
    return run
