"""The registered operators: opcheck, float64 gradcheck, input validation, strided inputs."""

import pytest
import torch
from torch.library import opcheck

import crosshead
from helpers import imhsa_inputs, rand

MIXES = ["post", "pre"]


def _imhsa_samples():
    for mix in MIXES:
        for interaction in (True, False):
            for requires_grad in (True, False):
                for dtype in (torch.float32, torch.float64, torch.bfloat16):
                    yield (*imhsa_inputs(2, 3, 13, 4, 5, dtype=dtype, interaction=interaction,
                                         requires_grad=requires_grad), mix, 0.4)


@pytest.mark.parametrize("args", list(_imhsa_samples()), ids=lambda a: f"{a[7]}-{a[0].dtype}-"
                         f"{'w' if a[5] is not None else 'no_w'}-{'grad' if a[0].requires_grad else 'nograd'}")
def test_opcheck_imhsa(args):
    opcheck(torch.ops.crosshead.imhsa.default, args)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("interaction", [True, False])
def test_opcheck_imhsa_backward(mix, interaction):
    inputs = imhsa_inputs(2, 3, 13, 4, 5, interaction=interaction)
    _, z, lse_k, lse_q = torch.ops.crosshead.imhsa(*inputs, mix, 0.5)
    opcheck(torch.ops.crosshead.imhsa_backward.default,
            (rand(2, 3, 13, 4), *inputs, z, lse_k, lse_q, mix, 0.5))


@pytest.mark.parametrize("grid,size,prefix", [([4, 5], [2, 3], 1), ([], [3], 2)])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck_landmarks(grid, size, prefix, requires_grad):
    x = rand(2, 3, prefix + 20, 4, requires_grad=requires_grad)
    opcheck(torch.ops.crosshead.landmarks.default, (x, grid, size, prefix))
    opcheck(torch.ops.crosshead.landmarks_backward.default,
            (rand(2, 3, size[0] * (size[1] if len(size) > 1 else 1), 4), prefix + 20, grid, size, prefix))


@pytest.mark.parametrize("mix", MIXES)
def test_gradcheck_all_seven_inputs(mix):
    inputs = imhsa_inputs(2, 3, 11, 4, 4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: crosshead.imhsa(*a, mix=mix), inputs)


def test_gradcheck_without_interaction_and_custom_scale():
    inputs = imhsa_inputs(1, 2, 9, 3, 2, interaction=False, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: crosshead.imhsa(*a, mix="pre", scale=1.3), inputs[:5])


@pytest.mark.parametrize("grid,size,prefix", [((4, 5), (3, 2), 2), (None, 4, 1)])
def test_gradcheck_landmarks(grid, size, prefix):
    x = rand(2, 2, prefix + 20, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: crosshead.landmarks(x, grid, size, prefix), (x,))


def test_gradcheck_through_landmarks_and_imhsa():
    """The module's path: landmarks of q and k feed the op, so q and k get both gradients."""
    q, k, v, _, _, w_q, w_k = imhsa_inputs(1, 2, 1 + 12, 3, 1, requires_grad=True)

    def f(q, k, v, w_q, w_k):
        ql, kl = crosshead.landmarks(q, (3, 4), (2, 2), 1), crosshead.landmarks(k, (3, 4), (2, 2), 1)
        return crosshead.imhsa(q, k, v, ql, kl, w_q, w_k)

    assert torch.autograd.gradcheck(f, (q, k, v, w_q, w_k))


def test_double_backward_is_refused():
    inputs = imhsa_inputs(1, 2, 8, 3, 2, requires_grad=True)
    out = crosshead.imhsa(*inputs)
    (g,) = torch.autograd.grad(out.sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_float32_interaction_with_half_inputs():
    """A module's float32 w under autocast meets bfloat16 activations."""
    q, k, v, ql, kl, w_q, w_k = imhsa_inputs(1, 2, 10, 4, 3, dtype=torch.bfloat16, requires_grad=True)
    w_q32 = w_q.detach().float().requires_grad_()
    out = crosshead.imhsa(q, k, v, ql, kl, w_q32, w_k)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w_q32.grad.dtype == torch.float32 and w_k.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------------ strided inputs


def test_non_contiguous_and_expanded_inputs():
    B, h, N, d, L = 2, 3, 15, 4, 5
    base = rand(B, N, 3, h, d)
    q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)  # the module's (non-contiguous) views
    assert not q.is_contiguous()
    ql = rand(1, h, L, d).expand(B, h, L, d)  # expanded: stride 0 over batch
    kl = rand(B, h, d, L).transpose(-1, -2)
    w = rand(h, h).T
    for mix in MIXES:
        out = crosshead.imhsa(q, k, v, ql, kl, w, w, mix=mix)
        expected = crosshead.imhsa(*(t.contiguous() for t in (q, k, v, ql, kl, w, w)), mix=mix)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    x = rand(B, h, d, 1 + 12).transpose(-1, -2)
    torch.testing.assert_close(crosshead.landmarks(x, (3, 4), (2, 2), 1),
                               crosshead.landmarks(x.contiguous(), (3, 4), (2, 2), 1), rtol=0, atol=0)


