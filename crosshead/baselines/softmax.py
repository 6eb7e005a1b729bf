"""``softmax``: standard multi-head self-attention (Vaswani et al., 2017), the reference.

Y = softmax(Q K^T / sqrt(d)) V per head, through ``torch.nn.functional.scaled_dot_product_attention``
(fused/flash kernels where the backend has them).

Defaults: none beyond qkv_bias=False (as timm's ``Attention``).
Complexity: O(N^2 d) time per head; O(N^2) memory unless SDPA picks a fused kernel.
Input: any N; ``grid`` is validated when given but not used.
"""

from __future__ import annotations

import torch.nn.functional as F

from ._base import BaselineAttention
from ._registry import register


@register("softmax")
class SoftmaxAttention(BaselineAttention):
    def __init__(self, dim, num_heads=8, *, num_prefix_tokens=0, qkv_bias=False):
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, qkv_bias=qkv_bias)

    def attend(self, q, k, v, grid):
        return F.scaled_dot_product_attention(q, k, v)
