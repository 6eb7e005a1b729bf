"""``nystrom``: Nystromformer (Xiong et al., AAAI 2021), through the ``nystrom-attention`` package.

Landmarks Q~, K~ (m x d) are segment means of Q and K along the sequence; with
A_F = softmax(Q K~^T), A = softmax(Q~ K~^T), A_B = softmax(Q~ K^T) (all scaled by 1/sqrt(d)):

    Y = A_F pinv(A) (A_B V)          (paper eq. 15)

pinv by the iterative Moore-Penrose scheme Z <- Z (13I - AZ(15I - AZ(7I - AZ))) / 4.
When m = N every landmark is a token and Y equals softmax attention (checked in the tests).

Defaults: ``num_landmarks=64`` (the paper's LRA/ViT setting; the package default is 256, more
than a ViT's 197 tokens), ``pinv_iterations=6``, ``residual=True`` (depthwise conv over V along
the sequence, kernel ``residual_conv_kernel=33``, as the package). Sequences whose length is not a
multiple of m are front-padded by the package; we pass a mask so padded tokens are ignored.
Complexity: O(N m d + m^3) time, O(N m + m^2) memory per head. Input: any N (1-D segments in
raster order); ``grid`` validated, unused.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._base import BaselineAttention
from ._registry import register


@register("nystrom", requires=(("nystrom_attention", "nystrom-attention"),))
class NystromAttention(BaselineAttention):
    def __init__(self, dim, num_heads=8, *, num_prefix_tokens=0, qkv_bias=False,
                 num_landmarks=64, pinv_iterations=6, residual=True, residual_conv_kernel=33):
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, make_qkv=False)
        from nystrom_attention import NystromAttention as _Nys

        self.attn = _Nys(dim, dim_head=self.head_dim, heads=num_heads, num_landmarks=num_landmarks,
                         pinv_iterations=pinv_iterations, residual=residual,
                         residual_conv_kernel=residual_conv_kernel)
        if qkv_bias:
            self.attn.to_qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.num_landmarks = num_landmarks

    def forward(self, x, grid=None):
        self.check_input(x, grid)
        mask = None
        if x.shape[1] % self.num_landmarks:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return self.attn(x, mask=mask)
