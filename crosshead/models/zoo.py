"""Model entry points (timm-style signatures) and a registry that works without timm."""

from __future__ import annotations

from typing import Callable

import torch

from . import deit, ivit

_ENTRYPOINTS: dict[str, Callable] = {}
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_strict")


def _make(name: str, pretrained: bool, kwargs: dict):
    if pretrained:
        raise ValueError(f"{name}: no pretrained weights exist for crosshead models (pretrained=True)")
    for k in _TIMM_ONLY_KWARGS:
        kwargs.pop(k, None)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    builder = ivit.build if name in ivit.CONFIGS else deit.build
    model = builder(name, **kwargs)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


def _entry(fn: Callable) -> Callable:
    _ENTRYPOINTS[fn.__name__] = fn
    return fn


@_entry
def ivit_tiny(pretrained: bool = False, **kwargs):
    """iViT-tiny: dims 64/128/256/512, depths 2/2/6/2, heads 8/16 in stages 3/4."""
    return _make("ivit_tiny", pretrained, kwargs)


@_entry
def ivit_small(pretrained: bool = False, **kwargs):
    """iViT-small: dims 64/128/320/512, depths 3/4/12/3, heads 10/16 in stages 3/4."""
    return _make("ivit_small", pretrained, kwargs)


@_entry
def ivit_base(pretrained: bool = False, **kwargs):
    """iViT-base: dims 96/192/384/768, depths 3/4/18/3, heads 12/24 in stages 3/4."""
    return _make("ivit_base", pretrained, kwargs)


@_entry
def deit_imhsa_tiny(pretrained: bool = False, **kwargs):
    """DeiT-tiny layout (192 wide, 12 blocks, 3 heads, patch 16) with iMHSA in every block."""
    return _make("deit_imhsa_tiny", pretrained, kwargs)


@_entry
def deit_imhsa_small(pretrained: bool = False, **kwargs):
    """DeiT-small layout (384 wide, 12 blocks, 6 heads, patch 16) with iMHSA in every block."""
    return _make("deit_imhsa_small", pretrained, kwargs)


def list_models() -> list[str]:
    return sorted(_ENTRYPOINTS)


def create_model(name: str, pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """Builds a crosshead model by name; other names go to ``timm.create_model`` when timm is installed."""
    if name in _ENTRYPOINTS:
        return _ENTRYPOINTS[name](pretrained=pretrained, **kwargs)
    try:
        import timm
    except ImportError as e:
        raise ValueError(f"unknown model {name!r}: crosshead has {list_models()}, and timm (for other names) "
                         "is not installed") from e
    if kwargs.pop("attn", None) is not None:
        raise ValueError(f"attn= applies to crosshead models only, not timm's {name!r}")
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def register_with_timm() -> bool:
    """Registers every entry point with timm (if importable); returns whether it did."""
    try:
        from timm.models import register_model
    except ImportError:
        return False
    for fn in _ENTRYPOINTS.values():
        register_model(fn)
    return True
