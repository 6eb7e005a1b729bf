"""Forward error bounds of crosshead's iMHSA arithmetic: the tests' tolerances, derived.

Model (Higham & Mary's probabilistic bound): a sum or inner product of n terms computed in a
precision of unit roundoff u is off by at most λ·√n·u·Σ|terms|, with probability at least
1 − 2n·exp(−λ²/2), whatever the summation order (threads, blocks, SIMD width). To first order
through a composition, each computed value T is then off by at most F·T̂, where

- T̂ is the same computation evaluated on absolute values, every difference turned into a sum
  (|Â_Q|·|Â_K|·|v| for out; see `magnitudes`), and
- F = λ·u·(Σ_stages √n_stage + 2·s·Σ_logit-stages √n + c): every sum or product the value's
  computation passes through, forward and backward, with its length n; elementwise steps (exp,
  division, subtraction, scaling) add c = 16 more. Through exp, a logit's absolute error becomes
  the same relative error of its probability, so the stages that form logits (d, and h when "pre"
  mixes logits) count s times, s = max of the logits' magnitude ŝ.

A value returned in a narrower dtype than it was computed in adds its final rounding,
u_out·|T|. With λ = 8, rounding alone breaks the bound of an n-term sum with probability below
2n·exp(−32) < 3e-14·n (under 1e-9 for the longest sums the tests form): a test that uses it cannot
fail on a summation order, and still catches an error a few times F·T̂ (tests/test_reference.py
shows both).
"""

from __future__ import annotations

import math

import torch

LAMBDA = 8.0
ELEMENTWISE_STEPS = 16

UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}


def compute_roundoff(dtype: torch.dtype) -> float:
    """u of the kernels' arithmetic: float32 for every input dtype but float64 (imhsa.md)."""
    return UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]


def _mix(w, x):
    return x if w is None else torch.einsum("gh,bh...->bg...", w, x)


def _mix_t(w, x):
    return x if w is None else torch.einsum("gh,bg...->bh...", w, x)


def _weight_grad(d_a, x):
    return torch.einsum("bg...,bh...->gh", d_a, x)


def _softmax_adjoint(d_p, p, absolute):
    r = (d_p * p).sum(-1, keepdim=True)
    return p * (d_p + r if absolute else d_p - r)


class _Side:
    """One side's map from logits s (softmax over the last dim), and its adjoint."""

    def __init__(self, s, w, mix):
        self.s, self.w, self.mix, self.absolute = s, w, mix, False
        if mix == "post":
            self.p = torch.softmax(s, -1)
            self.a = _mix(w, self.p)
        else:
            self.m = _mix(w, s)
            self.a = torch.softmax(self.m, -1)

    def magnitude(self, s_hat):
        """The same side on magnitudes: |w|, the logits' magnitude s_hat, every difference of the
        adjoint a sum. The probabilities are their own magnitudes (positive; their error relative
        to them is F's logit term)."""
        out = _Side.__new__(_Side)
        out.mix, out.absolute = self.mix, True
        out.w = None if self.w is None else self.w.abs()
        out.s = s_hat
        if self.mix == "post":
            out.p, out.a = self.p, _mix(out.w, self.p)
        else:
            out.m, out.a = _mix(out.w, s_hat), self.a
        return out

    def logits(self):
        """The logits that meet exp: per head (post) or mixed (pre)."""
        return self.s if self.mix == "post" else self.m

    def backward(self, d_a):
        """(d logits, dw or None)."""
        if self.mix == "post":
            d_w = None if self.w is None else _weight_grad(d_a, self.p)
            return _softmax_adjoint(_mix_t(self.w, d_a), self.p, self.absolute), d_w
        d_m = _softmax_adjoint(d_a, self.a, self.absolute)
        d_w = None if self.w is None else _weight_grad(d_m, self.s)
        return _mix_t(self.w, d_m), d_w


