"""Pure-torch forward and backward of every crosshead op.

These functions are the kernels registered for CPU (and for CUDA when the fused kernels are not
built), and the fast paths are checked against them. They compute ../shared/design/imhsa.md
exactly, right to left: Z = Â_K·v first, then out = Â_Q·Z, so no N×N map is ever formed; the
largest intermediates are the N×L score maps (their steps: crosshead/_maps.py; the query side
block by block over the tokens on the CPU: crosshead/_blocked.py). Arithmetic is float32 whatever
the input dtype (float64 for float64 inputs); results are cast back to the input dtype.

Shapes: q, k, v (B, h, N, d); q_land, k_land (B, h, L, d); w_q, w_k (h, h) or None.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _blocked, _maps


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t.to(dtype), without the call's overhead when t has it already (a tenth of these kernels'
    fixed cost per call, which is what matters at small N)."""
    return t if t.dtype == dtype else t.to(dtype)


def pooling_matrix(n_in: int, n_out: int, dtype: torch.dtype, device) -> Tensor:
    """(n_out, n_in) averaging matrix with adaptive_avg_pool's bins: bin i covers
    [floor(i·n_in/n_out), ceil((i+1)·n_in/n_out))."""
    i = torch.arange(n_out, device=device)
    start = (i * n_in) // n_out
    end = ((i + 1) * n_in + n_out - 1) // n_out
    j = torch.arange(n_in, device=device)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return inside.to(dtype) / (end - start).to(dtype)[:, None]


def _pool_axes(grid, size, dtype, device):
    return [pooling_matrix(n, m, dtype, device) for n, m in zip(grid, size)]


def _pool_shape(dims: list[int], size: list[int]):
    """(H, W), (Lh, Lw) of the pooling: a 1-D sequence of n tokens pools as a 1×n grid (the bins
    of adaptive_avg_pool1d are those of adaptive_avg_pool2d along W)."""
    if len(dims) == 1:
        return (1, dims[0]), (1, size[0])
    return tuple(dims), tuple(size)


def landmarks(x: Tensor, grid: list[int], size: list[int], prefix: int) -> Tensor:
    """Average-pool the grid tokens x[:, :, prefix:] to (B, h, prod(size), d).

    grid = [] means a 1-D sequence (size = [L]); grid = [H, W] a 2-D token grid (size = [Lh, Lw]).
    On the CPU this is torch's adaptive average pooling, reading the tokens (B·h, H, W, d) in place
    as a channels-last (B·h, d, H, W) image: one pass over x. Elsewhere (the CUDA fallback, where
    that pooling's backward is not deterministic) it is separable, one small matmul per axis."""
    B, h, _, d = x.shape
    ct = compute_dtype(x.dtype)
    t = _as(x[:, :, prefix:, :], ct)
    dims = list(grid) if len(grid) else [t.shape[2]]
    if x.device.type == "cpu":
        (H, W), pooled = _pool_shape(dims, size)
        out = F.adaptive_avg_pool2d(t.reshape(B * h, H, W, d).permute(0, 3, 1, 2), pooled)
        return _as(out.permute(0, 2, 3, 1).reshape(B, h, math.prod(size), d), x.dtype)
    mats = _pool_axes(dims, size, ct, x.device)
    if len(dims) == 1:
        out = torch.matmul(mats[0], t)
    else:
        (H, W), Lh = dims, size[0]
        t = torch.matmul(mats[0], t.reshape(B, h, H, W * d)).reshape(B, h, Lh, W, d)
        out = torch.matmul(mats[1], t)  # (Lw, W) @ (B, h, Lh, W, d)
    return _as(out.reshape(B, h, math.prod(size), d), x.dtype)  # not -1: B = 0 must work


def landmarks_backward(grad: Tensor, num_tokens: int, grid: list[int], size: list[int],
                       prefix: int) -> Tensor:
    """Adjoint of `landmarks`: spreads each landmark's gradient evenly over its bin; the prefix
    tokens get zero."""
    B, h, _, d = grad.shape
    ct = compute_dtype(grad.dtype)
    g = _as(grad, ct)
    dims = list(grid) if len(grid) else [num_tokens - prefix]
    if grad.device.type == "cpu":  # the adjoint of adaptive_avg_pool2d, channels-last as above
        (H, W), (Lh, Lw) = _pool_shape(dims, size)
        g = g.contiguous()  # (small) else the adjoint may come out NCHW, a slow transpose below
        # the input's shape and layout only: the adjoint does not read its values
        like = torch.empty_strided((B * h, d, H, W), (H * W * d, 1, W * d, d), dtype=ct)
        t = torch.ops.aten._adaptive_avg_pool2d_backward(
            g.reshape(B * h, Lh, Lw, d).permute(0, 3, 1, 2), like)
        t = t.permute(0, 2, 3, 1).reshape(B, h, H * W, d)
    else:
        mats = _pool_axes(dims, size, ct, grad.device)
        if len(dims) == 1:
            t = torch.matmul(mats[0].T, g)
        else:
            (H, W), (Lh, Lw) = dims, size
            t = torch.matmul(mats[1].T, g.reshape(B, h, Lh, Lw, d))  # (B, h, Lh, W, d)
            t = torch.matmul(mats[0].T, t.reshape(B, h, Lh, W * d)).reshape(B, h, H * W, d)
    if prefix == 0:
        return _as(t, grad.dtype)
    out = g.new_empty(B, h, num_tokens, d)
    out[:, :, :prefix, :] = 0
    out[:, :, prefix:, :] = t
    return _as(out, grad.dtype)


