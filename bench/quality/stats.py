"""Summary statistics over seeds: mean ± sample std, and paired differences with a Student-t interval.

Runs of one seed share their data (the Pathfinder samples are drawn from the seed) and their
initial random state, so attentions are compared seed by seed (a paired design): the difference
A − B is formed per seed, and its mean gets the interval mean ± t(0.975, n − 1) · s / √n.
"""

from __future__ import annotations

import math

# two-sided 95 % Student-t quantiles t(0.975, df), df = 1..30 (from the t distribution's tables)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (1.96 beyond the table)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; nan for one value)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_std of no values")
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return m, math.nan
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def paired_diff(a: dict, b: dict) -> dict | None:
    """A − B over the seeds both have (``a``, ``b``: seed → value): mean, std, 95 % CI, n, the per-seed
    differences, and whether the interval excludes 0. None with fewer than two common seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    m, s = mean_std(d)
    half = t975(len(d) - 1) * s / math.sqrt(len(d))
    return {"mean": m, "std": s, "ci95": [m - half, m + half], "n": len(d), "seeds": seeds, "diffs": d,
            "excludes_zero": (m - half > 0) or (m + half < 0)}