def _evaluate(q, k, v, q_land, k_land, w_q, w_k, mix, scale, grad_out, absolute, hats=None):
    """out and, with grad_out, the gradients of imhsa.md's op in float64, vectorised; with
    absolute = True the same on magnitudes: those of q, k, v, q_land, k_land are `hats` (default:
    their absolute values), the maps still come from the true logits."""
    if absolute:
        q_, k_, v_, ql_, kl_ = hats or [x.abs() for x in (q, k, v, q_land, k_land)]
        g_, sc = None if grad_out is None else grad_out.abs(), abs(scale)
    else:
        (q_, k_, v_, ql_, kl_), g_, sc = (q, k, v, q_land, k_land), grad_out, scale
    side_q = _Side(scale * q @ k_land.transpose(-1, -2), w_q, mix)
    side_k = _Side(scale * q_land @ k.transpose(-1, -2), w_k, mix)
    if absolute:
        side_q = side_q.magnitude(sc * q_ @ kl_.transpose(-1, -2))
        side_k = side_k.magnitude(sc * ql_ @ k_.transpose(-1, -2))
    a_q, a_k = side_q.a, side_k.a
    z = a_k @ v_
    logits = max(side_q.logits().abs().max().item(), side_k.logits().abs().max().item())
    res = {"out": a_q @ z, "z": z, "logits": logits,
           # lse = m + log Σ exp(s - m): off by the largest logit's error plus the sum's
           "lse_q": torch.full(a_q.shape[:3], logits + 1.0, dtype=z.dtype),
           "lse_k": torch.full(a_k.shape[:3], logits + 1.0, dtype=z.dtype)}
    if grad_out is None:
        return res
    d_z, d_a_q = a_q.transpose(-1, -2) @ g_, g_ @ z.transpose(-1, -2)
    d_v, d_a_k = a_k.transpose(-1, -2) @ d_z, d_z @ v_.transpose(-1, -2)
    d_s_q, d_w_q = side_q.backward(d_a_q)
    d_s_k, d_w_k = side_k.backward(d_a_k)
    res.update(q=sc * d_s_q @ kl_, k_land=sc * d_s_q.transpose(-1, -2) @ q_,
               q_land=sc * d_s_k @ k_, k=sc * d_s_k.transpose(-1, -2) @ ql_, v=d_v,
               w_q=d_w_q, w_k=d_w_k)
    return res


def magnitudes(q, k, v, q_land, k_land, w_q, w_k, mix, scale, grad_out=None, hats=None) -> dict:
    """T̂ for out, z, lse_q, lse_k and (with grad_out) every gradient, keyed "out", "z", "lse_q",
    "lse_k", "q", "k", "v", "q_land", "k_land", "w_q", "w_k" (None where w is None); "logits": s,
    the largest logit magnitude. hats: the magnitudes of q, k, v, q_land, k_land where they are
    themselves computed (default: their absolute values)."""
    args = [None if x is None else x.detach().to(torch.float64)
            for x in (q, k, v, q_land, k_land, w_q, w_k, grad_out)]
    with torch.no_grad():
        return _evaluate(*args[:7], mix, scale, args[7], absolute=True, hats=hats)


def evaluate(q, k, v, q_land, k_land, w_q, w_k, mix, scale, grad_out=None) -> dict:
    """The op's values themselves (out, z and the gradients) by the formulas `magnitudes` runs on
    magnitudes: tests/test_reference.py holds them to the loop reference."""
    args = [None if x is None else x.detach().to(torch.float64)
            for x in (q, k, v, q_land, k_land, w_q, w_k, grad_out)]
    with torch.no_grad():
        return _evaluate(*args[:7], mix, scale, args[7], absolute=False)


def imhsa_factor(B: int, h: int, N: int, d: int, L: int, logits: float, dtype: torch.dtype,
                 backward: bool = True, n_bin: int = 0) -> float:
    """F for every value of one imhsa call (forward and, with backward, its gradients), computed
    in dtype's arithmetic; n_bin > 0 adds landmarks computed from the tokens (bins of n_bin)."""
    stages = [N, L, N, L, h]  # softmax sums over N (key side) and L (query side), Z, out, mixing
    logit_stages = [d, h] + ([n_bin] if n_bin else [])
    if backward:  # the maps recomputed, then dZ, dÂ (d), the softmax adjoints' sums, dq... dw
        stages += [N, L, N, L, h, N, d, d, h, h, N, L, L, N, N, L, L, B * N * L, B * N * L]
        logit_stages += [d, h]
    root = sum(math.sqrt(n) for n in stages) + 2 * logits * sum(math.sqrt(n) for n in logit_stages)
    return LAMBDA * compute_roundoff(dtype) * (root + ELEMENTWISE_STEPS)


def excess(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor, factor: float,
           dtype: torch.dtype) -> float:
    """max |got − want| / bound over the elements, bound = F·T̂ + u_out·|want| (the result's own
    rounding into dtype where dtype is narrower than the arithmetic); at most 1 when within the
    bound. A zero bound admits only an exact zero error."""
    u_out = UNIT_ROUNDOFF[dtype] if UNIT_ROUNDOFF[dtype] > compute_roundoff(dtype) else 0.0
    err = (got.detach().to(torch.float64) - want.detach().to(torch.float64)).abs()
    bound = factor * magnitude * (1 + u_out) + u_out * want.detach().to(torch.float64).abs()
    ratio = torch.where(bound > 0, err / bound.clamp_min(torch.finfo(torch.float64).tiny),
                        torch.where(err > 0, torch.inf, 0.0))
    return ratio.max().item() if ratio.numel() else 0.0


NAMES = ("q", "k", "v", "q_land", "k_land", "w_q", "w_k")