def test_empty_batch():
    inputs = imhsa_inputs(0, 2, 9, 3, 2)
    assert crosshead.imhsa(*inputs).shape == (0, 2, 9, 3)


# ----------------------------------------------------------------------------- input validation


def _bad(fn, *args, match, exc=ValueError, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_imhsa_rejects_bad_input():
    q, k, v, ql, kl, wq, wk = imhsa_inputs(2, 3, 10, 4, 5)
    f = crosshead.imhsa
    _bad(f, q[0], k, v, ql, kl, match=r"q must have 4 dimensions")
    _bad(f, q, k[:, :, :9], v, ql, kl, match=r"k must have q's shape")
    _bad(f, q, k, v[..., :3], ql, kl, match=r"v must have q's shape")
    _bad(f, q, k, v, ql[..., :3], kl, match=r"q_land must be \(B, h, L, d\)")
    _bad(f, q, k, v, ql, kl[:, :, :4], match=r"k_land must have q_land's shape")
    _bad(f, q, k.float(), v, ql, kl, match=r"k has dtype torch.float32 but q has torch.float64")
    _bad(f, q, k, v, ql, kl.float(), match=r"k_land has dtype")
    _bad(f, q, k, v, ql, kl, wq[:2], match=r"w_q must be \(h, h\) = \(3, 3\)")
    _bad(f, q, k, v, ql, kl, None, wk.half(), match=r"w_k has dtype torch.float16; it must be float32 or q's")
    _bad(f, q, k, v, ql, kl, mix="both", match=r"mix must be 'post' or 'pre'")
    _bad(f, q, k, v, ql, kl, scale=float("nan"), match=r"scale must be a finite float")
    _bad(f, q.int(), k.int(), v.int(), ql.int(), kl.int(), match=r"q has dtype torch.int32")
    _bad(f, q, k, v, ql, [1], match=r"k_land must be a torch.Tensor", exc=TypeError)
    _bad(f, q, k, v, ql, kl, wq, "eye", match=r"w_k must be a torch.Tensor or None", exc=TypeError)


def test_imhsa_rejects_out_of_scope_requests():
    inputs = imhsa_inputs(1, 2, 8, 4, 2)
    _bad(crosshead.imhsa, *inputs, attn_mask=torch.ones(8, 8, dtype=torch.bool), match="attn_mask",
         exc=NotImplementedError)
    _bad(crosshead.imhsa, *inputs, dropout_p=0.1, match="dropout", exc=NotImplementedError)
    _bad(crosshead.imhsa, *inputs, is_causal=True, match="causal", exc=NotImplementedError)


def test_landmarks_rejects_bad_input():
    x = rand(2, 3, 1 + 20, 4)
    f = crosshead.landmarks
    _bad(f, x[0], (4, 5), match=r"x must have 4 dimensions")
    _bad(f, x, (4, 5), (2, 2), 0, match=r"grid \(4, 5\) has 20 tokens but x has N - prefix = 21 - 0 = 21")
    _bad(f, x, (4, 5), (5, 2), 1, match=r"landmark size \(5, 2\) is larger than the grid \(4, 5\)")
    _bad(f, x, None, 21, 1, match=r"landmark size L=21 is larger than the 20 tokens")
    _bad(f, x, None, (2, 2), 1, match=r"size must be an int L")
    _bad(f, x, (4, 5, 1), (2, 2), 1, match=r"grid must be 2 ints")
    _bad(f, x, (4, 5), (0, 2), 1, match=r"size must be positive")
    _bad(f, x, (4, 5), (2, 2), -1, match=r"prefix must be a non-negative int")
    _bad(f, x, (4, 5), (2, 2), 21, match=r"leaves no grid tokens")


def test_imhsa_rejects_mixed_devices():
    q, k, v, ql, kl, wq, wk = imhsa_inputs(1, 2, 8, 4, 2)
    _bad(crosshead.imhsa, q, k.to("meta"), v, ql, kl, match=r"k is on meta but q is on cpu")
    _bad(crosshead.imhsa, q, k, v, ql, kl, wq.to("meta"), match=r"w_q is on meta but q is on cpu")


def test_autocast_does_not_lower_the_kernels_precision():
    """Under autocast the pure-torch kernel still computes in float32 and returns float32 z and lse,
    as the fake kernel (and so torch.compile) declares: bitwise what it computes without autocast."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g).bfloat16() for _ in range(3))
    ql, kl = (torch.randn(2, 4, 4, 8, generator=g).bfloat16() for _ in range(2))
    w = torch.eye(4) + 0.1 * torch.randn(4, 4, generator=g)
    plain = torch.ops.crosshead.imhsa(q, k, v, ql, kl, w, w, "pre", 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = torch.ops.crosshead.imhsa(q, k, v, ql, kl, w, w, "pre", 0.3)
    assert [t.dtype for t in cast] == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
    for a, b in zip(cast, plain):
        assert torch.equal(a, b)
