"""InteractiveMultiheadAttention: qkv Linear → landmarks of q and k → imhsa → output Linear."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _checks, _validate
from .ops import imhsa, landmarks


class InteractiveMultiheadAttention(nn.Module):
    """Drop-in for the attention of a ViT block, with iMHSA in place of softmax attention.

    Args:
        dim (int): embedding width, divisible by num_heads.
        num_heads (int): heads h. Default: 8.
        landmarks (tuple[int, int] | int): landmark grid (Lh, Lw) for 2-D token grids, or an int L
            for 1-D sequences. Default: (7, 7).
        mix (str): "post" or "pre" (see :func:`crosshead.imhsa`). Default: "post".
        qkv_bias, proj_bias (bool): biases of the two Linear layers. Default: True.
        num_prefix_tokens (int): leading tokens (CLS, registers) kept out of pooling. Default: 0.
        interaction (bool): learn the (h, h) cross-head maps w_q and w_k, initialised to the identity
            (a fresh layer is plain two-hop landmark attention); False drops them. Default: True.
        scale (float, optional): logit scale, finite and positive; None means head_dim^-1/2.
            Default: None.

    Every argument is checked here, with an error that names it (a bad one does not wait for the
    first forward).

    ``forward(x, grid=None)``: x (B, N, dim) → (B, N, dim); B = 0 works. ``grid=(H, W)`` gives the
    token grid of the N − num_prefix_tokens grid tokens; with 2-D landmarks and grid=None a square
    grid is assumed (an error if N − num_prefix_tokens is not a square), which is what lets the
    module replace the attention of a timm ViT block, whose blocks call ``attn(x)``.
    """

    def __init__(self, dim: int, num_heads: int = 8, landmarks: tuple[int, int] | int = (7, 7),
                 mix: str = "post", qkv_bias: bool = True, proj_bias: bool = True,
                 num_prefix_tokens: int = 0, interaction: bool = True, scale: float | None = None):
        super().__init__()
        dim, num_heads = _validate.dim_and_heads("dim", dim, "num_heads", num_heads)
        if not isinstance(mix, str) or mix not in _checks.MIX_MODES:
            raise ValueError(f"mix must be 'post' or 'pre', got {mix!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.landmarks = _validate.landmark_size("landmarks", landmarks)
        self.mix = mix
        self.num_prefix_tokens = _validate.non_negative_int("num_prefix_tokens", num_prefix_tokens)
        self.scale = _validate.scale("scale", scale)
        qkv_bias = _validate.boolean("qkv_bias", qkv_bias)
        proj_bias = _validate.boolean("proj_bias", proj_bias)
        interaction = _validate.boolean("interaction", interaction)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        if interaction:
            self.w_q = nn.Parameter(torch.eye(num_heads))
            self.w_k = nn.Parameter(torch.eye(num_heads))
        else:
            self.register_parameter("w_q", None)
            self.register_parameter("w_k", None)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, landmarks={self.landmarks}, "
                f"mix={self.mix!r}, prefix={self.num_prefix_tokens}, interaction={self.w_q is not None}")

    def _grid(self, n_tokens: int, grid):
        if grid is not None or isinstance(self.landmarks, int):
            return grid
        n = n_tokens - self.num_prefix_tokens
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} grid tokens (N={n_tokens} minus {self.num_prefix_tokens} prefix) do "
                             "not form a square: pass grid=(H, W)")
        return side, side

    def _landmark_size(self, n_tokens: int, grid):
        """The landmark grid for this input (a hook: subclasses may adapt it to the token grid)."""
        return self.landmarks

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None, attn_mask: None = None,
                is_causal: bool = False) -> Tensor:
        _checks.out_of_scope(attn_mask, 0.0, is_causal)
        if x.dim() != 3:
            raise ValueError(f"x must be (B, N, dim), got shape {tuple(x.shape)}")
        B, N, C = x.shape
        grid = self._grid(N, grid)
        size = self._landmark_size(N, grid)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q_land = landmarks(q, grid, size, self.num_prefix_tokens)
        k_land = landmarks(k, grid, size, self.num_prefix_tokens)
        out = imhsa(q, k, v, q_land, k_land, self.w_q, self.w_k, mix=self.mix, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))
