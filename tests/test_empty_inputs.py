"""Degenerate inputs: an empty batch (B = 0) works end to end (the public functions, the registered ops,
the module, every model, forward and backward), with correctly shaped empty outputs and gradients;
a head dim d = 0 is refused with an error naming the argument."""

import pytest
import torch
from torch.library import opcheck

import crosshead
import crosshead.models as M
from crosshead.nn import InteractiveMultiheadAttention
from helpers import imhsa_inputs, rand

SMALL_IVIT = dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), num_heads=(4, 8))


@pytest.mark.parametrize("grid,size,prefix", [((4, 5), (2, 3), 1), ((4, 5), (4, 5), 0), (None, 3, 2)])
def test_landmarks_empty_batch(grid, size, prefix):
    x = rand(0, 3, prefix + 20, 4, requires_grad=True)
    L = size if isinstance(size, int) else size[0] * size[1]
    out = crosshead.landmarks(x, grid, size, prefix)
    assert out.shape == (0, 3, L, 4) and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("interaction", [True, False])
def test_imhsa_empty_batch_forward_backward(mix, interaction):
    leaves = imhsa_inputs(0, 3, 13, 4, 5, interaction=interaction, requires_grad=True)
    out = crosshead.imhsa(*leaves, mix=mix)
    assert out.shape == (0, 3, 13, 4)
    out.sum().backward()
    for name, t in zip(["q", "k", "v", "q_land", "k_land", "w_q", "w_k"], leaves):
        if t is not None:
            assert t.grad is not None and t.grad.shape == t.shape, name
    if interaction:  # summed over an empty batch: exactly zero
        assert torch.equal(leaves[5].grad, torch.zeros(3, 3, dtype=leaves[5].dtype))


def test_landmarks_then_imhsa_empty_batch():
    q, k, v = (rand(0, 2, 1 + 16, 8, requires_grad=True) for _ in range(3))
    ql, kl = (crosshead.landmarks(t, (4, 4), (2, 2), 1) for t in (q, k))
    out = crosshead.imhsa(q, k, v, ql, kl, torch.eye(2, dtype=q.dtype), torch.eye(2, dtype=q.dtype))
    out.sum().backward()
    assert out.shape == (0, 2, 17, 8) and all(t.grad.shape == (0, 2, 17, 8) for t in (q, k, v))


@pytest.mark.parametrize("grid,size,prefix", [([4, 5], [2, 3], 1), ([], [3], 2)])
def test_opcheck_empty_batch(grid, size, prefix):
    x = rand(0, 3, prefix + 20, 4, requires_grad=True)
    opcheck(torch.ops.crosshead.landmarks.default, (x, grid, size, prefix))
    L = size[0] * (size[1] if len(size) > 1 else 1)
    opcheck(torch.ops.crosshead.landmarks_backward.default, (rand(0, 3, L, 4), prefix + 20, grid, size, prefix))
    inputs = imhsa_inputs(0, 3, 13, 4, 5, requires_grad=True)
    opcheck(torch.ops.crosshead.imhsa.default, (*inputs, "post", 0.5))
    _, z, lse_k, lse_q = torch.ops.crosshead.imhsa(*inputs, "pre", 0.5)
    opcheck(torch.ops.crosshead.imhsa_backward.default,
            (rand(0, 3, 13, 4), *[t.detach() for t in inputs], z, lse_k, lse_q, "pre", 0.5))


def test_head_dim_zero_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"^x has head dim d = 0"):
        crosshead.landmarks(rand(1, 2, 16, 0), (4, 4), (2, 2))
    q, k, v, ql, kl, _, _ = imhsa_inputs(1, 2, 16, 0, 4, interaction=False)
    with pytest.raises(ValueError, match=r"^q has head dim d = 0"):
        crosshead.imhsa(q, k, v, ql, kl)
    with pytest.raises(ValueError, match=r"^q has head dim d = 0"):  # explicit scale: still refused
        crosshead.imhsa(q, k, v, ql, kl, scale=1.0)


@pytest.mark.parametrize("landmarks,grid,n", [((2, 2), None, 1 + 16), ((2, 3), (4, 6), 1 + 24), (5, None, 9)])
def test_module_empty_batch(landmarks, grid, n):
    m = InteractiveMultiheadAttention(32, num_heads=4, landmarks=landmarks, num_prefix_tokens=1)
    x = torch.randn(0, n, 32, requires_grad=True)
    y = m(x, grid)
    assert y.shape == (0, n, 32)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


@pytest.mark.parametrize("name", M.list_models())
def test_every_model_empty_batch(name):
    kw = SMALL_IVIT if name.startswith("ivit") else dict(depth=2)
    model = M.create_model(name, num_classes=5, **kw)  # training mode: drop path on an empty batch too
    x = torch.randn(0, 3, 64, 96, requires_grad=True)
    y = model(x)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), pname


def test_features_only_empty_batch():
    model = M.ivit_tiny(features_only=True, out_indices=(0, 1, 2, 3), **SMALL_IVIT)
    x = torch.randn(0, 3, 64, 96, requires_grad=True)
    feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(0, c, 64 // r, 96 // r) for c, r in
                                              zip(model.feature_info.channels(), model.feature_info.reduction())]
    sum(f.sum() for f in feats).backward()
    assert x.grad.shape == x.shape
