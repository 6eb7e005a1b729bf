"""Options of crosshead.baselines that choose between faithful variants: RA/LARA's training-noise
scale, LARA's defaults and 1-D proposals, ripple's and rpe_linear's two evaluations, and the
size-dependent options of ``create_for``."""

import math
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)

baselines = pytest.importorskip("crosshead.baselines", reason="crosshead.baselines not importable")
from crosshead.baselines import randomized  # noqa: E402

# float64 throughout: every comparison below is between two evaluations of the same formula, so
# they differ by rounding only, a few ulps times a sum of at most N = 64 terms of size ~1:
# |err| <= 8 sqrt(64) 2^-53 * 64 ~ 5e-13; 1e-10 leaves room and is still 1e-8 of the signal
TOL = dict(atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------ RA / LARA training noise
def official_ra(q, k, v, idx, eps):
    """RA as the authors' code computes it, in the unscaled space: w = q + k' + eps, logits
    d^{-1/2} (w.k - |k|^2/2), given the sampled key indices and the noise."""
    d = q.shape[-1]
    w = q + torch.gather(k, 2, idx.unsqueeze(-1).expand(-1, -1, -1, d)) + eps
    logits = (w @ k.transpose(-2, -1) - 0.5 * (k * k).sum(-1).unsqueeze(-2)) * d ** -0.5
    return logits.softmax(-1) @ v


def paper_ra(q, k, v, idx, eps):
    """RA with the paper's proposal N(q~ + k~', I) in the scaled space x~ = d^{-1/4} x."""
    d = q.shape[-1]
    qs, ks = q * d ** -0.25, k * d ** -0.25
    w = qs + torch.gather(ks, 2, idx.unsqueeze(-1).expand(-1, -1, -1, d)) + eps
    logits = w @ ks.transpose(-2, -1) - 0.5 * (ks * ks).sum(-1).unsqueeze(-2)
    return logits.softmax(-1) @ v


def draws(q, k, seed):
    """The key indices and the standard normal noise RA draws after ``torch.manual_seed(seed)``
    (multinomial over softmax(q.k/sqrt d), then randn), in that order."""
    torch.manual_seed(seed)
    probs = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
    b, h, n, _ = probs.shape
    idx = torch.multinomial(probs.reshape(b * h * n, -1), 1, replacement=True).view(b, h, n)
    return idx, torch.randn(q.shape, dtype=q.dtype)


def check_ra_noise(noise_scale):
    torch.manual_seed(0)
    m = baselines.create("ra", 64, 2, noise_scale=noise_scale).double().train()
    q, k, v = m.qkv_heads(torch.randn(2, 12, 64, dtype=torch.float64))
    torch.manual_seed(7)
    out = m.attend(q, k, v, None)
    idx, eps = draws(q, k, 7)
    ref = (official_ra if noise_scale == "official" else paper_ra)(q, k, v, idx, eps)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("noise_scale", ["official", "paper"])
def test_ra_noise_scale_matches_its_convention(noise_scale):
    check_ra_noise(noise_scale)


def test_ra_noise_scale_check_fails_when_the_scale_is_ignored(monkeypatch):
    # broken: the paper's unit noise whatever noise_scale says
    monkeypatch.setattr(randomized, "noise_std", lambda scale, d: 1.0)
    check_ra_noise("paper")
    with pytest.raises(AssertionError):
        check_ra_noise("official")


def test_lara_training_noise_has_the_chosen_scale():
    """The spread of LARA's train-mode samples scales with the noise: the official scale is
    d^{-1/4} of the paper's, and each module reports it."""
    torch.manual_seed(0)
    x = torch.randn(1, 1 + 64, 64, dtype=torch.float64)
    spread = {}
    for scale in ("official", "paper"):
        torch.manual_seed(0)
        m = baselines.create("lara", 64, 1, num_prefix_tokens=1, num_landmarks=16,
                             noise_scale=scale).double()
        assert m.noise_std == {"official": 64 ** -0.25, "paper": 1.0}[scale]
        q, k, v = m.qkv_heads(x)
        mean = m.eval().attend(q, k, v, (8, 8))
        m.train()
        spread[scale] = torch.stack([m.attend(q, k, v, (8, 8)) - mean for _ in range(64)]).std()
    assert spread["official"] < spread["paper"] / 1.5, spread


def test_noise_scale_and_sample_count_are_checked():
    for name in ("ra", "lara"):
        with pytest.raises(ValueError, match="noise_scale"):
            baselines.create(name, 32, 2, noise_scale="theory")
        with pytest.raises(ValueError, match="num_samples"):
            baselines.create(name, 32, 2, num_samples=0)


def test_lara_defaults_are_the_papers_imagenet_settings():
    m = baselines.create("lara", 384, 6)
    assert (m.proposal_gen, m.alpha_coeff, m.mis_type, m.q_prop.num_landmarks) == \
        ("pool-mixed", 2.0, "mis-opt", 49)
    assert m.noise_scale == "official" and "noise_scale='official'" in repr(m)


def test_lara_one_dimensional_proposals_are_segment_means():
    x = torch.randn(2, 3, 13, 4, dtype=torch.float64)
    got = randomized.lara_segment_means(x, 4)                            # 13 = 3 + 3 + 3 + 4
    want = torch.stack([x[..., a:b, :].mean(-2) for a, b in ((0, 3), (3, 6), (6, 9), (9, 13))], -2)
    torch.testing.assert_close(got, want, **TOL)
    assert randomized.lara_segment_means(x, 16) is x                    # N <= c: the tokens themselves
    torch.manual_seed(0)
    m = baselines.create("lara", 32, 2, num_landmarks=4).double().eval()
    q = torch.randn(1, 2, 13, 16, dtype=torch.float64)
    torch.testing.assert_close(m.q_prop(q, None), randomized.lara_segment_means(
        m.q_prop.norm(m.q_prop.lin(q)), 4), **TOL)


# --------------------------------------------------------- ripple / rpe_linear evaluations
IMPLS = {"ripple": ("quadratic", "dp", "AUTO_DP_FROM"), "rpe_linear": ("explicit", "fft",
                                                                       "AUTO_FFT_FROM")}


@pytest.mark.parametrize("name", ["ripple", "rpe_linear"])
def test_both_evaluations_give_one_output_and_auto_switches_at_the_crossover(name):
    small, large, limit = IMPLS[name]
    torch.manual_seed(0)
    mods = {impl: baselines.create(name, 32, 2, num_prefix_tokens=1, impl=impl,
                                   **({"grid_size": (8, 8)} if name == "rpe_linear" else {}))
            .double() for impl in (small, large)}
    mods[large].load_state_dict(mods[small].state_dict())
    x = torch.randn(2, 1 + 30, 32, dtype=torch.float64)
    torch.testing.assert_close(mods[small](x, grid=(5, 6)), mods[large](x, grid=(5, 6)), **TOL)
    auto = baselines.create(name, 32, 2)
    n = getattr(auto, limit)
    side = math.isqrt(n)
    assert auto.impl == "auto" and side * side == n
    assert auto.chosen_impl((side, side)) == small
    assert auto.chosen_impl((side, side + 1)) == large
    assert mods[small].chosen_impl((side, side + 1)) == small        # an explicit choice stays
    with pytest.raises(ValueError, match="impl"):
        baselines.create(name, 32, 2, impl="fast")


@pytest.mark.parametrize("name", ["ripple", "rpe_linear"])
def test_auto_runs_the_chosen_evaluation(name, monkeypatch):
    small, large, limit = IMPLS[name]
    m = baselines.create(name, 32, 2)
    calls = []
    for impl in (small, large):
        monkeypatch.setattr(m, f"attend_{impl}", lambda *a, impl=impl: calls.append(impl))
    monkeypatch.setattr(type(m), limit, 20)
    m.attend(None, None, None, (4, 5))
    m.attend(None, None, None, (3, 7))
    assert calls == [small, large]


# --------------------------------------------------------------------------------- create_for
def test_create_for_sizes_each_method_for_its_input():
    need = pytest.importorskip
    need("linformer")
    lin = baselines.create_for("linformer", 64, 4, grid=(7, 9), num_prefix_tokens=1)
    assert (lin.seq_len, lin.k) == (64, 16)
    assert lin(torch.randn(1, 64, 64), grid=(7, 9)).shape == (1, 64, 64)
    rpe = baselines.create_for("rpe_linear", 64, 4, grid=(20, 18))
    assert rpe.grid_size == (20, 18)
    assert rpe(torch.randn(1, 360, 64), grid=(20, 18)).shape == (1, 360, 64)
    assert baselines.create_for("mra2", 64, 4, grid=(14, 14), num_prefix_tokens=1).block_per_row == 1
    assert baselines.create_for("mra2", 64, 4, grid=(28, 28)).block_per_row == 6
    assert baselines.create_for("mra2", 64, 4, grid=(56, 56)).block_per_row == 8
    assert baselines.create_for("mra2", 64, 4, grid=(14, 14), block_per_row=3).block_per_row == 3
    assert baselines.sized_options("performer", 197) == {}
    with pytest.raises(ValueError, match="grid"):
        baselines.create_for("softmax", 64, 4, grid=None)


def test_create_for_makes_mra2_approximate_at_vit_size():
    """create's default (8 blocks per row) selects all 7 blocks at 197 tokens, i.e. softmax;
    create_for's selects one per row."""
    from crosshead.baselines import mra
    from crosshead.baselines._base import pad_to_blocks
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 197, 16).unbind(0)
    for m, everything in ((baselines.create("mra2", 32, 2, num_prefix_tokens=1), True),
                          (baselines.create_for("mra2", 32, 2, grid=(14, 14),
                                                num_prefix_tokens=1), False)):
        qp, kp, vp, valid = pad_to_blocks(q, k, v, m.block_size)
        _, sel = mra.mra2_attention(qp, kp, vp, block_per_row=m.block_per_row, valid=valid)
        assert bool(sel.all()) == everything
