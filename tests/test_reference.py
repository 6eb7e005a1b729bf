"""The pure-torch path (the CPU kernels) against the independent float64 loop reference."""

import pytest
import torch
import torch.nn.functional as F

import crosshead
import error_bounds
from helpers import as64, imhsa_inputs, rand
import loop_reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, h, N, d, L): ordinary, one head, one landmark, odd everything
SHAPES = [(2, 3, 70, 16, 12), (1, 1, 37, 8, 5), (2, 4, 29, 12, 1), (3, 2, 5, 3, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}h{}N{}d{}L{}".format(*s))
@pytest.mark.parametrize("interaction", [True, False], ids=["w", "no_w"])
def test_forward_and_gradients_match_loop_reference(dtype, mix, shape, interaction):
    inputs = imhsa_inputs(*shape, dtype=dtype, interaction=interaction, requires_grad=True)
    out, grad_out, expected, grads = _op_and_loop_reference(inputs, mix)
    assert out.dtype == dtype and out.shape == expected.shape
    for name, x in zip(error_bounds.NAMES, inputs):
        assert x is None or (x.grad is not None and x.grad.dtype == x.dtype), name
    error_bounds.assert_imhsa_within(inputs, out, grad_out, expected, grads, mix, shape[3] ** -0.5)


def _grads(tensors):
    return [None if t is None else t.grad for t in tensors]


def _op_and_loop_reference(inputs, mix):
    """crosshead.imhsa forward, and backward of a fresh random output gradient, on inputs; and the
    loop reference's on the same (rounded) values in float64, so that only the op's own error is
    measured. Returns (out, grad_out, expected out, expected gradients)."""
    out = crosshead.imhsa(*inputs, mix=mix)
    grad_out = rand(*out.shape, dtype=out.dtype)
    out.backward(grad_out)
    inputs64 = as64(inputs)
    expected = ref.imhsa(*inputs64, mix=mix)
    expected.backward(grad_out.to(torch.float64))
    return out, grad_out, expected, _grads(inputs64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_the_bound_catches_a_kernel_that_lowers_its_precision(dtype):
    """The tolerance above is an error bound, not a loose number: the op run on its inputs rounded
    to bfloat16 (as a kernel whose products fell to bfloat16 would compute) breaks it, while the
    op itself stays inside it."""
    shape = (2, 3, 70, 16, 12)
    inputs = imhsa_inputs(*shape, dtype=dtype, requires_grad=True)
    out, g, expected, grads = _op_and_loop_reference(inputs, "pre")
    error_bounds.assert_imhsa_within(inputs, out, g, expected, grads, "pre", 16 ** -0.5)
    lowered = [t.detach().bfloat16().to(dtype) for t in inputs]
    bad = crosshead.imhsa(*lowered, mix="pre")
    with pytest.raises(AssertionError, match="out: error"):
        error_bounds.assert_imhsa_within(inputs, bad, None, expected, None, "pre", 16 ** -0.5)


@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("interaction", [True, False], ids=["w", "no_w"])
def test_the_bounds_formulas_are_the_ops(mix, interaction):
    """tests/error_bounds.py runs the op's forward and backward formulas on magnitudes; run on the
    values themselves, the same formulas give the loop reference's output and gradients."""
    inputs = imhsa_inputs(2, 3, 20, 8, 5, interaction=interaction, requires_grad=True)
    g = rand(2, 3, 20, 8)
    out = ref.imhsa(*inputs, mix=mix)
    out.backward(g)
    values = error_bounds.evaluate(*inputs, mix, 8 ** -0.5, g)
    want = {"out": out.detach()}
    want.update((n, x.grad) for n, x in zip(error_bounds.NAMES, inputs) if x is not None)
    error_bounds.assert_within(inputs, mix, 8 ** -0.5, g, {n: values[n] for n in want}, want,
                               slack=2)


@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("side", ["q", "k"])
def test_mixing_on_one_side_only(mix, side):
    """w on one side, None on the other: the two sides of the kernels reuse each other's buffers,
    which depends on which side mixes."""
    inputs = list(imhsa_inputs(2, 3, 33, 8, 7, dtype=torch.float32, requires_grad=True))
    inputs[6 if side == "q" else 5] = None
    out, grad_out, expected, grads = _op_and_loop_reference(inputs, mix)
    error_bounds.assert_imhsa_within(inputs, out, grad_out, expected, grads, mix, 8 ** -0.5)


@pytest.mark.parametrize("mix", ["post", "pre"])
def test_in_place_mixing_in_many_blocks(mix, monkeypatch):
    """The maps are mixed in place block by block (_maps.mix_heads_inplace); with a tiny block every
    map takes many blocks and a ragged last one, and the result does not change."""
    from crosshead import _maps

    inputs = imhsa_inputs(2, 3, 70, 16, 12, dtype=torch.float64, requires_grad=True)
    g = rand(2, 3, 70, 16)
    runs = []
    for block_bytes in (_maps.MIX_CHUNK_BYTES, 64):
        monkeypatch.setattr(_maps, "MIX_CHUNK_BYTES", block_bytes)
        out = crosshead.imhsa(*inputs, mix=mix)
        out.backward(g)
        runs.append((out.detach(), _grads(inputs)))
        if block_bytes != 64:
            for t in inputs:
                t.grad = None
    (out, grads), (out_blocks, _) = runs
    error_bounds.assert_imhsa_within(inputs, out_blocks, g, out, grads, mix, 16 ** -0.5, slack=2)


@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("interaction", [True, False], ids=["w", "no_w"])
def test_query_side_in_many_blocks(mix, interaction, monkeypatch):
    """Below autograd the query side runs block by block over the tokens (crosshead/_blocked.py);
    with 8-token blocks N = 70 takes nine, the last one ragged, and still matches the loop
    reference in float64."""
    from crosshead import _blocked

    monkeypatch.setattr(_blocked, "MIN_TOKENS", 8)
    monkeypatch.setattr(_blocked, "BLOCK_BYTES", 1)
    inputs = imhsa_inputs(2, 3, 70, 16, 12, interaction=interaction, requires_grad=True)
    out, g, expected, grads = _op_and_loop_reference(inputs, mix)
    error_bounds.assert_imhsa_within(inputs, out, g, expected, grads, mix, 16 ** -0.5)


@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("ws", ["both", "none", "q", "k"])
def test_whole_map_path_of_the_cuda_fallback(mix, ws, monkeypatch):
    """On a GPU the kernels run the whole-map code in place instead of the blocks
    (_maps.use_blocks), the key side reusing the query side's buffers (which depends on which
    side mixes); run that code here on the CPU, against the loop reference."""
    from crosshead import _maps

    monkeypatch.setattr(_maps, "use_blocks", lambda t: False)
    inputs = list(imhsa_inputs(2, 3, 70, 16, 12, interaction=ws != "none", requires_grad=True))
    if ws in ("q", "k"):
        inputs[6 if ws == "q" else 5] = None
    out, g, expected, grads = _op_and_loop_reference(inputs, mix)
    error_bounds.assert_imhsa_within(inputs, out, g, expected, grads, mix, 16 ** -0.5)


@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("blocks", [True, False], ids=["blocked", "whole_map"])
def test_functional_path_agrees_with_the_in_place_one(mix, blocks, monkeypatch):
    """Where autograd records (torch.compile, differentiating reference.imhsa itself), the kernels
    run the whole-map functional code instead of the in-place one (blocked where N spans several
    blocks, _blocked.worthwhile, else whole-map): both compute the same."""
    from crosshead import _blocked, reference

    if blocks:
        monkeypatch.setattr(_blocked, "MIN_TOKENS", 8)
        monkeypatch.setattr(_blocked, "BLOCK_BYTES", 1)
    inputs = imhsa_inputs(2, 3, 40, 8, 6, requires_grad=True)
    assert _blocked.worthwhile(inputs[0], 6) == blocks
    g = rand(2, 3, 40, 8)
    with torch.no_grad():
        fwd = reference.imhsa(*inputs, mix, 0.5)
        bwd = reference.imhsa_backward(g, *inputs, *fwd[1:], mix, 0.5)
    with torch.enable_grad():  # inputs require grad: autograd records, the functional path runs
        fwd2 = reference.imhsa(*inputs, mix, 0.5)
        bwd2 = reference.imhsa_backward(g, *inputs, *fwd2[1:], mix, 0.5)
    assert fwd2[0].requires_grad and bwd2[0].requires_grad
    names = ("out", "z", "lse_k", "lse_q") + error_bounds.NAMES
    got, want = dict(zip(names, fwd + bwd)), {n: t.detach() for n, t in zip(names, fwd2 + bwd2)}
    error_bounds.assert_within(inputs, mix, 0.5, g, got, want, slack=2)


def test_float64_path_is_exact():
    inputs = imhsa_inputs(2, 3, 30, 8, 6)
    for mix in ("post", "pre"):
        error_bounds.assert_imhsa_within(inputs, crosshead.imhsa(*inputs, mix=mix), None,
                                         ref.imhsa(*inputs, mix=mix), None, mix, 8 ** -0.5)


def test_custom_scale():
    inputs = imhsa_inputs(1, 2, 20, 8, 4)
    torch.testing.assert_close(crosshead.imhsa(*inputs, mix="pre", scale=0.7),
                               ref.imhsa(*inputs, mix="pre", scale=0.7))


# ------------------------------------------------------------------------- invariants of imhsa.md


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_identity_interaction_makes_modes_agree(dtype):
    q, k, v, ql, kl, _, _ = imhsa_inputs(2, 4, 50, 8, 9, dtype=dtype)
    eye = torch.eye(4, dtype=dtype)
    post = crosshead.imhsa(q, k, v, ql, kl, eye, eye, mix="post")
    pre = crosshead.imhsa(q, k, v, ql, kl, eye, eye, mix="pre")
    none = crosshead.imhsa(q, k, v, ql, kl, mix="pre")
    inputs = (q, k, v, ql, kl, eye, eye)
    for other in (pre, none):  # two computed results of one exact value: twice the bound
        error_bounds.assert_imhsa_within(inputs, other, None, post, None, "post", 8 ** -0.5, slack=2)


def test_rows_of_the_two_hop_map_sum_to_one():
    """out = Â_Q·Â_K·v, so v = 1 gives the row sums of Â_Q·Â_K."""
    q, k, _, ql, kl, w_q, w_k = imhsa_inputs(2, 3, 40, 8, 6)
    ones = torch.ones_like(q)
    for mix, wq, wk in (("post", None, None), ("pre", None, None), ("pre", w_q, w_k)):
        sums = crosshead.imhsa(q, k, ones, ql, kl, wq, wk, mix=mix)
        torch.testing.assert_close(sums, ones)
    # post-softmax mixing with a non-identity w does not keep rows stochastic: the check can fail
    sums = crosshead.imhsa(q, k, ones, ql, kl, w_q, w_k, mix="post")
    assert (sums - 1).abs().max() > 1e-3


def test_full_landmarks_give_a_squared_not_a():
    """L = N with identity pooling is A·A (two hops), not softmax attention A."""
    q, k, v, *_ = imhsa_inputs(2, 2, 16, 8, 1)
    out = crosshead.imhsa(q, k, v, q, k)
    a = torch.softmax(q @ k.transpose(-1, -2) * 8**-0.5, dim=-1)
    torch.testing.assert_close(out, a @ a @ v)
    assert (out - a @ v).abs().max() > 1e-3


# ---------------------------------------------------------------------------------- landmarks


@pytest.mark.parametrize("dtype", [torch.float64] + DTYPES, ids=str)
@pytest.mark.parametrize("grid,size,prefix", [((14, 14), (7, 7), 0), ((5, 7), (2, 3), 1),
                                              ((9, 4), (4, 4), 4), ((3, 3), (1, 1), 0),
                                              ((6, 6), (6, 6), 2)])
def test_landmarks_match_adaptive_avg_pool2d(dtype, grid, size, prefix):
    B, h, d = 2, 3, 5
    x = rand(B, h, prefix + grid[0] * grid[1], d, dtype=dtype, requires_grad=True)
    out = crosshead.landmarks(x, grid, size, prefix)
    x64 = as64([x])[0]
    tokens = x64[:, :, prefix:].reshape(B * h, *grid, d).permute(0, 3, 1, 2)
    expected = F.adaptive_avg_pool2d(tokens, size).permute(0, 2, 3, 1).reshape(B, h, -1, d)
    torch.testing.assert_close(expected, ref.landmarks(x64, grid, size, prefix))
    g = rand(*out.shape, dtype=dtype)
    out.backward(g)
    expected.backward(g.to(torch.float64))
    # bin means: the magnitudes are the same pooling of |x| and its adjoint of |g|
    n_bin = (-(-grid[0] // size[0]) + 1) * (-(-grid[1] // size[1]) + 1)
    factor = error_bounds.landmarks_factor(n_bin, dtype)
    magnitude = ref.landmarks(x64.detach().abs(), grid, size, prefix)
    x_abs = x64.detach().abs().requires_grad_()
    grad_magnitude, = torch.autograd.grad(ref.landmarks(x_abs, grid, size, prefix), x_abs,
                                          g.to(torch.float64).abs())
    assert error_bounds.excess(out, expected, magnitude, factor, dtype) <= 1
    assert error_bounds.excess(x.grad, x64.grad, grad_magnitude, factor, dtype) <= 1
    assert (x.grad[:, :, :prefix] == 0).all()


@pytest.mark.parametrize("n,size,prefix", [(37, 5, 0), (20, 20, 0), (11, 1, 3), (100, 7, 1)])
def test_landmarks_1d_match_adaptive_avg_pool1d(n, size, prefix):
    x = rand(2, 3, prefix + n, 4)
    out = crosshead.landmarks(x, None, size, prefix)
    expected = F.adaptive_avg_pool1d(x[:, :, prefix:].reshape(6, n, 4).transpose(1, 2), size)
    torch.testing.assert_close(out, expected.transpose(1, 2).reshape(2, 3, size, 4))
    torch.testing.assert_close(out, ref.landmarks(x, None, size, prefix))


def test_prefix_tokens_are_queries_and_keys_but_not_pooled():
    """A CLS token changes the output through attention (it is a key), never through pooling."""
    h, d, grid = 2, 8, (4, 4)
    x = rand(1, h, 1 + 16, d)
    q, k, v = x, rand(1, h, 17, d), rand(1, h, 17, d)
    ql, kl = crosshead.landmarks(q, grid, (2, 2), 1), crosshead.landmarks(k, grid, (2, 2), 1)
    k2 = k.clone()
    k2[:, :, 0] += 5.0
    assert torch.equal(crosshead.landmarks(k2, grid, (2, 2), 1), kl)
    assert not torch.allclose(crosshead.imhsa(q, k2, v, ql, kl), crosshead.imhsa(q, k, v, ql, kl))


@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("interaction", [True, False], ids=["w", "no_w"])
def test_autograd_through_the_reference_forward(mix, interaction):
    """torch.compile of the pure-torch path (bench/) differentiates crosshead.reference.imhsa
    itself: its in-place steps must leave autograd's saved tensors intact."""
    from crosshead import reference

    inputs = imhsa_inputs(2, 3, 17, 4, 5, interaction=interaction, requires_grad=True)
    reference.imhsa(*inputs, mix, 0.6)[0].sum().backward()
    got = [None if t is None else t.grad for t in inputs]
    inputs64 = as64(inputs)
    ref.imhsa(*inputs64, mix=mix, scale=0.6).sum().backward()
    for g, t in zip(got, inputs64):
        if t is not None:
            torch.testing.assert_close(g, t.grad)
