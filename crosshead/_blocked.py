"""The query side of crosshead.reference's kernels, block by block over the tokens.

The query side's softmax is over the L landmarks of one token, so a block of tokens is a complete
piece of work: its logits, softmax, mixing, its rows of out (forward) or of dq (backward), and its
share of Z's, dZ's, dk_land's and dw's sums. A block's N×L maps (stored (B·h, L, n), n tokens
contiguous, as the whole-map path stores them) stay in the L2 cache through all of those steps,
and no N×L map is ever allocated: compared with the whole-map path this saves a fifth of the
query side's forward and a quarter of its backward at N = 16384 on this project's CPU.

Used below autograd only (reference._free); where autograd records or torch.compile traces,
reference.py runs the whole-map functional code. The logits are in base 2 (reference.py, "Base 2").
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK_BYTES = 3 << 19  # one block's N×L map: 1.5 MiB, in L2 with the operands it meets (measured)
MIN_TOKENS = 256  # per block, however many heads and landmarks
LN2 = 0.6931471805599453


def _tokens(B: int, h: int, L: int, n: int, esize: int) -> int:
    """Tokens per block: about BLOCK_BYTES of map (at least MIN_TOKENS tokens), the n tokens split
    into blocks of one size (a multiple of 64 when large) but for the last."""
    most = max(MIN_TOKENS, BLOCK_BYTES // max(1, B * h * L * esize))
    size = -(-n // max(1, -(-n // most)))  # ceil(n / number of blocks)
    if size > 256:
        size = -(-size // 64) * 64
    return max(1, min(n, size))


def _heads(x: Tensor, B: int, h: int) -> Tensor:
    """A block (B·h, L, n) as (B, h, L·n)."""
    return x.view(B, h, x.shape[1] * x.shape[2])


def _mixed(w, x: Tensor, out: Tensor, B: int, h: int) -> Tensor:
    """x (B·h, L, n) mixed across heads into out (same shape, not x); x itself without w."""
    if w is None:
        return x
    torch.bmm(w.expand(B, h, h), _heads(x, B, h), out=_heads(out, B, h))
    return out


def _block(buf: Tensor, BH: int, L: int, n: int) -> Tensor:
    return buf[:BH * L * n].view(BH, L, n)


def query_forward(q: Tensor, k_land: Tensor, z: Tensor, w: Tensor | None, mix: str, scale2: float):
    """out = Â_Q·Z (B, h, N, d) and the natural lse_q (B, h, N), from q, k_land, z and w in the
    compute dtype; scale2 is the logit scale times log2 e."""
    B, h, N, d = q.shape
    L, BH = k_land.shape[2], B * h
    q = q.contiguous()
    out, lse = q.new_empty(B, h, N, d), q.new_empty(B, h, N)
    C = _tokens(B, h, L, N, q.element_size())
    s = q.new_empty(BH * L * C)
    other = q.new_empty(BH * L * C) if w is not None else None
    kl2, zf = (k_land * scale2).flatten(0, 1), z.flatten(0, 1)
    for c0 in range(0, N, C):
        n = min(C, N - c0)
        sb = torch.bmm(kl2, q[:, :, c0:c0 + n].flatten(0, 1).transpose(1, 2), out=_block(s, BH, L, n))
        if mix == "pre":
            sb = _mixed(w, sb, _block(other, BH, L, n) if w is not None else None, B, h)
        m = sb.amax(1, keepdim=True)
        total = sb.sub_(m).exp2_().sum(1, keepdim=True)
        p = sb.div_(total)
        lse[:, :, c0:c0 + n] = (m.add_(total.log2_()).mul_(LN2)).view(B, h, n)
        a = _mixed(w, p, _block(other, BH, L, n) if w is not None else None, B, h) \
            if mix == "post" else p
        torch.bmm(a.transpose(1, 2), zf, out=out[:, :, c0:c0 + n].flatten(0, 1))
    return out, lse


def query_backward(g: Tensor, q: Tensor, k_land: Tensor, z: Tensor, w: Tensor | None,
                   lse2: Tensor, mix: str, scale: float, scale2: float):
    """(dZ (B, h, L, d), dq (B, h, N, d), dk_land (B, h, L, d), dw (h, h) or None) of the query
    side, the maps recomputed from the logits and lse2 = lse_q·log2 e. In pre mode dw is taken
    against the base-2 logits (the caller rescales it)."""
    B, h, N, d = q.shape
    L, BH = k_land.shape[2], B * h
    q, g = q.contiguous(), g.contiguous()
    d_z, d_kl = q.new_zeros(BH, L, d), q.new_zeros(BH, L, d)
    d_w = q.new_zeros(B, h, h) if w is not None else None
    d_q = q.new_empty(B, h, N, d)
    C = _tokens(B, h, L, N, q.element_size())
    s, a_buf, d_buf = (q.new_empty(BH * L * C) for _ in range(3))
    kl2, kl1, zf = (k_land * scale2).flatten(0, 1), (k_land * scale).flatten(0, 1), z.flatten(0, 1)
    w_t = None if w is None else w.T
    for c0 in range(0, N, C):
        n = min(C, N - c0)
        qb, gb = q[:, :, c0:c0 + n].flatten(0, 1), g[:, :, c0:c0 + n].flatten(0, 1)
        sb = torch.bmm(kl2, qb.transpose(1, 2), out=_block(s, BH, L, n))
        lse_b = lse2[:, :, c0:c0 + n].reshape(BH, 1, n)
        if mix == "post":
            p = sb.sub_(lse_b).exp2_()
            a = _mixed(w, p, _block(a_buf, BH, L, n), B, h)
            d_z.baddbmm_(a, gb)
            d_a = torch.bmm(zf, gb.transpose(1, 2), out=_block(d_buf, BH, L, n))
            if w is not None:
                d_w.baddbmm_(_heads(d_a, B, h), _heads(p, B, h).transpose(1, 2))
                d_a = _mixed(w_t, d_a, _block(a_buf, BH, L, n), B, h)  # Â is dead: its block
            d_s = torch.ops.aten._softmax_backward_data.out(d_a, p, 1, p.dtype, grad_input=d_a)
        else:
            a = _mixed(w, sb, _block(a_buf, BH, L, n), B, h).sub_(lse_b).exp2_()
            d_z.baddbmm_(a, gb)
            d_m = torch.bmm(zf, gb.transpose(1, 2), out=_block(d_buf, BH, L, n))
            d_m = torch.ops.aten._softmax_backward_data.out(d_m, a, 1, a.dtype, grad_input=d_m)
            if w is not None:
                d_w.baddbmm_(_heads(d_m, B, h), _heads(sb, B, h).transpose(1, 2))
            d_s = _mixed(w_t, d_m, _block(a_buf, BH, L, n), B, h)  # Â is dead: its block
        torch.bmm(d_s.transpose(1, 2), kl1, out=d_q[:, :, c0:c0 + n].flatten(0, 1))
        d_kl.baddbmm_(d_s, qb)
    d_w = None if d_w is None else d_w.sum(0)
    return d_z.view(B, h, L, d), d_q, d_kl.mul_(scale).view(B, h, L, d), d_w
