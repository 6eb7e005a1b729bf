"""Autograd of the forward ops, reverse and forward mode, registered as their Autograd kernels.

Reverse mode: each backward is the registered *_backward op (double backward is refused).
Forward mode (torch.autograd.forward_ad, torch.func.jvp / jacfwd): landmarks is linear, so its
tangent is landmarks of the tangent; imhsa's tangent comes from crosshead/_forward_ad.py.
torch.func's grad, vjp, jvp and jacfwd/jacrev reach these kernels as they reach any built-in op's;
vmap is the ops' own batching rule (crosshead/_vmap.py).

torch.library.register_autograd would give reverse mode only: its kernel skips autograd unless an
input requires grad, so a forward-mode tangent was silently dropped. This kernel enters the
Function when an input requires grad *or* carries a tangent.
"""

import torch
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd import forward_ad
from torch.autograd.function import _SingleLevelFunction

from . import _forward_ad

_ops = torch.ops.crosshead


def _has_tangent(args) -> bool:
    level = forward_ad._current_level
    return level >= 0 and any(isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a, level=level).tangent
                              is not None for a in args)


def _needs_autograd(args) -> bool:
    return (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)) or _has_tangent(args)


def _apply(function, *args):
    """The Functions below are single-level (torch.autograd.function._SingleLevelFunction, as
    torch.func's own generated ones): they run inside the op's Autograd kernel, where torch.func has
    already unwrapped its transform for the op (as for any built-in op), so they must act as an
    ordinary autograd node there rather than re-enter torch.func's custom_function_call."""
    with enable_single_level_autograd_function():
        return function.apply(*args)


def _below_autograd(op, keyset, args):
    with torch._C._AutoDispatchBelowAutograd():
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)


class Landmarks(_SingleLevelFunction):
    @staticmethod
    def forward(x, grid, size, prefix):
        with torch._C._AutoDispatchBelowAutograd():
            return _ops.landmarks(x, grid, size, prefix)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, grid, size, prefix = inputs
        ctx.num_tokens, ctx.grid, ctx.size, ctx.prefix = x.shape[2], grid, size, prefix

    @staticmethod
    def backward(ctx, grad):
        return _ops.landmarks_backward(grad, ctx.num_tokens, ctx.grid, ctx.size, ctx.prefix), None, None, None

    @staticmethod
    def jvp(ctx, x_t, *_):
        return _ops.landmarks(x_t, ctx.grid, ctx.size, ctx.prefix)  # linear in x


class Imhsa(_SingleLevelFunction):
    @staticmethod
    def forward(q, k, v, q_land, k_land, w_q, w_k, mix, scale):
        with torch._C._AutoDispatchBelowAutograd():
            return _ops.imhsa(q, k, v, q_land, k_land, w_q, w_k, mix, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, q_land, k_land, w_q, w_k, mix, scale = inputs
        _, z, lse_k, lse_q = output
        ctx.mark_non_differentiable(z, lse_k, lse_q)
        ctx.save_for_backward(q, k, v, q_land, k_land, w_q, w_k, z, lse_k, lse_q)
        ctx.save_for_forward(q, k, v, q_land, k_land, w_q, w_k)
        ctx.mix, ctx.scale = mix, scale

    @staticmethod
    def backward(ctx, grad_out, _grad_z, _grad_lse_k, _grad_lse_q):
        q, k, v, q_land, k_land, w_q, w_k, z, lse_k, lse_q = ctx.saved_tensors
        dq, dk, dv, dq_land, dk_land, dw_q, dw_k = _ops.imhsa_backward(
            grad_out, q, k, v, q_land, k_land, w_q, w_k, z, lse_k, lse_q, ctx.mix, ctx.scale)
        return (dq, dk, dv, dq_land, dk_land, None if w_q is None else dw_q, None if w_k is None else dw_k,
                None, None)

    @staticmethod
    def jvp(ctx, *tangents):
        q, k, v, q_land, k_land, w_q, w_k = ctx.saved_tensors
        out_t = _forward_ad.imhsa_jvp(q, k, v, q_land, k_land, w_q, w_k, ctx.mix, ctx.scale, tangents[:7])
        return out_t, None, None, None


def _landmarks_kernel(keyset, x, grid, size, prefix):
    if _needs_autograd((x,)):
        return _apply(Landmarks, x, grid, size, prefix)
    return _below_autograd(_ops.landmarks.default, keyset, (x, grid, size, prefix))


def _imhsa_kernel(keyset, *args):
    if _needs_autograd(args[:7]):
        return _apply(Imhsa, *args)
    return _below_autograd(_ops.imhsa.default, keyset, args)


class _Underivable(_SingleLevelFunction):
    """Runs a backward op; differentiating its result raises (double backward is not supported)."""

    @staticmethod
    def forward(op, *args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op_name = inputs[0].name()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.op_name}: double backward (gradients of gradients) is not supported")


def _backward_kernel(op):
    def kernel(keyset, *args):
        if _has_tangent(args):
            raise RuntimeError(f"{op.name()}: forward-mode differentiation of a backward op (forward over "
                               "reverse, as in jacfwd(jacrev(f))) is not supported")
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return _apply(_Underivable, op, *args)
        return _below_autograd(op, keyset, args)
    return kernel


_lib = torch.library.Library("crosshead", "IMPL")
_lib.impl("landmarks", _landmarks_kernel, "Autograd", with_keyset=True)
_lib.impl("imhsa", _imhsa_kernel, "Autograd", with_keyset=True)
_lib.impl("landmarks_backward", _backward_kernel(_ops.landmarks_backward.default), "Autograd", with_keyset=True)
_lib.impl("imhsa_backward", _backward_kernel(_ops.imhsa_backward.default), "Autograd", with_keyset=True)
