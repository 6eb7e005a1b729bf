"""Mutation tests for the baselines' mechanism checks (tests/test_baselines_mechanisms.py and
test_baselines_sparse.py; the Nystrom ones are in test_baselines_nystrom.py): each check passes on
the code as it is, and fails once a deliberately broken version of the mechanism it guards is
monkeypatched into crosshead.baselines."""

import pytest

pytest.importorskip("crosshead.baselines", reason="crosshead.baselines not importable")

from crosshead.baselines import mra, randomized, vars_d  # noqa: E402
from crosshead.baselines._base import from_heads, to_heads  # noqa: E402
from baseline_checks import softmax_ref  # noqa: E402
from test_baselines_mechanisms import (check_lara_matches_equations, check_linformer,  # noqa: E402
                                       check_vars_d_unroll)
from test_baselines_sparse import check_mra2_selection  # noqa: E402


def linformer_ignores_e_and_f(mp):
    from crosshead.baselines import linformer

    def forward(self, x, grid=None):                                  # softmax over all N keys
        a = self.attn
        q, k, v = (to_heads(f(x), self.num_heads) for f in (a.to_q, a.to_k, a.to_v))
        return a.to_out(from_heads(softmax_ref(q, k, v)))
    mp.setattr(linformer.LinformerAttention, "forward", forward)


def mra2_selects_lowest_blocks(mp):
    def select_blocks(low, block_per_row):
        nb = low.shape[-1]
        score = (low - low.amax(-1, keepdim=True)).flatten(1)
        return score.topk(min(nb * block_per_row, nb * nb), dim=-1, largest=False).indices
    mp.setattr(mra, "select_blocks", select_blocks)


def lara_balance_heuristic_for_mis_opt(mp):
    core = randomized.lara_core
    mp.setattr(randomized, "lara_core", lambda *a, **kw: core(*a, **{**kw, "mis_type": "bh"}))


def lara_mu_without_d_quarter_scaling(mp):
    core = randomized.lara_core

    def lara_core(q, k, v, mu, qbar, **kw):                           # mu = qbar + kbar
        return core(q, k, v, mu * q.shape[-1] ** 0.25, qbar, **kw)
    mp.setattr(randomized, "lara_core", lara_core)


def lara_pools_token_sequence(mp):
    forward = randomized._Proposal.forward                            # 1-D pool, grid ignored
    mp.setattr(randomized._Proposal, "forward", lambda self, x, grid: forward(self, x, None))


def vars_d_t_g_instead_of_t_g_t(mp):
    def reconstruct(self, phi, v, num_step=None):                     # VARSDAttention's, but T G
        num_step = self.num_step if num_step is None else num_step
        g = phi.transpose(-2, -1) @ phi
        b = phi.transpose(-2, -1) @ v
        gt = self.T @ g
        lam = self.lam * self.lam_scale
        lip = (g.abs().sum(-1).amax(-1) + 1.0).detach()[..., None, None] / self.step_scale
        z = vars_d.shrink(b, lam, self.shrink)
        for _ in range(num_step):
            z = vars_d.shrink(z - (gt @ z - b) / lip, lam / lip, self.shrink)
        return z
    mp.setattr(vars_d.VARSDAttention, "reconstruct", reconstruct)


# name: (mutation, check, its arguments, the failing comparison's message)
MUTANTS = {
    "linformer ignores E and F": (linformer_ignores_e_and_f, check_linformer, (), "linformer"),
    "mra2 selects the lowest blocks": (mra2_selects_lowest_blocks, check_mra2_selection, (),
                                       "block selection"),
    "lara bh weights for mis-opt": (lara_balance_heuristic_for_mis_opt,
                                    check_lara_matches_equations, ("pool-mixed", "mis-opt"),
                                    "lara"),
    "lara mu without d^-1/4": (lara_mu_without_d_quarter_scaling, check_lara_matches_equations,
                               ("pool", "bh"), "lara"),
    "lara pools the token sequence": (lara_pools_token_sequence, check_lara_matches_equations,
                                      ("pool", "mis-opt"), "lara"),
    "vars_d T G instead of T G T": (vars_d_t_g_instead_of_t_g_t, check_vars_d_unroll, (),
                                    "vars_d codes"),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_check_passes_then_fails_on_mutant(name, monkeypatch):
    mutate, check, args, message = MUTANTS[name]
    check(*args)                                                      # the code as it is
    mutate(monkeypatch)
    with pytest.raises(AssertionError, match=message):
        check(*args)
