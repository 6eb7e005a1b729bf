"""``flash_gau``: FLASH / gated attention unit (Hua, Dai, Liu, Le, "Transformer Quality in Linear
Time", ICML 2022, arXiv 2202.10447), through the ``FLASH-pytorch`` package (``FLASH``, MIT).

GAU is a single-head gated *block*, not a (q, k, v) operator, so it is run as a whole block in the
attention slot. With X^ the (already normalised) input, U, V = SiLU(X^ W_h) (N x e each),
Z = SiLU(X^ W_z) (N x s) and four per-dimension scale/offsets of Z giving Q_quad, K_quad, Q_lin,
K_lin, FLASH's mixed chunk attention over groups of G tokens is

    quad_g = relu^2(Q_quad,g K_quad,g^T / G + b_rel) V_g            (exact, inside each group)
    lin_g  = Q_lin,g (sum_h K_lin,h^T V_h) / N                       (linear, across groups)
    out    = (U o (quad + lin)) W_o

We return ``out`` (the package adds the residual x and a LayerNorm; we replace the norm by an
identity and drop the residual, since a ViT block already pre-normalises and adds x around its
attention). ``num_heads`` is ignored (GAU is single-head).

Defaults: group_size=256 (package; at N <= 256 the whole sequence is one group, i.e. plain GAU
plus the global linear term), query_key_dim s=128 (paper), ``expansion_factor=None`` = chosen so the
block has the same parameter count as softmax MHSA's qkv + output projections (4 dim^2 + 4 dim);
pass 2.0 for the paper's GAU that replaces attention *and* the MLP.
Complexity: O(N G s + N s e) time, O(N G + s e) memory. Input: any N (raster order); ``grid``
validated, unused.
"""

from __future__ import annotations

import torch.nn as nn

from ._base import BaselineAttention
from ._registry import register


def _gau_params(dim, e, s):
    return dim * 2 * e + 2 * e + dim * s + s + 8 * s + e * dim + dim + 32


def matched_expansion(dim, query_key_dim):
    """Expansion factor giving FLASH the parameter count of MHSA projections (4 dim^2 + 4 dim)."""
    target = 4 * dim * dim + 4 * dim
    e = max(1, round((target - _gau_params(dim, 0, query_key_dim)) / (3 * dim + 2)))
    return (e + 0.5) / dim


@register("flash_gau", requires=(("flash_pytorch", "FLASH-pytorch"),))
class FlashGAU(BaselineAttention):
    def __init__(self, dim, num_heads=8, *, num_prefix_tokens=0, group_size=256,
                 query_key_dim=128, expansion_factor=None):
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, make_qkv=False)
        from flash_pytorch import FLASH

        if expansion_factor is None:
            expansion_factor = matched_expansion(dim, query_key_dim)
        self.flash = FLASH(dim=dim, group_size=group_size, query_key_dim=query_key_dim,
                           expansion_factor=expansion_factor, causal=False, norm_klass=nn.Identity)
        self.group_size = group_size
        self._branch = None
        self.flash.to_out.register_forward_hook(self._keep_branch)

    def _keep_branch(self, module, args, output):
        self._branch = output

    def forward(self, x, grid=None):
        self.check_input(x, grid)
        self.flash(x)
        out, self._branch = self._branch, None
        return out
