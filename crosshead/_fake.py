"""Fake (meta) kernels: output shapes, dtypes and devices only, for torch.compile and opcheck."""

import math

import torch

from .reference import compute_dtype


@torch.library.register_fake("crosshead::landmarks")
def _landmarks(x, grid, size, prefix):
    B, h, _, d = x.shape
    return x.new_empty(B, h, math.prod(size), d)


@torch.library.register_fake("crosshead::landmarks_backward")
def _landmarks_backward(grad, num_tokens, grid, size, prefix):
    B, h, _, d = grad.shape
    return grad.new_empty(B, h, num_tokens, d)


@torch.library.register_fake("crosshead::imhsa")
def _imhsa(q, k, v, q_land, k_land, w_q, w_k, mix, scale):
    B, h, N, d = q.shape
    L = q_land.shape[2]
    ct = compute_dtype(q.dtype)
    return (torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, h, L, d, dtype=ct),
            q.new_empty(B, h, L, dtype=ct), q.new_empty(B, h, N, dtype=ct))


@torch.library.register_fake("crosshead::imhsa_backward")
def _imhsa_backward(grad_out, q, k, v, q_land, k_land, w_q, w_k, z, lse_k, lse_q, mix, scale):
    def w_grad(w):
        return grad_out.new_empty(0) if w is None else torch.empty_like(w, memory_format=torch.contiguous_format)

    like = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, q_land, k_land)]
    return (*like, w_grad(w_q), w_grad(w_k))
