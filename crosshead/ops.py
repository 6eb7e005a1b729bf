"""The public functions: check arguments, then call the registered torch.ops.crosshead ops."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks


def landmarks(x: Tensor, grid: tuple[int, int] | None = None, size: tuple[int, int] | int = (7, 7),
              prefix: int = 0) -> Tensor:
    """Landmarks of a token map by average pooling (imhsa.md, "Landmarks").

    Args:
        x (Tensor): (B, h, N, d) queries or keys.
        grid (tuple[int, int], optional): (H, W) with H·W = N − prefix for a 2-D token grid; None for
            a 1-D sequence. Default: None.
        size (tuple[int, int] | int): landmark grid (Lh, Lw) for 2-D, or L for 1-D. Bins follow
            ``adaptive_avg_pool2d`` / ``adaptive_avg_pool1d``. Default: (7, 7).
        prefix (int): leading tokens (CLS, registers) left out of pooling. Default: 0.

    Returns:
        Tensor: (B, h, L, d) in x's dtype, L = Lh·Lw (2-D) or L (1-D).
    """
    grid, size = _checks.landmark_args(x, grid, size, prefix)
    return torch.ops.crosshead.landmarks(x, grid, size, prefix)


def imhsa(q: Tensor, k: Tensor, v: Tensor, q_land: Tensor, k_land: Tensor, w_q: Tensor | None = None,
          w_k: Tensor | None = None, *, mix: str = "post", scale: float | None = None,
          attn_mask: None = None, dropout_p: float = 0.0, is_causal: bool = False) -> Tensor:
    """Interactive multi-head self-attention (imhsa.md, "The core op").

    out[g] = Â_Q[g]·(Â_K[g]·v[g]) with Â_Q = mix_q(softmax_L(scale·q·k_landᵀ)) (N×L) and
    Â_K = mix_k(softmax_N(scale·q_land·kᵀ)) (L×N); mixing across heads acts on the probabilities
    (mix="post") or on the logits (mix="pre"). Cost O(N·L·h·(d+h)); nothing N×N is formed.

    Args:
        q, k, v (Tensor): (B, h, N, d); float16, bfloat16, float32 or float64, one dtype and device.
        q_land, k_land (Tensor): (B, h, L, d) landmark queries and keys (see :func:`landmarks`).
        w_q, w_k (Tensor, optional): (h, h) cross-head interaction of the query and key side, float32
            or q's dtype; None is the identity (no interaction). Default: None.
        mix (str): "post" (mix softmax probabilities) or "pre" (mix logits). Default: "post".
        scale (float, optional): logit scale; None means d^-1/2. Default: None.
        attn_mask, dropout_p, is_causal: accepted only at their defaults; masks, dropout and causal
            use are out of scope and raise NotImplementedError.

    Returns:
        Tensor: (B, h, N, d) in q's dtype.
    """
    _checks.out_of_scope(attn_mask, dropout_p, is_causal)
    scale = _checks.imhsa_args(q, k, v, q_land, k_land, w_q, w_k, mix, scale)
    return torch.ops.crosshead.imhsa(q, k, v, q_land, k_land, w_q, w_k, mix, scale)[0]
