"""``performer``: FAVOR+ (Choromanski et al., "Rethinking Attention with Performers", ICLR 2021).

Through the ``performer-pytorch`` package (``FastAttention``, MIT). Positive orthogonal random
features approximate the softmax kernel exp(q.k / sqrt(d)):

    phi(x) = m^{-1/2} exp(Omega x~ - |x~|^2 / 2 - stabiliser),   x~ = d^{-1/4} x
    Y = diag(phi(Q) (phi(K)^T 1))^{-1} phi(Q) (phi(K)^T V)

Omega (m x d) is built from orthogonal Gaussian blocks (QR) with chi_d row norms
(``ortho_scaling=0``). E[phi(q).phi(k)] = exp(q.k/sqrt d), so with many features the output
approaches softmax attention.

Defaults (package): ``nb_features = int(d ln d)`` (266 for d=64); the projection is redrawn
every ``feature_redraw_interval=1000`` training forwards (None: never), as the package's
``ProjectionUpdater`` does. Complexity: O(N m d) time, O(N m + m d) memory per head.
Input: any N; ``grid`` validated, unused. Non-causal only.
"""

from __future__ import annotations

import torch

from ._base import BaselineAttention
from ._registry import register


@register("performer", requires=(("performer_pytorch", "performer-pytorch"),))
class PerformerAttention(BaselineAttention):
    def __init__(self, dim, num_heads=8, *, num_prefix_tokens=0, qkv_bias=False,
                 nb_features=None, feature_redraw_interval=1000):
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, qkv_bias=qkv_bias)
        from performer_pytorch import FastAttention

        self.fast_attention = FastAttention(self.head_dim, nb_features=nb_features, ortho_scaling=0,
                                            causal=False, generalized_attention=False)
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
        return super().extra_repr() + f", nb_features={self.nb_features}"
