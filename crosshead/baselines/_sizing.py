"""Size-dependent options: what each baseline needs to be *itself* at a given token count.

``create(name, dim, num_heads)`` builds every mechanism with its paper's or package's defaults,
and some of those are tied to one size or stop approximating at ViT sizes (docs/baselines.md,
"At the sizes users run"). ``create_for`` fills in the options that depend on the input size, so
that a benchmark or a model sweeping N gets a working, genuinely approximate module at each N:

- ``linformer``: E and F are built for exactly N tokens (``seq_len = N``), with the module's own
  rule k = min(256, N // 4);
- ``rpe_linear``: the relative-position table covers the grid (``grid_size = grid``);
- ``mra2``: at most a quarter of the blocks per row, and at most the paper's 8, are computed
  exactly (``block_per_row = min(8, max(1, N_b // 4))``, N_b = ceil(N / block_size)); with the
  default 8 every block is selected up to 256 tokens and MRA-2 *is* softmax attention.

Options passed explicitly always win. Every other mechanism has no size-dependent option: its
``create`` defaults are used (``ripple`` and ``rpe_linear`` pick their evaluation by size
themselves, ``impl='auto'``).
"""

from __future__ import annotations

import math

import torch.nn as nn

from ._registry import create

__all__ = ["sized_options", "create_for"]

MRA_MAX_FRACTION = 4  # at most 1 / MRA_MAX_FRACTION of a row's blocks are computed exactly
MRA_PAPER_BLOCKS_PER_ROW = 8


def sized_options(name: str, num_tokens: int, grid=None, *, block_size: int = 32) -> dict:
    """Options ``create_for`` adds for ``name`` at ``num_tokens`` tokens (prefix included) on an
    H x W ``grid`` (needed by ``rpe_linear`` only)."""
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if name == "linformer":
        return {"seq_len": num_tokens}
    if name == "rpe_linear":
        if grid is None:
            raise ValueError("rpe_linear: create_for needs grid=(H, W) to size its relative-position "
                             "table")
        return {"grid_size": (int(grid[0]), int(grid[1]))}
    if name == "mra2":
        blocks = math.ceil(num_tokens / block_size)
        return {"block_per_row": min(MRA_PAPER_BLOCKS_PER_ROW, max(1, blocks // MRA_MAX_FRACTION))}
    return {}


def create_for(name: str, dim: int, num_heads: int = 8, *, grid, num_prefix_tokens: int = 0,
               **options) -> nn.Module:
    """``create`` with the size-dependent options for ``num_prefix_tokens + H * W`` tokens on the
    H x W ``grid`` filled in (see the module docstring); explicit ``options`` override them."""
    if grid is None or len(grid) != 2 or min(int(grid[0]), int(grid[1])) < 1:
        raise ValueError(f"create_for: grid must be (H, W) with positive sides, got {grid!r}")
    n = num_prefix_tokens + int(grid[0]) * int(grid[1])
    sized = sized_options(name, n, grid, block_size=options.get("block_size", 32))
    return create(name, dim, num_heads, num_prefix_tokens=num_prefix_tokens, **{**sized, **options})
