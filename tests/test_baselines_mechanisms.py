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


# ------------------------------------------------------------------------------------- nystrom
# The Nystrom checks are plain functions so that test_nystrom_checks_fail_on_broken_versions can
# run them on broken versions. All in float64 (unit roundoff U64 = 2^-53 ~ 1.1e-16), x ~ 2 N(0, 1).
#
# Where the tolerances come from. The module's own pinv iterate Z of its m x m landmark kernel M
# (both read back from the package's moore_penrose_iter_pinv during the forward) has the residual
# rho = ||(M Z - P)[real rows]||_inf, P the projector on range(M): I when M is invertible; in
# "package" the padding-only landmarks are uniform rows of M (see nystrom_segments). First, rho
# must be at the rounding floor of the product M Z, m U64 ||M||_inf ||Z||_inf: the iteration has
# converged. (Per step E = I - M Z becomes (3E^3 + E^4)/4, cubic once ||E|| < 1, but from
# Z_0 = M^T / (||M||_1 ||M||_inf) the smallest singular directions gain only a factor 13/4 per
# step; here 20 iterations leave rho ~ 0.8, 25 reach the floor; 60 is the margin.) Then, against
# eq. 15 with the exact pinv, output row i before to_out is off by (a_F A^+)_i (M Z - P)_real c,
# c = A_B V and, in "package", the padding rows' means of V: at most
# ||(a_F A^+)_i||_1 rho ||V||_max. The kernels' own rounding (measured: ||M_real - A||_inf
# ~ 1e-15) adds ||(a_F A^+)_i||_1 ||dA||_inf ||A^+ c||_max, and at most as much again through a_F
# and A_B (hence 2 ||dA||). After to_out, times ||W_out||_inf; the factor 2 is margin. These are
# worst-case norm bounds: the measured errors are 4-5 orders of magnitude below them (1e-11..1e-10
# vs 1e-7..4e-6 at outputs 10..90), and each broken version below is off by O(10), 4-6 orders
# above its tolerance.
U64 = torch.finfo(torch.float64).eps / 2


def inf_norm(t):
    """Largest row l1 norm over all leading (batch, head) indices."""
    return t.abs().sum(-1).max().item()


