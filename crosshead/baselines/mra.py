"""``mra2``: MRA-2 multi-resolution analysis attention (Zeng, Pal, Kline, Fung, Singh,
"Multi Resolution Analysis (MRA) for Approximate Self-Attention", ICML 2022, arXiv 2207.10284).

Pure-torch re-implementation of the paper's MRA-2 scheme (the official repository has no licence;
none of its code or CUDA kernels is used): the three custom kernels are replaced by
gather / ``scatter_add`` / ``scatter_reduce`` over the selected block indices.

Per (batch, head), block size b = 32, N_b = N / b blocks:
 1. low resolution: block means Q^, K^, V^ (N_b x d); L = Q^ K^^T / sqrt(d);
 2. selection: the k = N_b * ``block_per_row`` largest entries of L - rowmax(L) over the whole
    N_b x N_b matrix (capped at N_b^2);
 3. high resolution: for each selected block pair (i, j) the exact b x b logits Q_i K_j^T / sqrt(d);
 4. ``mode='full'`` (MRA-2): every unselected pair contributes exp(L_ij) * b * V^_j to each row of
    block i; numerators and denominators of both parts are brought to a common per-row max and

        y_r = (sum_sel exp(S_rm) v_m + sum_unsel exp(L_ij) |B_j| V^_j)
              / (sum_sel exp(S_rm)       + sum_unsel exp(L_ij) |B_j|)

    ``mode='sparse'`` (MRA-2-s) drops the low-resolution part.
With every block selected the result is exactly softmax attention (checked in the tests).

Defaults: block_size=32, block_per_row=8 (the paper's ImageNet/LRA configs), mode='full'.
At N <= 256 (e.g. ViT-B/16 at 224 px: 197 tokens -> 7 blocks) 8 blocks per row selects every
block, so MRA-2 *is* softmax attention there; pass a smaller ``block_per_row`` to approximate.
N is padded to a multiple of 32 with masked keys (prefix tokens are ordinary tokens). Tokens are
blocked in raster order (the paper's ImageNet setup re-tiles pixels into 4x8 patches; not done).
Complexity: O((N/32)^2 d) low resolution + O(N * block_per_row * 32 * d) high resolution time;
O((N/32)^2 + k 32^2) memory per head. Input: any N; ``grid`` validated, unused.
"""

from __future__ import annotations

import torch

from ._base import BaselineAttention, pad_to_blocks
from ._registry import register


def _block_mean(x, valid, nb, bs):
    g, n, d = x.shape
    w = valid.view(1, nb, bs, 1).to(x.dtype)
    cnt = w.sum(2)                                                       # (1, nb, 1)
    return (x.view(g, nb, bs, d) * w).sum(2) / cnt.clamp_min(1.0)


def select_blocks(low, block_per_row):
    """MRA-2's block selection: flat indices (G, k) into N_b x N_b of the k = N_b *
    ``block_per_row`` (capped at N_b^2) largest entries of L - rowmax(L) over the whole matrix,
    for block-mean logits ``low`` = L (G, N_b, N_b)."""
    nb = low.shape[-1]
    score = (low - low.amax(-1, keepdim=True)).detach().flatten(1)
    return score.topk(min(nb * int(block_per_row), nb * nb), dim=-1).indices


