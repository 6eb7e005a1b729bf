"""The configurations of ``python -m bench.quality``: ``cpu``, ``gpu`` and ``tiny`` (the test's).

``cpu`` was sized on this project's 2-core machine (docs/quality.md has the measurements): at about
150 s of one core per Pathfinder run, only a small ViT with a conv stem and CPE got past
Pathfinder's plateau, and only at batch 32 (softmax 98 %; batch 64, or 12 000 samples × 8 epochs,
left it at or near chance). The whole grid took about 80 minutes. ``gpu`` is an estimate that has
never run (no GPU was lent to the session that wrote it).
"""

from __future__ import annotations

from .configs import ALL_ATTENTIONS, Config, Study, Task

_HEADS = (2, 4, 8, 16)
_HEADS_ATTN = ("imhsa_post", "imhsa_nointeraction")
_DIGITS = Task("digits", "digits", image_size=16, patch=2, width=64, depth=2, landmarks=4, epochs=12, batch_size=32,
               lr=1e-3)

CPU = Config(
    name="cpu",
    tasks=(
        Task("pathfinder32", "pathfinder32", image_size=32, patch=4, width=64, depth=2, landmarks=4, epochs=6,
             batch_size=32, lr=1e-3, train_size=20000, test_size=2000, stem="conv", cpe=True),
        _DIGITS,
    ),
    studies=(
        Study("pathfinder32", "pathfinder32", ALL_ATTENTIONS, (4,), "Pathfinder 32: every attention, 4 heads"),
        Study("heads", "pathfinder32", _HEADS_ATTN, _HEADS, "Pathfinder 32: heads at fixed width, with and "
              "without interaction"),
        Study("digits", "digits", ALL_ATTENTIONS, (4,), "Digits (smoke task): every attention, 4 heads"),
    ),
    seeds=(0, 1, 2), threads=1, jobs=2, budget_min=90.0,
    note="2 cores: two runs at a time, one thread each; sized to finish within 90 minutes")

GPU = Config(
    name="gpu",
    tasks=(
        # pixel-level tokens as in LRA (a 1×1 patch projection), 1024 tokens, L = 64
        Task("pathfinder32", "pathfinder32", image_size=32, patch=1, width=64, depth=4, landmarks=8, epochs=8,
             batch_size=128, lr=1e-3, train_size=40000, test_size=4000, cpe=True, extra=("--amp", "bf16")),
        # 64 px at patch 2 (a conv stem): 1024 tokens again; the N×N peers would not fit 4096 tokens at this batch
        Task("pathfinder64", "pathfinder64", image_size=64, patch=2, width=64, depth=4, landmarks=8, epochs=8,
             batch_size=128, lr=1e-3, train_size=40000, test_size=4000, stem="conv", cpe=True,
             extra=("--amp", "bf16")),
        _DIGITS,
    ),
    studies=(
        Study("pathfinder32", "pathfinder32", ALL_ATTENTIONS, (4,), "Pathfinder 32: every attention, 4 heads"),
        Study("pathfinder64", "pathfinder64", ALL_ATTENTIONS, (4,), "Pathfinder 64: every attention, 4 heads"),
        Study("heads", "pathfinder32", _HEADS_ATTN, _HEADS, "Pathfinder 32: heads at fixed width, with and "
              "without interaction"),
        Study("digits", "digits", ALL_ATTENTIONS, (4,), "Digits (smoke task): every attention, 4 heads"),
    ),
    seeds=(0, 1, 2), threads=2, jobs=8, budget_min=15.0,
    note="one H100/H200, 8 runs sharing it; sized by estimate and NOT YET RUN: no GPU was lent to the "
         "session that wrote it",
    budget_exceptions=(("linformer", "its E and F projections hold 1025 x k parameters each per block, by "
                        "design: at 1024 tokens, twice as many as the rest of the model (0.79 M against 0.27 M)"),))

TINY = Config(
    name="tiny",
    tasks=(Task("digits", "digits", image_size=8, patch=2, width=8, depth=1, landmarks=2, epochs=2, batch_size=64,
                lr=1e-3, extra=("--max-steps-per-epoch", "2", "--limit-test", "64")),),
    studies=(Study("digits", "digits", ("imhsa_post", "imhsa_nointeraction"), (2,), "Digits, tiny"),),
    seeds=(0, 1), threads=1, jobs=1, budget_min=1.0, note="the test's grid: a few steps per run")

CONFIGS = {c.name: c for c in (CPU, GPU, TINY)}


def selector(cfg: Config, studies=None, seeds=None):
    """A predicate on runs: those of the given studies (their task, attentions and heads) and seeds."""
    chosen = [s for s in cfg.studies if studies is None or s.name in studies]

    def keep(run) -> bool:
        if seeds is not None and run.seed not in seeds:
            return False
        return any(run.task.name == s.task and run.attn in s.attentions and run.heads in s.heads for s in chosen)

    return keep