def nystrom_segments(mode, n, m):
    """The landmarks' token ranges [(start, end)], written from the documented rules (not taken from
    nystrom.py), and how many of the m landmark slots hold padding only ("package")."""
    if mode == "even":          # min(m, n) runs of n // m or n // m + 1 tokens, the longer first
        m = min(m, n)
        ranges, start = [], 0
        for i in range(m):
            size = n // m + (1 if i < n % m else 0)
            ranges.append((start, start + size))
            start += size
        return ranges, 0
    seg = -(-n // m)            # package: zeros in front up to m * ceil(n/m), then m equal cuts
    pad = m * seg - n
    cuts = [(i * seg - pad, (i + 1) * seg - pad) for i in range(m)]
    return [(max(a, 0), b) for a, b in cuts if b > 0], sum(b <= 0 for _, b in cuts)


def exact_nystrom(q, k, v, ranges):
    """Eq. 15 with segment-mean landmarks over ``ranges`` and the exact pseudo-inverse:
    returns a_F, A^+, A and c = A_B V."""
    ql, kl = (torch.stack([t[..., a:b, :].mean(-2) for a, b in ranges], -2) for t in (q, k))
    s = q.shape[-1] ** -0.5
    a_f = torch.softmax(q @ kl.transpose(-2, -1) * s, -1)
    a = torch.softmax(ql @ kl.transpose(-2, -1) * s, -1)
    a_b = torch.softmax(ql @ k.transpose(-2, -1) * s, -1)
    return a_f, torch.linalg.pinv(a), a, a_b @ v


def depthwise_conv_ref(v, w):
    """The residual conv as a sum of shifted copies: out_i = sum_j w[h, j] v_{i + j - K//2}, zeros
    outside the sequence (the package's Conv2d(h, h, (K, 1), groups=h) on (B, h, N, d))."""
    kk, n = w.shape[2], v.shape[2]
    vp = torch.nn.functional.pad(v, (0, 0, kk // 2, kk // 2))
    return sum(w[:, 0, j, 0].view(1, -1, 1, 1) * vp[:, :, j:j + n] for j in range(kk))


def run_recording_pinv(mod, x):
    """mod(x) with every call of the package's moore_penrose_iter_pinv recorded as (M, Z, iters)."""
    import nystrom_attention.nystrom_attention as pkg
    calls, orig = [], pkg.moore_penrose_iter_pinv

    def recording(a, iters=6):
        z = orig(a, iters)
        calls.append((a, z, iters))
        return z

    pkg.moore_penrose_iter_pinv = recording
    try:
        with torch.no_grad():
            y = mod(x)
    finally:
        pkg.moore_penrose_iter_pinv = orig
    return y, calls


def nystrom_case(mode, n, m, *, residual=False, iters=60, seed=0):
    """A float64 module (64 channels, 2 heads, qkv bias), ViT-like prefix (197 = CLS + 14x14) and a
    seeded random non-zero input x ~ 2 N(0, 1)."""
    torch.manual_seed(seed)
    mod = baselines.create("nystrom", 64, 2, num_prefix_tokens=n - math.isqrt(n) ** 2,
                           qkv_bias=True, num_landmarks=m, landmark_segments=mode,
                           pinv_iterations=iters, residual=residual).double()
    return mod, 2 * torch.randn(2, n, 64, dtype=torch.float64)


def pinv_residual(calls, iters, pad):
    """(M, rho) of the module's one pinv call; asserts rho is at the rounding floor (converged)."""
    assert len(calls) == 1 and calls[0][2] == iters
    mk, z, _ = calls[0]
    r = mk.shape[-1]
    proj = torch.eye(r, dtype=mk.dtype)
    if pad:
        proj[:pad, :pad] = 1 / pad
    rho = inf_norm((mk @ z - proj)[..., pad:, :])
    floor = r * U64 * inf_norm(mk) * inf_norm(z)
    assert rho <= floor, f"pinv not converged after {iters} iterations: {rho:.1e} > {floor:.1e}"
    return mk, rho


def kernel_error(mk, a, pad, q, k):
    """(min(||M_real - A||_inf, bound), ||M_real - A||_inf <= bound), bound an a-priori float64
    bound for two computations of the same softmax kernel: logits are d-term dot products of means
    of at most N tokens, off by <= (d + N + 2) U64 L with L = sqrt(d) max|q| max|k|; softmax
    doubles that; m U64 for the row sum. The cap only matters for a broken kernel, and keeps its
    tolerance from growing with the bug; the kernel assertion then reports it."""
    d, n = q.shape[-1], q.shape[-2]
    bound = 2 * (d + n + 2) * U64 * d ** 0.5 * q.abs().max().item() * k.abs().max().item()
    bound += mk.shape[-1] * U64
    real = mk[..., pad:, pad:]
    err = inf_norm(real - a) if real.shape == a.shape else math.inf
    return min(err, bound), err <= bound


def check_nystrom_matches_exact(mode, n, *, m=64, residual=False, iters=60):
    """The module equals eq. 15 on the landmarks of nystrom_segments(mode, n, m), exact pinv."""
    mod, x = nystrom_case(mode, n, m, residual=residual, iters=iters)
    y, calls = run_recording_pinv(mod, x)
    ranges, pad = nystrom_segments(mode, n, m)
    mk, rho = pinv_residual(calls, iters, pad)
    with torch.no_grad():
        q, k, v = (to_heads(t, 2) for t in mod.attn.to_qkv(x).chunk(3, -1))
        a_f, a_inv, a, c = exact_nystrom(q, k, v, ranges)
        h0 = a_f @ a_inv @ c
        conv = depthwise_conv_ref(v, mod.attn.res_conv.weight) if residual else torch.zeros_like(h0)
        expect = mod.attn.to_out(from_heads(h0 + conv))
    d_a, kernel_ok = kernel_error(mk, a, pad, q, k)
    w_out, vmax = inf_norm(mod.attn.to_out[0].weight), v.abs().max().item()
    tol = 2 * w_out * inf_norm(a_f @ a_inv) * (
        rho * vmax + 2 * d_a * max((a_inv @ c).abs().max().item(), vmax))
    torch.testing.assert_close(y, expect, rtol=0, atol=tol)
    assert kernel_ok, "landmark kernel differs from the exact segment-mean kernel"
    if pad:             # "package": padding-only landmarks are uniform rows, invisible to real ones
        assert (mk[..., :pad, :] == 1 / m).all() and (mk[..., pad:, :pad] == 0).all()
    if residual:        # the conv part alone: residual on minus residual off, same weights
        flat = baselines.create("nystrom", 64, 2, qkv_bias=True, num_landmarks=m,
                                landmark_segments=mode, pinv_iterations=iters, residual=False)
        flat.double().load_state_dict(mod.state_dict(), strict=False)
        with torch.no_grad():
            got = y - flat(x)
            want = from_heads(conv) @ mod.attn.to_out[0].weight.T
        # rounding only (the Nystrom parts are the same computation): gamma_{dim+2} for both
        # projections and the add, K U64 ||w||_1 ||V||_max for the conv's K-term sums
        w_conv = mod.attn.res_conv.weight
        tol_conv = 2 * (64 + 2) * U64 * (w_out * (h0.abs().max() + (h0 + conv).abs().max()).item()
                                         + 2 * mod.attn.to_out[0].bias.abs().max().item())
        w_conv_l1 = w_conv.abs().sum((1, 2, 3)).max().item()
        tol_conv += w_out * 2 * w_conv.shape[2] * U64 * w_conv_l1 * vmax
        torch.testing.assert_close(got, want, rtol=0, atol=tol_conv)


def check_nystrom_one_landmark_per_token_is_softmax(mode, n, *, m=16, iters=60):
    """m >= N: every landmark is one token (in "package" with m - N padding-only slots), and
    A_F pinv(A) A_B V = A A^-1 A V = softmax attention. Off by R A V with R = (M Z - P)_real:
    |dy| <= (rho + 2 ||dA||_inf) ||V||_max before to_out."""
    mod, x = nystrom_case(mode, n, m, iters=iters)
    y, calls = run_recording_pinv(mod, x)
    ranges, pad = nystrom_segments(mode, n, m)
    assert ranges == [(i, i + 1) for i in range(n)]
    mk, rho = pinv_residual(calls, iters, pad)
    with torch.no_grad():
        q, k, v = (to_heads(t, 2) for t in mod.attn.to_qkv(x).chunk(3, -1))
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)
        expect = mod.attn.to_out(from_heads(a @ v))
    d_a, kernel_ok = kernel_error(mk, a, pad, q, k)
    tol = 2 * inf_norm(mod.attn.to_out[0].weight) * (rho + 2 * d_a) * v.abs().max().item()
    torch.testing.assert_close(y, expect, rtol=0, atol=tol)
    assert kernel_ok, "landmark kernel differs from softmax(Q K^T)"
    return mod, x, expect


@pytest.mark.parametrize("mode", ["even", "package"])
@pytest.mark.parametrize("n", [197, 196])
def test_nystrom_matches_exact_nystrom_at_vit_sizes(mode, n):
    need("nystrom")
    check_nystrom_matches_exact(mode, n)


@pytest.mark.parametrize("mode", ["even", "package"])
def test_nystrom_residual_conv_matches_shifted_sum(mode):
    need("nystrom")
    check_nystrom_matches_exact(mode, 197, residual=True)


def test_nystrom_effective_landmarks_and_options():
    need("nystrom")
    even = baselines.create("nystrom", 64, 2)
    pkg = baselines.create("nystrom", 64, 2, landmark_segments="package")
    assert even.landmark_segments == "even" and even.num_landmarks == 64
    sizes = (197, 196, 256, 128, 65, 10, 1)
    assert [even.effective_landmarks(n) for n in sizes] == [64, 64, 64, 64, 64, 10, 1]
    assert [pkg.effective_landmarks(n) for n in sizes] == [50, 49, 64, 64, 33, 10, 1]
    for n in sizes:                                   # the same counts from the written-out rules
        assert len(nystrom_segments("package", n, 64)[0]) == pkg.effective_landmarks(n)
        assert len(nystrom_segments("even", n, 64)[0]) == even.effective_landmarks(n)
    cls_alone = nystrom_segments("package", 197, 64)[0]
    assert cls_alone[0] == (0, 1) and {b - a for a, b in cls_alone[1:]} == {4}
    assert {b - a for a, b in nystrom_segments("even", 197, 64)[0]} == {3, 4}
    assert "landmark_segments='package'" in repr(pkg) and "num_landmarks=64" in repr(pkg)
    assert even.state_dict().keys() == pkg.state_dict().keys()
    pkg.load_state_dict(even.state_dict())
    with pytest.raises(ValueError, match="landmark_segments.*'even', 'package'"):
        baselines.create("nystrom", 64, 2, landmark_segments="front")


@pytest.mark.parametrize("mode", ["even", "package"])
@pytest.mark.parametrize("n", [16, 10])                 # m = N, and N < m (package: padded)
def test_nystrom_with_one_landmark_per_token_is_softmax(mode, n):
    need("nystrom")
    mod, x, expect = check_nystrom_one_landmark_per_token_is_softmax(mode, n)
    few = baselines.create("nystrom", 64, 2, qkv_bias=True, num_landmarks=4,
                           landmark_segments=mode, pinv_iterations=60, residual=False).double()
    few.load_state_dict(mod.state_dict())
    with torch.no_grad():
        assert (few(x) - expect).abs().max() > 1e-2              # fewer landmarks approximate


def _package_bounds(n, m):
    """Broken "even": the package's front-padded cuts, padding-only segments dropped (50 at 197)."""
    seg = -(-n // m)
    return [0] + [e for e in ((i + 1) * seg - (m * seg - n) for i in range(m)) if e > 0]


def _remainder_last_bounds(n, m):
    """Broken "even": segments of n // m tokens, the whole remainder in the last one."""
    return [i * (n // m) for i in range(m)] + [n]


def _first_token_landmarks(x, m):
    """Broken "even": each segment's first token instead of its mean."""
    from crosshead.baselines import nystrom
    return x[..., nystrom.segment_bounds(x.shape[-2], m)[:-1], :]


NYSTROM_MUTANTS = {
    "package without the padding mask": ("package", "package_nystrom", lambda attn, x: attn(x)),
    "even with the package's front-padded segments": ("even", "segment_bounds", _package_bounds),
    "even with the remainder in the last segment": ("even", "segment_bounds",
                                                    _remainder_last_bounds),
    "even with first-token landmarks": ("even", "even_landmarks", _first_token_landmarks),
}


@pytest.mark.parametrize("mutant", list(NYSTROM_MUTANTS))
def test_nystrom_checks_fail_on_broken_versions(mutant, monkeypatch):
    need("nystrom")
    from crosshead.baselines import nystrom
    mode, name, broken = NYSTROM_MUTANTS[mutant]
    monkeypatch.setattr(nystrom, name, broken)
    for n in (197, 196):                    # the output comparison itself fails, not only the rest
        with pytest.raises(AssertionError, match="Tensor-likes are not close"):
            check_nystrom_matches_exact(mode, n)
    if mode == "package":                   # and the padded N < m case of the softmax check
        with pytest.raises(AssertionError, match="Tensor-likes are not close"):
            check_nystrom_one_landmark_per_token_is_softmax(mode, 10)


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
