"""Building blocks shared by iViT and the DeiT-style iMHSA ViTs (pure torch, no timm needed)."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils.checkpoint import checkpoint

from .attention import build_attention


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zeroes whole samples with probability p, scales the rest by 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


def check_sides(x: Tensor, multiple: int, what: str) -> None:
    """Refuses an input whose height or width is not a multiple of ``multiple``."""
    if x.shape[-1] % multiple or x.shape[-2] % multiple:
        raise ValueError(f"{what} needs input sides divisible by {multiple}, got {tuple(x.shape[-2:])}")


def run_block(block: nn.Module, checkpointed: bool, *args) -> Tensor:
    """``block(*args)``, recomputed in the backward instead of stored when ``checkpointed`` (activation
    checkpointing; the RNG state is restored, so stochastic depth draws the same masks)."""
    if checkpointed and not is_fx_symbolic_tracing():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


# FX symbolic tracing (timm's feature extraction, torchvision's create_feature_extractor) records these
# as single calls instead of tracing into their shape-dependent branches
torch.fx.wrap("drop_path")


class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvBlock(nn.Module):
    """ConvNeXt block: depthwise 7×7 → LayerNorm → MLP (×mlp_ratio) → layer scale, residual."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, ls_init: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma = nn.Parameter(torch.full((dim,), ls_init))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        y = self.mlp(self.norm(self.dwconv(x).permute(0, 2, 3, 1))) * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block on tokens (B, N, C) whose attention is chosen by name.

    ``cpe=True`` adds a conditional positional encoding first (depthwise 3×3 conv on the token grid,
    residual), so the block needs no fixed-size position table and works at any resolution.
    """

    def __init__(self, dim: int, num_heads: int, *, attn: str = "imhsa_post", mlp_ratio: float = 4.0,
                 landmarks=(7, 7), num_prefix_tokens: int = 0, qkv_bias: bool = True, drop_path: float = 0.0,
                 ls_init: float | None = None, cpe: bool = False, attn_kwargs: dict | None = None):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if cpe else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = build_attention(attn, dim, num_heads, num_prefix_tokens=num_prefix_tokens,
                                    landmarks=landmarks, qkv_bias=qkv_bias, attn_kwargs=attn_kwargs)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if ls_init is None:
            self.gamma1 = self.gamma2 = None
        else:
            self.gamma1 = nn.Parameter(torch.full((dim,), ls_init))
            self.gamma2 = nn.Parameter(torch.full((dim,), ls_init))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        if self.cpe is not None:
            p = self.num_prefix_tokens
            B, N, C = x.shape
            g = x[:, p:].transpose(1, 2).reshape(B, C, grid[0], grid[1])
            x = torch.cat([x[:, :p], x[:, p:] + self.cpe(g).flatten(2).transpose(1, 2)], dim=1)
        y = self.attn(self.norm1(x), grid)
        x = x + self.drop_path(y if self.gamma1 is None else y * self.gamma1)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma2 is None else y * self.gamma2)


def init_weights(module: nn.Module) -> None:
    """Truncated-normal Linear/Conv weights (std 0.02), zero biases; LayerNorm to (1, 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
