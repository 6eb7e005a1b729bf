"""Shared pieces of the baseline attentions: the module base class and grid/shape checks."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

__all__ = ["BaselineAttention", "resolve_grid", "to_heads", "from_heads", "segment_bounds",
           "segment_means"]


def resolve_grid(n_tokens: int, num_prefix: int, grid, *, required: bool, name: str):
    """Return (H, W) for the ``n_tokens - num_prefix`` grid tokens, or None.

    ``grid`` given: checked against the token count. ``grid`` None: a square grid is inferred
    when the count is a perfect square; otherwise None, or a ValueError when ``required``.
    """
    n = n_tokens - num_prefix
    if n <= 0:
        raise ValueError(f"{name}: {n_tokens} tokens with {num_prefix} prefix tokens leave no grid")
    if grid is not None:
        if len(grid) != 2:
            raise ValueError(f"{name}: grid must be (H, W), got {grid!r}")
        h, w = int(grid[0]), int(grid[1])
        if h * w != n:
            raise ValueError(f"{name}: grid {h}x{w}={h * w} does not match the {n} grid tokens "
                             f"(N={n_tokens}, num_prefix_tokens={num_prefix})")
        return h, w
    s = math.isqrt(n)
    if s * s == n:
        return s, s
    if required:
        raise ValueError(f"{name} is a 2-D method: pass grid=(H, W) for the {n} grid tokens "
                         f"(N={n_tokens}, num_prefix_tokens={num_prefix}); {n} is not a perfect "
                         f"square so no square grid can be inferred")
    return None


def pad_to_blocks(q, k, v, block_size: int):
    """Zero-pad the token axis of (B, h, N, d) tensors to a multiple of block_size; returns the
    padded q, k, v and a (N + pad,) mask that is False on the padding."""
    n = q.shape[2]
    pad = (-n) % block_size
    valid = torch.ones(n + pad, dtype=torch.bool, device=q.device)
    if pad:
        valid[n:] = False
        q, k, v = (nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    return q, k, v, valid


def segment_bounds(n: int, m: int, *, longer_first: bool = True) -> list[int]:
    """Boundaries 0 = b_0 < ... < b_m = n of m contiguous segments of n tokens whose lengths differ
    by at most one: the ``n % m`` longer segments first (as ``numpy.array_split``), or last
    (``longer_first=False``). 1 <= m <= n."""
    base, extra = divmod(n, m)
    if longer_first:
        return [i * base + min(i, extra) for i in range(m + 1)]
    return [i * base + max(0, i - (m - extra)) for i in range(m + 1)]


def segment_means(x: torch.Tensor, bounds) -> torch.Tensor:
    """Means of (..., N, d) ``x`` over the token segments between consecutive ``bounds``."""
    sums, lengths = _segment_sums(tuple(bounds), x.device)
    return (sums.to(x.dtype) @ x) / lengths.to(x.dtype)                 # (m, N) @ (..., N, d)


@functools.lru_cache(maxsize=32)
def _segment_sums(bounds: tuple, device: torch.device):
    """The (m, N) 0/1 matrix summing each segment and the (m, 1) segment lengths, built once per
    segmentation and device (no host-device traffic in the forward)."""
    sums = torch.zeros(len(bounds) - 1, bounds[-1])
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        sums[i, start:end] = 1.0
    return sums.to(device), sums.sum(1, keepdim=True).to(device)


def to_heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """(B, N, h*d) -> (B, h, N, d)."""
    b, n, c = t.shape
    return t.view(b, n, h, c // h).transpose(1, 2)


def from_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) -> (B, N, h*d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class BaselineAttention(nn.Module):
    """Base class: timm-style qkv and output projections plus input checks.

    Subclasses set ``needs_grid`` (2-D methods) and implement ``attend(q, k, v, grid)`` on
    (B, h, N, d) tensors, or override ``forward`` entirely.
    """

    needs_grid = False
    registry_name = "?"

    def __init__(self, dim: int, num_heads: int, *, num_prefix_tokens: int = 0,
                 qkv_bias: bool = False, make_qkv: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.num_prefix_tokens = num_prefix_tokens
        if make_qkv:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
            self.proj = nn.Linear(dim, dim)

    def check_input(self, x: torch.Tensor, grid):
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"{self.registry_name}: expected x of shape (B, N, {self.dim}), "
                             f"got {tuple(x.shape)}")
        return resolve_grid(x.shape[1], self.num_prefix_tokens, grid,
                            required=self.needs_grid, name=self.registry_name)

    def qkv_heads(self, x: torch.Tensor):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = self.num_heads
        return to_heads(q, h), to_heads(k, h), to_heads(v, h)

    def attend(self, q, k, v, grid):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        grid = self.check_input(x, grid)
        q, k, v = self.qkv_heads(x)
        out = self.attend(q, k, v, grid)
        return self.proj(from_heads(out))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, "
                f"num_prefix_tokens={self.num_prefix_tokens}")
