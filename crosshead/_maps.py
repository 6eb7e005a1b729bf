"""The steps of crosshead.reference's imhsa kernels on the N×L score maps: logits, softmax with its
logsumexp, cross-head mixing, and their adjoints, in place where autograd allows.

How the CPU spends its time here (bench/, torch.profiler, one thread): the products are MKL's;
what this code controls are the passes over the N×L maps, where they live, and allocations.
- Layout: the maps are stored (B, h, L, N), N contiguous. The key side's softmax is over N (the
  last dim); the query side's map is stored transposed, Ŝ_Qᵀ, and its softmax over L runs
  across rows (dim -2). Reductions and elementwise passes then run along rows of N elements
  instead of rows of L (49) elements, several times faster.
- Blocks: the query side's softmax is per token, so below autograd it runs block by block over
  the tokens (crosshead/_blocked.py), each block's maps staying in the L2 cache; the key side's
  softmax spans all tokens and runs on the whole map.
- Few N×L buffers: the maps are softmaxed and mixed in place, so the forward needs one N×L
  buffer and the backward two (three in "pre" mode with mixing). A fresh N×L allocation costs
  page faults.
- Base 2: the maps are exponentiated as exp2(s·log2 e - m), with log2 e folded into the scale
  of the small landmark operand: torch's exp2 kernel is about 4× faster than its exp. The logits
  carry the same relative rounding as before, so exp2 of them is as accurate as exp was.
  Gradients are with respect to the natural logits (the softmax adjoint needs only p).
- In-place, out= and blocked steps run only where autograd is not recording (see free): the
  registered kernels run below autograd, while torch.compile (bench/) and
  tests/test_reference.py differentiate imhsa itself and then get the whole-map functional
  forms (the query side transposed in the key side's buffer).
"""

from __future__ import annotations

import torch
from torch import Tensor

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MIX_CHUNK_BYTES = 1 << 20  # in-place mixing goes through a scratch block this size (in L2)


def free(*tensors) -> bool:
    """True when in-place and out= steps on these tensors are safe and useful: autograd is off or
    records none of them, and torch.compile is not tracing (inductor plans memory itself)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def use_blocks(t: Tensor) -> bool:
    """Block-by-block steps (the query side, in-place mixing) are for the CPU, where they keep the
    data in cache; on a GPU (the CUDA fallback) they would only multiply kernel launches."""
    return t.device.type == "cpu"


def mix_heads(w: Tensor | None, x: Tensor) -> Tensor:
    """Cross-head mixing y[:, g] = Σ_h w[g, h] · x[:, h] on (B, h, ...) tensors, as one
    (h×h)·(h×rest) product per batch element, x read as stored (torch.matmul of a 2-D w with a
    3-D x folds it into a much slower product with x transposed, plus a copy)."""
    if w is None:
        return x
    B, h = x.shape[:2]
    return torch.bmm(w.to(x.dtype).expand(B, h, h), x.flatten(2)).view_as(x)


def mix_heads_inplace(w: Tensor | None, x: Tensor) -> Tensor:
    """mix_heads written over x (contiguous) where autograd allows: column block by column
    block, each mixed into an L2-sized scratch block and copied back. About as fast as mix_heads,
    without a new N×L buffer; a map no larger than one block is mixed by mix_heads (fewer ops)."""
    if w is None:
        return x
    if not (free(w, x) and x.is_contiguous() and use_blocks(x)) \
            or x.numel() * x.element_size() <= MIX_CHUNK_BYTES:
        return mix_heads(w, x)
    B, h = x.shape[:2]
    flat = x.flatten(2)
    n = flat.shape[2]
    wb = w.to(x.dtype).expand(B, h, h)
    step = max(64, MIX_CHUNK_BYTES // max(1, B * h * x.element_size()))
    scratch = x.new_empty(B * h * min(step, n))
    for c0 in range(0, n, step):
        width = min(step, n - c0)
        block = flat[:, :, c0:c0 + width]
        block.copy_(torch.bmm(wb, block, out=scratch[:B * h * width].view(B, h, width)))
    return x


def mix_heads_into(w: Tensor | None, x: Tensor, out: Tensor | None) -> Tensor:
    """mix_heads written into `out` when given and autograd allows: a dead contiguous buffer
    (not x) with x's number of elements, reused instead of allocating a new N×L map."""
    if w is None or out is None or not out.is_contiguous() or out.numel() != x.numel() \
            or not free(w, x, out):
        return mix_heads(w, x)
    B, h = x.shape[:2]
    res = out.view(x.shape)
    torch.bmm(w.to(x.dtype).expand(B, h, h), x.flatten(2), out=res.flatten(2))
    return res


def mix_heads_weight_grad(dy: Tensor, x: Tensor) -> Tensor:
    """Gradient of mix_heads with respect to w: dw[g, h] = Σ_{b,·} dy[b, g, ·] · x[b, h, ·]."""
    return torch.bmm(dy.flatten(2), x.flatten(2).transpose(1, 2)).sum(0)


