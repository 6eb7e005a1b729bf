"""Shared pieces of the baselines' mechanism tests (tests/test_baselines_*.py): the softmax
reference, the optional-package guard, and the tolerances.

Tolerances. Exact identities run in float64 with `identity_tol` (a rounding bound, from
tests/error_bounds.py's model); statistical checks use the Monte-Carlo standard error measured in
the test, times `union_z`, plus any bias term stated where it is used. `lin_hat`, `qkv_hat` and
`out_hat` give the magnitudes (values computed on absolute values) the bounds scale with.
"""

import math
from statistics import NormalDist

import pytest
import torch

import error_bounds as eb

from crosshead.baselines._base import from_heads, to_heads

F64 = torch.float64
PACKAGES = {"performer": "performer_pytorch", "nystrom": "nystrom_attention",
            "linformer": "linformer", "flash_gau": "flash_pytorch"}


def need(name):
    if name in PACKAGES:
        pytest.importorskip(PACKAGES[name], reason=f"optional package for {name} not installed")


def softmax_ref(q, k, v, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-2, -1) * scale, -1) @ v


# ------------------------------------------------------------------------------ tolerances
def identity_tol(n_terms, magnitude, *, logit_terms=(), logits=0.0, steps=1, dtype=F64):
    """Tolerance on |a - b| for two computations a, b of the same exact value in `dtype`.

    tests/error_bounds.py's model (Higham & Mary's probabilistic bound): a sum of n terms in unit
    roundoff u is off by at most lambda*sqrt(n)*u*sum|terms| (lambda = 8: broken with probability
    below 2n*exp(-32)), and through a composition the errors add to first order, so each of a, b
    is within F*T of the exact value, with F = lambda*u*(sum sqrt(n) + 2*s*sum sqrt(n_logit) +
    16*steps) and T = `magnitude`, the value computed on absolute values (or a bound on it).
    n_terms: the lengths of the sums the value passes through; logit_terms: those of the sums
    that form logits meeting exp, whose absolute error is a relative error of the exponential in
    both numerator and denominator (hence 2*s, s = `logits`, the largest logit magnitude);
    steps: groups of 16 elementwise operations. Returns 2*F*T (a and b each within F*T)."""
    root = sum(map(math.sqrt, n_terms)) + 2 * logits * sum(map(math.sqrt, logit_terms))
    factor = eb.LAMBDA * eb.UNIT_ROUNDOFF[dtype] * (root + steps * eb.ELEMENTWISE_STEPS)
    return 2 * factor * magnitude


def union_z(n_elements, alpha=1e-6):
    """z such that n_elements normal estimates all lie within z standard errors of their means
    with probability at least 1 - alpha (two-sided, union bound over the elements)."""
    return NormalDist().inv_cdf(1 - alpha / (2 * n_elements))


def assert_within(got, want, tol, what="values"):
    err = (got - want).abs()
    ratio = (err / tol).max().item()
    assert ratio <= 1.0, f"{what}: max error {err.max().item():.3g}, {ratio:.3g} x its tolerance"
    return ratio


def outside(got, want, tol):
    """A control: some element differs by more than the tolerance."""
    return bool(((got - want).abs() > tol).any())


def lin_hat(x_hat, lin):
    """Magnitude of lin(x) given that of x: |W| x_hat + |b|."""
    out = x_hat @ lin.weight.detach().abs().T
    return out if lin.bias is None else out + lin.bias.detach().abs()


def qkv_hat(m, x):
    """Magnitudes of m.qkv_heads(x), (B, h, N, d) each, and the largest logit magnitude."""
    q, k, v = (to_heads(t, m.num_heads) for t in lin_hat(x.abs(), m.qkv).chunk(3, -1))
    return q, k, v, (q @ k.transpose(-2, -1)).amax().item() * m.head_dim ** -0.5


def out_hat(m, v_hat):
    """Magnitude of m.proj(from_heads(y)), y a convex combination of values of magnitude v_hat."""
    return lin_hat(from_heads(v_hat.amax(2, keepdim=True)), m.proj)


