"""DeiT-style plain ViTs with iMHSA in every block, sized like timm's DeiT (tiny, small).

Same layout and parameter names as timm's ``VisionTransformer`` (patch_embed.proj, cls_token,
pos_embed, blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head), so the
parameter count differs from ``deit_tiny_patch16_224`` only by the interaction maps w_q, w_k
(2·h² per block). The CLS token is a prefix token: it is kept out of landmark pooling but attends
and is attended to. The 14×14 position table is resized bicubically for other resolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import _validate
from .blocks import AttentionBlock, ClassifierHead, init_weights

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

CONFIGS = {
    "deit_imhsa_tiny": dict(embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.1),
    "deit_imhsa_small": dict(embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1),
}


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class DeiTIMHSA(ClassifierHead, nn.Module):
    """Plain ViT with a CLS token; every block's attention chosen by ``attn`` (default iMHSA post)."""

    def __init__(self, embed_dim: int = 192, depth: int = 12, num_heads: int = 3, *, attn: str = "imhsa_post",
                 landmarks=(7, 7), patch_size: int = 16, img_size: int = 224, num_classes: int = 1000,
                 in_chans: int = 3, mlp_ratio: float = 4.0, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 attn_kwargs: dict | None = None, global_pool: str = "token"):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        embed_dim, num_heads = _validate.dim_and_heads("embed_dim", embed_dim, "num_heads", num_heads)
        depth = _validate.positive_int("depth", depth)
        patch_size = _validate.positive_int("patch_size", patch_size)
        img_size = _validate.positive_int("img_size", img_size)
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size} (the position "
                             "table covers the img_size / patch_size grid)")
        num_classes, in_chans, landmarks, mlp_ratio, drop_rate, drop_path_rate = _validate.model_head_args(
            num_classes, in_chans, landmarks, mlp_ratio, drop_rate, drop_path_rate)
        self.num_classes, self.num_features, self.head_hidden_size = num_classes, embed_dim, embed_dim
        self.global_pool, self.num_prefix_tokens, self.attn_name = global_pool, 1, attn
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.base_grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.base_grid ** 2, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            AttentionBlock(embed_dim, num_heads, attn=attn, mlp_ratio=mlp_ratio, landmarks=landmarks,
                           num_prefix_tokens=1, drop_path=dpr[i], attn_kwargs=attn_kwargs) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"} | {n for n, _ in self.named_parameters() if n.endswith((".w_q", ".w_k"))}

    def _pos_embed(self, grid: tuple[int, int]) -> Tensor:
        # statically_known_true: a symbolic grid (torch.compile with dynamic shapes, torch.export) takes
        # the resize path, which at the base grid is the identity (bicubic at scale 1 samples the table
        # exactly), instead of guarding on the grid being 14 x 14, which would specialise the graph
        if statically_known_true(grid[0] == self.base_grid) and statically_known_true(grid[1] == self.base_grid):
            return self.pos_embed
        cls, pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        C = pos.shape[-1]
        pos = pos.reshape(1, self.base_grid, self.base_grid, C).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([cls, pos.flatten(2).transpose(1, 2)], dim=1)

    def forward_features(self, x: Tensor) -> Tensor:
        """Tokens after the final norm, (B, 1 + H/16·W/16, embed_dim), CLS first."""
        p = self.patch_embed.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"input sides must be divisible by the patch size {p}, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self._pos_embed(grid)
        for blk in self.blocks:
            x = blk(x, grid)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def build(name: str, *, features_only: bool = False, **kwargs):
    if features_only:
        raise ValueError(f"{name} is a plain (single-stride 16) ViT: features_only pyramids are offered by "
                         "the hierarchical ivit_* models only")
    cfg = {**CONFIGS[name], **kwargs}
    model = DeiTIMHSA(**cfg)
    c = cfg.get("in_chans", 3)
    model.pretrained_cfg = model.default_cfg = dict(
        architecture=name, input_size=(c, 224, 224), num_classes=model.num_classes, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, interpolation="bicubic", crop_pct=0.875, first_conv="patch_embed.proj",
        classifier="head", fixed_input_size=False)
    return model
