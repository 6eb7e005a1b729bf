"""The attention of every iMHSA block, chosen by name: ``build_attention(attn, dim, num_heads, ...)``.

Own names (no extra dependency):

=====================  =====================================================================
``imhsa_post``         iMHSA, cross-head interaction on the softmax probabilities (default)
``imhsa_pre``          iMHSA, interaction on the logits
``imhsa_nointeraction`` iMHSA without w_q/w_k (plain two-hop landmark attention)
``softmax``            multi-head softmax attention through ``F.scaled_dot_product_attention``
=====================  =====================================================================

Aliases: ``imhsa`` = ``imhsa_post``, ``imhsa_noint`` / ``imhsa_none`` = ``imhsa_nointeraction``,
``sdpa`` = ``softmax``. Any other name is looked up in ``crosshead.baselines`` (imported lazily,
only then); ``baselines:NAME`` forces that look-up (e.g. ``baselines:softmax``). Every module
returned has ``forward(x, grid=None)`` with x (B, N, dim).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate
from ..nn import InteractiveMultiheadAttention

_IMHSA = {"imhsa_post": dict(mix="post", interaction=True),
          "imhsa_pre": dict(mix="pre", interaction=True),
          "imhsa_nointeraction": dict(mix="post", interaction=False)}
_ALIASES = {"imhsa": "imhsa_post", "imhsa_noint": "imhsa_nointeraction", "imhsa_none": "imhsa_nointeraction",
            "sdpa": "softmax"}
OWN_NAMES = (*_IMHSA, "softmax")


class GridInteractiveAttention(InteractiveMultiheadAttention):
    """InteractiveMultiheadAttention whose landmark grid shrinks to the token grid when that is smaller.

    ``landmarks=(7, 7)`` on a 4×4 grid pools to 4×4 (identity pooling) instead of failing; on any grid
    at least 7×7 it is the parent module exactly (same parameters, same ops), so L stays fixed as the
    resolution grows. Needed because iViT's stage 4 is 7×7 at 224² but smaller on small inputs.
    The landmark count is a static argument of the op, so a compiled graph or an exported program
    serves one side of that boundary (docs/models.md).
    """

    def _landmark_size(self, n_tokens: int, grid):
        if grid is not None:
            return min(self.landmarks[0], grid[0]), min(self.landmarks[1], grid[1])
        return min(self.landmarks, n_tokens - self.num_prefix_tokens)


class SoftmaxAttention(nn.Module):
    """Standard multi-head softmax attention (SDPA), with the same parameter layout as the iMHSA module."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 scale: float | None = None, **_unused):
        super().__init__()
        dim, num_heads = _validate.dim_and_heads("dim", dim, "num_heads", num_heads)
        self.num_heads, self.head_dim, self.scale = num_heads, dim // num_heads, _validate.scale("scale", scale)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}"

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


# modules FX symbolic tracing must keep whole (their forward branches on the input's shape): timm's
# tracer gets them through register_notrace_module; give them to any other tracer as leaf modules
FX_LEAF_MODULES = (InteractiveMultiheadAttention, GridInteractiveAttention, SoftmaxAttention)


def canonical(name: str) -> str:
    return _ALIASES.get(name, name)


def names() -> list[str]:
    """Own attention names plus the baselines registry's, when that package imports."""
    out = list(OWN_NAMES)
    try:
        from .. import baselines
    except ImportError:
        return out
    return out + [n for n in baselines.names() if n not in out]


def build_attention(attn: str, dim: int, num_heads: int, *, num_prefix_tokens: int = 0,
                    landmarks: tuple[int, int] | int = (7, 7), qkv_bias: bool = True,
                    attn_kwargs: dict | None = None) -> nn.Module:
    """One attention module by name (see the module docstring). ``attn_kwargs`` go to its constructor."""
    name = canonical(attn)
    options = dict(attn_kwargs or {})
    forced = name.startswith("baselines:")
    if forced:
        name = name[len("baselines:"):]
    elif name in _IMHSA:
        cfg = {**_IMHSA[name], **options}
        return GridInteractiveAttention(dim, num_heads, landmarks=landmarks, qkv_bias=qkv_bias,
                                        num_prefix_tokens=num_prefix_tokens, **cfg)
    if name == "softmax" and not forced:
        return SoftmaxAttention(dim, num_heads, qkv_bias=qkv_bias, **options)
    try:
        from .. import baselines
    except ImportError as e:
        raise ValueError(f"unknown attention {attn!r}: own names are {list(OWN_NAMES)}, and the baselines "
                         f"registry (crosshead.baselines) could not be imported: {e}") from e
    if name not in baselines.names():
        raise ValueError(f"unknown attention {attn!r}: own names are {list(OWN_NAMES)}; "
                         f"crosshead.baselines has {sorted(baselines.names())}")
    reason = baselines.available().get(name)
    if reason is not None:
        raise RuntimeError(f"attention {attn!r} from crosshead.baselines is unavailable here: {reason}")
    return baselines.create(name, dim, num_heads, num_prefix_tokens=num_prefix_tokens, **options)


def imhsa_flops(q_shape, k_shape, v_shape, q_land_shape, k_land_shape, w_q_shape=None, w_k_shape=None,
                *args, out_shape=None, **kwargs) -> int:
    """FLOPs (2·MACs) of one ``torch.ops.crosshead.imhsa`` call, by imhsa.md's cost section.

    Scores 2·N·L·d MACs per head, value products 2·N·L·d, head mixing N·L·h per side when present.
    Softmax, pooling and exp are not counted (FlopCounterMode counts no elementwise work either).
    """
    B, h, N, d = q_shape
    L = q_land_shape[2]
    macs = B * h * (2 * N * L * d + 2 * N * L * d)
    macs += sum(B * h * N * L * h for w in (w_q_shape, w_k_shape) if w is not None)
    return 2 * macs


def sdpa_flops(B: int, h: int, N: int, d: int) -> int:
    return 4 * B * h * N * N * d
