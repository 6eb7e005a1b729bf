"""``vars_d``: VARS-D, visual attention from recurrent sparse reconstruction (Shi, Song, Joshi,
Darrell, Wang, "Visual Attention Emerges from Recurrent Sparse Reconstruction", ICML 2022,
arXiv 2204.10962). Re-implemented from the paper and the notes in
shared/research/peers_attention.md section 8 (the authors' repository has no licence).

Attention as sparse reconstruction of the values over a dictionary built from the tokens:
per head, keys are tied to queries (qkv projects to q and v only).
 1. q^ = q / |q|;  phi(q^) = exp(q^ Omega - |q^|^2/2) / sqrt(m), Omega in R^{d x m} a fixed
    Gaussian (m = ``rand_feat_dim_ratio`` * d); Phi = phi normalised to unit L2 norm over tokens
    (per dictionary atom).
 2. G = Phi^T Phi (m x m), b = Phi^T V (m x d).
 3. Unrolled ISTA for  min_z 1/2 |Phi z - V|^2 + lam' |z|_1  with learned tweaks:
    G~ = T G T (T learned, init I), lam' = lam * a (a learned, init 1),
    L' = (max_i sum_j |G_ij| + 1, no grad) / l (l learned, init 1),
    z_0 = S(b, lam');  repeat ``num_step`` times: z <- S(z - (G~ z - b) / L', lam' / L'),
    with the shrinkage S(x, t) = sign(x) GELU(|x| - t) (``shrink='gelu'``, as the paper's code)
    or the exact soft threshold sign(x) ReLU(|x| - t) (``shrink='relu'``).
 4. Y = Phi z, heads concatenated, output projection.
With ``shrink='relu'`` and the tweaks at their initial values, many steps converge to the LASSO
solution; the tests check its optimality (KKT) conditions.

Defaults (paper code): lam=0.3, rand_feat_dim_ratio=2, num_step=5, shrink='gelu'; T is one
m x m matrix shared by the heads (per-head sharing is not stated in the notes).
Complexity: O(N m d + T m^2 d) time, O(N m + m^2) memory per head: linear in N.
Input: any N; ``grid`` validated, unused. Note the tied keys: one projection fewer than MHSA.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import BaselineAttention, from_heads, to_heads
from ._registry import register


def shrink(x, t, kind="gelu"):
    act = F.gelu if kind == "gelu" else F.relu
    return torch.sign(x) * act(x.abs() - t)


@register("vars_d")
class VARSDAttention(BaselineAttention):
    def __init__(self, dim, num_heads=8, *, num_prefix_tokens=0, qkv_bias=False, lam=0.3,
                 rand_feat_dim_ratio=2, num_step=5, shrink="gelu"):
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, make_qkv=False)
        if shrink not in ("gelu", "relu"):
            raise ValueError(f"vars_d: shrink must be 'gelu' or 'relu', got {shrink!r}")
        d = self.head_dim
        self.m = int(rand_feat_dim_ratio * d)
        self.qv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("omega", torch.randn(d, self.m))
        self.T = nn.Parameter(torch.eye(self.m))
        self.lam_scale = nn.Parameter(torch.ones(()))
        self.step_scale = nn.Parameter(torch.ones(()))
        self.lam, self.num_step, self.shrink = float(lam), int(num_step), shrink

    def dictionary(self, q):
        """Phi (B, h, N, m) from queries (B, h, N, d)."""
        qn = F.normalize(q, dim=-1)
        phi = torch.exp(qn @ self.omega - 0.5 * (qn * qn).sum(-1, keepdim=True)) / self.m ** 0.5
        return F.normalize(phi, dim=-2)

    def reconstruct(self, phi, v, num_step=None):
        """ISTA codes z (B, h, m, d) for values v (B, h, N, d) over the dictionary phi."""
        num_step = self.num_step if num_step is None else num_step
        g = phi.transpose(-2, -1) @ phi                                     # (B,h,m,m)
        b = phi.transpose(-2, -1) @ v                                       # (B,h,m,d)
        gt = self.T @ g @ self.T
        lam = self.lam * self.lam_scale
        lip = (g.abs().sum(-1).amax(-1) + 1.0).detach()[..., None, None] / self.step_scale
        z = shrink(b, lam, self.shrink)
        for _ in range(num_step):
            z = shrink(z - (gt @ z - b) / lip, lam / lip, self.shrink)
        return z

    def forward(self, x, grid=None):
        self.check_input(x, grid)
        q, v = self.qv(x).chunk(2, dim=-1)
        q, v = to_heads(q, self.num_heads), to_heads(v, self.num_heads)
        phi = self.dictionary(q)
        out = phi @ self.reconstruct(phi, v)
        return self.proj(from_heads(out))
