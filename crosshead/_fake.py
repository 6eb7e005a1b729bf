"""Fake (meta) kernels: the ops' argument checks, then output shapes, dtypes and devices only, for
the meta device, torch.compile, torch.export and opcheck."""

import math

import torch

from ._op_checks import checked
from .reference import compute_dtype


def _landmarks(x, grid, size, prefix):
    B, h, _, d = x.shape
    return x.new_empty(B, h, math.prod(size), d)


def _landmarks_backward(grad, num_tokens, grid, size, prefix):
    B, h, _, d = grad.shape
    return grad.new_empty(B, h, num_tokens, d)


def _imhsa(q, k, v, q_land, k_land, w_q, w_k, mix, scale):
    B, h, N, d = q.shape
    L = q_land.shape[2]
    ct = compute_dtype(q.dtype)
    return (torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, h, L, d, dtype=ct),
            q.new_empty(B, h, L, dtype=ct), q.new_empty(B, h, N, dtype=ct))


def _imhsa_backward(grad_out, q, k, v, q_land, k_land, w_q, w_k, z, lse_k, lse_q, mix, scale):
    def w_grad(w):
        return grad_out.new_empty(0) if w is None else torch.empty_like(w, memory_format=torch.contiguous_format)

    like = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, q_land, k_land)]
    return (*like, w_grad(w_q), w_grad(w_k))


for _op, _kernel in (("landmarks", _landmarks), ("landmarks_backward", _landmarks_backward), ("imhsa", _imhsa),
                     ("imhsa_backward", _imhsa_backward)):
    torch.library.register_fake(f"crosshead::{_op}", checked(_op, _kernel))
