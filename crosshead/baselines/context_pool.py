"""``context_pool``: ContextPool around softmax attention (Huang, Talbott, Jaitly, Susskind,
"Efficient Representation Learning via Adaptive Context Pooling", ICML 2022, arXiv 2207.01844).

No public code exists and the predictor architecture is not in the notes; this is a
re-implementation of the mechanism as the abstract and figure 2 state it ("learn to pool
neighbouring features for each token before computing attention"; "pooling weights and support
size are adaptively determined" per token), with the 2-D Gaussian form recalled in
shared/research/peers_attention.md section 6. Our choices are marked "(ours)".

For grid tokens i, j at 2-D positions p_i, p_j:
    m_j = sigmoid(w_m . x_j + b_m)                       pooling weight        (linear head: ours)
    s_i = s_max * sigmoid(w_s . x_i + b_s)               support size (grid cells; s_max ours)
    G_i(j) = exp(-|p_i - p_j|^2 / (2 s_i^2))
    y_i = sum_j G_i(j) m_j x_j / sum_j G_i(j) m_j
then ordinary softmax MHSA (SDPA) on y (queries, keys and values all from the pooled features).
Prefix tokens are neither pooled nor pooled into others (y = x for them) (ours).
As s -> 0 pooling is the identity and the module is softmax attention (checked in the tests).

Defaults (ours): s_max = 4.0 grid cells, heads initialised so s starts at s_max/2 and m at 1/2.
Complexity: pooling O(N^2 C) (global Gaussians), attention O(N^2 d): not cheaper per layer; the
paper's efficiency comes from needing fewer layers.
Input: a 2-D grid (required; inferred when N - prefix is a perfect square).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import BaselineAttention, from_heads
from ._registry import register


@register("context_pool")
class ContextPoolAttention(BaselineAttention):
    needs_grid = True

    def __init__(self, dim, num_heads=8, *, num_prefix_tokens=0, qkv_bias=False, max_support=4.0):
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, qkv_bias=qkv_bias)
        self.max_support = float(max_support)
        self.to_weight = nn.Linear(dim, 1)
        self.to_support = nn.Linear(dim, 1)
        for lin in (self.to_weight, self.to_support):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def pool(self, x, grid):
        p = self.num_prefix_tokens
        h, w = grid
        xg = x[:, p:]
        ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device),
                                indexing="ij")
        pos = torch.stack([ys.flatten(), xs.flatten()], -1).to(x.dtype)
        d2 = torch.cdist(pos, pos).pow(2)                                   # (Ng, Ng)
        m = torch.sigmoid(self.to_weight(xg)).squeeze(-1)                   # (B, Ng)
        s = self.max_support * torch.sigmoid(self.to_support(xg))          # (B, Ng, 1)
        logw = -d2 / (2 * s * s) + torch.log(m).unsqueeze(1)                # (B, Ng, Ng)
        y = logw.softmax(-1) @ xg
        return torch.cat([x[:, :p], y], dim=1)

    def forward(self, x, grid=None):
        grid = self.check_input(x, grid)
        y = self.pool(x, grid)
        q, k, v = self.qkv_heads(y)
        return self.proj(from_heads(F.scaled_dot_product_attention(q, k, v)))
