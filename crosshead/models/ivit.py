"""iViT: a hierarchical vision transformer with iMHSA in its deeper stages.

The paper (arXiv 2402.17507) says only that iViT is hierarchical and uses iMHSA "in deeper stages";
its stage layout, widths, depths, heads and landmark counts are not public (see
shared/research/paper_imhsa.md §2). This is OUR configuration, in that spirit:

* convolutional stem (two 3×3 stride-2 convs) → stride 4;
* stages 1–2: ConvNeXt blocks (strides 4, 8);
* stages 3–4: pre-norm transformer blocks with iMHSA (strides 16, 32), each with a depthwise-conv
  positional encoding, so no position table ties the model to one resolution;
* a 3×3 stride-2 conv + LayerNorm between stages;
* landmarks (7, 7) in stages 3 and 4: L = 49 whatever the input, so iMHSA's cost is linear in the
  number of tokens. When a stage's grid is smaller than 7×7 (inputs under 224 in stage 4, under 112
  in stage 3) the landmark grid shrinks to the token grid.

Input sides must be divisible by 32. See docs/models.md for parameter counts and FLOPs.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .. import _validate
from . import pooling
from .blocks import AttentionBlock, ConvBlock, LayerNorm2d, check_sides, init_weights, run_block
from .features import FeaturesOnly, check_output_fmt, take_indices

CONFIGS = {
    "ivit_tiny": dict(dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(8, 16), drop_path_rate=0.1),
    "ivit_small": dict(dims=(64, 128, 320, 512), depths=(3, 4, 12, 3), num_heads=(10, 16), drop_path_rate=0.2),
    "ivit_base": dict(dims=(96, 192, 384, 768), depths=(3, 4, 18, 3), num_heads=(12, 24), drop_path_rate=0.3),
}
DEFAULT_OUT_INDICES = (1, 2, 3)  # features_only: strides 8, 16, 32
STRIDE = 32

torch.fx.wrap("check_sides")


class Stem(nn.Sequential):
    def __init__(self, in_chans: int, dim: int):
        super().__init__(nn.Conv2d(in_chans, dim // 2, 3, 2, 1), LayerNorm2d(dim // 2, eps=1e-6), nn.GELU(),
                         nn.Conv2d(dim // 2, dim, 3, 2, 1), LayerNorm2d(dim, eps=1e-6))


class Downsample(nn.Sequential):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__(nn.Conv2d(dim_in, dim_out, 3, 2, 1), LayerNorm2d(dim_out, eps=1e-6))


class ConvStage(nn.Module):
    def __init__(self, dim_in, dim, depth, drop_paths, downsample: bool, mlp_ratio: float):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(dim_in, dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(ConvBlock(dim, mlp_ratio, dp) for dp in drop_paths[:depth])

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            x = run_block(blk, self.grad_checkpointing, x)
        return x


class AttentionStage(nn.Module):
    def __init__(self, dim_in, dim, depth, heads, drop_paths, mlp_ratio, attn, landmarks, attn_kwargs):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(dim_in, dim)
        self.blocks = nn.ModuleList(
            AttentionBlock(dim, heads, attn=attn, mlp_ratio=mlp_ratio, landmarks=landmarks, drop_path=dp,
                           ls_init=1e-5, cpe=True, attn_kwargs=attn_kwargs) for dp in drop_paths[:depth])
        self.norm = LayerNorm2d(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            t = run_block(blk, self.grad_checkpointing, t, (H, W))
        return self.norm(t.transpose(1, 2).reshape(B, C, H, W))


class IViT(pooling.ClassifierHead, nn.Module):
    """Hierarchical iMHSA vision transformer (4 stages, strides 4/8/16/32).

    Args:
        dims, depths: width and block count of the 4 stages.
        num_heads: heads of stages 3 and 4.
        attn: attention of every transformer block (see :mod:`crosshead.models.attention`).
        landmarks: landmark grid of every iMHSA block. Default: (7, 7).
        num_classes: classifier outputs; 0 for no classifier (``forward`` returns pooled features).
        global_pool: ``avg`` (default), ``max``, ``avgmax``, ``catavgmax`` or ``''`` (no pooling; the
            classifier, if any, applies per position), see :mod:`crosshead.models.pooling`.
        in_chans, mlp_ratio, drop_rate (before the classifier), drop_path_rate (linear over blocks).
        attn_kwargs: extra constructor arguments of the attention modules.
    """

    _global_pools = pooling.MAP_POOLS

    def __init__(self, dims: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (8, 16), *, attn: str = "imhsa_post", landmarks=(7, 7),
                 num_classes: int = 1000, in_chans: int = 3, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, attn_kwargs: dict | None = None, global_pool: str = "avg"):
        super().__init__()
        pooling.check(global_pool, self._global_pools, type(self).__name__)
        dims = _validate.int_sequence("dims", dims, 4, minimum=2)  # the stem's first conv has dims[0] // 2
        depths = _validate.int_sequence("depths", depths, 4, minimum=0)
        num_heads = _validate.int_sequence("num_heads", num_heads, 2)
        for i, (dim, heads) in enumerate(zip(dims[2:], num_heads)):
            if dim % heads:
                raise ValueError(f"dims[{i + 2}]={dim} must be divisible by num_heads[{i}]={heads}")
        num_classes, in_chans, landmarks, mlp_ratio, drop_rate, drop_path_rate = _validate.model_head_args(
            num_classes, in_chans, landmarks, mlp_ratio, drop_rate, drop_path_rate)
        self.dims, self.depths, self.attn_name = tuple(dims), tuple(depths), attn
        self.num_features = dims[-1]
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(4)]
        self.stem = Stem(in_chans, dims[0])
        self.stages = nn.ModuleList([
            ConvStage(dims[0], dims[0], depths[0], dpr[starts[0]:], False, mlp_ratio),
            ConvStage(dims[0], dims[1], depths[1], dpr[starts[1]:], True, mlp_ratio),
            AttentionStage(dims[1], dims[2], depths[2], num_heads[0], dpr[starts[2]:], mlp_ratio, attn,
                           landmarks, attn_kwargs),
            AttentionStage(dims[2], dims[3], depths[3], num_heads[1], dpr[starts[3]:], mlp_ratio, attn,
                           landmarks, attn_kwargs),
        ])
        self.feature_info = [dict(num_chs=dims[i], reduction=2 ** (i + 2), module=f"stages.{i}") for i in range(4)]
        self.head_drop = nn.Dropout(drop_rate)
        self._set_classifier(num_classes, global_pool)
        init_weights(self)

    # timm-style API --------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Names to exclude from weight decay besides 1-D parameters: the (h, h) cross-head maps."""
        return {n for n, _ in self.named_parameters() if n.endswith((".w_q", ".w_k"))}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise lr decay (timm's ``param_groups_layer_decay``): the stem, then
        each block with its stage's downsampling before the first block and its norm after the last."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)),
            (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^stages\.(\d+)\.norm", (99999,)),
        ])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in the backward instead of storing its activations."""
        for stage in self.stages:
            stage.grad_checkpointing = bool(enable)

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage outputs (timm's API). ``indices``: None for all 4 stages, n for the last n, or the stages
        (negative from the end). ``output_fmt``: NCHW or NHWC. Returns ``(last map, stage maps)``, or the
        stage maps alone with ``intermediates_only``; ``stop_early`` runs no stage after the last one taken.
        ``norm`` is accepted and changes nothing: every attention stage already ends in its norm."""
        check_output_fmt(output_fmt, ("NCHW", "NHWC"))
        taken, last = take_indices(len(self.stages), indices)
        check_sides(x, STRIDE, "iViT")
        x = self.stem(x)
        intermediates = []
        stages = self.stages[:last + 1] if stop_early or intermediates_only else self.stages
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in taken:
                intermediates.append(x if output_fmt == "NCHW" else x.permute(0, 2, 3, 1))
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drops the stages after the last of ``indices`` (and the classifier, with ``prune_head``);
        returns the absolute indices. ``prune_norm`` changes nothing (no final norm)."""
        taken, last = take_indices(len(self.stages), indices)
        self.stages = self.stages[:last + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return taken

    def forward_pyramid(self, x: Tensor) -> list[Tensor]:
        """The 4 stage outputs (B, C_i, H/2^(i+2), W/2^(i+2)), strides 4, 8, 16, 32."""
        return self.forward_intermediates(x, intermediates_only=True)

    def forward_features(self, x: Tensor) -> Tensor:
        """Last stage map (B, C4, H/32, W/32) (unpooled, like timm's convolutional backbones)."""
        check_sides(x, STRIDE, "iViT")
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(pooling.pool_map(x, self.global_pool))
        if pre_logits:
            return x
        if self.global_pool == "" and self.num_classes > 0:  # the classifier per position
            return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class FeaturePyramid(FeaturesOnly, IViT):
    """iViT's ``features_only`` form: ``forward(x)`` → the stage maps of ``out_indices`` (default (1, 2, 3):
    strides 8, 16, 32, the inputs of an FPN-style head). ``feature_info`` describes them (timm's
    FeatureInfo). Same parameter names as the classifier, without the stages after the last index and
    without the head."""

    def __init__(self, *args, out_indices=DEFAULT_OUT_INDICES, output_fmt: str = "NCHW", norm: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        check_output_fmt(output_fmt, ("NCHW", "NHWC"))
        self._become_features(out_indices, output_fmt=output_fmt, norm=norm)


def build(name: str, *, features: dict | None = None, **kwargs) -> IViT:
    """``features``: None for the classifier, else the features_only arguments (out_indices, output_fmt, norm)."""
    cfg = {**CONFIGS[name], **kwargs}
    return IViT(**cfg) if features is None else FeaturePyramid(**cfg, **features)
