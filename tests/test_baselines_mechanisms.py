"""Mechanism checks for crosshead.baselines, exact identities: softmax, Talking-Heads, Linformer,
LARA's equations, ripple, the RPE-masked linear attention and VARS-D, each against an independent
formulation (softmax attention, an explicit quadratic form, the paper's equations, an unrolled
ISTA, KKT conditions) in float64, with tolerances from tests/baseline_checks.py. The check_*
functions are also run against deliberately broken versions in tests/test_baselines_mutations.py,
which must fail them. Others: test_baselines_sparse.py (MRA-2, Hypercube, FLASH, ContextPool),
test_baselines_nystrom.py, test_baselines_estimators.py (Performer, RA, LARA as estimators of
softmax attention); interface and shapes: test_baselines.py.
"""

import math
import warnings

import pytest
import torch

import error_bounds as eb
from baseline_checks import (F64, assert_within, identity_tol, lin_hat, need, out_hat, outside,
                             qkv_hat, softmax_ref)

warnings.filterwarnings("ignore", category=DeprecationWarning)

baselines = pytest.importorskip("crosshead.baselines", reason="crosshead.baselines not importable")
from crosshead.baselines._base import from_heads, to_heads  # noqa: E402


def test_softmax_matches_torch_multihead_attention():
    torch.manual_seed(0)
    m = baselines.create("softmax", 32, 4, qkv_bias=True).double()
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True).double()
    with torch.no_grad():
        ref.in_proj_weight.copy_(m.qkv.weight)
        ref.in_proj_bias.copy_(m.qkv.bias)
        ref.out_proj.weight.copy_(m.proj.weight)
        ref.out_proj.bias.copy_(m.proj.bias)
    x = torch.randn(2, 10, 32, dtype=F64)
    _, _, v_, s = qkv_hat(m, x)
    # qkv (32 + bias), softmax and AV over N = 10, proj; logits: q and k (33) and q.k (d = 8)
    tol = identity_tol([33, 10, 10, 33], out_hat(m, v_), logit_terms=[33, 8], logits=s)
    assert_within(m(x), ref(x, x, x, need_weights=False)[0], tol)


def test_talking_heads_mixes_heads():
    torch.manual_seed(0)
    th = baselines.create("talking_heads", 32, 4).double()
    sm = baselines.create("softmax", 32, 4).double()
    sm.load_state_dict(th.state_dict(), strict=False)
    x = torch.randn(2, 9, 32, dtype=F64)
    q, k, v = th.qkv_heads(x)
    q_, k_, v_, s = qkv_hat(th, x)
    # identity init = MHSA: as softmax, plus the two head mixings (h = 4 + bias)
    tol = identity_tol([32, 5, 9, 9, 5, 33], out_hat(th, v_), logit_terms=[32, 8, 5], logits=s)
    assert_within(th(x), sm(x), tol, "identity init")
    logits = q @ k.transpose(-2, -1) / math.sqrt(8)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        th.proj_l.weight.copy_(torch.eye(4, dtype=F64)[perm])          # L[h] = J[perm[h]]
    assert_within(th(x), th.proj(from_heads(torch.softmax(logits[:, perm], -1) @ v)), tol, "perm")
    assert outside(th(x), sm(x), tol)
    with torch.no_grad():                                             # general mixing, both sides
        for p in (th.proj_l.weight, th.proj_w.weight, th.proj_l.bias, th.proj_w.bias):
            p.normal_()
    pl, bl, pw, bw = th.proj_l.weight, th.proj_l.bias, th.proj_w.weight, th.proj_w.bias
    big_l = torch.einsum("bknm,hk->bhnm", logits, pl) + bl.view(1, 4, 1, 1)
    u = torch.einsum("bhnm,gh->bgnm", big_l.softmax(-1), pw) + bw.view(1, 4, 1, 1)
    s_mix = (torch.einsum("bknm,hk->bhnm", q_ @ k_.transpose(-2, -1) / math.sqrt(8), pl.abs())
             + bl.abs().view(1, 4, 1, 1)).amax().item()
    u_ = torch.einsum("bhnm,gh->bgnm", big_l.softmax(-1), pw.abs()) + bw.abs().view(1, 4, 1, 1)
    tol = identity_tol([32, 9, 5, 9, 33], lin_hat(from_heads(u_ @ v_), th.proj),
                       logit_terms=[32, 8, 5], logits=s_mix)
    assert_within(th(x), th.proj(from_heads(u @ v)), tol, "general mixing")


