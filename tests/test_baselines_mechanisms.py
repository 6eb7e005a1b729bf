"""Mechanism checks for crosshead.baselines: each compares a mechanism against an independent
formulation (softmax attention, an explicit quadratic form, a dense mask, KKT conditions) so that a
wrong mechanism fails, not only a crash. Interface and shape tests: tests/test_baselines.py."""

import math
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)

baselines = pytest.importorskip("crosshead.baselines", reason="crosshead.baselines not importable")
from crosshead.baselines._base import from_heads, to_heads  # noqa: E402

PACKAGES = {"performer": "performer_pytorch", "nystrom": "nystrom_attention",
            "linformer": "linformer", "flash_gau": "flash_pytorch"}


def need(name):
    if name in PACKAGES:
        pytest.importorskip(PACKAGES[name], reason=f"optional package for {name} not installed")


def softmax_ref(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v


# ------------------------------------------------------------------------ mechanism checks
def qkv_of(m, x):
    return m.qkv_heads(x)


def test_softmax_matches_torch_multihead_attention():
    torch.manual_seed(0)
    m = baselines.create("softmax", 32, 4, qkv_bias=True)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(m.qkv.weight)
        ref.in_proj_bias.copy_(m.qkv.bias)
        ref.out_proj.weight.copy_(m.proj.weight)
        ref.out_proj.bias.copy_(m.proj.bias)
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(m(x), ref(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_talking_heads_mixes_heads():
    torch.manual_seed(0)
    th = baselines.create("talking_heads", 32, 4)
    sm = baselines.create("softmax", 32, 4)
    sm.load_state_dict(th.state_dict(), strict=False)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(th(x), sm(x), atol=1e-5, rtol=1e-5)   # identity init = MHSA
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        th.proj_l.weight.copy_(torch.eye(4)[perm])                     # L[h] = J[perm[h]]
    q, k, v = qkv_of(th, x)
    logits = q @ k.transpose(-2, -1) / math.sqrt(8)
    expect = th.proj(from_heads(torch.softmax(logits[:, perm], -1) @ v))
    torch.testing.assert_close(th(x), expect, atol=1e-5, rtol=1e-5)   # head h uses perm[h]'s map
    assert (th(x) - sm(x)).abs().max() > 1e-2
    with torch.no_grad():                                             # general mixing, both sides
        th.proj_l.weight.normal_()
        th.proj_w.weight.normal_()
        th.proj_w.bias.normal_()
    pl, pw, bw = th.proj_l.weight, th.proj_w.weight, th.proj_w.bias
    big_l = torch.einsum("bknm,hk->bhnm", logits, pl) + th.proj_l.bias.view(1, 4, 1, 1)
    u = torch.einsum("bhnm,gh->bgnm", big_l.softmax(-1), pw) + bw.view(1, 4, 1, 1)
    torch.testing.assert_close(th(x), th.proj(from_heads(u @ v)), atol=1e-5, rtol=1e-5)


def test_performer_approaches_softmax_with_many_features():
    need("performer")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 16) * s for s in (0.6, 0.6, 1.0))
    ref = softmax_ref(q, k, v)
    errs = {}
    for m in (16, 8192):
        mod = baselines.create("performer", 32, 2, nb_features=m).eval()
        errs[m] = (mod.attend(q, k, v, None) - ref).abs().mean().item()
    assert errs[8192] < 0.02, errs
    assert errs[8192] < errs[16] / 4, errs


def test_nystrom_with_one_landmark_per_token_is_softmax():
    need("nystrom")
    torch.manual_seed(0)
    m = baselines.create("nystrom", 32, 2, num_landmarks=16, residual=False, pinv_iterations=30)
    x = torch.randn(2, 16, 32) * 3    # peaked, well-conditioned maps
    q, k, v = (to_heads(t, 2) for t in m.attn.to_qkv(x).chunk(3, -1))
    expect = m.attn.to_out(from_heads(softmax_ref(q, k, v)))
    torch.testing.assert_close(m(x), expect, atol=2e-4, rtol=2e-4)
    m8 = baselines.create("nystrom", 32, 2, num_landmarks=4, residual=False)
    m8.load_state_dict(m.state_dict())
    assert (m8(x) - expect).abs().max() > 1e-2                     # fewer landmarks approximate


def test_linformer_with_identity_projections_is_softmax():
    need("linformer")
    torch.manual_seed(0)
    m = baselines.create("linformer", 32, 2, seq_len=12, k=12)
    with torch.no_grad():
        m.attn.proj_k.copy_(torch.eye(12))
        m.attn.proj_v.copy_(torch.eye(12))
    x = torch.randn(2, 12, 32)
    a = m.attn
    q, k, v = to_heads(a.to_q(x), 2), to_heads(a.to_k(x), 2), to_heads(a.to_v(x), 2)
    expect = a.to_out(from_heads(softmax_ref(q, k, v)))
    torch.testing.assert_close(m(x), expect, atol=1e-5, rtol=1e-5)


def test_ra_is_unbiased():
    from crosshead.baselines.randomized import randomized_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 1, 8, 4).unbind(0)
    q, k = 1.5 * q, 1.5 * k
    ref = softmax_ref(q, k, v)
    avg = randomized_attention(q, k, v, num_samples=40000, noise=True)
    assert (avg - ref).abs().max() < 0.02
    # control: without the Gaussian noise the estimator is biased, and the check sees it
    biased = randomized_attention(q, k, v, num_samples=40000, noise=False)
    assert (biased - ref).abs().max() > 0.04
    # the module averages samples in training and is deterministic given the sample in eval
    m = baselines.create("ra", 16, 2, num_samples=4).train()
    assert m(torch.randn(1, 9, 16)).shape == (1, 9, 16)


