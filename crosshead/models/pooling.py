"""Global pooling before the classifier, by timm's names, and the classifier API built on it.

=============  =================================================  =================  ============
global_pool    pools                                              width              models
=============  =================================================  =================  ============
``avg``        mean over positions (patch tokens for a ViT)       C                  both
``max``        max over positions                                 C                  both
``avgmax``     (mean + max) / 2                                   C                  both
``catavgmax``  [mean, max] concatenated                           2C                 iViT
``token``      the CLS token                                      C                  DeiT
``''``         nothing: the classifier is applied per position     C per position     both
=============  =================================================  =================  ============

With ``''``, iViT returns (B, num_classes, H, W) (or the map itself without a classifier) and DeiT
returns (B, N, num_classes) over all tokens, CLS included, as timm's VisionTransformer does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _validate
from .blocks import init_weights

MAP_POOLS = ("avg", "max", "avgmax", "catavgmax", "")
TOKEN_POOLS = ("token", "avg", "max", "avgmax", "")
_NOT_OFFERED = {"map": "attention pooling ('map', a learned-query attention head) is not implemented here",
                "fast": "'fast' pooling is a timm speed variant of 'avg'; use 'avg'"}


def check(global_pool, allowed: tuple[str, ...], model: str) -> str:
    if global_pool in allowed:
        return global_pool
    why = _NOT_OFFERED.get(global_pool) if isinstance(global_pool, str) else None
    if global_pool == "catavgmax" and "token" in allowed:
        why = "a plain ViT's classifier takes one C-wide vector; use 'avgmax'"
    raise ValueError(f"{model}: global_pool must be one of {list(allowed)}, got {global_pool!r}"
                     + (f" ({why})" if why else ""))


def width(global_pool: str, channels: int) -> int:
    """Width of the pooled features (the classifier's input, ``head_hidden_size``)."""
    return 2 * channels if global_pool == "catavgmax" else channels


def pool_map(x: Tensor, global_pool: str) -> Tensor:
    """(B, C, H, W) → (B, width) by ``global_pool``; ``''`` returns the map unchanged."""
    if global_pool == "":
        return x
    if global_pool == "avg":
        return x.mean((2, 3))
    peak = x.amax((2, 3))
    if global_pool == "max":
        return peak
    mean = x.mean((2, 3))
    return 0.5 * (mean + peak) if global_pool == "avgmax" else torch.cat([mean, peak], dim=1)


def pool_tokens(x: Tensor, global_pool: str, num_prefix_tokens: int) -> Tensor:
    """(B, N, C) → (B, C) by ``global_pool`` (avg/max over the patch tokens); ``''`` returns x unchanged."""
    if global_pool == "":
        return x
    if global_pool == "token":
        return x[:, 0]
    patches = x[:, num_prefix_tokens:]
    if global_pool == "avg":
        return patches.mean(1)
    if global_pool == "max":
        return patches.amax(1)
    return 0.5 * (patches.mean(1) + patches.amax(1))


class ClassifierHead:
    """timm's classifier API (``get_classifier``, ``reset_classifier``) for a model whose classifier is
    ``self.head`` on pooled features; the model sets ``_global_pools`` (allowed names)."""

    _global_pools: tuple[str, ...] = ()

    def _set_classifier(self, num_classes: int, global_pool: str) -> None:
        self.global_pool = check(global_pool, self._global_pools, type(self).__name__)
        self.num_classes = num_classes
        self.head_hidden_size = width(self.global_pool, self.num_features)
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier for ``num_classes`` (0: none), optionally with a new ``global_pool``. The
        same checks as the constructor; the new head is freshly initialised (truncated normal, std 0.02)."""
        num_classes = _validate.non_negative_int("num_classes", num_classes)
        self._set_classifier(num_classes, self.global_pool if global_pool is None else global_pool)
        p = next(iter(self.parameters()), None)
        if p is not None:
            self.head.to(device=p.device, dtype=p.dtype)
        init_weights(self.head)
