"""Model entry points (timm-style signatures) and a registry that works without timm."""

from __future__ import annotations

from typing import Callable

import torch

from . import cfgs, deit, ivit
from .attention import FX_LEAF_MODULES
from .features import features_kwargs

_ENTRYPOINTS: dict[str, Callable] = {}
default_cfgs = cfgs.DEFAULT_CFGS  # timm's register_model reads the entry points' module's default_cfgs
_FEATURE_ARGS = ("out_indices", "feature_cls", "feature_cfg", "output_fmt")


def _make(name: str, pretrained: bool, kwargs: dict):
    """One model from timm-style arguments; ``pretrained_cfg`` / ``pretrained_cfg_overlay`` are applied
    (a model's configuration also records its num_classes and input channels), and the configuration's
    num_classes and channels are the defaults of the model's, as in timm."""
    cfg = cfgs.resolve(name, kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None))
    if pretrained:
        cfgs.refuse_pretrained(name, cfg)
    for k in ("cache_dir", "pretrained_strict"):
        kwargs.pop(k, None)
    family = ivit if name in ivit.CONFIGS else deit
    stride = ivit.STRIDE if family is ivit else kwargs.get("patch_size", 16)
    output_stride = kwargs.pop("output_stride", None)
    if output_stride not in (None, stride):
        raise ValueError(f"{name}: output_stride={output_stride!r} is not offered (no dilated variant); this "
                         f"model's output stride is {stride}")
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    if kwargs.pop("features_only", False):
        features = features_kwargs(name, kwargs, family.DEFAULT_OUT_INDICES)
    else:
        features = None
        given = [k for k in _FEATURE_ARGS if k in kwargs]
        if given:
            raise ValueError(f"{name}: {given} apply to features_only=True models only")
    kwargs.setdefault("num_classes", cfg.get("num_classes", 1000))
    kwargs.setdefault("in_chans", cfg.get("input_size", (3,))[0])
    img_size = kwargs.pop("img_size", None) if family is ivit else kwargs.get("img_size")
    if family is ivit and img_size is not None:
        img_size = _ivit_img_size(img_size)
    model = family.build(name, features=features, **kwargs)
    c = kwargs["in_chans"]
    size = cfg.get("input_size", (3, 224, 224))[1:] if img_size is None else (img_size, img_size)
    cfg.update(num_classes=kwargs["num_classes"], input_size=(c, *size))
    if cfg.get("min_input_size"):
        cfg["min_input_size"] = (c, *cfg["min_input_size"][1:])
    model.pretrained_cfg = model.default_cfg = cfg
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


def _ivit_img_size(img_size) -> int:
    """iViT serves any size that is a multiple of 32; ``img_size`` (timm's argument) only sets the
    configuration's input size."""
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and img_size[0] == img_size[1]:
        img_size = img_size[0]
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 32 or img_size % 32:
        raise ValueError(f"img_size must be a positive multiple of 32 (iViT's stride), got {img_size!r}")
    return img_size


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
    """Registers every entry point and its pretrained cfg with timm (if importable), and the attention
    modules as FX leaves (timm's ``register_notrace_module``); returns whether it did."""
    try:
        from timm.models import register_model, register_notrace_module
    except ImportError:
        return False
    for fn in _ENTRYPOINTS.values():
        register_model(fn)
    for cls in FX_LEAF_MODULES:
        register_notrace_module(cls)
    return True
