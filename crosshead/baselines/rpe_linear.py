"""``rpe_linear``: linear attention masked by a learned 2-D relative-position mask, evaluated with
the FFT (Choromanski, Lin, Chen, et al., "From block-Toeplitz matrices to differential equations
on graphs: towards a general theory for scalable masked Transformers", ICML 2022, arXiv 2107.07999).

Masked kernel attention with features phi(q) = relu(q / sqrt(d)) + 1e-8, phi(k) = relu(k) + 1e-8
(as the paper's vision code, m = d features) and a mask M on the H x W grid that depends only on
the 2-D offset, M[(y, x), (y', x')] = |f_h(y - y', x - x')| (one learned table f_h per head,
initialised to ones, so training starts from plain linear attention); prefix (CLS) rows and
columns of M are 1:

    Y = D^{-1} (M o phi(Q) phi(K)^T) V,   D = diag((M o phi(Q) phi(K)^T) 1)          (explicit)

Since M is 2-level block-Toeplitz, (M o phi(Q) phi(K)^T) V = sum_l diag(phi(Q)_l) M (diag(phi(K)_l) V):
m (d + 1) products of M with grid fields, each a 2-D linear convolution done with ``rfft2`` on a
zero-padded (2H x 2W) grid. Two evaluations of the same output (``impl``; the tests check they
agree):
- ``attend_explicit``: the N x N masked form above, O(N^2 d) time and O(N^2) memory per head; the
  form the paper's official vision code runs.
- ``attend_fft``: the paper's block-Toeplitz algorithm, O(m d N log N) time and O(m d N) memory
  per head; its constant is large (m (d + 1) = 4160 grids of 4N points per head at d = 64).
``impl='auto'`` (default) takes the explicit form up to ``AUTO_FFT_FROM`` grid tokens and the FFT
above: the measured crossover (ViT-S heads, CPU, forward+backward; docs/baselines.md).

Defaults: grid_size=(14, 14) -- the table covers offsets up to (13, 13), so any grid up to
14 x 14 works (larger grids raise ValueError); features 'relu'.
Complexity: see ``impl`` above.
Input: a 2-D grid (required; inferred when N - prefix is a perfect square).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._base import BaselineAttention
from ._registry import register


@register("rpe_linear")
class RPEMaskedLinearAttention(BaselineAttention):
    needs_grid = True

    IMPLS = ("auto", "explicit", "fft")
    AUTO_FFT_FROM = 116 * 116  # grid tokens: the measured forward+backward memory crossover

    def __init__(self, dim, num_heads=8, *, num_prefix_tokens=0, qkv_bias=False,
                 grid_size=(14, 14), impl="auto"):
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, qkv_bias=qkv_bias)
        if impl not in self.IMPLS:
            raise ValueError(f"rpe_linear: impl must be one of {self.IMPLS}, got {impl!r}")
        self.impl = impl
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        gh, gw = self.grid_size
        self.rpe = nn.Parameter(torch.ones(num_heads, 2 * gh - 1, 2 * gw - 1))

    def features(self, q, k):
        return torch.relu(q * self.scale) + 1e-8, torch.relu(k) + 1e-8

    def mask_table(self, grid):
        """|f| for offsets in [-(H-1), H-1] x [-(W-1), W-1]: (h, 2H-1, 2W-1)."""
        h, w = grid
        gh, gw = self.grid_size
        if h > gh or w > gw:
            raise ValueError(f"rpe_linear: grid {h}x{w} exceeds the relative-position table built "
                             f"for grid_size={self.grid_size}; create it with grid_size=({h}, {w})")
        return self.rpe[:, gh - h:gh + h - 1, gw - w:gw + w - 1].abs()

    def dense_mask(self, grid):
        """The explicit N x N mask (h, N, N) including prefix rows/columns of ones."""
        h, w = grid
        tab = self.mask_table(grid)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ys, xs = ys.flatten().to(tab.device), xs.flatten().to(tab.device)
        dy = ys[:, None] - ys[None, :] + h - 1
        dx = xs[:, None] - xs[None, :] + w - 1
        m = tab[:, dy, dx]
        p = self.num_prefix_tokens
        if p:
            m = nn.functional.pad(m, (p, 0, p, 0), value=1.0)
        return m

    def attend_explicit(self, q, k, v, grid):
        fq, fk = self.features(q, k)
        a = (fq @ fk.transpose(-2, -1)) * self.dense_mask(grid)
        return (a @ v) / a.sum(-1, keepdim=True)

    def chosen_impl(self, grid) -> str:
        """'explicit' or 'fft': what ``attend`` runs for this grid."""
        if self.impl != "auto":
            return self.impl
        return "fft" if grid[0] * grid[1] > self.AUTO_FFT_FROM else "explicit"

    def attend(self, q, k, v, grid):
        if self.chosen_impl(grid) == "fft":
            return self.attend_fft(q, k, v, grid)
        return self.attend_explicit(q, k, v, grid)

    def extra_repr(self):
        return super().extra_repr() + f", grid_size={self.grid_size}, impl={self.impl!r}"

    def attend_fft(self, q, k, v, grid):
        b, nh, n, d = q.shape
        p = self.num_prefix_tokens
        h, w = grid
        fq, fk = self.features(q, k)
        ve = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)          # (B,h,N,d+1)
        kv = fk.unsqueeze(-1) * ve.unsqueeze(-2)                            # (B,h,N,m,d+1)
        kv_prefix = kv[:, :, :p].sum(2)                                     # (B,h,m,d+1)
        field = kv[:, :, p:].reshape(b, nh, h, w, -1).permute(0, 1, 4, 2, 3)  # (B,h,C,H,W)
        ph, pw = 2 * h, 2 * w
        kern = torch.zeros(nh, ph, pw, device=q.device, dtype=q.dtype)
        tab = self.mask_table(grid)                                         # (h, 2H-1, 2W-1)
        oy = torch.arange(-(h - 1), h, device=q.device) % ph
        ox = torch.arange(-(w - 1), w, device=q.device) % pw
        kern = kern.index_put((torch.arange(nh, device=q.device)[:, None, None],
                               oy[None, :, None], ox[None, None, :]), tab)
        conv = torch.fft.irfft2(torch.fft.rfft2(field, s=(ph, pw)) *
                                torch.fft.rfft2(kern, s=(ph, pw))[None, :, None],
                                s=(ph, pw))[..., :h, :w]                    # (B,h,C,H,W)
        conv = conv.permute(0, 1, 3, 4, 2).reshape(b, nh, h * w, *kv.shape[-2:])
        conv = conv + kv_prefix.unsqueeze(2)                                # prefix keys: mask 1
        full = kv.sum(2, keepdim=True).expand(-1, -1, p, -1, -1)            # prefix queries: mask 1
        ctx = torch.cat([full, conv], dim=2)                                # (B,h,N,m,d+1)
        out = torch.einsum("bhnm,bhnme->bhne", fq, ctx)
        return out[..., :d] / out[..., d:]
