"""InteractiveMultiheadAttention: qkv Linear → landmarks of q and k → imhsa → output Linear."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _checks, _validate
from .ops import imhsa, landmarks


def _check_value(cond, message: str) -> None:
    """ValueError(message) unless cond. A symbolic cond (a SymBool, under torch.compile or export)
    goes to torch._check instead: Dynamo cannot trace torch._check_with(ValueError, ...) on every
    torch we support (torch 2.11 refuses it with fullgraph=True; seen on the H200 run of issue #10)."""
    if isinstance(cond, torch.SymBool):
        torch._check(cond, lambda: message)
    elif not cond:
        raise ValueError(message)


def symbolic_isqrt(n, message: str, minimum: int = 1):
    """The integer square root of a size n that must be a perfect square (an error with ``message`` if
    it is not), for plain ints and for symbolic sizes alike.

    ``math.isqrt`` would force a symbolic size (``torch.compile`` with dynamic shapes, ``torch.export``
    with a dynamic dimension) to one concrete value, specialising the graph to one resolution. Here the
    candidate root is ``trunc(sqrt(float(n)))``, built with ``torch.sym_sqrt`` and ``torch.sym_int`` so
    that it stays an expression of n, and it is then checked exactly, in integers: ``side * side == n``
    holds for no integer side when n is not a square, and only for its root when it is. So a non-square
    is never accepted and an accepted side is never wrong. Float rounding could at most refuse a true
    square, and cannot up to 2^53: there float(k²) is exact, and the correctly rounded (IEEE) sqrt of
    it is exactly k. (No tensor that fits in memory has 2^53 tokens; plain ints use ``math.isqrt``.)

    How the check is enforced depends on the caller:

    * eager: a ValueError(message).
    * ``torch.compile``: a guard. Every square n runs the same graph; a non-square one fails the guard,
      and Dynamo's retrace raises with ``message``.
    * ``torch.export`` (non-strict, the default): "n is a square" is no range of a ``Dim``, so as a
      guard it would make export refuse the dynamic dimension. Instead the exported program asserts
      it on every call (a tensor assertion carrying ``message``), and the root becomes a fresh
      (unbacked) size tied to n by ``torch._check``, which on an unbacked size records a runtime
      assertion rather than a guard. ``minimum`` (checked only here) is a lower bound on the root that
      later checks need to know to stay free of guards on the unbacked size (a landmark grid no
      larger than the token grid). Strict export (``strict=True``, through Dynamo) gets the guard and
      refuses a dynamic n.

    ``message`` must be a plain string: Dynamo traces only constant messages.
    """
    if isinstance(n, int) and not torch.compiler.is_compiling():
        side = math.isqrt(n) if n >= 0 else -1
        if side * side != n:
            raise ValueError(message)
        return side
    side = torch.sym_int(torch.sym_sqrt(n))
    if isinstance(n, torch.SymInt) and torch.compiler.is_exporting():
        # checked first as a tensor (no guard), so that a non-square N fails with this message
        torch._assert_async(torch.scalar_tensor(side * side - n) == 0, message)
        torch._assert_async(torch.scalar_tensor(side) >= minimum,
                            f"the square token grid is smaller than {minimum} x {minimum}")
        side = torch.sym_fresh_size(side)
        torch._check(side >= minimum)
        torch._check(side * side == n)
        return side
    _check_value(side * side == n, message)
    return side


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
    module replace the attention of a timm ViT block, whose blocks call ``attn(x)``. The square root
    is taken symbolically under ``torch.compile`` and ``torch.export`` (:func:`symbolic_isqrt`), so a
    compiled or exported module serves every resolution, not only the one it was traced at.
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
        p = self.num_prefix_tokens
        if isinstance(n_tokens, int) and not torch.compiler.is_compiling():  # eager: name the numbers
            message = (f"{n_tokens - p} grid tokens (N={n_tokens} minus {p} prefix) do not form a "
                       "square: pass grid=(H, W)")
        else:  # traced: the message must not depend on the symbolic N
            message = f"the N - {p} grid tokens (N minus the prefix) do not form a square: pass grid=(H, W)"
        _check_value(n_tokens > p, f"x has no grid tokens after its {p} prefix tokens")
        side = symbolic_isqrt(n_tokens - p, message, minimum=max(self.landmarks))
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
