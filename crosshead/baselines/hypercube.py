"""``hypercube``: the Hypercube Transformer's sparse layout (Wang, Chen, Liu, et al., "What Dense
Graph Do You Need for Self-Attention?", ICML 2022, arXiv 2205.14014).

Softmax attention restricted to a fixed block-sparse layout. Blocks of ``block_size=16`` tokens;
with N_b blocks and k = ceil(log2 N_b), block i sits at hypercube vertex g(i) = i XOR (i >> 1)
(reflected binary Gray code) and attends to itself and to the blocks p with
g(p) = g(i) XOR 2^j, j = 0..k-1 (a neighbour index >= N_b falls back to self, i.e. is dropped).
When N_b is a power of two the block graph is exactly the k-dimensional hypercube: every block
has degree k (+ itself), the graph is symmetric and connected with diameter k, and consecutive
blocks are neighbours (Gray code); checked in the tests. The layout is shared by all heads.

Re-implemented from the paper (the authors' repository has no licence; it used DeepSpeed's
block-sparse kernels). Here the k+1 key blocks of each query block are gathered and attended with
an ordinary softmax, so time is O(N * 16 * (k+1) * d) and memory O(N * 16 * (k+1)) per head,
i.e. O(N log N). N is padded to a multiple of 16 with masked keys; tokens are blocked in raster
order (prefix tokens first), so the layout is a 1-D one, as in the paper (not spatially aware).
Input: any N; ``grid`` validated, unused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._base import BaselineAttention, pad_to_blocks
from ._registry import register


def gray(i: int) -> int:
    return i ^ (i >> 1)


def gray_inverse(g: int) -> int:
    i = 0
    while g:
        i ^= g
        g >>= 1
    return i


def hypercube_layout(num_blocks: int) -> list[list[int]]:
    """For each block, the sorted distinct key blocks it attends to (itself included)."""
    k = max(0, math.ceil(math.log2(num_blocks))) if num_blocks > 1 else 0
    out = []
    for i in range(num_blocks):
        nbrs = {i}
        for j in range(k):
            p = gray_inverse(gray(i) ^ (1 << j))
            nbrs.add(p if p < num_blocks else i)
        out.append(sorted(nbrs))
    return out


def hypercube_attention(q, k, v, *, block_size=16, valid=None):
    """Block-sparse softmax attention on (B, h, N, d), N a multiple of ``block_size``."""
    b, h, n, d = q.shape
    bs = block_size
    nb = n // bs
    layout = hypercube_layout(nb)
    width = max(len(r) for r in layout)
    idx = torch.zeros(nb, width, dtype=torch.long)
    ok = torch.zeros(nb, width, dtype=torch.bool)
    for i, r in enumerate(layout):
        idx[i, :len(r)] = torch.tensor(r)
        ok[i, :len(r)] = True
    idx, ok = idx.to(q.device), ok.to(q.device)
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=q.device)
    kb = k.reshape(b, h, nb, bs, d)[:, :, idx].reshape(b, h, nb, width * bs, d)
    vb = v.reshape(b, h, nb, bs, d)[:, :, idx].reshape(b, h, nb, width * bs, d)
    key_ok = (ok.unsqueeze(-1) & valid.view(nb, bs)[idx]).reshape(nb, 1, width * bs)
    qb = q.reshape(b, h, nb, bs, d)
    return F.scaled_dot_product_attention(qb, kb, vb, attn_mask=key_ok).reshape(b, h, n, d)


@register("hypercube")
class HypercubeAttention(BaselineAttention):
    def __init__(self, dim, num_heads=8, *, num_prefix_tokens=0, qkv_bias=False, block_size=16):
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, qkv_bias=qkv_bias)
        self.block_size = int(block_size)

    def attend(self, q, k, v, grid):
        n = q.shape[2]
        q, k, v, valid = pad_to_blocks(q, k, v, self.block_size)
        return hypercube_attention(q, k, v, block_size=self.block_size, valid=valid)[:, :, :n]
