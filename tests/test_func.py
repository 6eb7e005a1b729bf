"""Forward-mode AD and torch.func: what the README promises (grad, vjp, jvp, jacrev, jacfwd, vmap and
their compositions over imhsa and landmarks; double backward refused), each against float64
references: gradcheck's numerical derivatives and explicit loops."""

import pytest
import torch
from torch.autograd import forward_ad
from torch.autograd.gradcheck import GradcheckError

import crosshead
from crosshead import _forward_ad, _vmap

f64 = torch.float64
B, h, N, d, L = 2, 3, 12, 4, 3


def make(seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*batch, B, h, N, d, generator=g, dtype=f64) for _ in range(3))
    w_q, w_k = (torch.eye(h, dtype=f64) + 0.3 * torch.randn(*batch, h, h, generator=g, dtype=f64) for _ in range(2))
    return q, k, v, w_q, w_k


def attention(q, k, v, w_q, w_k, mix="post"):
    ql, kl = (crosshead.landmarks(t, (3, 4), (1, 3), 0) for t in (q, k))
    return crosshead.imhsa(q, k, v, ql, kl, w_q, w_k, mix=mix)


@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("interaction", [True, False])
def test_forward_and_reverse_mode_match_numerical_derivatives(mix, interaction):
    q, k, v, w_q, w_k = make()
    ws = (w_q, w_k) if interaction else (None, None)
    ql, kl = (crosshead.landmarks(t, None, L, 0) for t in (q, k))
    leaves = [t.requires_grad_() for t in (q, k, v, ql.detach(), kl.detach(), *ws) if t is not None]
    fn = (lambda q, k, v, ql, kl, *w: crosshead.imhsa(q, k, v, ql, kl, *(w or (None, None)), mix=mix))
    assert torch.autograd.gradcheck(fn, leaves, check_forward_ad=True, check_backward_ad=True)


def test_landmarks_forward_mode_matches_numerical_derivatives():
    x = torch.randn(2, 3, 1 + 20, 4, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: crosshead.landmarks(x, (4, 5), (2, 3), 1), (x,), check_forward_ad=True)


def test_a_wrong_tangent_fails_the_check(monkeypatch):
    """The mechanism check above can fail: a zero tangent (the old silent answer) is caught."""
    monkeypatch.setattr(_forward_ad, "imhsa_jvp", lambda *a, **kw: torch.zeros(B, h, N, d, dtype=f64))
    q, k, v, w_q, w_k = make()
    ql, kl = (crosshead.landmarks(t, None, L, 0).detach() for t in (q, k))
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(lambda q: crosshead.imhsa(q, k, v, ql, kl), (q.requires_grad_(),),
                                 check_forward_ad=True, check_backward_ad=False)


