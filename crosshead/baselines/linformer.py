"""``linformer``: Linformer (Wang et al., 2020), through the ``linformer`` package.

Learned length projections E, F in R^{k x N} compress keys and values along the sequence:

    Y = softmax(Q (E K)^T / sqrt(d)) (F V)

Defaults: ``seq_len = 196 + num_prefix_tokens`` (a 14 x 14 ViT-B/16 grid at 224 px),
``k = min(256, seq_len // 4)`` (the package default is 256, sized for text of length >= 1024;
for 197 tokens 256 would *expand* the sequence, so we keep the package's 1/4 ratio),
``share_kv=False``, ``one_kv_head=False``.
Complexity: O(N k d) time, O(N k) memory per head.
Input: **fixed N** -- E and F are tied to ``seq_len``; any other N raises ValueError.
"""

from __future__ import annotations

import torch.nn as nn

from ._base import BaselineAttention
from ._registry import register


@register("linformer", requires=(("linformer", "linformer"),))
class LinformerAttention(BaselineAttention):
    def __init__(self, dim, num_heads=8, *, num_prefix_tokens=0, qkv_bias=False, seq_len=None,
                 k=None, share_kv=False, one_kv_head=False):
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, make_qkv=False)
        from linformer import LinformerSelfAttention

        seq_len = 196 + num_prefix_tokens if seq_len is None else int(seq_len)
        k = max(1, min(256, seq_len // 4)) if k is None else int(k)
        self.seq_len, self.k = seq_len, k
        self.attn = LinformerSelfAttention(dim, seq_len, k=k, heads=num_heads,
                                           dim_head=self.head_dim, one_kv_head=one_kv_head,
                                           share_kv=share_kv)
        if qkv_bias:
            kv_dim = self.head_dim if one_kv_head else dim
            self.attn.to_q = nn.Linear(dim, dim, bias=True)
            self.attn.to_k = nn.Linear(dim, kv_dim, bias=True)
            if not share_kv:
                self.attn.to_v = nn.Linear(dim, kv_dim, bias=True)

    def forward(self, x, grid=None):
        self.check_input(x, grid)
        if x.shape[1] != self.seq_len:
            raise ValueError(f"linformer: built for a fixed sequence length seq_len={self.seq_len} "
                             f"(its E, F projections are {self.seq_len} x {self.k}); got N="
                             f"{x.shape[1]}. Create it with seq_len={x.shape[1]}.")
        return self.attn(x)

    def extra_repr(self):
        return super().extra_repr() + f", seq_len={self.seq_len}, k={self.k}"
