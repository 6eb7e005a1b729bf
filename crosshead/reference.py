"""Pure-torch forward and backward of every crosshead op.

These functions are the kernels registered for CPU (and for CUDA when the fused kernels are not
built), and the fast paths are checked against them. They compute ../shared/design/imhsa.md
exactly, right to left: Z = Â_K·v first, then out = Â_Q·Z, so no N×N map is ever formed; the
largest intermediates are the N×L score maps. Arithmetic is float32 whatever the input dtype
(float64 for float64 inputs); results are cast back to the input dtype.

Shapes: q, k, v (B, h, N, d); q_land, k_land (B, h, L, d); w_q, w_k (h, h) or None.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _blocked

MIX_MODES = ("post", "pre")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------- landmarks


def pooling_matrix(n_in: int, n_out: int, dtype: torch.dtype, device) -> Tensor:
    """(n_out, n_in) averaging matrix with adaptive_avg_pool's bins: bin i covers
    [floor(i·n_in/n_out), ceil((i+1)·n_in/n_out))."""
    i = torch.arange(n_out, device=device)
    start = (i * n_in) // n_out
    end = ((i + 1) * n_in + n_out - 1) // n_out
    j = torch.arange(n_in, device=device)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return inside.to(dtype) / (end - start).to(dtype)[:, None]


def _pool_axes(grid, size, dtype, device):
    return [pooling_matrix(n, m, dtype, device) for n, m in zip(grid, size)]


def _pool_shape(dims: list[int], size: list[int]):
    """(H, W), (Lh, Lw) of the pooling: a 1-D sequence of n tokens pools as a 1×n grid (the bins
    of adaptive_avg_pool1d are those of adaptive_avg_pool2d along W)."""
    if len(dims) == 1:
        return (1, dims[0]), (1, size[0])
    return tuple(dims), tuple(size)


def landmarks(x: Tensor, grid: list[int], size: list[int], prefix: int) -> Tensor:
    """Average-pool the grid tokens x[:, :, prefix:] to (B, h, prod(size), d).

    grid = [] means a 1-D sequence (size = [L]); grid = [H, W] a 2-D token grid (size = [Lh, Lw]).
    On the CPU this is torch's adaptive average pooling, reading the tokens (B·h, H, W, d) in place
    as a channels-last (B·h, d, H, W) image: one pass over x. Elsewhere (the CUDA fallback, where
    that pooling's backward is not deterministic) it is separable, one small matmul per axis."""
    B, h, _, d = x.shape
    ct = compute_dtype(x.dtype)
    t = x[:, :, prefix:, :].to(ct)
    dims = list(grid) if len(grid) else [t.shape[2]]
    if x.device.type == "cpu":
        (H, W), pooled = _pool_shape(dims, size)
        out = F.adaptive_avg_pool2d(t.reshape(B * h, H, W, d).permute(0, 3, 1, 2), pooled)
        return out.permute(0, 2, 3, 1).reshape(B, h, math.prod(size), d).to(x.dtype)
    mats = _pool_axes(dims, size, ct, x.device)
    if len(dims) == 1:
        out = torch.matmul(mats[0], t)
    else:
        (H, W), Lh = dims, size[0]
        t = torch.matmul(mats[0], t.reshape(B, h, H, W * d)).reshape(B, h, Lh, W, d)
        out = torch.matmul(mats[1], t)  # (Lw, W) @ (B, h, Lh, W, d)
    return out.reshape(B, h, math.prod(size), d).to(x.dtype)  # not -1: B = 0 must work


def landmarks_backward(grad: Tensor, num_tokens: int, grid: list[int], size: list[int],
                       prefix: int) -> Tensor:
    """Adjoint of `landmarks`: spreads each landmark's gradient evenly over its bin; the prefix
    tokens get zero."""
    B, h, _, d = grad.shape
    ct = compute_dtype(grad.dtype)
    g = grad.to(ct)
    dims = list(grid) if len(grid) else [num_tokens - prefix]
    if grad.device.type == "cpu":  # the adjoint of adaptive_avg_pool2d, channels-last as above
        (H, W), (Lh, Lw) = _pool_shape(dims, size)
        g = g.contiguous()  # (small) else the adjoint may come out NCHW, a slow transpose below
        # the input's shape and layout only: the adjoint does not read its values
        like = torch.empty_strided((B * h, d, H, W), (H * W * d, 1, W * d, d), dtype=ct)
        t = torch.ops.aten._adaptive_avg_pool2d_backward(
            g.reshape(B * h, Lh, Lw, d).permute(0, 3, 1, 2), like)
        t = t.permute(0, 2, 3, 1).reshape(B, h, H * W, d)
    else:
        mats = _pool_axes(dims, size, ct, grad.device)
        if len(dims) == 1:
            t = torch.matmul(mats[0].T, g)
        else:
            (H, W), (Lh, Lw) = dims, size
            t = torch.matmul(mats[1].T, g.reshape(B, h, Lh, Lw, d))  # (B, h, Lh, W, d)
            t = torch.matmul(mats[0].T, t.reshape(B, h, Lh, W * d)).reshape(B, h, H * W, d)
    if prefix == 0:
        return t.to(grad.dtype)
    out = g.new_empty(B, h, num_tokens, d)
    out[:, :, :prefix, :] = 0
    out[:, :, prefix:, :] = t
    return out.to(grad.dtype)


# ---------------------------------------------------------------------------------------- imhsa
#
# How the CPU spends its time here (bench/, torch.profiler, one thread): the products are MKL's;
# what this code controls are the passes over the N×L maps, where they live, and allocations.
# - Layout: the maps are stored (B, h, L, N), N contiguous. The key side's softmax is over N (the
#   last dim); the query side's map is stored transposed, Ŝ_Qᵀ, and its softmax over L runs
#   across rows (dim -2). Reductions and elementwise passes then run along rows of N elements
#   instead of rows of L (49) elements, several times faster.
# - Blocks: the query side's softmax is per token, so below autograd it runs block by block over
#   the tokens (crosshead/_blocked.py), each block's maps staying in the L2 cache; the key side's
#   softmax spans all tokens and runs on the whole map.
# - Few N×L buffers: the maps are softmaxed and mixed in place, so the forward needs one N×L
#   buffer and the backward two (three in "pre" mode with mixing). A fresh N×L allocation costs
#   page faults.
# - Base 2: the maps are exponentiated as exp2(s·log2 e - m), with log2 e folded into the scale
#   of the small landmark operand: torch's exp2 kernel is about 4× faster than its exp. The logits
#   carry the same relative rounding as before, so exp2 of them is as accurate as exp was.
#   Gradients are with respect to the natural logits (the softmax adjoint needs only p).
# - In-place, out= and blocked steps run only where autograd is not recording (see _free): the
#   registered kernels run below autograd, while torch.compile (bench/) and
#   tests/test_reference.py differentiate imhsa itself and then get the whole-map functional
#   forms (the query side transposed in the key side's buffer).

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MIX_CHUNK_BYTES = 1 << 20  # in-place mixing goes through a scratch block this size (in L2)


def _free(*tensors) -> bool:
    """True when in-place and out= steps on these tensors are safe and useful: autograd is off or
    records none of them, and torch.compile is not tracing (inductor plans memory itself)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _blocks(t: Tensor) -> bool:
    """Block-by-block steps (the query side, in-place mixing) are for the CPU, where they keep the
    data in cache; on a GPU (the CUDA fallback) they would only multiply kernel launches."""
    return t.device.type == "cpu"


def _mix(w: Tensor | None, x: Tensor) -> Tensor:
    """Cross-head mixing y[:, g] = Σ_h w[g, h] · x[:, h] on (B, h, ...) tensors, as one
    (h×h)·(h×rest) product per batch element, x read as stored (torch.matmul of a 2-D w with a
    3-D x folds it into a much slower product with x transposed, plus a copy)."""
    if w is None:
        return x
    B, h = x.shape[:2]
    return torch.bmm(w.to(x.dtype).expand(B, h, h), x.flatten(2)).view_as(x)


def _mix_inplace(w: Tensor | None, x: Tensor) -> Tensor:
    """_mix written over x (contiguous) where autograd allows: column block by column block,
    each mixed into an L2-sized scratch block and copied back. About as fast as _mix, without a
    new N×L buffer; a map no larger than one block is mixed by _mix (fewer ops)."""
    if w is None:
        return x
    if not (_free(w, x) and x.is_contiguous() and _blocks(x)) \
            or x.numel() * x.element_size() <= MIX_CHUNK_BYTES:
        return _mix(w, x)
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


def _mix_into(w: Tensor | None, x: Tensor, out: Tensor | None) -> Tensor:
    """_mix written into `out` when given and autograd allows: a dead contiguous buffer (not x)
    with x's number of elements, reused instead of allocating a new N×L map."""
    if w is None or out is None or not out.is_contiguous() or out.numel() != x.numel() \
            or not _free(w, x, out):
        return _mix(w, x)
    B, h = x.shape[:2]
    res = out.view(x.shape)
    torch.bmm(w.to(x.dtype).expand(B, h, h), x.flatten(2), out=res.flatten(2))
    return res


def _mix_adjoint(w: Tensor | None, dy: Tensor) -> Tensor:
    """Gradient of _mix with respect to x: dx[:, h] = Σ_g w[g, h] · dy[:, g]."""
    return _mix(None if w is None else w.T, dy)


def _mix_weight_grad(dy: Tensor, x: Tensor) -> Tensor:
    """Gradient of _mix with respect to w: dw[g, h] = Σ_{b,·} dy[b, g, ·] · x[b, h, ·]."""
    return torch.bmm(dy.flatten(2), x.flatten(2).transpose(1, 2)).sum(0)


def _softmax_lse(x2: Tensor, dim: int):
    """(softmax over dim, natural logsumexp over dim) of logits given in base 2 (x2 = x·log2 e);
    the softmax in place in x2 where autograd allows. Max-subtracted: m = max x2,
    p = exp2(x2 - m) / Σ, lse = (m + log2 Σ)·ln 2."""
    m = x2.amax(dim, keepdim=True)
    if _free(x2):
        e = x2.sub_(m).exp2_()
        total = e.sum(dim, keepdim=True)
        p = e.div_(total)
    else:
        e = (x2 - m).exp2()
        total = e.sum(dim, keepdim=True)
        p = e / total
    return p, (m + total.log2()).squeeze(dim) * LN2


def _softmax_adjoint(d_p: Tensor, p: Tensor, dim: int) -> Tensor:
    """d_s = p ⊙ (d_p − Σ_dim d_p ⊙ p), torch's fused kernel, in place in d_p where autograd
    allows."""
    if _free(d_p, p):
        return torch.ops.aten._softmax_backward_data.out(d_p, p, dim, p.dtype, grad_input=d_p)
    return torch.ops.aten._softmax_backward_data(d_p, p, dim, p.dtype)


def _side(s: Tensor, w: Tensor | None, mix: str):
    """One side of the op, from per-head logits s (softmax over the last dim) to the mixed map:
    post: Â = mix(softmax(s)), lse of s per head; pre: Â = softmax(mix(s)), lse of the mixed
    logits. Returns (Â, lse)."""
    return _side_inplace(s * LOG2E, w, mix, -1)


def _side_inplace(s2: Tensor, w: Tensor | None, mix: str, dim: int):
    """_side on base-2 logits s2, softmax over dim, computed in s2's buffer."""
    if mix == "post":
        p, lse = _softmax_lse(s2, dim)
        return _mix_inplace(w, p), lse
    return _softmax_lse(_mix_inplace(w, s2), dim)


def _side_backward(d_a: Tensor, a: Tensor, p: Tensor | None, s: Tensor, w: Tensor | None,
                   mix: str):
    """Gradients of one side: from dÂ to (d logits per head, dw or None). d_a is a temporary of
    the caller's and is overwritten (the gradient is computed in its buffer)."""
    return _side_backward_at(d_a, a, p, s, w, mix, -1)


def _side_backward_at(d_a: Tensor, a: Tensor, p: Tensor | None, s: Tensor, w: Tensor | None,
                      mix: str, dim: int):
    """_side_backward with the softmax over dim."""
    w_t = None if w is None else w.T
    if mix == "post":
        d_w = _mix_weight_grad(d_a, p) if w is not None else None
        return _softmax_adjoint(_mix_inplace(w_t, d_a), p, dim), d_w
    d_m = _softmax_adjoint(d_a, a, dim)
    d_w = _mix_weight_grad(d_m, s) if w is not None else None
    return _mix_inplace(w_t, d_m), d_w


def _recompute(s: Tensor, w: Tensor | None, lse: Tensor, mix: str):
    """Â (and the per-head probabilities in post mode) from logits and the saved logsumexp."""
    return _recompute_into(s * LOG2E, w, lse * LOG2E, mix, None, -1)


def _recompute_into(s2: Tensor, w: Tensor | None, lse2: Tensor, mix: str, out: Tensor | None,
                    dim: int):
    """_recompute from base-2 logits s2 and lse2 = lse·log2 e, softmax over dim, the mixing
    written into the dead buffer `out`. In post mode s2 is overwritten with the probabilities,
    in pre mode without w with Â (where autograd allows)."""
    lse2 = lse2.unsqueeze(dim)
    if mix == "post":
        p = s2.sub_(lse2).exp2_() if _free(s2) else (s2 - lse2).exp2()
        return _mix_into(w, p, out), p
    m = _mix_into(w, s2, out)  # pre mode keeps s2 for dw
    return m.sub_(lse2).exp2_() if _free(m) else (m - lse2).exp2(), None


def _matmul_into(a: Tensor, b: Tensor, out: Tensor | None) -> Tensor:
    """a @ b on (B, h, ·, ·) operands, written into the dead contiguous buffer `out` (any shape
    with the product's number of elements) when given and autograd allows."""
    B, h, m, n = *a.shape[:3], b.shape[-1]
    if out is None or not out.is_contiguous() or out.numel() != B * h * m * n \
            or not _free(a, b, out):
        return torch.matmul(a, b)
    res = out.view(B, h, m, n)
    torch.bmm(a.flatten(0, 1), b.flatten(0, 1), out=res.view(B * h, m, n))
    return res


def _distinct(*tensors) -> list:
    """The distinct buffers among tensors that are about to die, for the next side to reuse."""
    seen, out = set(), []
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out.append(t)
    return out


def _take(buffers: list):
    return buffers.pop(0) if buffers else None


def _logits_k(q_land, k, scale, out=None):
    # the scale goes on the small (L×d) landmark operands, not on the N×L products
    return _matmul_into(q_land * scale, k.transpose(-1, -2), out)  # (B, h, L, N), softmax over N


def _logits_q_t(q, k_land, scale, out=None):
    # the query side's logits transposed: (B, h, L, N), softmax over L (dim -2)
    return _matmul_into(k_land * scale, q.transpose(-1, -2), out)


def _logits(q, k, k_land, q_land, scale):
    """(S_K (B, h, L, N), S_Q (B, h, N, L)), each with its softmax over the last dim."""
    return _logits_k(q_land, k, scale), _logits_q_t(q, k_land, scale).transpose(-1, -2)


def imhsa(q: Tensor, k: Tensor, v: Tensor, q_land: Tensor, k_land: Tensor, w_q: Tensor | None,
          w_k: Tensor | None, mix: str, scale: float):
    """Forward. Returns (out, z, lse_k, lse_q): out (B, h, N, d) in q's dtype; z = Â_K·v
    (B, h, L, d), lse_k (B, h, L) and lse_q (B, h, N) in float32 (float64 for float64 inputs)."""
    dtype = q.dtype
    ct = compute_dtype(dtype)
    q, k, v, q_land, k_land = (t.to(ct) for t in (q, k, v, q_land, k_land))
    wq = None if w_q is None else w_q.to(ct)
    wk = None if w_k is None else w_k.to(ct)
    scale2 = scale * LOG2E  # logits in base 2
    # the key side (one N×L buffer), then the query side: block by block where autograd
    # allows (crosshead/_blocked.py), else transposed in the key side's buffer
    a_k, lse_k = _side_inplace(_logits_k(q_land, k, scale2), wk, mix, -1)
    z = torch.matmul(a_k, v)
    if _blocks(q) and _free(q, k_land, z, wq):
        del a_k
        out, lse_q = _blocked.query_forward(q, k_land, z, wq, mix, scale2)
        return out.to(dtype), z, lse_k, lse_q
    a_q_t, lse_q = _side_inplace(_logits_q_t(q, k_land, scale2, a_k), wq, mix, -2)
    return torch.matmul(a_q_t.transpose(-1, -2), z).to(dtype), z, lse_k, lse_q


def imhsa_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, q_land: Tensor,
                   k_land: Tensor, w_q: Tensor | None, w_k: Tensor | None, z: Tensor,
                   lse_k: Tensor, lse_q: Tensor, mix: str, scale: float):
    """Backward. Returns (dq, dk, dv, dq_land, dk_land, dw_q, dw_k); dw_* are empty tensors when
    the corresponding w is None. The softmax maps are recomputed from the logits and the saved
    logsumexps (lse_*), so nothing of size N×N is formed."""
    dtype = q.dtype
    ct = compute_dtype(dtype)
    q, k, v, q_land, k_land, g = (t.to(ct) for t in (q, k, v, q_land, k_land, grad_out))
    wq = None if w_q is None else w_q.to(ct)
    wk = None if w_k is None else w_k.to(ct)
    z = z.to(ct)
    scale2 = scale * LOG2E  # the maps are recomputed in base 2; gradients are natural
    # in post mode with mixing, Â is dead once it has given dZ (or dv): its buffer takes dÂ
    reuse_a = mix == "post"

    # query side first (out = Â_Q·Z): it yields dZ, which the key side needs. Block by block
    # where autograd allows (crosshead/_blocked.py); else with its maps transposed (L×N),
    # which it then leaves to the key side
    buffers = []
    if _blocks(q) and _free(g, q, k_land, z, wq):
        d_z, d_q, d_k_land, d_wq = _blocked.query_backward(
            g, q, k_land, z, wq, lse_q.to(ct) * LOG2E, mix, scale, scale2)
    else:
        s_q_t = _logits_q_t(q, k_land, scale2)
        a_q_t, p_q_t = _recompute_into(s_q_t, wq, lse_q.to(ct) * LOG2E, mix, None, -2)
        d_z = torch.matmul(a_q_t, g)
        d_a_q_t = _matmul_into(z, g.transpose(-1, -2),
                               a_q_t if reuse_a and wq is not None else None)
        d_s_q_t, d_wq = _side_backward_at(d_a_q_t, a_q_t, p_q_t, s_q_t, wq, mix, -2)
        d_q = torch.matmul(d_s_q_t.transpose(-1, -2), k_land * scale)
        d_k_land = torch.matmul(d_s_q_t, q) * scale
        buffers = _distinct(s_q_t, a_q_t, d_a_q_t)
        del s_q_t, a_q_t, p_q_t, d_a_q_t, d_s_q_t

    # key side (Z = Â_K·v)
    s_k = _logits_k(q_land, k, scale2, _take(buffers))
    a_k, p_k = _recompute_into(s_k, wk, lse_k.to(ct) * LOG2E, mix,
                               _take(buffers) if wk is not None else None, -1)
    d_v = torch.matmul(a_k.transpose(-1, -2), d_z)
    d_a_k = _matmul_into(d_z, v.transpose(-1, -2),
                         a_k if reuse_a and wk is not None else _take(buffers))
    d_s_k, d_wk = _side_backward_at(d_a_k, a_k, p_k, s_k, wk, mix, -1)
    d_q_land = torch.matmul(d_s_k, k) * scale
    d_k = torch.matmul(d_s_k.transpose(-1, -2), q_land * scale)

    def w_grad(d_w, w):
        if w is None:
            return grad_out.new_empty(0)
        # pre mode: dw is taken against the base-2 logits, log2 e times too large
        return (d_w * LN2 if mix == "pre" else d_w).to(w.dtype)

    return (d_q.to(dtype), d_k.to(dtype), d_v.to(dtype), d_q_land.to(dtype), d_k_land.to(dtype),
            w_grad(d_wq, w_q), w_grad(d_wk, w_k))