def check_linformer():
    """Linformer at k < N against Y = softmax(Q (E^T K)^T / sqrt d) (F^T V), with the package's
    E = proj_k and F = proj_v of shape (N, k) (it projects with einsum('bnd,nk->bkd')): first E, F
    segment-averaging (softmax over the segment means of K and V), then random E != F."""
    need("linformer")
    torch.manual_seed(0)
    n, kk, h, d = 12, 4, 2, 16
    m = baselines.create("linformer", 32, h, seq_len=n, k=kk).double()
    a = m.attn
    x = torch.randn(2, n, 32, dtype=F64)
    q, k, v = (to_heads(f(x), h) for f in (a.to_q, a.to_k, a.to_v))
    q_, k_, v_ = (to_heads(lin_hat(x.abs(), f), h) for f in (a.to_q, a.to_k, a.to_v))
    seg = torch.kron(torch.eye(kk, dtype=F64), torch.full((n // kk, 1), kk / n, dtype=F64))
    for e, f in ((seg, seg), (torch.randn(n, kk, dtype=F64), torch.randn(n, kk, dtype=F64))):
        with torch.no_grad():
            a.proj_k.copy_(e)
            a.proj_v.copy_(f)
        if e is seg:                                                  # means of 3 tokens each
            kp, vp = (t.unflatten(2, (kk, n // kk)).mean(3) for t in (k, v))
        else:
            kp, vp = torch.einsum("bhnd,nk->bhkd", k, e), torch.einsum("bhnd,nk->bhkd", v, f)
        kp_, vp_ = (torch.einsum("bhnd,nk->bhkd", t, w.abs()) for t, w in ((k_, e), (v_, f)))
        s = (q_ @ kp_.transpose(-2, -1)).amax().item() * d ** -0.5
        # to_v (32), projection along N (12), softmax and AV over k (4), to_out (32 + bias);
        # logits: to_q/to_k (32), projection along N (12), q.k (16)
        tol = identity_tol([32, n, kk, kk, 33], lin_hat(from_heads(vp_.amax(2, keepdim=True)),
                           a.to_out), logit_terms=[32, n, d], logits=s)
        assert_within(m(x), a.to_out(from_heads(softmax_ref(q, kp, vp))), tol, "linformer")


def test_linformer_projects_keys_and_values():
    check_linformer()


def adaptive_bins(n_in, n_out):
    """Adaptive average pooling's bins [floor(i n / s), ceil((i + 1) n / s)), i < s."""
    return [(i * n_in // n_out, -(-(i + 1) * n_in // n_out)) for i in range(n_out)]


def lara_reference(m, q, k, v, grid):
    """LARA in eval mode (one sample per proposal, at its mean), transcribed from the paper's
    self-normalised multiple importance sampling with explicit Gaussian densities (module
    docstring): target p~_n(w) = N(w; 0, I) xi(q_n, w) sum_m xi(k_m, w), xi(x, w) =
    exp(w.x~ - |x~|^2 / 2), x~ = d^-1/4 x; proposals q_c = N(mu_c, I) with mu_c = (qbar_c +
    kbar_c) d^-1/4; y_n = sum_c r_nc f(w_c) / sum_c r_nc, r_nc = alpha_nc(w_c) p~_n(w_c) /
    q_c(w_c), f(w) = sum_m xi(k_m, w) v_m / sum_m xi(k_m, w). Returns y and the largest
    log-density magnitude (for the tolerance)."""
    p, d, (gh, gw) = m.num_prefix_tokens, q.shape[-1], grid
    side = math.isqrt(m.q_prop.num_landmarks)

    def landmarks(x, prop):               # average-pool the grid to side x side, Linear, LayerNorm
        img = x[:, :, p:].unflatten(2, (gh, gw))
        z = torch.stack([img[:, :, y0:y1, x0:x1].mean((2, 3)) for y0, y1 in adaptive_bins(gh, side)
                         for x0, x1 in adaptive_bins(gw, side)], 2)
        z = z @ prop.lin.weight.T + prop.lin.bias
        z = (z - z.mean(-1, keepdim=True)) / (z.var(-1, unbiased=False, keepdim=True)
                                              + prop.norm.eps).sqrt()
        return z * prop.norm.weight + prop.norm.bias

    qbar, kbar = landmarks(q, m.q_prop), landmarks(k, m.k_prop)
    if m.proposal_gen == "pool-mixed":
        kbar = torch.softmax(kbar @ kbar.transpose(-2, -1) / math.sqrt(d), -1) @ kbar
    mu = (qbar + kbar) / d ** 0.25
    w = mu                                                            # eval: w_c = mu_c
    qs, ks = q / d ** 0.25, k / d ** 0.25

    def log_normal(w, mean):                                          # log N(w_c; mean_c', I)
        return (-0.5 * (w.unsqueeze(-2) - mean.unsqueeze(-3)).pow(2).sum(-1)
                - d / 2 * math.log(2 * math.pi))

    def log_xi(x):                                                    # (B, h, C, N)
        return w @ x.transpose(-2, -1) - 0.5 * x.pow(2).sum(-1).unsqueeze(-2)

    log_prop = log_normal(w, mu)                                      # log q_c'(w_c)
    log_own = log_prop.diagonal(dim1=-2, dim2=-1)                     # log q_c(w_c)
    log_target = (log_normal(w, torch.zeros_like(mu[..., :1, :]))[..., 0].unsqueeze(-1)
                  + log_xi(qs) + torch.logsumexp(log_xi(ks), -1, keepdim=True))
    f = torch.softmax(log_xi(ks), -1) @ v
    bh = torch.exp(log_own - torch.logsumexp(log_prop, -1)).unsqueeze(-1)   # balance heuristic
    alpha = bh.expand_as(log_target)
    if m.mis_type == "mis-opt":
        t = torch.softmax(qbar @ q.transpose(-2, -1) / math.sqrt(d), -1)   # over tokens
        alpha = bh + m.alpha_coeff * (t - t.mean(-2, keepdim=True))
    r = torch.softmax(alpha.clamp_min(1e-8).log() + log_target - log_own.unsqueeze(-1), -2)
    hat = max(((w.abs() @ x.abs().transpose(-2, -1)) + x.pow(2).sum(-1).unsqueeze(-2)).amax()
              for x in (qs, ks, mu))
    return r.transpose(-2, -1) @ f, hat.item()


def check_lara_matches_equations(proposal_gen, mis_type):
    """The lara module in eval mode (`attend`) equals `lara_reference`: CLS prefix, a 5 x 7 grid
    pooled to 3 x 3 (overlapping adaptive bins), random Linear/LayerNorm proposal parameters."""
    torch.manual_seed(0)
    m = baselines.create("lara", 32, 2, num_prefix_tokens=1, num_landmarks=9, alpha_coeff=2.0,
                         proposal_gen=proposal_gen, mis_type=mis_type).double().eval()
    with torch.no_grad():
        for prop in (m.q_prop, m.k_prop):
            for t, mean in ((prop.lin.weight, 0.0), (prop.lin.bias, 0.0), (prop.norm.weight, 1.0),
                            (prop.norm.bias, 0.0)):
                t.normal_(mean, 0.5)
    x = 2 * torch.randn(2, 1 + 35, 32, dtype=F64)
    q, k, v = m.qkv_heads(x)
    got = m.attend(q, k, v, (5, 7))
    want, s = lara_reference(m, q, k, v, (5, 7))
    # f and y: sums over N = 36 and C = 9; log-densities (magnitude s): pooling (<= 6 tokens),
    # Linear, LayerNorm mean and variance (16 each), pool-mixed (16, 9, 9), w.x (16), the
    # logsumexps over keys (36) and proposals (9), t's softmax over tokens (35)
    tol = identity_tol([36, 9], v.abs().amax(2, keepdim=True), steps=2, logits=s,
                       logit_terms=[6, 16, 16, 16, 16, 9, 9, 16, 36, 9, 35])
    assert_within(got, want, tol, f"lara {proposal_gen} {mis_type}")
    assert torch.equal(got, m.attend(q, k, v, (5, 7)))                # eval: deterministic


@pytest.mark.parametrize("proposal_gen", ["pool", "pool-mixed"])
@pytest.mark.parametrize("mis_type", ["mis-opt", "bh"])
def test_lara_matches_its_equations(proposal_gen, mis_type):
    check_lara_matches_equations(proposal_gen, mis_type)


def ripple_dp_tol(m, q, k, v, y, weights, grid):
    """Rounding bound of ripple's DP against a quadratic form y = a v / a 1, a = phi(q).phi(k) *
    weights. The DP takes differences of summed-area tables, so its numerator and denominator are
    off relative to the sums over *all* keys (4 corners x R squares x the tables' totals), and y
    by (numerator error + |y| denominator error) / denominator. Sums: cumsums over H and W,
    phi(q). (D), 4 corners, R squares; the quadratic form: phi(q).phi(k) (D), two over N."""
    a_all = m.features(q, True) @ m.features(k, False).transpose(-2, -1)
    den = (a_all * weights).sum(-1, keepdim=True)
    r, nf, n = m.max_radius, m.num_features, q.shape[2]
    hat = 4 * r * (a_all @ v.abs() + y.abs() * a_all.sum(-1, keepdim=True)) / den
    return identity_tol([grid[0], grid[1], nf, 4, r, nf, n, n], hat, steps=2)


def test_ripple_dynamic_program_equals_quadratic_form():
    torch.manual_seed(0)
    for prefix, grid in ((0, (6, 6)), (1, (5, 7))):
        m = baselines.create("ripple", 32, 2, num_prefix_tokens=prefix, num_features=16,
                             max_radius=4).double()
        with torch.no_grad():
            m.stick.weight.normal_(0, 0.5)
            m.stick.bias.normal_(0, 1.0)
        x = torch.randn(2, prefix + grid[0] * grid[1], 32, dtype=F64)
        q, k, v = m.qkv_heads(x)
        quad = m.attend_quadratic(q, k, v, grid)
        tol = ripple_dp_tol(m, q, k, v, quad, m.weight_matrix(q, grid), grid)
        assert_within(m.attend_dp(q, k, v, grid), quad, tol, f"ripple {grid}")
        alpha = m.spatial_weights(q)
        assert_within(alpha.sum(-1), 1.0, identity_tol([4, 4], 1.0), "stick-breaking")


@pytest.mark.parametrize("impl", ["quadratic", "dp"])
def test_ripple_weights_are_spatial(impl):
    torch.manual_seed(0)
    m = baselines.create("ripple", 32, 2, num_features=16, max_radius=3,
                         impl=impl).double()
    with torch.no_grad():
        m.stick.weight.zero_()
        m.stick.bias.copy_(torch.tensor([40.0, 0.0]))    # sigmoid(40) rounds to 1: only own cell
    x = torch.randn(1, 20, 32, dtype=F64)
    q, k, v = m.qkv_heads(x)
    own = torch.eye(20, dtype=F64)
    assert_within(m.attend(q, k, v, (4, 5)), v, ripple_dp_tol(m, q, k, v, v, own, (4, 5)), "own")
    with torch.no_grad():
        m.stick.bias.copy_(torch.tensor([-80.0, 40.0]))  # only the ring at distance 1 (own: 2e-35)
    out = m.attend(q, k, v, (4, 5))
    fq, fk = m.features(q, True), m.features(k, False)
    ring = (m.chebyshev((4, 5), q.device) == 1).to(F64)
    a = (fq @ fk.transpose(-2, -1)) * ring
    tol = ripple_dp_tol(m, q, k, v, out, ring, (4, 5))
    assert_within(out, (a @ v) / a.sum(-1, keepdim=True), tol, "ring 1")


def test_rpe_linear_fft_equals_explicit_form():
    torch.manual_seed(0)
    for prefix, grid in ((0, (6, 6)), (1, (5, 7))):
        m = baselines.create("rpe_linear", 32, 2, num_prefix_tokens=prefix,
                             grid_size=(8, 8)).double()
        with torch.no_grad():
            m.rpe.uniform_(-2, 2)
        x = torch.randn(2, prefix + grid[0] * grid[1], 32, dtype=F64)
        q, k, v = m.qkv_heads(x)
        fft, explicit = m.attend_fft(q, k, v, grid), m.attend_explicit(q, k, v, grid)
        fq, fk = m.features(q, k)
        # FFT convolution y = x * h = F^-1(Fx . Fh) / n: with each transform off by eps
        # relative, normwise, |dy_i| <= ||dy||_2 <= eps (2 ||x||_2 ||h||_1 + ||x||_1 ||h||_2);
        # eps = log2(n) eta, eta = u + 4u(sqrt 2 + u) < 10u per stage (Higham, ASNA Thm 24.2,
        # radix 2; log2(n) stages taken for pocketfft's mixed radix), n = 2H x 2W. x: the fields
        # phi(k) v^T and phi(k) on the grid, h: the mask table; then phi(q). over m = 16, the ratio
        ve = torch.cat([v, torch.ones_like(v[..., :1])], -1)[..., prefix:, :]
        field = (fk[..., prefix:, :, None] * ve[..., None, :]).abs()          # (B, h, Ng, m, d+1)
        tab = m.mask_table(grid).abs()
        h1 = tab.sum((-2, -1)).view(1, -1, 1, 1)
        h2 = tab.pow(2).sum((-2, -1)).sqrt().view(1, -1, 1, 1)
        conv = fq @ (2 * field.pow(2).sum(2).sqrt() * h1 + field.sum(2) * h2)  # (B, h, N, d+1)
        eps = math.log2(4 * grid[0] * grid[1]) * 10 * eb.UNIT_ROUNDOFF[F64]
        a_hat = fq @ fk.transpose(-2, -1) * m.dense_mask(grid)
        den = a_hat.sum(-1, keepdim=True)
        n = x.shape[1]
        tol = (eps * (conv[..., :-1] + explicit.abs() * conv[..., -1:]) / den
               + identity_tol([16, n, n, 16], (a_hat @ v.abs()) / den + explicit.abs()))
        assert_within(fft, explicit, tol, f"rpe_linear {grid}")
        plain = (fq @ (fk.transpose(-2, -1) @ v)) / (fq @ fk.sum(2, keepdim=True).transpose(-2, -1))
        assert outside(fft, plain, tol)                               # the mask matters
    with pytest.raises(ValueError, match="grid_size"):
        m(torch.randn(1, 1 + 81, 32, dtype=F64), grid=(9, 9))


def check_vars_d_unroll():
    """VARS-D with the default shrink (GELU), a random T and random lambda/step scales against
    an explicit unrolled ISTA (module docstring): Phi = unit-norm atoms of exp(q^ Omega -
    |q^|^2 / 2) / sqrt(m), G = Phi^T Phi, b = Phi^T V, G~ = T G T, lam' = lam a, L' = (max row
    sum |G| + 1) / l, z0 = S(b, lam'), z <- S(z - (G~ z - b) / L', lam' / L') five times,
    S(x, t) = sign(x) GELU(|x| - t); Y = Phi z, then the output projection."""
    torch.manual_seed(0)
    m = baselines.create("vars_d", 32, 2).double()
    assert m.shrink == "gelu" and m.num_step == 5
    with torch.no_grad():
        m.T.add_(0.05 * torch.randn_like(m.T))                   # |T - I|_2 ~ 0.6
        m.lam_scale.fill_(0.7)
        m.step_scale.fill_(1.6)
    x = torch.randn(2, 20, 32, dtype=F64)
    q, v = (to_heads(t, 2) for t in (x @ m.qv.weight.T).chunk(2, -1))
    v_ = to_heads(lin_hat(x.abs(), m.qv).chunk(2, -1)[1], 2)
    qn = q / q.norm(dim=-1, keepdim=True)
    phi = torch.exp(qn @ m.omega - 0.5 * qn.pow(2).sum(-1, keepdim=True)) / math.sqrt(m.m)
    phi = phi / phi.norm(dim=-2, keepdim=True)
    gram, b = phi.transpose(-2, -1) @ phi, phi.transpose(-2, -1) @ v
    gt = m.T @ gram @ m.T
    lam = m.lam * m.lam_scale
    lip = (gram.abs().sum(-1).amax(-1) + 1)[..., None, None] / m.step_scale

    def shrink(x, t):
        y = x.abs() - t
        return x.sign() * y / 2 * (1 + torch.erf(y / math.sqrt(2)))

    # error bound: each step's new sums (magnitudes |z|, |T| G |T| |z| / L, Phi^T |v| / L,
    # lam / L) plus the earlier error carried by the step's Jacobian, at most
    # kappa |I - G~ / L| (kappa = 1.13 >= GELU's largest slope, 1.129): z_ below
    kappa, carry = 1.13, (torch.eye(m.m, dtype=F64) - gt / lip).abs()
    b_ = phi.transpose(-2, -1) @ v_
    z = shrink(b, lam)
    z_ = kappa * (b_ + lam)
    for _ in range(5):
        new = z.abs() + (m.T.abs() @ gram @ m.T.abs() @ z.abs() + b_ + lam) / lip
        z_ = kappa * (carry @ z_ + new)
        z = shrink(z - (gt @ z - b) / lip, lam / lip)
    want = m.proj(from_heads(phi @ z))
    s = (qn.abs() @ m.omega.abs()).amax().item() + 0.5
    # v (32), G, b, Phi's norm (N = 20), T G T and L's row sums (m = 32), 5 x G~ z (32), Phi z
    # (32), proj (33); logits of the features: q (32), |q| and q^.Omega (16); 6 x elementwise
    stages = [32, 20, 20, 20, 32, 32, 32] + [32] * 5 + [32, 33]
    tol_z = identity_tol(stages[:-2], z_, logit_terms=[32, 16, 16], logits=s, steps=6)
    with torch.no_grad():
        assert_within(m.reconstruct(m.dictionary(q), v), z, tol_z, "vars_d codes z")
        tol = identity_tol(stages, lin_hat(from_heads(phi @ z_), m.proj), logit_terms=[32, 16, 16],
                           logits=s, steps=6)
        assert_within(m(x), want, tol, "vars_d output")


def test_vars_d_matches_unrolled_ista():
    check_vars_d_unroll()


def test_vars_d_reaches_the_lasso_optimum():
    """With shrink='relu' and the tweaks at init (T = I: this cannot see where T goes, which
    check_vars_d_unroll does) many steps reach the LASSO optimum. One ISTA step z0 -> z is an
    exact proximal-gradient step, so grad(z) + lam s = (G - L)(z - z0) with s in d|z|_1: the
    KKT residual is bounded by the certificate (|G| + L)|z - z0| (plus rounding)."""
    torch.manual_seed(0)
    lam = 0.05
    m = baselines.create("vars_d", 16, 2, shrink="relu", lam=lam).double()
    x = torch.randn(2, 64, 16, dtype=F64)
    q, v = (to_heads(t, 2) for t in m.qv(x).chunk(2, -1))
    phi = m.dictionary(q)
    assert_within(phi.norm(dim=-2), 1.0, identity_tol([64], 1.0), "unit atoms")
    gram = phi.transpose(-2, -1) @ phi
    lip = (gram.abs().sum(-1).amax(-1) + 1)[..., None, None]

    def kkt_violation(steps):
        with torch.no_grad():
            z0, z = m.reconstruct(phi, v, num_step=steps - 1), m.reconstruct(phi, v, num_step=steps)
        g = phi.transpose(-2, -1) @ (phi @ z - v)
        on = z != 0
        viol = torch.where(on, (g + lam * z.sign()).abs(), (g.abs() - lam).clamp_min(0))
        cert = gram.abs() @ (z - z0).abs() + lip * (z - z0).abs()
        # g's sums over N = 64 and m = 16; the step's own rounding (G z0 - b over m = 16 and N,
        # then / L), times L in the identity (phi >= 0)
        b_ = phi.transpose(-2, -1) @ v.abs()
        g_ = (phi.transpose(-2, -1) @ (phi @ z.abs()) + gram @ z0.abs() + 2 * b_
              + lip * (z.abs() + z0.abs() + lam))
        return viol, cert + identity_tol([64, 64, 16, 64], g_), on

    viol, bound, on = kkt_violation(3000)
    assert on.any() and (~on).any()                                   # genuinely sparse
    assert_within(viol, 0.0, bound, "KKT residual vs its certificate")
    assert bound.max() < 0.05 * lam                                   # converged: KKT to 5% of lam
    viol5, _, _ = kkt_violation(5)                                    # the default 5 steps are not
    assert viol5.max() > 0.05 * lam
