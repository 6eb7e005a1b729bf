"""Batching rules of the ops for torch.func.vmap (and the vmap inside jacrev/jacfwd).

A vmapped dimension V over the (B, h, ·, d) tensors folds into the batch: one call on (V·B, ...)
tensors, unbatched operands expanded (a view, no copy until the kernel reads it). The weight w is
shared over the batch, so a vmapped w_q or w_k, and the backward's dw (summed over the batch, which
must stay per V), fall back to one call per V, stacked.
"""

import torch

_ops = torch.ops.crosshead


def _fold(t, bdim, size):
    """(V, B, ...) from t with its vmapped dim at bdim (or none), reshaped to (V·B, ...)."""
    t = t.unsqueeze(0).expand(size, *t.shape) if bdim is None else t.movedim(bdim, 0)
    return t.reshape(size * t.shape[1], *t.shape[2:])


def _unfold(t, size):
    return t.reshape(size, t.shape[0] // size, *t.shape[1:])


def _per_item(op, info, in_dims, args):
    """One call per vmapped index, stacked along dim 0."""
    outs = [op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)))
            for i in range(info.batch_size)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])


def _landmarks(info, in_dims, x, grid, size, prefix):
    out = _ops.landmarks(_fold(x, in_dims[0], info.batch_size), grid, size, prefix)
    return _unfold(out, info.batch_size), 0


def _landmarks_backward(info, in_dims, grad, num_tokens, grid, size, prefix):
    out = _ops.landmarks_backward(_fold(grad, in_dims[0], info.batch_size), num_tokens, grid, size, prefix)
    return _unfold(out, info.batch_size), 0


def _imhsa(info, in_dims, q, k, v, q_land, k_land, w_q, w_k, mix, scale):
    args = (q, k, v, q_land, k_land, w_q, w_k, mix, scale)
    if in_dims[5] is not None or in_dims[6] is not None:
        return _per_item(_ops.imhsa, info, in_dims, args)
    folded = [_fold(t, d, info.batch_size) for t, d in zip(args[:5], in_dims[:5])]
    outs = _ops.imhsa(*folded, w_q, w_k, mix, scale)
    return tuple(_unfold(t, info.batch_size) for t in outs), (0, 0, 0, 0)


def _imhsa_backward(info, in_dims, grad_out, q, k, v, q_land, k_land, w_q, w_k, z, lse_k, lse_q, mix, scale):
    args = (grad_out, q, k, v, q_land, k_land, w_q, w_k, z, lse_k, lse_q, mix, scale)
    if w_q is not None or w_k is not None:
        return _per_item(_ops.imhsa_backward, info, in_dims, args)
    tensors = [None if t is None else _fold(t, d, info.batch_size) for t, d in zip(args[:11], in_dims[:11])]
    outs = _ops.imhsa_backward(*tensors, mix, scale)
    grads = tuple(_unfold(t, info.batch_size) for t in outs[:5])
    empty = outs[5].new_empty(info.batch_size, 0)  # no w: the op returns empty dw
    return (*grads, empty, empty), (0,) * 7


for _name, _rule in (("landmarks", _landmarks), ("landmarks_backward", _landmarks_backward), ("imhsa", _imhsa),
                     ("imhsa_backward", _imhsa_backward)):
    torch.library.register_vmap(f"crosshead::{_name}", _rule)
