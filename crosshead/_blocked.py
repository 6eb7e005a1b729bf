"""The query side of crosshead.reference's kernels, block by block over the tokens.

The query side's softmax is over the L landmarks of one token, so a block of tokens is a complete
piece of work: its logits, softmax, mixing, its rows of out (forward) or of dq (backward), and its
share of Z's, dZ's, dk_land's and dw's sums. A block's N×L maps (stored (B·h, L, n), n tokens
contiguous, as the whole-map path stores them) stay in the L2 cache through all of those steps,
and no N×L map is ever allocated: compared with the whole-map path this saves a fifth of the
query side's forward and a quarter of its backward at N = 16384 on this project's CPU.

Used below autograd only (_maps.free); where autograd records or torch.compile traces,
reference.py runs the whole-map functional code. The logits are in base 2 (_maps.py, "Base 2").
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _maps
from ._maps import LN2

BLOCK_BYTES = 3 << 19  # one block's N×L map: 1.5 MiB, in L2 with the operands it meets (measured)
MIN_TOKENS = 256  # per block, however many heads and landmarks


def _tokens(B: int, h: int, L: int, n: int, esize: int) -> int:
    """Tokens per block: about BLOCK_BYTES of map (at least MIN_TOKENS tokens), the n tokens split
    into blocks of one size (a multiple of 64 when large) but for the last."""
    most = max(MIN_TOKENS, BLOCK_BYTES // max(1, B * h * L * esize))
    size = -(-n // max(1, -(-n // most)))  # ceil(n / number of blocks)
    if size > 256:
        size = -(-size // 64) * 64
    return max(1, min(n, size))


def worthwhile(q: Tensor, L: int) -> bool:
    """True when the query side should run block by block: on the CPU (_maps.use_blocks), and when
    the tokens split into more than one block. In a single block the maps are as cache-resident
    as the whole-map path's, which then does the same work in fewer ops (measured: the whole-map
    path is 5-15 % faster up to N = 1600 at B=1, h=4, L=49, one thread)."""
    B, h, N, _ = q.shape
    return _maps.use_blocks(q) and _tokens(B, h, L, N, q.element_size()) < N


class _Blocks:
    """count flat scratch buffers of one block each, and their views for a block of n tokens as
    (B·h, L, n) maps and as (B, h, L·n) for the mixing, made once per block size."""

    def __init__(self, like: Tensor, count: int, B: int, h: int, L: int, C: int):
        self.bufs = [like.new_empty(B * h * L * C) for _ in range(count)]
        self.shape, self.views = (B, h, L), {}

    def __call__(self, n: int) -> list:
        if n not in self.views:
            B, h, L = self.shape
            self.views[n] = [(b[:B * h * L * n].view(B * h, L, n), b[:B * h * L * n].view(B, h, L * n))
                             for b in self.bufs]
        return self.views[n]


def query_forward(q: Tensor, k_land: Tensor, z: Tensor, w: Tensor | None, mix: str, scale2: float):
    """out = Â_Q·Z (B, h, N, d) and the natural lse_q (B, h, N), from q, k_land, z and w in the
    compute dtype; scale2 is the logit scale times log2 e."""
    B, h, N, d = q.shape
    L, BH = k_land.shape[2], B * h
    q_t = q.contiguous().view(BH, N, d).transpose(1, 2)
    out = q.new_empty(BH, N, d)
    m_all, total_all = q.new_empty(BH, 1, N), q.new_empty(BH, 1, N)
    C = _tokens(B, h, L, N, q.element_size())
    blocks = _Blocks(q, 1 if w is None else 2, B, h, L, C)
    kl2, zf = (k_land * scale2).flatten(0, 1), z.flatten(0, 1)
    wb = None if w is None else w.expand(B, h, h)
    for c0 in range(0, N, C):
        n, cols = min(C, N - c0), slice(c0, c0 + C)
        (s, s_h), *other = blocks(n)
        torch.bmm(kl2, q_t[:, :, cols], out=s)
        if mix == "pre" and w is not None:  # softmax of the mixed logits, in the other block
            torch.bmm(wb, s_h, out=other[0][1])
            (s, s_h), other = other[0], [(s, s_h)]
        m = torch.amax(s, 1, keepdim=True, out=m_all[:, :, cols])
        total = torch.sum(s.sub_(m).exp2_(), 1, keepdim=True, out=total_all[:, :, cols])
        a = s.div_(total)
        if mix == "post" and w is not None:
            a = torch.bmm(wb, s_h, out=other[0][1]).view(BH, L, n)
        torch.bmm(a.transpose(1, 2), zf, out=out[:, cols])
    lse = m_all.add_(total_all.log2_()).mul_(LN2)
    return out.view(B, h, N, d), lse.view(B, h, N)


def query_backward(g: Tensor, q: Tensor, k_land: Tensor, z: Tensor, w: Tensor | None,
                   lse2: Tensor, mix: str, scale: float, scale2: float):
    """(dZ (B, h, L, d), dq (B, h, N, d), dk_land (B, h, L, d), dw (h, h) or None) of the query
    side, the maps recomputed from the logits and lse2 = lse_q·log2 e. In pre mode dw is taken
    against the base-2 logits (the caller rescales it)."""
    B, h, N, d = q.shape
    L, BH = k_land.shape[2], B * h
    q_f, g_f = q.contiguous().view(BH, N, d), g.contiguous().view(BH, N, d)
    q_t, g_t = q_f.transpose(1, 2), g_f.transpose(1, 2)
    lse_f = lse2.contiguous().view(BH, 1, N)
    d_z, d_kl = q.new_zeros(BH, L, d), q.new_zeros(BH, L, d)
    d_w = q.new_zeros(B, h, h) if w is not None else None
    d_q = q.new_empty(BH, N, d)
    C = _tokens(B, h, L, N, q.element_size())
    blocks = _Blocks(q, 3, B, h, L, C)
    kl2, kl1, zf = (k_land * scale2).flatten(0, 1), (k_land * scale).flatten(0, 1), z.flatten(0, 1)
    wb, wtb = (None, None) if w is None else (w.expand(B, h, h), w.T.expand(B, h, h))
    for c0 in range(0, N, C):
        n, cols = min(C, N - c0), slice(c0, c0 + C)
        (s, s_h), (a, a_h), (d_a, d_a_h) = blocks(n)
        torch.bmm(kl2, q_t[:, :, cols], out=s)
        if mix == "post":
            p = s.sub_(lse_f[:, :, cols]).exp2_()
            if w is not None:
                torch.bmm(wb, s_h, out=a_h)
            d_z.baddbmm_(a if w is not None else p, g_f[:, cols])
            torch.bmm(zf, g_t[:, :, cols], out=d_a)
            if w is not None:
                d_w.baddbmm_(d_a_h, s_h.transpose(1, 2))
                torch.bmm(wtb, d_a_h, out=a_h)  # Â is dead: its block takes dp
                d_a = a
            d_s = torch.ops.aten._softmax_backward_data.out(d_a, p, 1, p.dtype, grad_input=d_a)
        else:
            if w is not None:
                torch.bmm(wb, s_h, out=a_h)
            else:
                a = s
            a.sub_(lse_f[:, :, cols]).exp2_()
            d_z.baddbmm_(a, g_f[:, cols])
            torch.bmm(zf, g_t[:, :, cols], out=d_a)
            d_m = torch.ops.aten._softmax_backward_data.out(d_a, a, 1, a.dtype, grad_input=d_a)
            if w is not None:
                d_w.baddbmm_(d_a_h, s_h.transpose(1, 2))
                torch.bmm(wtb, d_a_h, out=a_h)  # Â is dead: its block takes the gradient
                d_m = a
            d_s = d_m
        torch.bmm(d_s.transpose(1, 2), kl1, out=d_q[:, cols])
        d_kl.baddbmm_(d_s, q_f[:, cols])
    d_w = None if d_w is None else d_w.sum(0)
    return d_z.view(B, h, L, d), d_q.view(B, h, N, d), d_kl.mul_(scale).view(B, h, L, d), d_w