# ---------------------------------------------------------------------------------------- imhsa
# The steps on the N×L maps, and how they spend the CPU's time, are in crosshead/_maps.py.


def imhsa(q: Tensor, k: Tensor, v: Tensor, q_land: Tensor, k_land: Tensor, w_q: Tensor | None,
          w_k: Tensor | None, mix: str, scale: float):
    """Forward. Returns (out, z, lse_k, lse_q): out (B, h, N, d) in q's dtype; z = Â_K·v
    (B, h, L, d), lse_k (B, h, L) and lse_q (B, h, N) in float32 (float64 for float64 inputs)."""
    dtype = q.dtype
    ct = compute_dtype(dtype)
    q, k, v, q_land, k_land = (_as(t, ct) for t in (q, k, v, q_land, k_land))
    wq = None if w_q is None else _as(w_q, ct)
    wk = None if w_k is None else _as(w_k, ct)
    scale2 = scale * _maps.LOG2E  # logits in base 2
    # the key side (one N×L buffer), then the query side: block by block where autograd
    # allows (crosshead/_blocked.py), else transposed in the key side's buffer
    a_k, lse_k = _maps.side(_maps.logits_k(q_land, k, scale2), wk, mix, -1)
    z = torch.matmul(a_k, v)
    if _blocked.worthwhile(q, k_land.shape[2]) and _maps.free(q, k_land, z, wq):
        del a_k
        out, lse_q = _blocked.query_forward(q, k_land, z, wq, mix, scale2)
        return _as(out, dtype), z, lse_k, lse_q
    a_q_t, lse_q = _maps.side(_maps.logits_q_t(q, k_land, scale2, a_k), wq, mix, -2)
    return _as(torch.matmul(a_q_t.transpose(-1, -2), z), dtype), z, lse_k, lse_q


def imhsa_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, q_land: Tensor,
                   k_land: Tensor, w_q: Tensor | None, w_k: Tensor | None, z: Tensor,
                   lse_k: Tensor, lse_q: Tensor, mix: str, scale: float):
    """Backward. Returns (dq, dk, dv, dq_land, dk_land, dw_q, dw_k); dw_* are empty tensors when
    the corresponding w is None. The softmax maps are recomputed from the logits and the saved
    logsumexps (lse_*), so nothing of size N×N is formed."""
    dtype = q.dtype
    ct = compute_dtype(dtype)
    q, k, v, q_land, k_land, g = (_as(t, ct) for t in (q, k, v, q_land, k_land, grad_out))
    wq = None if w_q is None else _as(w_q, ct)
    wk = None if w_k is None else _as(w_k, ct)
    z = _as(z, ct)
    scale2 = scale * _maps.LOG2E  # the maps are recomputed in base 2; gradients are natural
    # in post mode with mixing, Â is dead once it has given dZ (or dv): its buffer takes dÂ
    reuse_a = mix == "post"

    # query side first (out = Â_Q·Z): it yields dZ, which the key side needs. Block by block
    # where autograd allows (crosshead/_blocked.py); else with its maps transposed (L×N),
    # which it then leaves to the key side
    buffers = []
    if _blocked.worthwhile(q, k_land.shape[2]) and _maps.free(g, q, k_land, z, wq):
        d_z, d_q, d_k_land, d_wq = _blocked.query_backward(
            g, q, k_land, z, wq, _as(lse_q, ct) * _maps.LOG2E, mix, scale, scale2)
    else:
        s_q_t = _maps.logits_q_t(q, k_land, scale2)
        a_q_t, p_q_t = _maps.recompute(s_q_t, wq, _as(lse_q, ct) * _maps.LOG2E, mix, None, -2)
        d_z = torch.matmul(a_q_t, g)
        d_a_q_t = _maps.matmul_into(z, g.transpose(-1, -2),
                                    a_q_t if reuse_a and wq is not None else None)
        d_s_q_t, d_wq = _maps.side_backward(d_a_q_t, a_q_t, p_q_t, s_q_t, wq, mix, -2)
        d_q = torch.matmul(d_s_q_t.transpose(-1, -2), k_land * scale)
        d_k_land = torch.matmul(d_s_q_t, q) * scale
        buffers = _maps.distinct(s_q_t, a_q_t, d_a_q_t)
        del s_q_t, a_q_t, p_q_t, d_a_q_t, d_s_q_t

    # key side (Z = Â_K·v)
    s_k = _maps.logits_k(q_land, k, scale2, _maps.take(buffers))
    a_k, p_k = _maps.recompute(s_k, wk, _as(lse_k, ct) * _maps.LOG2E, mix,
                               _maps.take(buffers) if wk is not None else None, -1)
    d_v = torch.matmul(a_k.transpose(-1, -2), d_z)
    d_a_k = _maps.matmul_into(d_z, v.transpose(-1, -2),
                              a_k if reuse_a and wk is not None else _maps.take(buffers))
    d_s_k, d_wk = _maps.side_backward(d_a_k, a_k, p_k, s_k, wk, mix, -1)
    d_q_land = torch.matmul(d_s_k, k) * scale
    d_k = torch.matmul(d_s_k.transpose(-1, -2), q_land * scale)

    def w_grad(d_w, w):
        if w is None:
            return grad_out.new_empty(0)
        # pre mode: dw is taken against the base-2 logits, log2 e times too large
        return _as(d_w * _maps.LN2 if mix == "pre" else d_w, w.dtype)

    d_inputs = (_as(t, dtype) for t in (d_q, d_k, d_v, d_q_land, d_k_land))
    return (*d_inputs, w_grad(d_wq, w_q), w_grad(d_wk, w_k))