@pytest.mark.parametrize("mis_type,tol", [("bh", 0.03), ("mis-opt", 0.08)])
def test_lara_converges_to_softmax_with_many_samples(mis_type, tol):
    from crosshead.baselines.randomized import lara_core
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 1, 8, 4).unbind(0)
    q, k = 0.7 * q, 0.7 * k
    ref = softmax_ref(q, k, v)
    assert (v.mean(2, keepdim=True) - ref).abs().max() > 0.3         # target is not trivial
    mu, qbar = torch.randn(1, 1, 4, 4) * 0.3, torch.randn(1, 1, 4, 4)
    err = {s: (lara_core(q, k, v, mu, qbar, num_samples=s, mis_type=mis_type) - ref)
           .abs().max().item() for s in (100, 40000)}
    assert err[40000] < tol and err[40000] < err[100] / 2, err


def test_lara_module_uses_pooled_proposals():
    torch.manual_seed(0)
    m = baselines.create("lara", 32, 2, num_prefix_tokens=1, num_landmarks=4,
                         num_samples=2000).train()
    x = torch.randn(1, 17, 32)
    q, k, v = qkv_of(m, x)
    out = m.attend(q, k, v, (4, 4))
    assert out.shape == q.shape
    m.eval()
    a, b = m.attend(q, k, v, (4, 4)), m.attend(q, k, v, (4, 4))
    torch.testing.assert_close(a, b)                                  # eval: w = mu, deterministic


def dense_mra_reference(q, k, v, sel, bs):
    """Explicit form of MRA-2 'full' from a block selection (g, nb, nb)."""
    b, h, n, d = q.shape
    nb = n // bs
    qf, kf, vf = (t.reshape(b * h, n, d) for t in (q, k, v))
    s = qf @ kf.transpose(-2, -1) / math.sqrt(d)
    qh, kh, vh = (t.view(b * h, nb, bs, d).mean(2) for t in (qf, kf, vf))
    low = qh @ kh.transpose(-2, -1) / math.sqrt(d)
    low_full = low.repeat_interleave(bs, 1).repeat_interleave(bs, 2)
    selm = sel.repeat_interleave(bs, 1).repeat_interleave(bs, 2)
    logits = torch.where(selm, s, low_full)
    vals_lo = vh.repeat_interleave(bs, 1)                             # each key -> its block mean
    a = torch.softmax(logits, -1)
    out = (a * selm) @ vf + (a * ~selm) @ vals_lo
    return out.view(b, h, n, d)


def test_mra2_all_blocks_is_softmax_and_partial_matches_explicit_form():
    from crosshead.baselines.mra import mra2_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 128, 16).unbind(0)
    out, sel = mra2_attention(q, k, v, block_size=32, block_per_row=4)   # 4 blocks: all selected
    assert sel.all()
    torch.testing.assert_close(out, softmax_ref(q, k, v), atol=1e-5, rtol=1e-5)
    out, sel = mra2_attention(q, k, v, block_size=32, block_per_row=1)
    assert sel.sum((1, 2)).eq(4).all() and not sel.all()
    torch.testing.assert_close(out, dense_mra_reference(q, k, v, sel, 32), atol=1e-5, rtol=1e-5)
    assert (out - softmax_ref(q, k, v)).abs().max() > 1e-3
    # the module pads N to a multiple of 32 with masked keys: with every block selected it is
    # softmax attention at any N (197 = CLS + 14x14 -> 224)
    m = baselines.create("mra2", 48, 3, num_prefix_tokens=1)
    x = torch.randn(2, 197, 48)
    q, k, v = qkv_of(m, x)
    torch.testing.assert_close(m.attend(q, k, v, None), softmax_ref(q, k, v), atol=1e-5, rtol=1e-5)