def softmax_lse(x2: Tensor, dim: int):
    """(softmax over dim, natural logsumexp over dim) of logits given in base 2 (x2 = x·log2 e);
    the softmax in place in x2 where autograd allows. Max-subtracted: m = max x2,
    p = exp2(x2 - m) / Σ, lse = (m + log2 Σ)·ln 2."""
    m = x2.amax(dim, keepdim=True)
    if free(x2):
        e = x2.sub_(m).exp2_()
        total = e.sum(dim, keepdim=True)
        p = e.div_(total)
    else:
        e = (x2 - m).exp2()
        total = e.sum(dim, keepdim=True)
        p = e / total
    return p, (m + total.log2()).squeeze(dim) * LN2


def softmax_adjoint(d_p: Tensor, p: Tensor, dim: int) -> Tensor:
    """d_s = p ⊙ (d_p − Σ_dim d_p ⊙ p), torch's fused kernel, in place in d_p where autograd
    allows."""
    if free(d_p, p):
        return torch.ops.aten._softmax_backward_data.out(d_p, p, dim, p.dtype, grad_input=d_p)
    return torch.ops.aten._softmax_backward_data(d_p, p, dim, p.dtype)


def side(s2: Tensor, w: Tensor | None, mix: str, dim: int):
    """One side of the op, from per-head base-2 logits s2 (softmax over dim) to the mixed map,
    computed in s2's buffer: post: Â = mix(softmax(s)), lse of s per head; pre: Â =
    softmax(mix(s)), lse of the mixed logits. Returns (Â, natural lse)."""
    if mix == "post":
        p, lse = softmax_lse(s2, dim)
        return mix_heads_inplace(w, p), lse
    return softmax_lse(mix_heads_inplace(w, s2), dim)


def side_backward(d_a: Tensor, a: Tensor, p: Tensor | None, s: Tensor, w: Tensor | None,
                  mix: str, dim: int):
    """Gradients of one side: from dÂ to (d logits per head, dw or None), the softmax over
    dim. d_a is a temporary of the caller's and is overwritten (the gradient is computed in its
    buffer)."""
    w_t = None if w is None else w.T
    if mix == "post":
        d_w = mix_heads_weight_grad(d_a, p) if w is not None else None
        return softmax_adjoint(mix_heads_inplace(w_t, d_a), p, dim), d_w
    d_m = softmax_adjoint(d_a, a, dim)
    d_w = mix_heads_weight_grad(d_m, s) if w is not None else None
    return mix_heads_inplace(w_t, d_m), d_w


def recompute(s2: Tensor, w: Tensor | None, lse2: Tensor, mix: str, out: Tensor | None, dim: int):
    """Â (and the per-head probabilities in post mode) recomputed from base-2 logits s2 and the
    saved lse2 = lse·log2 e, softmax over dim, the mixing written into the dead buffer `out`. In
    post mode s2 is overwritten with the probabilities, in pre mode without w with Â (where
    autograd allows)."""
    lse2 = lse2.unsqueeze(dim)
    if mix == "post":
        p = s2.sub_(lse2).exp2_() if free(s2) else (s2 - lse2).exp2()
        return mix_heads_into(w, p, out), p
    m = mix_heads_into(w, s2, out)  # pre mode keeps s2 for dw
    return m.sub_(lse2).exp2_() if free(m) else (m - lse2).exp2(), None


def matmul_into(a: Tensor, b: Tensor, out: Tensor | None) -> Tensor:
    """a @ b on (B, h, ·, ·) operands, written into the dead contiguous buffer `out` (any shape
    with the product's number of elements) when given and autograd allows."""
    B, h, m, n = *a.shape[:3], b.shape[-1]
    if out is None or not out.is_contiguous() or out.numel() != B * h * m * n \
            or not free(a, b, out):
        return torch.matmul(a, b)
    res = out.view(B, h, m, n)
    torch.bmm(a.flatten(0, 1), b.flatten(0, 1), out=res.view(B * h, m, n))
    return res


def distinct(*tensors) -> list:
    """The distinct buffers among tensors that are about to die, for the next side to reuse."""
    seen, out = set(), []
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out.append(t)
    return out


def take(buffers: list):
    return buffers.pop(0) if buffers else None


def logits_k(q_land, k, scale, out=None):
    # the scale goes on the small (L×d) landmark operands, not on the N×L products
    return matmul_into(q_land * scale, k.transpose(-1, -2), out)  # (B, h, L, N), softmax over N


def logits_q_t(q, k_land, scale, out=None):
    # the query side's logits transposed: (B, h, L, N), softmax over L (dim -2)
    return matmul_into(k_land * scale, q.transpose(-1, -2), out)


def logits(q, k, k_land, q_land, scale):
    """(S_K (B, h, L, N), S_Q (B, h, N, L)), each with its softmax over the last dim."""
    return logits_k(q_land, k, scale), logits_q_t(q, k_land, scale).transpose(-1, -2)
