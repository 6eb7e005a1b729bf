"""Autograd for the forward ops: each backward is the registered *_backward op."""

import torch


def _landmarks_setup(ctx, inputs, output):
    x, grid, size, prefix = inputs
    ctx.num_tokens, ctx.grid, ctx.size, ctx.prefix = x.shape[2], grid, size, prefix


def _landmarks_backward(ctx, grad):
    dx = torch.ops.crosshead.landmarks_backward(grad, ctx.num_tokens, ctx.grid, ctx.size, ctx.prefix)
    return dx, None, None, None


def _imhsa_setup(ctx, inputs, output):
    q, k, v, q_land, k_land, w_q, w_k, mix, scale = inputs
    _, z, lse_k, lse_q = output
    ctx.mark_non_differentiable(z, lse_k, lse_q)
    ctx.save_for_backward(q, k, v, q_land, k_land, w_q, w_k, z, lse_k, lse_q)
    ctx.mix, ctx.scale = mix, scale


def _imhsa_backward(ctx, grad_out, _grad_z, _grad_lse_k, _grad_lse_q):
    q, k, v, q_land, k_land, w_q, w_k, z, lse_k, lse_q = ctx.saved_tensors
    dq, dk, dv, dq_land, dk_land, dw_q, dw_k = torch.ops.crosshead.imhsa_backward(
        grad_out, q, k, v, q_land, k_land, w_q, w_k, z, lse_k, lse_q, ctx.mix, ctx.scale)
    return (dq, dk, dv, dq_land, dk_land, None if w_q is None else dw_q,
            None if w_k is None else dw_k, None, None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("crosshead: double backward (gradients of gradients) is not supported")


torch.library.register_autograd("crosshead::landmarks", _landmarks_backward,
                                setup_context=_landmarks_setup)
torch.library.register_autograd("crosshead::imhsa", _imhsa_backward, setup_context=_imhsa_setup)
for _op in ("landmarks_backward", "imhsa_backward"):
    torch.library.register_autograd(f"crosshead::{_op}", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)
