"""``ra`` and ``lara``: randomized attention and linear randomized attention
(Zheng, Wang, Kong, "Linear Complexity Randomized Self-attention Mechanism", ICML 2022,
arXiv 2204.04667). Re-implemented from the paper's equations and the notes in
shared/research/peers_attention.md section 2 (the official code is Apache-2.0; none is copied).

Work in the scaled space x~ = d^{-1/4} x, where softmax's kernel is exp(q~.k~) and the positive
random feature is xi(x, w) = exp(w.x~ - |x~|^2/2), E_{w~N(0,I)}[xi(q,w) xi(k,w)] = exp(q~.k~).
Write l(x, w) = w.x~ - |x~|^2/2.

RA (``ra``, quadratic). For each query n the paper's target density is the mixture
p_n(w) = sum_m softmax_m(q~_n.k~_m) N(w; q~_n + k~_m, I). Sample k' ~ Cat(softmax(q~_n K~^T)),
w = q~_n + k' + eps (eps ~ N(0, sigma^2 I) in training, sigma from ``noise_scale`` below; eps = 0
in eval, as the official code), then

    y_n = sum_m softmax_m(l(k_m, w)) v_m                                      (RA, eq. 7)

and with sigma = 1 (``noise_scale='paper'``) E_{p_n}[y_n] is exactly softmax attention (checked in
the tests by averaging many samples); the default, the official code's sigma = d^{-1/4}, is not.
Complexity O(N^2 d) time and O(N^2) memory per head. ``num_samples`` draws per query are averaged.

LARA (``lara``, linear). c = ``num_landmarks`` proposals N(mu_c, I), mu_c = q-bar_c + k-bar_c with
q-bar = LayerNorm(Linear_d(AdaptiveAvgPool2d(sqrt c)(Q))) on the H x W grid (``'light'``: one
Linear/LayerNorm over the head dim shared by all heads), k-bar likewise with its own parameters
(``proposal_gen='pool-mixed'`` additionally sets k-bar <- softmax(k-bar k-bar^T / sqrt d) k-bar).
Samples w_c = mu_c + eps in training (eps ~ N(0, sigma^2 I), as for RA), mu_c in eval. Then with

    kv_c    = sum_m softmax_m(l(k_m, w_c)) v_m
    bh_c    = exp(l(mu_c, w_c) - logsumexp_c' l(mu_c', w_c))                  (balance heuristic)
    alpha   = max(bh_c + alpha_coeff (t_cn - mean_c t_cn), 1e-8),  t_cn = softmax_n(q-bar_c.q_n/sqrt d)
    log r_cn = log alpha_cn + l(q_n, w_c) + logsumexp_m l(k_m, w_c) - l(mu_c, w_c)
    y_n     = sum_c softmax_c(log r_cn) kv_c                                  (self-normalised MIS)

Since sum_c alpha_c(w) = 1, this is a consistent estimator of softmax attention: with many
samples per proposal (``num_samples``) it converges to it (checked in the tests).
Defaults: num_landmarks=49 (7x7), proposal_gen='pool-mixed', mis_type='mis-opt', alpha_coeff=2.0,
num_samples=1: the paper's ImageNet DeiT runs (the authors' README commands); the official code's
argparse defaults are proposal_gen='pool', alpha_coeff=1.0. Complexity O(N c d) time, O(N c)
memory per head.
Input: a grid for the 2-D pooled proposals (inferred when square). Without one (non-square N and
no grid) the proposals are 1-D, as the official 'adaptive-1d' path: Linear+LayerNorm per token,
then means over c contiguous segments (lengths differing by at most one; tokens themselves when
N <= c). Prefix tokens take part as queries/keys but are not pooled into the proposals.

Training noise (``noise_scale``, both modules). The official code adds eps ~ N(0, I) to w in the
*unscaled* space, i.e. eps~ ~ N(0, d^{-1/2} I) in the scaled space above: ``'official'`` (default,
std d^{-1/4} = 0.35 at d = 64), what produced the paper's ImageNet numbers. ``'paper'`` adds
N(0, I) in the scaled space, the proposal of the paper's derivation, which makes RA exactly
unbiased; its samples scatter about 2.8x more at d = 64.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import BaselineAttention, segment_bounds, segment_means
from ._registry import register


def _log_feat(x, w):
    """l(x, w) = w.x - |x|^2/2 for all pairs: x (..., N, d), w (..., C, d) -> (..., C, N)."""
    return w @ x.transpose(-2, -1) - 0.5 * (x * x).sum(-1).unsqueeze(-2)


NOISE_SCALES = ("official", "paper")


def noise_std(noise_scale: str, head_dim: int) -> float:
    """Standard deviation of the training noise in the scaled space (see the module docstring)."""
    if noise_scale == "official":
        return head_dim ** -0.25
    if noise_scale == "paper":
        return 1.0
    raise ValueError(f"noise_scale must be one of {NOISE_SCALES}, got {noise_scale!r}")


def randomized_attention(q, k, v, *, num_samples=1, noise=True, noise_std=1.0, generator=None):
    """RA on (B, h, N, d) tensors (unscaled q, k); ``noise_std`` is the standard deviation of the
    training noise in the scaled space. Returns (B, h, N, d)."""
    d = q.shape[-1]
    qs, ks = q * d ** -0.25, k * d ** -0.25
    logits = qs @ ks.transpose(-2, -1)                                   # (B,h,N,N)
    b, h, n, m = logits.shape
    probs = logits.detach().softmax(-1).reshape(-1, m)
    idx = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    idx = idx.view(b, h, n * num_samples)
    ksel = torch.gather(ks, 2, idx.unsqueeze(-1).expand(-1, -1, -1, d))  # (B,h,N*S,d)
    w = qs.repeat_interleave(num_samples, dim=2) + ksel
    if noise:
        w = w + noise_std * torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype)
    attn = _log_feat(ks, w).softmax(-1)                                  # (B,h,N*S,N)
    out = attn @ v
    return out.view(b, h, n, num_samples, -1).mean(3)


@register("ra")
class RandomizedAttention(BaselineAttention):
    def __init__(self, dim, num_heads=8, *, num_prefix_tokens=0, qkv_bias=False, num_samples=1,
                 noise_scale="official"):
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, qkv_bias=qkv_bias)
        self.num_samples = _positive("ra", "num_samples", num_samples)
        self.noise_scale, self.noise_std = noise_scale, noise_std(noise_scale, self.head_dim)

    def attend(self, q, k, v, grid):
        return randomized_attention(q, k, v, num_samples=self.num_samples, noise=self.training,
                                    noise_std=self.noise_std)

    def extra_repr(self):
        return super().extra_repr() + f", num_samples={self.num_samples}, noise_scale={self.noise_scale!r}"


def lara_core(q, k, v, mu, qbar, *, num_samples=1, noise=True, noise_std=1.0, alpha_coeff=1.0,
              mis_type="mis-opt", generator=None):
    """LARA on (B, h, N, d) q, k, v (unscaled) and proposals mu (B, h, c, d) in the scaled space;
    qbar (B, h, c, d) are the query landmarks used by the 'mis-opt' weights; ``noise_std`` is the
    standard deviation of the training noise in the scaled space."""
    d = q.shape[-1]
    c = mu.shape[2]
    qs, ks = q * d ** -0.25, k * d ** -0.25
    mu_s = mu.repeat_interleave(num_samples, dim=2)                      # (B,h,C,d), C = c*S
    w = mu_s
    if noise:
        w = w + noise_std * torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype)
    log_k = _log_feat(ks, w)                                             # (B,h,C,N)
    kv = log_k.softmax(-1) @ v                                           # (B,h,C,d)
    lse_k = torch.logsumexp(log_k, -1)                                   # (B,h,C)
    log_q = _log_feat(qs, w)                                             # (B,h,C,N)
    log_prop = _log_feat(mu, w)                                          # (B,h,C,c): l(mu_c', w)
    own = torch.arange(c, device=q.device).repeat_interleave(num_samples)
    log_own = log_prop.gather(-1, own.view(1, 1, -1, 1).expand(*log_prop.shape[:3], 1))[..., 0]
    bh = torch.exp(log_own - torch.logsumexp(log_prop, -1))             # (B,h,C)
    if mis_type == "mis-opt":
        t = (qbar @ q.transpose(-2, -1) * d ** -0.5).softmax(-1)        # (B,h,c,N)
        t = t - t.mean(2, keepdim=True)
        t = t.repeat_interleave(num_samples, dim=2)
        alpha = (bh.unsqueeze(-1) + alpha_coeff * t).clamp_min(1e-8)    # (B,h,C,N)
    elif mis_type == "bh":
        alpha = bh.unsqueeze(-1).clamp_min(1e-8).expand_as(log_q)
    else:
        raise ValueError(f"lara: mis_type must be 'mis-opt' or 'bh', got {mis_type!r}")
    log_r = alpha.log() + log_q + (lse_k - log_own).unsqueeze(-1)       # (B,h,C,N)
    wts = log_r.softmax(2)                                               # over samples
    return wts.transpose(-2, -1) @ kv                                    # (B,h,N,d)


def lara_segment_means(x, c):
    """Means of ``x`` (..., N, d) over c contiguous segments of the token axis whose lengths differ
    by at most one (the shorter ones first, as the official 1-D LARA); x itself when N <= c."""
    n = x.shape[-2]
    return x if n <= c else segment_means(x, segment_bounds(n, c, longer_first=False))


class _Proposal(nn.Module):
    """Landmarks per head, parameters shared by heads: LayerNorm(Linear_d(pool2d(x))) on a grid,
    lara_segment_means(LayerNorm(Linear_d(x))) without one (the official 'pool' / 'adaptive-1d')."""

    def __init__(self, head_dim, num_landmarks):
        super().__init__()
        self.side = math.isqrt(num_landmarks)
        if self.side * self.side != num_landmarks:
            raise ValueError(f"lara: num_landmarks must be a perfect square (a sqrt x sqrt pool), "
                             f"got {num_landmarks}")
        self.num_landmarks = num_landmarks
        self.lin = nn.Linear(head_dim, head_dim)
        self.norm = nn.LayerNorm(head_dim)

    def forward(self, x, grid):
        b, h, n, d = x.shape
        if grid is None:
            return lara_segment_means(self.norm(self.lin(x)), self.num_landmarks)
        img = x.reshape(b * h, grid[0], grid[1], d).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(img, self.side).flatten(2).transpose(1, 2)
        return self.norm(self.lin(pooled.reshape(b, h, -1, d)))


def _positive(name, option, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {option} must be a positive int, got {value!r}")
    return value


@register("lara")
class LinearRandomizedAttention(BaselineAttention):
    def __init__(self, dim, num_heads=8, *, num_prefix_tokens=0, qkv_bias=False,
                 num_landmarks=49, proposal_gen="pool-mixed", mis_type="mis-opt", alpha_coeff=2.0,
                 num_samples=1, noise_scale="official"):
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, qkv_bias=qkv_bias)
        if proposal_gen not in ("pool", "pool-mixed"):
            raise ValueError(f"lara: proposal_gen must be 'pool' or 'pool-mixed', got {proposal_gen!r}")
        if mis_type not in ("mis-opt", "bh"):
            raise ValueError(f"lara: mis_type must be 'mis-opt' or 'bh', got {mis_type!r}")
        self.q_prop = _Proposal(self.head_dim, num_landmarks)
        self.k_prop = _Proposal(self.head_dim, num_landmarks)
        self.proposal_gen, self.mis_type = proposal_gen, mis_type
        self.alpha_coeff = float(alpha_coeff)
        self.num_samples = _positive("lara", "num_samples", num_samples)
        self.noise_scale, self.noise_std = noise_scale, noise_std(noise_scale, self.head_dim)

    def attend(self, q, k, v, grid):
        p = self.num_prefix_tokens
        qbar = self.q_prop(q[:, :, p:], grid)
        kbar = self.k_prop(k[:, :, p:], grid)
        if self.proposal_gen == "pool-mixed" and grid is not None:  # 2-D only, as the official
            kbar = (kbar @ kbar.transpose(-2, -1) * self.scale).softmax(-1) @ kbar
        mu = (qbar + kbar) * self.head_dim ** -0.25
        return lara_core(q, k, v, mu, qbar, num_samples=self.num_samples, noise=self.training,
                         noise_std=self.noise_std, alpha_coeff=self.alpha_coeff,
                         mis_type=self.mis_type)

    def extra_repr(self):
        return (super().extra_repr() + f", num_landmarks={self.q_prop.num_landmarks}, "
                f"proposal_gen={self.proposal_gen!r}, mis_type={self.mis_type!r}, "
                f"alpha_coeff={self.alpha_coeff}, num_samples={self.num_samples}, "
                f"noise_scale={self.noise_scale!r}")
