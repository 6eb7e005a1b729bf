"""``ripple``: ripple attention (Zheng, Pan, Kong, "Ripple Attention for Visual Perception with
Sub-quadratic Complexity", ICML 2022, arXiv 2110.02453). No public code exists; re-implemented
from the paper's description (see shared/research/peers_attention.md section 1, where parts of
the parameterisation are marked as recalled, not verified -- the choices below are ours where
noted).

Kernelised (RFA / Performer-style) attention whose token contributions are re-weighted by their
2-D distance to the query. Positive random features phi(x) = exp(Omega x~ - |x~|^2/2) / sqrt(D),
x~ = d^{-1/4} x, Omega ~ N(0, I)^{D x d} (fixed buffer). For a grid query p, key tokens are split
into *vicinal groups* G_r(p) = {m : Chebyshev distance(p, m) = r} (rings). Spatial weights come
from a stick-breaking transform of query-dependent logits (ours: one Linear(d -> R-1) shared by
the heads):

    s_r(p) = sigmoid(w_r . q_p + b_r),  alpha_r = s_r prod_{r'<r} (1 - s_r'),  r = 0..R-2
    alpha_tail = prod_{r'<R-1} (1 - s_r')  -- every group r >= R-1 gets this same weight
                                             (the paper's threshold radius r^ = R)

    y_p = sum_r alpha_r(p) phi(q_p)^T S_r(p) / sum_r alpha_r(p) phi(q_p)^T z_r(p),
    S_r(p) = sum_{m in G_r(p)} phi(k_m) v_m^T,  z_r(p) = sum_{m in G_r(p)} phi(k_m).

Two evaluations of the same output (``impl``; the tests check they agree):
- ``attend_quadratic`` forms the N x N weight matrix: O(N^2 (D + d)) time, O(N^2) memory per head.
- ``attend_dp`` is the paper's dynamic programme: summed-area tables of phi(k) v^T and phi(k) give
  any square's sum in O(1); a ring is the difference of two squares, so by telescoping
  sum_r alpha_r Ring_r = sum_{r<R-1} (alpha_r - alpha_{r+1}) Square_r + alpha_tail Total,
  costing O(N R D d) time and O(N D d) memory per head: the tables hold D (d + 1) = 4160 floats
  per token and head at d = 64, so its constant is large.
``impl='auto'`` (default) takes the quadratic form up to ``AUTO_DP_FROM`` grid tokens and the DP
above: the measured crossover (ViT-S heads, CPU, forward+backward; docs/baselines.md).
Prefix (CLS) tokens, our choice: as keys they get weight alpha_0 (like the query's own cell);
as queries they attend every token with weight 1 (plain kernelised attention).

Defaults: num_features D = 64, max_radius R = 4 (r^ = 4 in the paper's figure),
sat_dtype=None (the input dtype; torch.float64 keeps the tables' running sums in double
precision against cancellation); the paper's
adaptive threshold tau (which picks r^ per input) is replaced by this fixed R.
Complexity: see ``impl`` above.
Input: a 2-D grid (required; inferred when N - prefix is a perfect square).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._base import BaselineAttention
from ._registry import register


@register("ripple")
class RippleAttention(BaselineAttention):
    needs_grid = True

    IMPLS = ("auto", "quadratic", "dp")
    AUTO_DP_FROM = 73 * 73  # grid tokens: the measured forward+backward memory crossover

    def __init__(self, dim, num_heads=8, *, num_prefix_tokens=0, qkv_bias=False,
                 num_features=64, max_radius=4, sat_dtype=None, impl="auto"):
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, qkv_bias=qkv_bias)
        if max_radius < 2:
            raise ValueError(f"ripple: max_radius must be >= 2, got {max_radius}")
        if impl not in self.IMPLS:
            raise ValueError(f"ripple: impl must be one of {self.IMPLS}, got {impl!r}")
        self.impl = impl
        self.num_features, self.max_radius = int(num_features), int(max_radius)
        self.sat_dtype = sat_dtype
        self.register_buffer("omega", torch.randn(self.num_features, self.head_dim))
        self.stick = nn.Linear(self.head_dim, self.max_radius - 1)

    # -- pieces --------------------------------------------------------------------------------
    def features(self, x, is_query):
        xs = x * self.head_dim ** -0.25
        logits = xs @ self.omega.t() - 0.5 * (xs * xs).sum(-1, keepdim=True)
        # stabilisers cancel in the ratio: per row for queries, one max per (batch, head) for keys
        stab = logits.amax(-1, keepdim=True) if is_query else logits.amax((-2, -1), keepdim=True)
        return torch.exp(logits - stab.detach()) / self.num_features ** 0.5

    def spatial_weights(self, q_grid):
        """(B, h, Ng, R): alpha_0..alpha_{R-2} and alpha_tail, summing to 1 over the last axis."""
        s = torch.sigmoid(self.stick(q_grid))                               # (B,h,Ng,R-1)
        rest = torch.cumprod(1 - s, dim=-1)
        before = torch.cat([torch.ones_like(s[..., :1]), rest[..., :-1]], dim=-1)
        return torch.cat([s * before, rest[..., -1:]], dim=-1)

    @staticmethod
    def chebyshev(grid, device):
        h, w = grid
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        return torch.maximum((ys[:, None] - ys[None, :]).abs(), (xs[:, None] - xs[None, :]).abs())

    # -- quadratic reference -------------------------------------------------------------------
    def weight_matrix(self, q, grid):
        """Explicit (B, h, N, N) spatial weights, prefix rows/columns included."""
        p = self.num_prefix_tokens
        alpha = self.spatial_weights(q[:, :, p:])                           # (B,h,Ng,R)
        dist = self.chebyshev(grid, q.device).clamp_max(self.max_radius - 1)
        ng = dist.shape[0]
        wg = alpha.gather(-1, dist.expand(*alpha.shape[:2], ng, ng))        # (B,h,Ng,Ng)
        wp = alpha[..., :1].expand(-1, -1, -1, p)                           # prefix keys: alpha_0
        rows = torch.cat([wp, wg], dim=-1)
        top = torch.ones(*q.shape[:2], p, p + ng, device=q.device, dtype=q.dtype)
        return torch.cat([top, rows], dim=2)

    def attend_quadratic(self, q, k, v, grid):
        fq, fk = self.features(q, True), self.features(k, False)
        a = (fq @ fk.transpose(-2, -1)) * self.weight_matrix(q, grid)
        return (a @ v) / a.sum(-1, keepdim=True)

    def chosen_impl(self, grid) -> str:
        """'quadratic' or 'dp': what ``attend`` runs for this grid."""
        if self.impl != "auto":
            return self.impl
        return "dp" if grid[0] * grid[1] > self.AUTO_DP_FROM else "quadratic"

    def attend(self, q, k, v, grid):
        if self.chosen_impl(grid) == "dp":
            return self.attend_dp(q, k, v, grid)
        return self.attend_quadratic(q, k, v, grid)

    def extra_repr(self):
        return (super().extra_repr() + f", num_features={self.num_features}, "
                f"max_radius={self.max_radius}, impl={self.impl!r}")

    # -- summed-area-table dynamic programme ---------------------------------------------------
    def attend_dp(self, q, k, v, grid):
        b, nh, n, d = q.shape
        p, (h, w), big_r = self.num_prefix_tokens, grid, self.max_radius
        fq, fk = self.features(q, True), self.features(k, False)
        ve = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)           # (B,h,N,d+1)
        kv = (fk.unsqueeze(-1) * ve.unsqueeze(-2)).flatten(-2)             # (B,h,N,D*(d+1))
        total = kv.sum(2)                                                  # (B,h,C)
        prefix = kv[:, :, :p].sum(2)
        field = kv[:, :, p:].reshape(b, nh, h, w, -1)
        # prefix sums, then differences of them; ``sat_dtype=torch.float64`` keeps the running
        # sums in double precision if cancellation ever matters (float32 measured ~2e-4 max abs
        # error against a float64 quadratic reference at 14x14)
        sat = field.to(self.sat_dtype or field.dtype).cumsum(2).cumsum(3)
        sat = nn.functional.pad(sat, (0, 0, 1, 0, 1, 0))                   # (B,h,H+1,W+1,C)
        ys = torch.arange(h, device=q.device)
        xs = torch.arange(w, device=q.device)

        def square(r):  # (B,h,H,W,C): sums over the (2r+1)^2 square around each cell, clipped
            y1, y2 = (ys - r).clamp_min(0), (ys + r + 1).clamp_max(h)
            x1, x2 = (xs - r).clamp_min(0), (xs + r + 1).clamp_max(w)
            return (sat[:, :, y2[:, None], x2[None, :]] - sat[:, :, y1[:, None], x2[None, :]]
                    - sat[:, :, y2[:, None], x1[None, :]]
                    + sat[:, :, y1[:, None], x1[None, :]]).to(q.dtype)

        fqg = fq[:, :, p:].reshape(b, nh, h, w, self.num_features)
        alpha = self.spatial_weights(q[:, :, p:]).reshape(b, nh, h, w, big_r)

        def contract(ctx):  # phi(q_p)^T ctx_p for ctx (B,h,H,W,C) -> (B,h,H,W,d+1)
            return torch.einsum("bhyxm,bhyxme->bhyxe", fqg,
                                ctx.reshape(*ctx.shape[:-1], self.num_features, d + 1))

        tot = total.reshape(b, nh, self.num_features, d + 1)
        tot_grid = (total - prefix).reshape(b, nh, self.num_features, d + 1)
        out = alpha[..., -1:] * torch.einsum("bhyxm,bhme->bhyxe", fqg, tot_grid)
        for r in range(big_r - 1):
            out = out + (alpha[..., r] - alpha[..., r + 1]).unsqueeze(-1) * contract(square(r))
        if p:
            pre = prefix.reshape(b, nh, self.num_features, d + 1)
            out = out + alpha[..., :1] * torch.einsum("bhyxm,bhme->bhyxe", fqg, pre)
        out = out.reshape(b, nh, h * w, d + 1)
        if p:
            head = torch.einsum("bhnm,bhme->bhne", fq[:, :, :p], tot)
            out = torch.cat([head, out], dim=2)
        return out[..., :d] / out[..., d:]
