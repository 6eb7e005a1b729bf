"""``talking_heads``: Talking-Heads attention (Shazeer, Lan, Cheng, Ding, Hou; arXiv 2003.02436).

Per batch and query/key pair, learned linear maps across the *head* axis are applied to the
N x N maps immediately before and after the softmax (paper eqs. for J, L, W, U, O):

    J[h_k] = Q_{h_k} K_{h_k}^T / sqrt(d)
    L[h]   = sum_{h_k} P_l[h_k, h] J[h_k]         (+ bias, as timm's CaiT ``TalkingHeadAttn``)
    W[h]   = softmax_keys(L[h])
    U[h_v] = sum_h P_w[h, h_v] W[h]               (+ bias)
    O[h_v] = U[h_v] V_{h_v}

Defaults: h_k = h = h_v = num_heads (as in CaiT); ``proj_l``/``proj_w`` are ``nn.Linear(h, h)``
with bias, initialised to the identity with zero bias (``init="identity"``, so the module starts
as plain MHSA) or to PyTorch's default Linear init (``init="default"``, as timm does).
Complexity: O(N^2 d + N^2 h) time per head, 3 O(h N^2) memory: it must materialise the maps,
so it cannot use fused SDPA kernels. A quality baseline for cross-head interaction, not an
efficiency one. Input: any N; ``grid`` is validated but not used.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._base import BaselineAttention
from ._registry import register


@register("talking_heads")
class TalkingHeadsAttention(BaselineAttention):
    def __init__(self, dim, num_heads=8, *, num_prefix_tokens=0, qkv_bias=False,
                 init="identity"):
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, qkv_bias=qkv_bias)
        self.proj_l = nn.Linear(num_heads, num_heads)
        self.proj_w = nn.Linear(num_heads, num_heads)
        if init == "identity":
            with torch.no_grad():
                for lin in (self.proj_l, self.proj_w):
                    lin.weight.copy_(torch.eye(num_heads))
                    lin.bias.zero_()
        elif init != "default":
            raise ValueError(f"talking_heads: init must be 'identity' or 'default', got {init!r}")

    def attend(self, q, k, v, grid):
        logits = (q * self.scale) @ k.transpose(-2, -1)              # (B, h, N, N)
        logits = self.proj_l(logits.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        w = logits.softmax(dim=-1)
        w = self.proj_w(w.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return w @ v