def mra2_attention(q, k, v, *, block_size=32, block_per_row=8, mode="full", valid=None):
    """MRA-2 on (B, h, N, d) tensors with N a multiple of ``block_size``; ``valid`` (N,) bool marks
    real (non-padding) tokens. Returns (B, h, N, d) and the boolean block selection (G, Nb, Nb)."""
    b, h, n, d = q.shape
    bs = block_size
    if n % bs:
        raise ValueError(f"mra2_attention: N={n} is not a multiple of block_size={bs}")
    nb = n // bs
    g = b * h
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=q.device)
    scale = d ** -0.5
    qf, kf, vf = (t.reshape(g, n, d) for t in (q, k, v))
    cnt = valid.view(nb, bs).sum(-1).to(q.dtype)                         # (nb,)
    qh, kh, vh = (_block_mean(t, valid, nb, bs) for t in (qf, kf, vf))  # (g, nb, d)

    low = (qh @ kh.transpose(-2, -1)) * scale                            # (g, nb, nb)
    low = low.masked_fill((cnt == 0).view(1, 1, nb), float("-inf"))
    top = select_blocks(low, block_per_row)                              # (g, kk)
    kk = top.shape[1]
    bi, bj = top // nb, top % nb
    sel = torch.zeros(g, nb * nb, dtype=torch.bool, device=q.device)
    sel.scatter_(1, top, True)
    sel = sel.view(g, nb, nb)

    qb, kb, vb = (t.view(g, nb, bs, d) for t in (qf, kf, vf))
    idx_i = bi.view(g, kk, 1, 1).expand(g, kk, bs, d)
    idx_j = bj.view(g, kk, 1, 1).expand(g, kk, bs, d)
    qs, ks, vs = qb.gather(1, idx_i), kb.gather(1, idx_j), vb.gather(1, idx_j)
    s = (qs @ ks.transpose(-2, -1)) * scale                              # (g, kk, bs, bs)
    key_ok = valid.view(nb, bs)[bj]                                      # (g, kk, bs)
    s = s.masked_fill(~key_ok.unsqueeze(2), float("-inf"))

    row_idx = bi.view(g, kk, 1).expand(g, kk, bs)
    m_hi = torch.full((g, nb, bs), float("-inf"), device=q.device, dtype=q.dtype)
    m_hi = m_hi.scatter_reduce(1, row_idx, s.detach().amax(-1), reduce="amax")
    if mode == "full":
        low_un = low.masked_fill(sel, float("-inf"))
        m_lo = low_un.detach().amax(-1)                                  # (g, nb)
        m = torch.maximum(m_hi, m_lo.unsqueeze(-1))
    elif mode == "sparse":
        m = m_hi
    else:
        raise ValueError(f"mra2: mode must be 'full' or 'sparse', got {mode!r}")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))

    p = torch.exp(s - m.gather(1, row_idx).unsqueeze(-1))                # (g, kk, bs, bs)
    num = torch.zeros(g, nb, bs, d, device=q.device, dtype=q.dtype).scatter_add(
        1, idx_i, p @ vs)
    den = torch.zeros(g, nb, bs, device=q.device, dtype=q.dtype).scatter_add(
        1, row_idx, p.sum(-1))
    if mode == "full":
        fin = torch.isfinite(m_lo)
        m_lo0 = torch.where(fin, m_lo, torch.zeros_like(m_lo))
        w_lo = torch.exp(low_un - m_lo0.unsqueeze(-1)) * cnt                # (g, nb, nb)
        num_lo, den_lo = w_lo @ vh, w_lo.sum(-1)                         # (g,nb,d), (g,nb)
        corr = torch.where(fin.unsqueeze(-1), torch.exp(m_lo0.unsqueeze(-1) - m),
                           torch.zeros_like(m))                          # (g, nb, bs)
        num = num + corr.unsqueeze(-1) * num_lo.unsqueeze(2)
        den = den + corr * den_lo.unsqueeze(-1)
    out = num / den.clamp_min(torch.finfo(q.dtype).tiny).unsqueeze(-1)
    return out.view(b, h, n, d), sel


@register("mra2")
class MRA2Attention(BaselineAttention):
    def __init__(self, dim, num_heads=8, *, num_prefix_tokens=0, qkv_bias=False, block_size=32,
                 block_per_row=8, mode="full"):
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, qkv_bias=qkv_bias)
        if mode not in ("full", "sparse"):
            raise ValueError(f"mra2: mode must be 'full' or 'sparse', got {mode!r}")
        self.block_size, self.block_per_row, self.mode = int(block_size), int(block_per_row), mode

    def attend(self, q, k, v, grid):
        n = q.shape[2]
        q, k, v, valid = pad_to_blocks(q, k, v, self.block_size)
        out, _ = mra2_attention(q, k, v, block_size=self.block_size,
                                block_per_row=self.block_per_row, mode=self.mode, valid=valid)
        return out[:, :, :n]
