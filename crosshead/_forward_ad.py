"""Forward-mode derivative (JVP) of crosshead::imhsa, in pure torch on any device.

Differentiating imhsa.md's equations along tangents (q̇, k̇, v̇, q̇_land, k̇_land, ẇ_q, ẇ_k):

    Ṡ_K = scale·(q̇_land·kᵀ + q_land·k̇ᵀ)          Ṡ_Q = scale·(q̇·k_landᵀ + q·k̇_landᵀ)
    softmax:  P = softmax(S)  ⇒  Ṗ = P ⊙ (Ṡ − Σ_j P·Ṡ)         (Σ_j over the softmax axis)
    post:     Â = w·P         ⇒  Â̇ = w·Ṗ + ẇ·P
    pre:      M = w·S, Â = softmax(M)  ⇒  Ṁ = w·Ṡ + ẇ·S,  Â̇ = Â ⊙ (Ṁ − Σ_j Â·Ṁ)
    Ż = Â̇_K·v + Â_K·v̇                            ȯut = Â̇_Q·Z + Â_Q·Ż

(w· is the head mixing Σ_h w[g, h]·X[h]). It costs about two forwards and, like the forward,
forms nothing N×N. Arithmetic is float32 (float64 for float64 inputs), as in crosshead.reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._maps import logits, mix_heads
from .reference import compute_dtype


def _softmax_jvp(p: Tensor, dx: Tensor) -> Tensor:
    return p * (dx - (p * dx).sum(-1, keepdim=True))


def _mix_jvp(w, w_t, x, x_t):
    """Tangent of mix(w, x)."""
    y = mix_heads(w, x_t)
    return y if w_t is None else y + mix_heads(w_t, x)


def _side_jvp(s, s_t, w, w_t, mix):
    """(Â, Â̇) of one side from the logits s and their tangent."""
    if mix == "post":
        p = torch.softmax(s, dim=-1)
        return mix_heads(w, p), _mix_jvp(w, w_t, p, _softmax_jvp(p, s_t))
    a = torch.softmax(mix_heads(w, s), dim=-1)
    return a, _softmax_jvp(a, _mix_jvp(w, w_t, s, s_t))


def imhsa_jvp(q, k, v, q_land, k_land, w_q, w_k, mix: str, scale: float, tangents) -> Tensor:
    """Tangent of imhsa's out (in q's dtype) along `tangents` (q̇, k̇, v̇, q̇_land, k̇_land, ẇ_q, ẇ_k),
    each a tensor like its primal or None (zero)."""
    dtype, ct = q.dtype, compute_dtype(q.dtype)
    primals = [None if t is None else t.to(ct) for t in (q, k, v, q_land, k_land, w_q, w_k)]
    q, k, v, q_land, k_land, w_q, w_k = primals
    dq, dk, dv, dq_land, dk_land, dw_q, dw_k = (
        None if t is None else t.to(ct) for t in tangents)

    s_k, s_q = logits(q, k, k_land, q_land, scale)
    zero_k, zero_q = torch.zeros_like(s_k), torch.zeros_like(s_q)
    ds_k = (zero_k if dq_land is None else torch.matmul(dq_land * scale, k.transpose(-1, -2))) + (
        0 if dk is None else torch.matmul(q_land * scale, dk.transpose(-1, -2)))
    ds_q = (zero_q if dq is None else torch.matmul(dq, (k_land * scale).transpose(-1, -2))) + (
        0 if dk_land is None else torch.matmul(q, (dk_land * scale).transpose(-1, -2)))

    a_k, da_k = _side_jvp(s_k, ds_k, w_k, dw_k, mix)
    z = torch.matmul(a_k, v)
    dz = torch.matmul(da_k, v)
    if dv is not None:
        dz = dz + torch.matmul(a_k, dv)
    a_q, da_q = _side_jvp(s_q, ds_q, w_q, dw_q, mix)
    out_t = torch.matmul(da_q, z) + torch.matmul(a_q, dz)
    return out_t.to(dtype)
