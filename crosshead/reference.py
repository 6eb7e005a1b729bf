"""Pure-torch forward and backward of every crosshead op.

These functions are the kernels registered for CPU (and for CUDA when the fused kernels are not
built), and the fast paths are checked against them. They compute ../shared/design/imhsa.md
exactly, right to left: Z = Â_K·v first, then out = Â_Q·Z, so no N×N map is ever formed; the
largest intermediates are the N×L score maps. Arithmetic is float32 whatever the input dtype
(float64 for float64 inputs); results are cast back to the input dtype.

Shapes: q, k, v (B, h, N, d); q_land, k_land (B, h, L, d); w_q, w_k (h, h) or None.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MIX_MODES = ("post", "pre")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------- landmarks


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


def landmarks(x: Tensor, grid: list[int], size: list[int], prefix: int) -> Tensor:
    """Average-pool the grid tokens x[:, :, prefix:] to (B, h, prod(size), d).

    grid = [] means a 1-D sequence (size = [L]); grid = [H, W] a 2-D token grid (size = [Lh, Lw]).
    Pooling is separable, one small matmul per axis."""
    B, h, _, d = x.shape
    ct = compute_dtype(x.dtype)
    t = x[:, :, prefix:, :].to(ct)
    dims = list(grid) if len(grid) else [t.shape[2]]
    mats = _pool_axes(dims, size, ct, x.device)
    if len(dims) == 1:
        out = torch.matmul(mats[0], t)
    else:
        (H, W), Lh = dims, size[0]
        t = torch.matmul(mats[0], t.reshape(B, h, H, W * d)).reshape(B, h, Lh, W, d)
        out = torch.matmul(mats[1], t)  # (Lw, W) @ (B, h, Lh, W, d)
    return out.reshape(B, h, math.prod(size), d).to(x.dtype)  # not -1: B = 0 must work


def landmarks_backward(grad: Tensor, num_tokens: int, grid: list[int], size: list[int],
                       prefix: int) -> Tensor:
    """Adjoint of `landmarks`: spreads each landmark's gradient evenly over its bin; the prefix
    tokens get zero."""
    B, h, _, d = grad.shape
    ct = compute_dtype(grad.dtype)
    g = grad.to(ct)
    dims = list(grid) if len(grid) else [num_tokens - prefix]
    mats = _pool_axes(dims, size, ct, grad.device)
    if len(dims) == 1:
        t = torch.matmul(mats[0].T, g)
    else:
        (H, W), (Lh, Lw) = dims, size
        t = torch.matmul(mats[1].T, g.reshape(B, h, Lh, Lw, d))  # (B, h, Lh, W, d)
        t = torch.matmul(mats[0].T, t.reshape(B, h, Lh, W * d)).reshape(B, h, H * W, d)
    out = grad.new_zeros(B, h, num_tokens, d, dtype=ct)
    out[:, :, prefix:, :] = t
    return out.to(grad.dtype)


# ---------------------------------------------------------------------------------------- imhsa


def _mix(w: Tensor | None, x: Tensor) -> Tensor:
    """Cross-head mixing y[:, g] = Σ_h w[g, h] · x[:, h] on (B, h, ...) tensors."""
    if w is None:
        return x
    return torch.matmul(w.to(x.dtype), x.flatten(2)).view_as(x)


def _mix_adjoint(w: Tensor | None, dy: Tensor) -> Tensor:
    """Gradient of _mix with respect to x: dx[:, h] = Σ_g w[g, h] · dy[:, g]."""
    if w is None:
        return dy
    return torch.matmul(w.to(dy.dtype).T, dy.flatten(2)).view_as(dy)


def _mix_weight_grad(dy: Tensor, x: Tensor) -> Tensor:
    """Gradient of _mix with respect to w: dw[g, h] = Σ_{b,·} dy[b, g, ·] · x[b, h, ·]."""
    return torch.matmul(dy.flatten(2), x.flatten(2).transpose(1, 2)).sum(0)


def _side(s: Tensor, w: Tensor | None, mix: str):
    """One side of the op, from per-head logits s (softmax over the last dim) to the mixed map:
    post: Â = mix(softmax(s)), lse of s per head; pre: Â = softmax(mix(s)), lse of the mixed
    logits. Returns (Â, lse)."""
    if mix == "post":
        lse = torch.logsumexp(s, dim=-1)
        return _mix(w, (s - lse.unsqueeze(-1)).exp_()), lse
    m = _mix(w, s)
    lse = torch.logsumexp(m, dim=-1)
    return (m - lse.unsqueeze(-1)).exp_(), lse  # not m.sub_: logsumexp's backward needs m


def _side_backward(d_a: Tensor, a: Tensor, p: Tensor | None, s: Tensor, w: Tensor | None,
                   mix: str):
    """Gradients of one side: from dÂ to (d logits per head, dw or None)."""
    # d_a is a temporary of the caller's and is overwritten (the softmax adjoint runs in place)
    if mix == "post":
        d_w = _mix_weight_grad(d_a, p) if w is not None else None
        d_p = _mix_adjoint(w, d_a)
        d_s = d_p.sub_((d_p * p).sum(-1, keepdim=True)).mul_(p)
    else:
        d_m = d_a.sub_((d_a * a).sum(-1, keepdim=True)).mul_(a)
        d_s = _mix_adjoint(w, d_m)
        d_w = _mix_weight_grad(d_m, s) if w is not None else None
    return d_s, d_w


def _logits(q, k, k_land, q_land, scale):
    # the scale goes on the small (L×d) landmark operands, not on the N×L products
    s_k = torch.matmul(q_land * scale, k.transpose(-1, -2))  # (B, h, L, N), softmax over N
    s_q = torch.matmul(q, (k_land * scale).transpose(-1, -2))  # (B, h, N, L), softmax over L
    return s_k, s_q


def imhsa(q: Tensor, k: Tensor, v: Tensor, q_land: Tensor, k_land: Tensor, w_q: Tensor | None,
          w_k: Tensor | None, mix: str, scale: float):
    """Forward. Returns (out, z, lse_k, lse_q): out (B, h, N, d) in q's dtype; z = Â_K·v
    (B, h, L, d), lse_k (B, h, L) and lse_q (B, h, N) in float32 (float64 for float64 inputs)."""
    dtype = q.dtype
    ct = compute_dtype(dtype)
    q, k, v, q_land, k_land = (t.to(ct) for t in (q, k, v, q_land, k_land))
    wq = None if w_q is None else w_q.to(ct)
    wk = None if w_k is None else w_k.to(ct)
    s_k, s_q = _logits(q, k, k_land, q_land, scale)
    a_k, lse_k = _side(s_k, wk, mix)
    z = torch.matmul(a_k, v)
    a_q, lse_q = _side(s_q, wq, mix)
    out = torch.matmul(a_q, z)
    return out.to(dtype), z, lse_k, lse_q


def imhsa_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, q_land: Tensor,
                   k_land: Tensor, w_q: Tensor | None, w_k: Tensor | None, z: Tensor,
                   lse_k: Tensor, lse_q: Tensor, mix: str, scale: float):
    """Backward. Returns (dq, dk, dv, dq_land, dk_land, dw_q, dw_k); dw_* are empty tensors when
    the corresponding w is None. The softmax maps are recomputed from the logits and the saved
    logsumexps (lse_*), so nothing of size N×N is formed."""
    dtype = q.dtype
    ct = compute_dtype(dtype)
    q, k, v, q_land, k_land, g = (t.to(ct) for t in (q, k, v, q_land, k_land, grad_out))
    wq = None if w_q is None else w_q.to(ct)
    wk = None if w_k is None else w_k.to(ct)
    z = z.to(ct)
    s_k, s_q = _logits(q, k, k_land, q_land, scale)
    a_q, p_q = _recompute(s_q, wq, lse_q.to(ct), mix)
    a_k, p_k = _recompute(s_k, wk, lse_k.to(ct), mix)

    # out = Â_Q·Z and Z = Â_K·v
    d_a_q = torch.matmul(g, z.transpose(-1, -2))
    d_z = torch.matmul(a_q.transpose(-1, -2), g)
    d_a_k = torch.matmul(d_z, v.transpose(-1, -2))
    d_v = torch.matmul(a_k.transpose(-1, -2), d_z)

    d_s_q, d_wq = _side_backward(d_a_q, a_q, p_q, s_q, wq, mix)
    d_s_k, d_wk = _side_backward(d_a_k, a_k, p_k, s_k, wk, mix)
    d_q = torch.matmul(d_s_q, k_land * scale)
    d_k_land = torch.matmul(d_s_q.transpose(-1, -2), q) * scale
    d_q_land = torch.matmul(d_s_k, k) * scale
    d_k = torch.matmul(d_s_k.transpose(-1, -2), q_land * scale)

    def w_grad(d_w, w):
        if w is None:
            return grad_out.new_empty(0)
        return d_w.to(w.dtype)

    return (d_q.to(dtype), d_k.to(dtype), d_v.to(dtype), d_q_land.to(dtype), d_k_land.to(dtype),
            w_grad(d_wq, w_q), w_grad(d_wk, w_k))


def _recompute(s: Tensor, w: Tensor | None, lse: Tensor, mix: str):
    """Â (and the per-head probabilities in post mode) from logits and the saved logsumexp."""
    if mix == "post":
        p = (s - lse.unsqueeze(-1)).exp_()
        return _mix(w, p), p
    return (_mix(w, s) - lse.unsqueeze(-1)).exp_(), None