def test_ripple_dynamic_program_equals_quadratic_form():
    torch.manual_seed(0)
    for prefix, grid in ((0, (6, 6)), (1, (5, 7))):
        m = baselines.create("ripple", 32, 2, num_prefix_tokens=prefix, num_features=16,
                             max_radius=4)
        with torch.no_grad():
            m.stick.weight.normal_(0, 0.5)
            m.stick.bias.normal_(0, 1.0)
        x = torch.randn(2, prefix + grid[0] * grid[1], 32)
        q, k, v = qkv_of(m, x)
        torch.testing.assert_close(m.attend_dp(q, k, v, grid), m.attend_quadratic(q, k, v, grid),
                                   atol=1e-5, rtol=1e-4)
        alpha = m.spatial_weights(q)
        torch.testing.assert_close(alpha.sum(-1), torch.ones_like(alpha[..., 0]))


@pytest.mark.parametrize("impl", ["quadratic", "dp"])
def test_ripple_weights_are_spatial(impl):
    torch.manual_seed(0)
    m = baselines.create("ripple", 32, 2, num_features=16, max_radius=3, impl=impl)
    with torch.no_grad():
        m.stick.weight.zero_()
        m.stick.bias.copy_(torch.tensor([30.0, 0.0]))                 # s_0 = 1: only own cell
    x = torch.randn(1, 20, 32)
    q, k, v = qkv_of(m, x)
    torch.testing.assert_close(m.attend(q, k, v, (4, 5)), v, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        m.stick.bias.copy_(torch.tensor([-30.0, 30.0]))               # only the ring at distance 1
    out = m.attend(q, k, v, (4, 5))
    fq, fk = m.features(q, True), m.features(k, False)
    ring = (m.chebyshev((4, 5), q.device) == 1).float()
    a = (fq @ fk.transpose(-2, -1)) * ring
    torch.testing.assert_close(out, (a @ v) / a.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)


def test_rpe_linear_fft_equals_explicit_form():
    torch.manual_seed(0)
    for prefix, grid in ((0, (6, 6)), (1, (5, 7))):
        m = baselines.create("rpe_linear", 32, 2, num_prefix_tokens=prefix, grid_size=(8, 8))
        with torch.no_grad():
            m.rpe.uniform_(-2, 2)
        x = torch.randn(2, prefix + grid[0] * grid[1], 32)
        q, k, v = qkv_of(m, x)
        fft, explicit = m.attend_fft(q, k, v, grid), m.attend_explicit(q, k, v, grid)
        torch.testing.assert_close(fft, explicit, atol=1e-5, rtol=1e-4)
        # the mask matters: a plain (unmasked) linear attention differs
        fq, fk = m.features(q, k)
        plain = (fq @ (fk.transpose(-2, -1) @ v)) / (fq @ fk.sum(2, keepdim=True).transpose(-2, -1))
        assert (fft - plain).abs().max() > 1e-2
    with pytest.raises(ValueError, match="grid_size"):
        m(torch.randn(1, 1 + 81, 32), grid=(9, 9))


def test_vars_d_reaches_the_lasso_optimum():
    torch.manual_seed(0)
    m = baselines.create("vars_d", 16, 2, shrink="relu", lam=0.05)
    x = torch.randn(2, 64, 16)
    q, v = (to_heads(t, 2) for t in m.qv(x).chunk(2, -1))
    phi = m.dictionary(q)
    torch.testing.assert_close(phi.norm(dim=-2), torch.ones(2, 2, m.m))   # unit atoms
    with torch.no_grad():
        z = m.reconstruct(phi, v, num_step=3000)
    g = phi.transpose(-2, -1) @ (phi @ z - v)                         # gradient of the LS term
    nz = z.abs() > 1e-6
    assert nz.any() and (~nz).any()                                   # genuinely sparse
    assert (g[nz] + 0.05 * z[nz].sign()).abs().max() < 1e-3           # stationarity on support
    assert g[~nz].abs().max() < 0.05 + 1e-3                           # subgradient off support
    # few steps (the default 5) are not at the optimum: the check discriminates
    with torch.no_grad():
        z5 = m.reconstruct(phi, v, num_step=5)
    g5 = phi.transpose(-2, -1) @ (phi @ z5 - v)
    assert (g5.abs() > 0.05 + 1e-2).any()


def test_hypercube_layout_degree_and_connectivity():
    from collections import deque
    from crosshead.baselines.hypercube import hypercube_layout
    for nb in (2, 8, 16, 64):
        lay = hypercube_layout(nb)
        dim = int(math.log2(nb))
        assert all(len(r) == dim + 1 and i in r for i, r in enumerate(lay))   # degree log2 Nb
        assert all(i in lay[j] for i, r in enumerate(lay) for j in r)       # symmetric
        assert all(i + 1 in lay[i] for i in range(nb - 1))                  # Gray order: chain
        dist = [0] + [-1] * (nb - 1)
        dq = deque([0])
        while dq:
            u = dq.popleft()
            for w in lay[u]:
                if dist[w] < 0:
                    dist[w] = dist[u] + 1
                    dq.append(w)
        assert min(dist) >= 0 and max(dist) == dim                          # connected, diam
    lay = hypercube_layout(13)
    assert all(max(r) < 13 and len(r) <= 5 for r in lay)


def test_hypercube_attention_equals_dense_masked_softmax():
    from crosshead.baselines.hypercube import hypercube_layout
    torch.manual_seed(0)
    m = baselines.create("hypercube", 32, 2, num_prefix_tokens=1)
    x = torch.randn(2, 1 + 100, 32)                                   # 101 -> 7 blocks of 16
    q, k, v = qkv_of(m, x)
    n = 101
    blk = torch.arange(n) // 16
    allowed = torch.zeros(7, 7, dtype=torch.bool)
    for i, r in enumerate(hypercube_layout(7)):
        allowed[i, r] = True
    mask = allowed[blk[:, None], blk[None, :]]
    logits = (q @ k.transpose(-2, -1) / math.sqrt(16)).masked_fill(~mask, float("-inf"))
    expect = torch.softmax(logits, -1) @ v
    torch.testing.assert_close(m.attend(q, k, v, None), expect, atol=1e-5, rtol=1e-5)
    assert not mask.all()


def test_flash_gau_matched_parameters_and_mixed_chunk_locality():
    need("flash_gau")
    for dim in (192, 384):
        n_flash = sum(p.numel() for p in baselines.create("flash_gau", dim, 4).parameters())
        n_mhsa = sum(p.numel() for p in baselines.create("softmax", dim, 4).parameters())
        assert abs(n_flash - n_mhsa) / n_mhsa < 0.01, (n_flash, n_mhsa)
    torch.manual_seed(0)
    m = baselines.create("flash_gau", 32, 1, group_size=8, query_key_dim=16).eval()
    x = torch.randn(1, 32, 32)
    # the returned branch is the package block minus its residual (norm replaced by identity)
    torch.testing.assert_close(m(x), m.flash(x) - x, atol=1e-5, rtol=1e-5)
    with torch.no_grad():                                             # (init scale is 0.02)
        m.flash.qk_offset_scale.gamma.normal_()
    x2 = x.clone()
    x2[:, 20] += 1.0                                                  # a token in group 2
    delta = (m(x2) - m(x))[:, :8].abs().max()
    assert delta > 1e-4                                               # reaches group 0 (linear)
    with torch.no_grad():
        m.flash.qk_offset_scale.gamma[1].zero_()                      # lin_q = 0: no global term
        m.flash.qk_offset_scale.beta[1].zero_()
    assert (m(x2) - m(x))[:, :16].abs().max() == 0                    # exact part stays local
    assert (m(x2) - m(x))[:, 16:24].abs().max() > 1e-4


def test_context_pool_pools_then_attends():
    torch.manual_seed(0)
    cp = baselines.create("context_pool", 32, 4, num_prefix_tokens=1)
    sm = baselines.create("softmax", 32, 4)
    sm.load_state_dict(cp.state_dict(), strict=False)
    x = torch.randn(2, 1 + 20, 32)
    with torch.no_grad():
        cp.to_support.bias.fill_(-40.0)                               # support -> 0: identity pool
    torch.testing.assert_close(cp(x, grid=(4, 5)), sm(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        cp.to_support.bias.fill_(40.0)
        cp.max_support = 1e4                                          # huge support: global mean
    pooled = cp.pool(x, (4, 5))
    torch.testing.assert_close(pooled[:, 1:], x[:, 1:].mean(1, keepdim=True).expand(-1, 20, -1),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled[:, :1], x[:, :1])               # prefix not pooled
    cp.max_support = 1.0
    with torch.no_grad():
        cp.to_support.bias.fill_(0.0)
        cp.to_weight.weight.normal_()
    pooled = cp.pool(x, (4, 5))
    assert (pooled[:, 1:] - x[:, 1:]).abs().max() > 1e-2              # neighbours are mixed
    # a convex combination: a constant field stays constant
    const = torch.ones(1, 21, 32)
    torch.testing.assert_close(cp.pool(const, (4, 5)), const)
