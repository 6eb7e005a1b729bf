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
from .blocks import AttentionBlock, ClassifierHead, ConvBlock, FeatureInfo, LayerNorm2d, init_weights

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

CONFIGS = {
    "ivit_tiny": dict(dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(8, 16), drop_path_rate=0.1),
    "ivit_small": dict(dims=(64, 128, 320, 512), depths=(3, 4, 12, 3), num_heads=(10, 16), drop_path_rate=0.2),
    "ivit_base": dict(dims=(96, 192, 384, 768), depths=(3, 4, 18, 3), num_heads=(12, 24), drop_path_rate=0.3),
}


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
        self.downsample = Downsample(dim_in, dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(ConvBlock(dim, mlp_ratio, dp) for dp in drop_paths[:depth])

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            x = blk(x)
        return x


class AttentionStage(nn.Module):
    def __init__(self, dim_in, dim, depth, heads, drop_paths, mlp_ratio, attn, landmarks, attn_kwargs):
        super().__init__()
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
            t = blk(t, (H, W))
        return self.norm(t.transpose(1, 2).reshape(B, C, H, W))


class IViT(ClassifierHead, nn.Module):
    """Hierarchical iMHSA vision transformer (4 stages, strides 4/8/16/32).

    Args:
        dims, depths: width and block count of the 4 stages.
        num_heads: heads of stages 3 and 4.
        attn: attention of every transformer block (see :mod:`crosshead.models.attention`).
        landmarks: landmark grid of every iMHSA block. Default: (7, 7).
        num_classes: classifier outputs; 0 for no classifier (``forward`` returns pooled features).
        in_chans, mlp_ratio, drop_rate (before the classifier), drop_path_rate (linear over blocks).
        attn_kwargs: extra constructor arguments of the attention modules.
    """

    def __init__(self, dims: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (8, 16), *, attn: str = "imhsa_post", landmarks=(7, 7),
                 num_classes: int = 1000, in_chans: int = 3, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, attn_kwargs: dict | None = None, global_pool: str = "avg"):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        dims = _validate.int_sequence("dims", dims, 4, minimum=2)  # the stem's first conv has dims[0] // 2
        depths = _validate.int_sequence("depths", depths, 4, minimum=0)
        num_heads = _validate.int_sequence("num_heads", num_heads, 2)
        for i, (dim, heads) in enumerate(zip(dims[2:], num_heads)):
            if dim % heads:
                raise ValueError(f"dims[{i + 2}]={dim} must be divisible by num_heads[{i}]={heads}")
        num_classes, in_chans, landmarks, mlp_ratio, drop_rate, drop_path_rate = _validate.model_head_args(
            num_classes, in_chans, landmarks, mlp_ratio, drop_rate, drop_path_rate)
        self.dims, self.depths, self.attn_name = tuple(dims), tuple(depths), attn
        self.num_classes, self.num_features, self.global_pool = num_classes, dims[-1], global_pool
        self.head_hidden_size = dims[-1]
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
        self.feature_info = FeatureInfo(dict(num_chs=dims[i], reduction=2 ** (i + 2), module=f"stages.{i}")
                                        for i in range(4))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self)

    # timm-style API --------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Names to exclude from weight decay besides 1-D parameters: the (h, h) cross-head maps."""
        return {n for n, _ in self.named_parameters() if n.endswith((".w_q", ".w_k"))}

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"iViT needs input sides divisible by 32, got {tuple(x.shape[-2:])}")

    def forward_pyramid(self, x: Tensor) -> list[Tensor]:
        """The 4 stage outputs (B, C_i, H/2^(i+2), W/2^(i+2)), strides 4, 8, 16, 32."""
        self._check_input(x)
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: Tensor) -> Tensor:
        """Last stage map (B, C4, H/32, W/32) (unpooled, like timm's convolutional backbones)."""
        return self.forward_pyramid(x)[-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class FeaturePyramid(nn.Module):
    """``features_only`` wrapper: ``forward(x)`` → list of stage maps for ``out_indices``.

    Default out_indices (1, 2, 3): strides 8, 16, 32, the inputs of an FPN-style detection or
    segmentation head. ``feature_info.channels()`` / ``.reduction()`` describe them.
    """

    def __init__(self, model: IViT, out_indices: Sequence[int] = (1, 2, 3)):
        super().__init__()
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise ValueError(f"out_indices must be a non-empty subset of 0..3, got {out_indices}")
        last = max(out_indices)
        self.out_indices = out_indices
        self.stem = model.stem
        self.stages = nn.ModuleList(model.stages[: last + 1])
        self.feature_info = FeatureInfo(model.feature_info[i] for i in out_indices)
        self.pretrained_cfg = getattr(model, "pretrained_cfg", None)

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"iViT needs input sides divisible by 32, got {tuple(x.shape[-2:])}")
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return outs


def build(name: str, *, features_only: bool = False, out_indices: Sequence[int] = (1, 2, 3), **kwargs):
    cfg = {**CONFIGS[name], **kwargs}
    model = IViT(**cfg)
    model.pretrained_cfg = model.default_cfg = dict(
        architecture=name, input_size=(cfg.get("in_chans", 3), 224, 224), min_input_size=(cfg.get("in_chans", 3), 32, 32),
        num_classes=model.num_classes, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic",
        crop_pct=0.9, first_conv="stem.0", classifier="head", fixed_input_size=False)
    if features_only:
        return FeaturePyramid(model, out_indices)
    return model