def test_dual_tensors_carry_a_tangent():
    q, k, v, w_q, w_k = make()
    t = torch.randn_like(q)
    with forward_ad.dual_level():
        out = attention(forward_ad.make_dual(q, t), k, v, w_q, w_k)
        tangent = forward_ad.unpack_dual(out).tangent
    assert tangent is not None
    eps = 1e-6
    numeric = (attention(q + eps * t, k, v, w_q, w_k) - attention(q - eps * t, k, v, w_q, w_k)) / (2 * eps)
    torch.testing.assert_close(tangent, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mix", ["post", "pre"])
def test_torch_func_grad_vjp_jvp_jacrev_jacfwd_agree(mix):
    q, k, v, w_q, w_k = make()
    f = (lambda q, w: attention(q, k, v, w, w_k, mix))
    loss = (lambda q, w: f(q, w).square().sum())
    q_leaf, w_leaf = q.clone().requires_grad_(), w_q.clone().requires_grad_()
    loss(q_leaf, w_leaf).backward()

    g_q, g_w = torch.func.grad(loss, argnums=(0, 1))(q, w_q)
    torch.testing.assert_close(g_q, q_leaf.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_w, w_leaf.grad, rtol=1e-10, atol=1e-12)
    out, pullback = torch.func.vjp(f, q, w_q)
    torch.testing.assert_close(pullback(2 * out)[0], q_leaf.grad, rtol=1e-10, atol=1e-12)

    t_q, t_w = torch.randn_like(q), torch.randn_like(w_q)
    _, tangent = torch.func.jvp(f, (q, w_q), (t_q, t_w))
    # <ȯut, c> = <grad of <out, c>, (q̇, ẇ)>: forward mode against reverse mode
    c = torch.randn_like(out)
    gq, gw = torch.func.grad(lambda q, w: (f(q, w) * c).sum(), argnums=(0, 1))(q, w_q)
    torch.testing.assert_close((tangent * c).sum(), (gq * t_q).sum() + (gw * t_w).sum(), rtol=1e-10, atol=1e-12)

    small = (lambda q: f(q, w_q)[0, 1, :4, 0])
    torch.testing.assert_close(torch.func.jacfwd(small)(q), torch.func.jacrev(small)(q), rtol=1e-9, atol=1e-12)


def _loop(f, args, in_dims):
    size = next(a.shape[dim] for a, dim in zip(args, in_dims) if dim is not None)
    return torch.stack([f(*(a.select(dim, i) if dim is not None else a for a, dim in zip(args, in_dims)))
                        for i in range(size)])


@pytest.mark.parametrize("in_dims", [(0, 0, 0, None, None), (0, None, 0, 0, None), (None, 1, None, None, 0)],
                         ids=["shared w", "vmapped w_q, shared k", "k over dim 1, vmapped w_k"])
def test_vmap_matches_a_loop(in_dims):
    q, k, v, w_q, w_k = make(batch=(3,))
    args = [a if dim is not None else a[0] for a, dim in zip((q, k, v, w_q, w_k), in_dims)]
    if in_dims[1] == 1:
        args[1] = args[1].movedim(0, 1)
    got = torch.func.vmap(attention, in_dims=in_dims)(*args)
    torch.testing.assert_close(got, _loop(attention, args, in_dims), rtol=1e-12, atol=1e-14)


def test_vmap_folds_into_the_batch(monkeypatch):
    """With w shared, the batching rule makes one call over V·B rather than V calls."""
    calls = []
    fold = _vmap._fold
    monkeypatch.setattr(_vmap, "_fold", lambda *a: calls.append(1) or fold(*a))
    monkeypatch.setattr(_vmap, "_per_item", lambda *a: pytest.fail("fell back to one call per item"))
    q, k, v, w_q, w_k = make(batch=(3,))
    torch.func.vmap(attention, in_dims=(0, 0, 0, None, None))(q, k, v, w_q[0], w_k[0])
    assert len(calls) == 2 + 5  # landmarks of q and k, then the five (B, h, ·, d) operands of imhsa


def test_per_sample_gradients_and_gradients_of_vmap():
    q, k, v, w_q, w_k = make(batch=(3,))
    loss = (lambda q, k, v, w: attention(q, k, v, w, w_k[0]).square().sum())
    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 3)), in_dims=(0, 0, 0, None))(q, k, v, w_q[0])
    for i in range(3):
        q_i, w_i = q[i].clone().requires_grad_(), w_q[0].clone().requires_grad_()
        loss(q_i, k[i], v[i], w_i).backward()
        torch.testing.assert_close(per_sample[0][i], q_i.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(per_sample[1][i], w_i.grad, rtol=1e-10, atol=1e-12)
    through_vmap = torch.func.grad(lambda q: torch.func.vmap(attention)(q, k, v, w_q, w_k).sum())(q)
    q_leaf = q.clone().requires_grad_()
    _loop(attention, (q_leaf, k, v, w_q, w_k), (0,) * 5).sum().backward()
    torch.testing.assert_close(through_vmap, q_leaf.grad, rtol=1e-10, atol=1e-12)


def test_second_derivatives_are_refused_clearly():
    q, k, v, w_q, w_k = make()
    q = q.requires_grad_()
    (g,) = torch.autograd.grad(attention(q, k, v, w_q, w_k).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
    with pytest.raises(RuntimeError, match="forward-mode differentiation of a backward op"):
        torch.func.jacfwd(torch.func.jacrev(lambda q: attention(q, k, v, w_q, w_k).sum()))(q.detach())
