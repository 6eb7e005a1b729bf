"""Mechanism checks for crosshead.baselines' Nystromformer: both landmark segmentations against an
exact Nystrom written out here, the residual conv, m = N against softmax, the effective landmark
count, and the broken versions each check must catch.
"""

import math
import warnings

import pytest
import torch

from baseline_checks import need

warnings.filterwarnings("ignore", category=DeprecationWarning)

baselines = pytest.importorskip("crosshead.baselines", reason="crosshead.baselines not importable")
from crosshead.baselines._base import from_heads, to_heads  # noqa: E402


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
