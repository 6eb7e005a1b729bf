"""What the forward's launches should cost: global bytes, FLOPs, grid and the design's predicted
fraction of the memory roofline (csrc/cuda/README.md, "Launches of the forward"). bench/cuda_targets.py
prints these beside the kernel times it measures, so every prediction meets its measurement.

The model, for bfloat16/float16 inputs on the second-generation query side (d in {32, 64, 128},
h <= 16, L <= 64) and the first-generation key side:
  bytes    DRAM traffic assuming k, v, q, out stream once per pass and the (B, h, L, d) landmark
           tensors stay in L2;
  flops    tensor-core FLOPs with the padding the kernel computes (L to 8 for scores, to 16 for
           Â·Z) plus the head-mixing FMAs (2·h per element);
  floor    bytes / copy bandwidth: the launch's memory roofline;
  predicted_fraction  floor / the design's own time estimate (README.md), to be checked on a GPU.
"""

from __future__ import annotations

import math


def _pad(x: int, m: int) -> int:
    return -(-x // m) * m


def forward_launches(B: int, H: int, N: int, D: int, L: int, elem: int = 2, has_w: bool = True) -> list[dict]:
    tok = B * H * N * D * elem  # one token tensor
    land32 = B * H * L * D * 4
    lp8, lp16 = _pad(L, 8), _pad(L, 16)
    mix = 2 * B * N * L * H * H if has_w else 0
    return [
        # first generation (cuda_audit.md §3): stats pass over k, then the Z pass over k and v with
        # per-tile float32 partials; the audit's model puts both near 3-5 % of the roofline
        {"launch": "key_stats_kernel", "bytes": tok, "flops": 2 * B * H * N * L * D + mix,
         "grid": "splits x B", "predicted_fraction": 0.05},
        {"launch": "reduce_logsumexp_kernel", "bytes": 0, "flops": 0, "grid": "grid-stride",
         "predicted_fraction": None},
        {"launch": "key_z_kernel", "bytes": 2 * tok, "flops": 4 * B * H * N * L * D + mix,
         "grid": "splits x B", "predicted_fraction": 0.05},
        {"launch": "reduce_splits_kernel (z)", "bytes": land32, "flops": 0, "grid": "grid-stride",
         "predicted_fraction": None},
        # second generation: q read once, out written once; k_land and Z (bf16) re-read from L2 per CTA.
        # Estimate (h=8, d=64, L=49): ~64 warp-instructions per token·head (scores and softmax ~25,
        # mixing ~30, Â·Z ~9); with the one warp per scheduler its shared memory allows, ~1-2 issued
        # per cycle per SM, so issue takes 2-4x the DRAM time: 0.25-0.5 of the roofline.
        {"launch": "query_forward_mma_kernel", "bytes": 2 * tok,
         "flops": 2 * B * H * N * D * (lp8 + lp16) + mix, "grid": f"ceil(N/64) x B = {math.ceil(N / 64) * B}",
         "predicted_fraction": 0.35},
    ]


def minimum_forward_bytes(B: int, H: int, N: int, D: int, elem: int = 2) -> int:
    """imhsa.md "Costs": q, k, v read once and out written once."""
    return 4 * B * H * N * D * elem


def minimum_backward_bytes(B: int, H: int, N: int, D: int, elem: int = 2) -> int:
    """q, k, v and grad_out read once; dq, dk and dv written once."""
    return 7 * B * H * N * D * elem
