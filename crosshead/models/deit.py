"""DeiT-style plain ViTs with iMHSA in every block, sized like timm's DeiT (tiny, small).

Same layout and parameter names as timm's ``VisionTransformer`` (patch_embed.proj, cls_token,
pos_embed, blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head), so the
parameter count differs from ``deit_tiny_patch16_224`` only by the interaction maps w_q, w_k
(2·h² per block). The CLS token is a prefix token: it is kept out of landmark pooling but attends
and is attended to. The 14×14 position table is resized bicubically for other resolutions.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import _validate
from . import pooling
from .blocks import AttentionBlock, check_sides, init_weights, run_block
from .features import FeaturesOnly, check_output_fmt, take_indices

CONFIGS = {
    "deit_imhsa_tiny": dict(embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.1),
    "deit_imhsa_small": dict(embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1),
}
DEFAULT_OUT_INDICES = 3  # features_only: the last 3 blocks, as timm's ViTs


def resize_pos_embed(pos_embed: Tensor, grid: tuple[int, int], base_grid: int) -> Tensor:
    """The (1, 1 + base_grid², C) table (CLS first) for a token grid ``grid``: the patch part resized
    bicubically, the table itself at the base grid."""
    # statically_known_true: a symbolic grid (torch.compile with dynamic shapes, torch.export) takes
    # the resize path, which at the base grid is the identity (bicubic at scale 1 samples the table
    # exactly), instead of guarding on the grid being 14 x 14, which would specialise the graph
    if statically_known_true(grid[0] == base_grid) and statically_known_true(grid[1] == base_grid):
        return pos_embed
    cls, pos = pos_embed[:, :1], pos_embed[:, 1:]
    C = pos.shape[-1]
    pos = pos.reshape(1, base_grid, base_grid, C).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([cls, pos.flatten(2).transpose(1, 2)], dim=1)


# FX symbolic tracing records these as single calls (their branches depend on the input's size)
torch.fx.wrap("check_sides")
torch.fx.wrap("resize_pos_embed")


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class ConvStem(nn.Module):
    """Early convolutions (Xiao et al. 2021, arXiv 2106.14881) in place of the patch projection.

    A 3×3 conv–BN–ReLU at full resolution (dim / 4 channels, at least 8); then, for every halving
    but the last, a stride-2 3×3 conv–BN–ReLU that doubles the channels and a stride-1 one; then
    ``proj``, a 3×3 stride-2 conv to ``dim``. Same token grid as a patch of ``patch_size`` (a power
    of 2, at least 2), with overlapping receptive fields (13 pixels at patch 4)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        halvings = patch_size.bit_length() - 1
        if patch_size < 2 or patch_size != 1 << halvings:
            raise ValueError(f"stem='conv' needs patch_size a power of 2, at least 2, got {patch_size}")
        self.patch_size = patch_size
        ch = max(dim // 4, 8)

        def cbr(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        layers = cbr(in_chans, ch, 1)
        for _ in range(halvings - 1):
            layers += cbr(ch, 2 * ch, 2) + cbr(2 * ch, 2 * ch, 1)
            ch *= 2
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(ch, dim, 3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.stem(x))


STEMS = {"patch": PatchEmbed, "conv": ConvStem}


class DeiTIMHSA(pooling.ClassifierHead, nn.Module):
    """Plain ViT with a CLS token; every block's attention chosen by ``attn`` (default iMHSA post).

    ``global_pool``: ``token`` (default), ``avg``, ``max``, ``avgmax`` or ``''`` (the classifier on
    every token), see :mod:`crosshead.models.pooling`.
    ``stem``: ``patch`` (default: timm's linear patch projection) or ``conv`` (:class:`ConvStem`, early
    convolutions, for small data sets). ``cpe``: add a conditional positional encoding to every block
    (a depthwise 3×3 conv on the token grid, as iViT's blocks), on top of the position table.
    """

    _global_pools = pooling.TOKEN_POOLS

    def __init__(self, embed_dim: int = 192, depth: int = 12, num_heads: int = 3, *, attn: str = "imhsa_post",
                 landmarks=(7, 7), patch_size: int = 16, img_size: int = 224, num_classes: int = 1000,
                 in_chans: int = 3, mlp_ratio: float = 4.0, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 attn_kwargs: dict | None = None, global_pool: str = "token", stem: str = "patch",
                 cpe: bool = False):
        super().__init__()
        pooling.check(global_pool, self._global_pools, type(self).__name__)
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {sorted(STEMS)}, got {stem!r}")
        if not isinstance(cpe, bool):
            raise ValueError(f"cpe must be a bool, got {cpe!r}")
        embed_dim, num_heads = _validate.dim_and_heads("embed_dim", embed_dim, "num_heads", num_heads)
        depth = _validate.positive_int("depth", depth)
        patch_size = _validate.positive_int("patch_size", patch_size)
        img_size = _validate.positive_int("img_size", img_size)
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size} (the position "
                             "table covers the img_size / patch_size grid)")
        num_classes, in_chans, landmarks, mlp_ratio, drop_rate, drop_path_rate = _validate.model_head_args(
            num_classes, in_chans, landmarks, mlp_ratio, drop_rate, drop_path_rate)
        self.num_features, self.num_prefix_tokens, self.attn_name = embed_dim, 1, attn
        self.grad_checkpointing = False
        self.patch_embed = STEMS[stem](patch_size, in_chans, embed_dim)
        self.base_grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.base_grid ** 2, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            AttentionBlock(embed_dim, num_heads, attn=attn, mlp_ratio=mlp_ratio, landmarks=landmarks,
                           num_prefix_tokens=1, drop_path=dpr[i], cpe=cpe, attn_kwargs=attn_kwargs)
            for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self.head_drop = nn.Dropout(drop_rate)
        self._set_classifier(num_classes, global_pool)
        init_weights(self)
        # the conv stem's and the CPE's convolutions keep PyTorch's default (Kaiming-uniform) init: at
        # ViT's std 0.02 a 3×3 depthwise CPE starts silent, and a small model trained from scratch on
        # Pathfinder then stays at chance for thousands of steps (docs/quality.md)
        for m in [*([] if stem == "patch" else self.patch_embed.modules()), *(b.cpe for b in self.blocks if cpe)]:
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    # timm-style API --------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"} | {n for n, _ in self.named_parameters() if n.endswith((".w_q", ".w_k"))}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise lr decay: the embeddings, each block, the final norm last."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in the backward instead of storing its activations."""
        self.grad_checkpointing = bool(enable)

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        p = self.patch_embed.patch_size
        check_sides(x, p, f"DeiT-iMHSA with patch size {p}")
        x = self.patch_embed(x)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + resize_pos_embed(self.pos_embed, grid, self.base_grid), grid

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Block outputs (timm's ViT API). ``indices``: None for all blocks, n for the last n, or the blocks
        (negative from the end). Each is the patch tokens, through the final norm if ``norm``, as
        (B, C, H/p, W/p) (``NCHW``) or (B, N, C) (``NLC``); with ``return_prefix_tokens``, a pair (tokens,
        CLS token). Returns ``(forward_features output, intermediates)``, or the intermediates alone with
        ``intermediates_only``; ``stop_early`` runs no block after the last one taken."""
        check_output_fmt(output_fmt, ("NCHW", "NLC"))
        taken, last = take_indices(len(self.blocks), indices)
        x, grid = self._embed(x)
        B = x.shape[0]
        intermediates = []
        blocks = self.blocks[:last + 1] if stop_early or intermediates_only else self.blocks
        for i, blk in enumerate(blocks):
            x = run_block(blk, self.grad_checkpointing, x, grid)
            if i in taken:
                intermediates.append(self.norm(x) if norm else x)
        p = self.num_prefix_tokens
        prefix = [y[:, :p] for y in intermediates]
        intermediates = [y[:, p:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(B, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drops the blocks after the last of ``indices``, the final norm with ``prune_norm`` and the
        classifier with ``prune_head``; returns the absolute indices."""
        taken, last = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return taken

    def forward_features(self, x: Tensor) -> Tensor:
        """Tokens after the final norm, (B, 1 + H/16·W/16, embed_dim), CLS first."""
        x, grid = self._embed(x)
        for blk in self.blocks:
            x = run_block(blk, self.grad_checkpointing, x, grid)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(pooling.pool_tokens(x, self.global_pool, self.num_prefix_tokens))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class DeiTFeatures(FeaturesOnly, DeiTIMHSA):
    """DeiT-iMHSA's ``features_only`` form: ``forward(x)`` → the patch tokens of the blocks in
    ``out_indices`` (default: the last 3) as stride-16 maps (B, C, H/16, W/16) (``output_fmt='NLC'``:
    (B, N, C)); with ``norm``, through the final norm. Same parameter names as the classifier."""

    def __init__(self, *args, out_indices=DEFAULT_OUT_INDICES, output_fmt: str = "NCHW", norm: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        check_output_fmt(output_fmt, ("NCHW", "NLC"))
        self._become_features(out_indices, output_fmt=output_fmt, norm=norm)


def build(name: str, *, features: dict | None = None, **kwargs) -> DeiTIMHSA:
    """``features``: None for the classifier, else the features_only arguments (out_indices, output_fmt, norm)."""
    cfg = {**CONFIGS[name], **kwargs}
    return DeiTIMHSA(**cfg) if features is None else DeiTFeatures(**cfg, **features)
