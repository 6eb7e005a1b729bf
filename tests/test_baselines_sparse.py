"""Mechanism checks for crosshead.baselines that keep part of the exact attention: MRA-2's block
selection and combination, Hypercube's layout, FLASH's mixed chunks and ContextPool's pooling,
each against an independent formulation in float64 (tolerances: tests/baseline_checks.py).
check_mra2_selection is also run against a broken selection in tests/test_baselines_mutations.py.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from baseline_checks import F64, assert_within, identity_tol, need, outside, softmax_ref

warnings.filterwarnings("ignore", category=DeprecationWarning)

baselines = pytest.importorskip("crosshead.baselines", reason="crosshead.baselines not importable")
from crosshead.baselines._base import pad_to_blocks  # noqa: E402


def block_means(t, bs):
    """(..., N, d) -> (..., ceil(N / bs), d): means over the real tokens of each block."""
    n = t.shape[-2]
    onehot = F.one_hot(torch.arange(n) // bs, -(-n // bs)).to(t.dtype).T      # (Nb, N)
    return (onehot @ t) / onehot.sum(1, keepdim=True)


def dense_mra_reference(q, k, v, sel, bs):
    """Explicit MRA-2 'full' for a block selection sel (B, h, Nb, Nb): exact logits on selected
    block pairs, the block-mean logit L_ij on the others, whose keys carry their block's mean
    value; N need not be a multiple of bs (the last block holds the remaining tokens)."""
    n, d = q.shape[-2:]
    blk = torch.arange(n) // bs
    qh, kh, vh = (block_means(t, bs) for t in (q, k, v))
    low = (qh @ kh.transpose(-2, -1) / math.sqrt(d))[..., blk[:, None], blk[None, :]]
    selm = sel[..., blk[:, None], blk[None, :]]
    a = torch.softmax(torch.where(selm, q @ k.transpose(-2, -1) / math.sqrt(d), low), -1)
    return (a * selm) @ v + (a * ~selm) @ vh[..., blk, :]


def check_mra2_selection():
    """MRA-2 with a partial selection: the selection equals an independent top-k of L - rowmax L
    over the whole Nb x Nb matrix (L from the test's own block means), and the output equals the
    dense form built from that selection: mra2_attention at N = 128 (4 blocks, 1 per row: 4 of
    16 pairs) and the module at N = 197 (padded to 224: 7 blocks, the last with 5 tokens; 2 per
    row: 14 of 49)."""
    from crosshead.baselines import mra
    torch.manual_seed(0)
    m = baselines.create("mra2", 48, 3, num_prefix_tokens=1, block_per_row=2).double()
    x = torch.randn(2, 197, 48, dtype=F64)
    cases = [(*torch.randn(3, 2, 2, 128, 16, dtype=F64).unbind(0), 1, None),
             (*m.qkv_heads(x), 2, m)]
    for q, k, v, bpr, module in cases:
        n, d = q.shape[-2:]
        qh, kh = block_means(q, 32), block_means(k, 32)
        low = qh @ kh.transpose(-2, -1) / math.sqrt(d)
        nb = low.shape[-1]
        score = (low - low.amax(-1, keepdim=True)).flatten(-2)
        ranked = score.sort(-1, descending=True).values
        want_sel = (score >= ranked[..., nb * bpr - 1:nb * bpr]).unflatten(-1, (nb, nb))
        s = (q.abs() @ k.abs().transpose(-2, -1)).amax().item() / math.sqrt(d)
        # block means (32 terms), logits over d, the row max: no near-tie can swap the k-th block
        gap = ranked[..., nb * bpr - 1] - ranked[..., nb * bpr]
        assert gap.min() > 2 * identity_tol([32, d], s), "near-tie: the selection is ambiguous"
        qp, kp, vp, valid = pad_to_blocks(q, k, v, 32)
        out, sel = mra.mra2_attention(qp, kp, vp, block_size=32, block_per_row=bpr, valid=valid)
        assert torch.equal(sel.view_as(want_sel), want_sel), "block selection"
        assert not want_sel.all()
        out = module.attend(q, k, v, None) if module is not None else out[..., :n, :]
        # block means (32), softmax and AV over N; logits: q.k (d) and block means (32)
        tol = identity_tol([32, n, n], v.abs().amax(-2, keepdim=True), logit_terms=[d, 32],
                           logits=s)
        assert_within(out, dense_mra_reference(q, k, v, want_sel, 32), tol, f"mra2 N={n}")
        assert outside(out, softmax_ref(q, k, v), tol)                # partial: not softmax


def test_mra2_selection_and_partial_output():
    check_mra2_selection()


def test_mra2_all_blocks_is_softmax():
    from crosshead.baselines.mra import mra2_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 128, 16, dtype=F64).unbind(0)
    out, sel = mra2_attention(q, k, v, block_size=32, block_per_row=4)   # 4 blocks: all selected
    assert sel.all()
    s = (q.abs() @ k.abs().transpose(-2, -1)).amax().item() / 4
    tol = identity_tol([32, 128, 128], v.abs().amax(2, keepdim=True), logit_terms=[16, 32],
                       logits=s)
    assert_within(out, softmax_ref(q, k, v), tol)
    # the module pads N to a multiple of 32 with masked keys: with every block selected (default
    # 8 per row) it is softmax attention at any N (197 = CLS + 14x14 -> 224)
    m = baselines.create("mra2", 48, 3, num_prefix_tokens=1).double()
    q, k, v = m.qkv_heads(torch.randn(2, 197, 48, dtype=F64))
    s = (q.abs() @ k.abs().transpose(-2, -1)).amax().item() / 4
    tol = identity_tol([32, 224, 224], v.abs().amax(2, keepdim=True), logit_terms=[16, 32],
                       logits=s)
    assert_within(m.attend(q, k, v, None), softmax_ref(q, k, v), tol)


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
    m = baselines.create("hypercube", 32, 2, num_prefix_tokens=1).double()
    x = torch.randn(2, 1 + 100, 32, dtype=F64)                       # 101 -> 7 blocks of 16
    q, k, v = m.qkv_heads(x)
    n = 101
    blk = torch.arange(n) // 16
    allowed = torch.zeros(7, 7, dtype=torch.bool)
    for i, r in enumerate(hypercube_layout(7)):
        allowed[i, r] = True
    mask = allowed[blk[:, None], blk[None, :]]
    logits = (q @ k.transpose(-2, -1) / math.sqrt(16)).masked_fill(~mask, float("-inf"))
    s = (q.abs() @ k.abs().transpose(-2, -1)).amax().item() / 4
    # softmax and AV over at most N = 101 keys; logits over d = 16
    tol = identity_tol([n, n], v.abs().amax(2, keepdim=True), logit_terms=[16], logits=s)
    assert_within(m.attend(q, k, v, None), torch.softmax(logits, -1) @ v, tol)
    assert not mask.all()


def test_flash_gau_matched_parameters_and_mixed_chunk_locality():
    need("flash_gau")
    for dim in (192, 384):
        n_flash = sum(p.numel() for p in baselines.create("flash_gau", dim, 4).parameters())
        n_mhsa = sum(p.numel() for p in baselines.create("softmax", dim, 4).parameters())
        assert abs(n_flash - n_mhsa) / n_mhsa < 0.01, (n_flash, n_mhsa)
    torch.manual_seed(0)
    m = baselines.create("flash_gau", 32, 1, group_size=8, query_key_dim=16).double().eval()
    x = torch.randn(1, 32, 32, dtype=F64)
    # the returned branch is the package block minus its residual (norm replaced by identity):
    # the same computation, then (branch + x) - x, two roundings of magnitude |branch| + |x|
    branch = m(x)
    assert_within(branch, m.flash(x) - x, identity_tol([2], branch.abs() + x.abs(), steps=0))
    with torch.no_grad():                                             # (init scale is 0.02)
        m.flash.qk_offset_scale.gamma.normal_()
    x2 = x.clone()
    x2[:, 20] += 1.0                                                  # a token in group 2
    # an output that does not depend on token 20 is bit-identical (the exact zero below), so
    # any difference shows the dependence
    assert (m(x2) - m(x))[:, :8].abs().max() > 0                      # reaches group 0 (linear)
    with torch.no_grad():
        m.flash.qk_offset_scale.gamma[1].zero_()                      # lin_q = 0: no global term
        m.flash.qk_offset_scale.beta[1].zero_()
    assert (m(x2) - m(x))[:, :16].abs().max() == 0                    # exact part stays local
    assert (m(x2) - m(x))[:, 16:24].abs().max() > 0


def test_context_pool_pools_then_attends():
    torch.manual_seed(0)
    cp = baselines.create("context_pool", 32, 4, num_prefix_tokens=1).double()
    sm = baselines.create("softmax", 32, 4).double()
    sm.load_state_dict(cp.state_dict(), strict=False)
    x = torch.randn(2, 1 + 20, 32, dtype=F64)
    with torch.no_grad():
        cp.to_support.bias.fill_(-40.0)                               # support -> 0
    # exact: the Gaussian weights of other cells underflow to 0, so the pool is the identity and
    # the rest is the same computation on the same input
    assert torch.equal(cp.pool(x, (4, 5)), x)
    assert torch.equal(cp(x, grid=(4, 5)), sm(x))
    with torch.no_grad():                                             # per-token weight, support
        for lin in (cp.to_weight, cp.to_support):
            lin.weight.normal_(0, 0.3)
            lin.bias.normal_()
    pooled = cp.pool(x, (4, 5))
    xg = x[:, 1:]
    mw = torch.sigmoid(xg @ cp.to_weight.weight.T + cp.to_weight.bias)          # (B, Ng, 1)
    s = cp.max_support * torch.sigmoid(xg @ cp.to_support.weight.T + cp.to_support.bias)
    pos = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij"), -1)
    d2 = (pos.view(-1, 1, 2) - pos.view(1, -1, 2)).pow(2).sum(-1).to(F64)       # (Ng, Ng)
    g = torch.exp(-d2 / (2 * s * s)) * mw.transpose(1, 2)                      # G_i(j) m_j
    want = (g @ xg) / g.sum(-1, keepdim=True)
    s_log = (d2 / (2 * s * s)).amax().item() + 1                      # the weights' log magnitude
    tol = identity_tol([20, 20], xg.abs().amax(1, keepdim=True), logit_terms=[33, 2], logits=s_log)
    assert_within(pooled[:, 1:], want, tol, "pool")
    assert torch.equal(pooled[:, :1], x[:, :1])                       # prefix not pooled
    assert outside(pooled[:, 1:], xg, tol)                            # neighbours are mixed
    const = torch.ones(1, 21, 32, dtype=F64)                          # a convex combination
    assert_within(cp.pool(const, (4, 5)), const, identity_tol([20, 20], 1.0, logit_terms=[33, 2],
                                                                 logits=s_log))
