"""Performer, RA and LARA as estimators of softmax attention: with many random features or samples
their mean approaches softmax attention within a tolerance from the Monte-Carlo standard error
(tests/baseline_checks.py's union_z), and controls (a wrong temperature, no noise, a plain average)
stay outside it.
"""

import math
import warnings

import pytest
import torch

from baseline_checks import (F64, assert_within, identity_tol, need, outside, softmax_ref,
                             union_z)

warnings.filterwarnings("ignore", category=DeprecationWarning)

baselines = pytest.importorskip("crosshead.baselines", reason="crosshead.baselines not importable")


def test_performer_approaches_softmax_with_many_features():
    need("performer")
    from performer_pytorch.performer_pytorch import softmax_kernel
    torch.manual_seed(0)
    d, nf, n = 16, 8192, 32
    q, k, v = (torch.randn(1, 2, n, d, dtype=F64) * s for s in (0.4, 0.4, 1.0))
    # isotropic features (the package's are not: test_performer_features_are_isotropic)
    mod = baselines.create("performer", 32, 2, nb_features=nf, orthogonal_features="haar")
    mod = mod.double().eval()
    y = mod.attend(q, k, v, None)
    proj = mod.fast_attention.projection_matrix
    fq, fk = (softmax_kernel(t, projection_matrix=proj, is_query=iq) for t, iq in ((q, 1), (k, 0)))
    ctx = fk.transpose(-2, -1) @ v
    ratio = (fq @ ctx) / (fq @ fk.sum(2).unsqueeze(-1))
    y_hat = (fq @ (fk.transpose(-2, -1) @ v.abs())) / (fq @ fk.sum(2).unsqueeze(-1))
    # identity: the module's output is phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1), sums over N, nf
    assert_within(y, ratio, identity_tol([n, nf, n, nf], y_hat), "performer = its features")
    # y = sum a / sum b over g = nf / d i.i.d. blocks of features: a_j = phi_j(q) phi_j(K)^T V,
    # b_j = phi_j(q) phi_j(K)^T 1, with E[b_j] proportional to sum_m exp(q.k_m / sqrt d)
    g = nf // d
    a = (fq.unsqueeze(-1) * ctx.unsqueeze(2)).unflatten(3, (g, d)).sum(4)     # (1, 2, n, g, d)
    b = (fq * fk.sum(2, keepdim=True)).unflatten(3, (g, d)).sum(4)            # (1, 2, n, g)
    b_mean = b.mean(3).unsqueeze(-1)
    se = (a - ratio.unsqueeze(3) * b.unsqueeze(-1)).std(3) / math.sqrt(g) / b_mean  # delta method
    ac, bc = a - a.mean(3, keepdim=True), b - b.mean(3, keepdim=True)
    bias = ((ratio * bc.pow(2).mean(3).unsqueeze(-1) - (ac * bc.unsqueeze(-1)).mean(3))
            / (g * b_mean ** 2))
    fq0, fk0 = fq - 1e-4 / math.sqrt(nf), fk - 1e-4 / math.sqrt(nf)   # the package's stabiliser
    y0 = (fq0 @ (fk0.transpose(-2, -1) @ v)) / (fq0 @ fk0.sum(2).unsqueeze(-1))
    # z standard errors, the ratio's O(1/g) bias (y Var b - Cov(a, b)) / (g E[b]^2), and the
    # deterministic effect of the package's eps = 1e-4 added to every feature
    tol = union_z(y.numel()) * se + bias.abs() + (y - y0).abs()
    assert_within(y, softmax_ref(q, k, v), tol, "performer vs softmax")
    assert outside(y, softmax_ref(q, k, v, scale=2 / math.sqrt(d)), tol)    # twice the temperature
    assert outside(y, v.mean(2, keepdim=True), tol)                          # not uniform


def check_performer_features_are_isotropic(orthogonal_features):
    torch.manual_seed(0)
    d, blocks = 16, 256
    mod = baselines.create("performer", d * 2, 2, nb_features=d * blocks,
                           orthogonal_features=orthogonal_features).train()
    for _ in range(2):                                                # as built, then redrawn
        w = mod.fast_attention.projection_matrix.view(blocks, d, d).double()
        gram = w @ w.transpose(-2, -1)                                # orthogonal rows in a block
        off = gram - torch.diag_embed(gram.diagonal(dim1=-2, dim2=-1))
        assert off.abs().max() < identity_tol([d], gram.diagonal(dim1=-2, dim2=-1).amax(),
                                              dtype=torch.float32)
        signs = w.diagonal(dim1=-2, dim2=-1).sign()                   # row i, coordinate i
        # isotropic rows: each sign is +-1 with probability 1/2, the mean of 256 has sd 1/16
        assert (signs.mean(0).abs() < union_z(d) / 16).all(), signs.mean(0)
        mod.redraw_features()


