"""The settings of one benchmark run, shared by the driver (bench/run.py) and its workers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

PASSES = ("fwd", "fwdbwd")

# Token grids (side × side) swept by default. CPU: up to 128×128 = 16384 tokens, the size the
# committed comparison with math SDPA is made at; GPU: 14×14 to 224×224 (50176 tokens).
CPU_GRIDS = (14, 28, 56, 96, 128)
GPU_GRIDS = (14, 28, 56, 112, 160, 224)
QUICK_GRIDS = (8, 16)


@dataclass
class Config:
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 1
    heads: int = 4
    head_dim: int = 32
    landmarks: tuple[int, int] = (7, 7)
    mix: str = "post"
    grids: tuple[int, ...] = CPU_GRIDS
    passes: tuple[str, ...] = PASSES
    threads: int = 1
    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 20
    budget_s: float = 1.0  # per point: keep repeating until min_reps and this much time are reached
    timeout_s: float = 420.0  # per point (warm-up, compilation and repeats together)
    mem_cap_bytes: int = 0  # a worker above this resident size (CPU) is killed; 0 = no cap
    # CPU: "wall" (time.perf_counter) or "cpu" (the timing thread's CPU time, time.thread_time:
    # one thread only; on a shared machine it leaves out the time other processes hold the core)
    clock: str = "wall"
    rounds: int = 1  # the whole sweep is repeated this many times; the median round is reported
    contenders: tuple[str, ...] = ()
    # options of the peer contenders (module level)
    performer_features: int = 0  # 0 = performer-pytorch's default int(d·ln d)
    nystrom_landmarks: int = 0  # 0 = the same L as iMHSA
    linformer_k: int = 256
    extra: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def num_landmarks(self) -> int:
        return self.landmarks[0] * self.landmarks[1]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = dict(d)
        for key in ("landmarks", "grids", "passes", "contenders"):
            d[key] = tuple(d[key])
        return cls(**d)


def element_size(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}[dtype]
