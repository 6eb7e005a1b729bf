"""The grids of the quality benchmark: which models are trained on what, and with which recipe.

A *task* fixes the data, the architecture (all but the attention and the head count) and the
recipe; a *study* is a question asked of one task: which attentions, which head counts. A run is
(task, attention, heads, seed); two studies that need the same run share it. Every run of a task
gets the same flags except ``--attn`` and the head count, so the models differ only in their
attention modules (the parameter counts are checked, ``grid.check_budget``).

Efficiency knobs are matched to the iMHSA landmark count L, so that every efficient peer works at
the same rank: Nyströmformer and LARA with L landmarks, Linformer with k = L, Performer with L
random features, MRA-2 with L exactly computed keys per query row (``peer_options``).
"""

from __future__ import annotations

import dataclasses
import json

IMHSA = ("imhsa_post", "imhsa_pre", "imhsa_nointeraction")
PEERS = ("softmax", "talking_heads", "performer", "nystrom", "linformer", "lara", "mra2")
ALL_ATTENTIONS = IMHSA + PEERS
BUDGET = 0.05  # parameter counts within one task and head count differ by at most this fraction
INTERACTION_PAIRS = (("imhsa_post", "imhsa_nointeraction"), ("imhsa_pre", "imhsa_nointeraction"),
                     ("imhsa_post", "imhsa_pre"))


@dataclasses.dataclass(frozen=True)
class Task:
    """One data set, architecture and recipe (``crosshead.train`` flags)."""

    name: str
    dataset: str
    image_size: int
    patch: int
    width: int
    depth: int
    landmarks: int                 # landmark grid side: L = landmarks²
    epochs: int
    batch_size: int
    lr: float
    train_size: int | None = None  # pathfinder only (digits has its fixed split)
    test_size: int | None = None
    stem: str = "patch"            # DeiT stem: patch (linear) or conv (early convolutions)
    cpe: bool = False              # a depthwise-conv positional encoding in every block
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    extra: tuple = ()              # further crosshead.train flags, the same for every run

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def tokens(self) -> int:
        return self.grid ** 2 + 1  # the patch grid and the CLS token


@dataclasses.dataclass(frozen=True)
class Study:
    """A question asked of one task: ``attentions`` × ``heads`` × the configuration's seeds."""

    name: str
    task: str
    attentions: tuple
    heads: tuple
    title: str


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    tasks: tuple
    studies: tuple
    seeds: tuple
    threads: int        # torch threads per run
    jobs: int           # runs at once
    budget_min: float   # the wall time the configuration is sized for, whole grid
    note: str
    # attentions whose parameter count may exceed the others' by more than BUDGET, with the reason
    budget_exceptions: tuple = ()

    def task(self, name: str) -> Task:
        return next(t for t in self.tasks if t.name == name)


@dataclasses.dataclass(frozen=True)
class Run:
    task: Task
    attn: str
    heads: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task.name}/{self.attn}-h{self.heads}/seed{self.seed}"


def peer_options(attn: str, task: Task) -> dict:
    """Constructor options of the attention, matched to the task: qkv bias as iMHSA and softmax have
    it (equal architecture), and the efficiency knob at the iMHSA rank L."""
    L = task.landmarks ** 2
    if attn in IMHSA or attn == "softmax":
        return {}
    opts = {"qkv_bias": True}
    if attn == "performer":
        opts["nb_features"] = L
    elif attn == "nystrom":
        opts["num_landmarks"] = L
    elif attn == "linformer":
        opts.update(seq_len=task.tokens, k=L)
    elif attn == "lara":
        opts["num_landmarks"] = L
    elif attn == "mra2":
        # exact attention on blocks of `side` keys, `L // side` of them per query block row
        side = task.landmarks
        opts.update(block_size=side, block_per_row=max(L // side, 1))
    return opts


def train_argv(run: Run) -> list[str]:
    """The ``python -m crosshead.train`` flags of a run (no --out/--resume)."""
    t = run.task
    model_kwargs = dict(embed_dim=t.width, depth=t.depth, num_heads=run.heads, patch_size=t.patch,
                        img_size=t.image_size, global_pool="avg", stem=t.stem, cpe=t.cpe)
    opts = peer_options(run.attn, t)
    if opts:
        model_kwargs["attn_kwargs"] = opts
    argv = ["--model", "deit_imhsa_tiny", "--attn", run.attn,
            "--model-kwargs", json.dumps(model_kwargs, sort_keys=True),
            "--landmarks", str(t.landmarks), str(t.landmarks), "--drop-path", "0",
            "--dataset", t.dataset, "--image-size", str(t.image_size), "--seed", str(run.seed),
            "--epochs", str(t.epochs), "--batch-size", str(t.batch_size), "--lr", repr(t.lr),
            "--warmup-epochs", repr(t.warmup_epochs), "--weight-decay", repr(t.weight_decay), "--no-progress"]
    if t.train_size is not None:
        argv += ["--train-size", str(t.train_size)]
    if t.test_size is not None:
        argv += ["--test-size", str(t.test_size)]
    return argv + list(t.extra)


def runs(cfg: Config) -> list[Run]:
    """Every run of the configuration once, in study order (a shared run at its first study)."""
    out, seen = [], set()
    for seed in cfg.seeds:  # seed-major: a grid stopped early has whole seeds of every study
        for study in cfg.studies:
            task = cfg.task(study.task)
            for heads in study.heads:
                for attn in study.attentions:
                    r = Run(task, attn, heads, seed)
                    if r.key not in seen:
                        seen.add(r.key)
                        out.append(r)
    return out
