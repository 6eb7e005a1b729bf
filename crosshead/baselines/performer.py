"""``performer``: FAVOR+ (Choromanski et al., "Rethinking Attention with Performers", ICLR 2021).

Through the ``performer-pytorch`` package (``FastAttention``, MIT). Positive orthogonal random
features approximate the softmax kernel exp(q.k / sqrt(d)):

    phi(x) = m^{-1/2} exp(Omega x~ - |x~|^2 / 2 - stabiliser),   x~ = d^{-1/4} x
    Y = diag(phi(Q) (phi(K)^T 1))^{-1} phi(Q) (phi(K)^T V)

Omega (m x d) is built from orthogonal Gaussian blocks (QR) with chi_d row norms
(``ortho_scaling=0``). E[phi(q).phi(k)] = exp(q.k/sqrt d) when every row of Omega is N(0, I), so
with many features the output approaches softmax attention.

``orthogonal_features``: ``'package'`` (default) keeps the package's blocks, the transposed Q of
``torch.linalg.qr`` of a Gaussian matrix as it comes, like Google's reference code. Householder
QR leaves Q not Haar-distributed: the i-th coordinate of row i of a block is negative more often
than not (always for row 0; measured at d = 8: mean signs -1, -0.86, ..., +0.51), so the rows
are not isotropic and the kernel estimate is slightly biased (docs/baselines.md). ``'haar'`` multiplies Q's columns by the signs of R's diagonal (the standard
way to sample a Haar orthogonal matrix), which makes every row N(0, I) in distribution, as the
paper's analysis assumes; redraws use the same rule.

Defaults (package): ``nb_features = int(d ln d)`` (266 for d=64); the projection is redrawn
every ``feature_redraw_interval=1000`` training forwards (None: never), as the package's
``ProjectionUpdater`` does. Complexity: O(N m d) time, O(N m + m d) memory per head.
Input: any N; ``grid`` validated, unused. Non-causal only.
"""

from __future__ import annotations

import functools
import math

import torch

from ._base import BaselineAttention
from ._registry import register


ORTHOGONAL_FEATURES = ("package", "haar")


def haar_orthogonal_features(nb_rows, nb_columns, scaling=0, device=None):
    """(nb_rows, nb_columns) blocks of orthonormal rows of Haar-random orthogonal matrices (QR of
    a Gaussian matrix, Q's columns times the signs of R's diagonal), rows rescaled by chi norms
    (``scaling=0``) or sqrt(nb_columns) (``scaling=1``), as the package's
    gaussian_orthogonal_random_matrix but isotropic."""
    blocks = []
    for _ in range(math.ceil(nb_rows / nb_columns)):
        q, r = torch.linalg.qr(torch.randn(nb_columns, nb_columns))
        blocks.append((q * r.diagonal().sign()).t())
    rows = torch.cat(blocks)[:nb_rows]
    if scaling == 0:
        norms = torch.randn(nb_rows, nb_columns).norm(dim=1, keepdim=True)
    elif scaling == 1:
        norms = torch.full((nb_rows, 1), math.sqrt(nb_columns))
    else:
        raise ValueError(f"performer: scaling must be 0 or 1, got {scaling!r}")
    return (norms * rows).to(device)


@register("performer", requires=(("performer_pytorch", "performer-pytorch"),))
class PerformerAttention(BaselineAttention):
    def __init__(self, dim, num_heads=8, *, num_prefix_tokens=0, qkv_bias=False,
                 nb_features=None, feature_redraw_interval=1000, orthogonal_features="package"):
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, qkv_bias=qkv_bias)
        from performer_pytorch import FastAttention

        if orthogonal_features not in ORTHOGONAL_FEATURES:
            raise ValueError(f"performer: orthogonal_features must be one of {ORTHOGONAL_FEATURES}, "
                             f"got {orthogonal_features!r}")
        self.fast_attention = FastAttention(self.head_dim, nb_features=nb_features, ortho_scaling=0,
                                            causal=False, generalized_attention=False)
        self.orthogonal_features = orthogonal_features
        if orthogonal_features == "haar":
            fa = self.fast_attention
            fa.create_projection = functools.partial(haar_orthogonal_features, fa.nb_features,
                                                     self.head_dim, 0)
            self.redraw_features()
        self.nb_features = self.fast_attention.nb_features
        self.feature_redraw_interval = feature_redraw_interval
        self.register_buffer("calls_since_redraw", torch.zeros((), dtype=torch.long),
                             persistent=False)

    @torch.no_grad()
    def redraw_features(self):
        self.fast_attention.redraw_projection_matrix(self.fast_attention.projection_matrix.device)

    def attend(self, q, k, v, grid):
        if self.training and self.feature_redraw_interval is not None:
            if int(self.calls_since_redraw) >= self.feature_redraw_interval:
                self.redraw_features()
                self.calls_since_redraw.zero_()
            else:
                self.calls_since_redraw += 1
        return self.fast_attention(q, k, v)

    def extra_repr(self):
        return (super().extra_repr() + f", nb_features={self.nb_features}, "
                f"orthogonal_features={self.orthogonal_features!r}")