def test_performer_features_are_isotropic():
    need("performer")
    check_performer_features_are_isotropic("haar")
    # performer-pytorch's own blocks take Q of torch.linalg.qr as it comes: not Haar, so its
    # default features fail the same check (Q's diagonal is mostly negative; row 0 always)
    with pytest.raises(AssertionError):
        check_performer_features_are_isotropic("package")
    with pytest.raises(ValueError, match="orthogonal_features"):
        baselines.create("performer", 32, 2, orthogonal_features="qr")


def test_ra_is_unbiased():
    from crosshead.baselines.randomized import randomized_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 1, 8, 4, dtype=F64).unbind(0)
    q, k = 1.5 * q, 1.5 * k
    ref = softmax_ref(q, k, v)[0]
    reps = 400                                                        # batches of 100 samples

    def mean_and_se(noise, noise_std=1.0):
        y = randomized_attention(*(t.expand(reps, -1, -1, -1) for t in (q, k, v)), num_samples=100,
                                 noise=noise, noise_std=noise_std)
        return y.mean(0), y.std(0) / math.sqrt(reps)

    mean, se = mean_and_se(True)          # unit noise in the scaled space: noise_scale='paper'
    tol = union_z(ref.numel()) * se                                   # exactly unbiased: no bias
    assert_within(mean, ref, tol, "RA")
    biased, _ = mean_and_se(False)        # control: without the Gaussian noise RA is biased
    assert outside(biased, ref, tol)
    official, _ = mean_and_se(True, 4 ** -0.25)   # the authors' noise (d^-1/4) is biased too
    assert outside(official, ref, tol)
    # the module averages samples in training and is deterministic given the sample in eval
    m = baselines.create("ra", 16, 2, num_samples=4).train()
    assert m(torch.randn(1, 9, 16)).shape == (1, 9, 16)


def test_lara_is_consistent():
    """LARA's self-normalised estimator converges to softmax attention with the samples per
    proposal. With the balance heuristic (weights summing to 1 over the proposals) it is
    consistent; 'mis-opt' is not tested here: its clamp at 1e-8 breaks the sum to 1 wherever it
    acts (check_lara_matches_equations pins its formula). This catches a wrong target or
    importance weight, not which partition of unity weights the proposals."""
    from crosshead.baselines.randomized import lara_core
    torch.manual_seed(0)
    n, d = 6, 4
    q, k, v = torch.randn(3, 1, 1, n, d, dtype=F64).unbind(0)
    q, k = 0.7 * q, 0.7 * k
    ref = softmax_ref(q, k, v)[0]
    # one proposal per component q~_n + k~_m of the targets' Gaussian mixtures: the importance
    # weights p_n / q_mix are bounded (by n^2), so the bias expansion below holds at small S
    mu = (q.unsqueeze(3) + k.unsqueeze(2)).flatten(2, 3) * d ** -0.25
    reps = 400

    def run(samples, noise=True):
        y = lara_core(*(t.expand(reps, -1, -1, -1) for t in (q, k, v, mu, mu)), noise=noise,
                      num_samples=samples, mis_type="bh", alpha_coeff=0.0)
        return y.mean(0), y.var(0) / reps

    (m16, v16), (m32, v32) = run(16), run(32)
    # self-normalised: E[y_S] = y + kappa / S + O(1/S^2); Richardson's 2 y_32 - y_16 cancels the
    # kappa / S term, leaving O(1/S^2) (kappa / 32 ~ |m16 - m32| is itself within the noise)
    tol = union_z(ref.numel()) * (4 * v32 + v16).sqrt()
    assert_within(2 * m32 - m16, ref, tol, "LARA (bh)")
    assert outside(v.mean(2)[0], ref, tol)                            # the target is not trivial
    ev = lara_core(q, k, v, mu, mu, noise=False, mis_type="bh", alpha_coeff=0.0)[0]
    assert outside(ev, ref, tol)                                      # w = mu only: biased