def assert_within(inputs, mix, scale, grad_out, got: dict, want: dict, dtype=None, slack=1.0):
    """Each got[name] (a key of `magnitudes`) within the bound of want[name], for one imhsa call
    on inputs (q, k, v, q_land, k_land, w_q, w_k) whose gradients come from grad_out (None: a
    forward only). want is the float64 value, or (slack = 2) another computed result of it."""
    q, q_land = inputs[0], inputs[3]
    dtype = dtype or q.dtype
    B, h, N, d = q.shape
    mags = magnitudes(*inputs, mix, scale, grad_out)
    factor = slack * imhsa_factor(B, h, N, d, q_land.shape[2], mags["logits"], dtype,
                                  backward=grad_out is not None)
    for name, value in got.items():
        assert value is not None and value.shape == want[name].shape, name
        r = excess(value, want[name], mags[name], factor, dtype)
        assert r <= 1.0, f"{name}: error {r:.3g} times its bound (F = {factor:.3g})"


def assert_imhsa_within(inputs, out, grad_out, expected_out, expected_grads, mix, scale,
                        dtype=None, slack=1.0):
    """out and the inputs' .grad (when grad_out is given) within the bound of expected_out and
    expected_grads (a sequence in NAMES' order, None where there is none)."""
    got, want = {"out": out}, {"out": expected_out}
    if grad_out is not None:
        for name, x, e in zip(NAMES, inputs, expected_grads):
            if x is not None:
                got[name], want[name] = x.grad, e
    assert_within(inputs, mix, scale, grad_out, got, want, dtype, slack)


def landmarks_factor(n_bin: int, dtype: torch.dtype) -> float:
    """F of the landmarks (bin means of at most n_bin tokens) and of their adjoint."""
    return LAMBDA * compute_roundoff(dtype) * (math.sqrt(n_bin) + ELEMENTWISE_STEPS)


def linear_factor(fan_in: int, roundoff: float) -> float:
    """F of y = x·Wᵀ + b computed with float32 accumulation: an inner product of fan_in terms and
    the bias; at a narrower roundoff (bfloat16 autocast: 2⁻⁸) x, W and y are each rounded once
    more, deterministically."""
    u32 = UNIT_ROUNDOFF[torch.float32]
    return LAMBDA * u32 * math.sqrt(fan_in + 1) + (3 * roundoff if roundoff > u32 else u32)


def attention_module_bound(m, x, grid=None, linear_roundoff=2.0 ** -24):
    """(ŷ, F) of crosshead.nn.InteractiveMultiheadAttention `m` on x (B, N, dim): the magnitude
    of its output (the whole module on magnitudes: |x|, |W|, |b|, the maps from the true logits)
    and F, with its Linear layers computed at linear_roundoff (2⁻⁸ under bfloat16 autocast) and
    the op in float32. The qkv layer's error reaches the logits, so it counts 1 + 2s times."""
    import loop_reference as ref

    B, N, C = x.shape
    h, d, p = m.num_heads, m.head_dim, m.num_prefix_tokens
    with torch.no_grad():
        x64 = x.detach().double()
        W, b = m.qkv.weight.double(), m.qkv.bias
        b = torch.zeros(3 * C, dtype=torch.float64) if b is None else b.double()

        def heads(t):
            return t.reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        (q, k, v), (q_, k_, v_) = heads(x64 @ W.T + b), heads(x64.abs() @ W.abs().T + b.abs())
        if grid is None and not isinstance(m.landmarks, int):
            side = math.isqrt(N - p)
            grid = (side, side)
        size = m.landmarks
        pool = (lambda t: ref.landmarks(t, grid, size, p)) if grid is not None else \
            (lambda t: ref.landmarks(t, None, size, p))
        w_q, w_k = (None if w is None else w.double() for w in (m.w_q, m.w_k))
        scale = d ** -0.5 if m.scale is None else m.scale
        mags = magnitudes(q, k, v, pool(q), pool(k), w_q, w_k, m.mix, scale,
                          hats=[q_, k_, v_, pool(q_), pool(k_)])
        out_ = mags["out"].transpose(1, 2).reshape(B, N, C)
        W_o, b_o = m.proj.weight.double().abs(), m.proj.bias
        y_ = out_ @ W_o.T + (0.0 if b_o is None else b_o.double().abs())
    if grid is None:
        n_bin = -(-(N - p) // size) + 1
    else:
        n_bin = (-(-grid[0] // size[0]) + 1) * (-(-grid[1] // size[1]) + 1)
    L = math.prod(size) if not isinstance(size, int) else size
    s = mags["logits"]
    factor = (imhsa_factor(B, h, N, d, L, s, torch.float32, backward=False, n_bin=n_bin)
              + (2 + 2 * s) * linear_factor(C, linear_roundoff))
    return y_, factor
