"""The one list of baseline attentions: ``@register(name)`` plus ``create``/``available``/``names``.

A family module decorates its class with ``@register("name", requires=(("performer_pytorch",
"performer-pytorch"),))``; ``requires`` lists (import name, pip name) pairs of optional PyPI
packages that are imported lazily, only when the module is built, so that
``import crosshead.baselines`` works without any of them.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field

import torch.nn as nn

__all__ = ["register", "create", "available", "names"]


@dataclass(frozen=True)
class _Entry:
    name: str
    cls: type
    requires: tuple = field(default_factory=tuple)  # ((import_name, pip_name), ...)


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, *, requires: tuple = ()):
    """Class decorator adding an attention module to the registry under ``name``."""

    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"baseline {name!r} registered twice")
        _REGISTRY[name] = _Entry(name, cls, tuple(requires))
        cls.registry_name = name
        return cls

    return deco


def names() -> list[str]:
    """All registered names, usable here or not, in registration order."""
    return list(_REGISTRY)


def _missing(entry: _Entry) -> str | None:
    for mod, pip in entry.requires:
        try:
            importlib.import_module(mod)
        except ImportError as exc:  # pragma: no cover - depends on the environment
            return f"package {pip} is not installed ({exc.__class__.__name__}: {exc}); " \
                   f"pip install {pip}  (or pip install crosshead[baselines])"
    return None


def available() -> dict[str, str | None]:
    """name -> None when usable in this environment, else a one-line reason."""
    return {n: _missing(e) for n, e in _REGISTRY.items()}


def _accepted_options(cls) -> set[str]:
    sig = inspect.signature(cls.__init__)
    skip = {"self", "dim", "num_heads", "num_prefix_tokens"}
    return {p.name for p in sig.parameters.values()
            if p.name not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def create(name: str, dim: int, num_heads: int = 8, *, num_prefix_tokens: int = 0,
           **options) -> nn.Module:
    """Build the attention module registered as ``name``.

    The module maps x (B, N, dim) -> (B, N, dim) through ``forward(x, grid=None)`` and owns its
    qkv and output projections. ``num_prefix_tokens`` leading tokens (CLS, distillation) are not
    part of the H x W grid. Raises ValueError for an unknown name, TypeError for an unknown
    option and ImportError (with the pip line) when an optional package is missing.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown baseline attention {name!r}; known: {', '.join(names())}")
    entry = _REGISTRY[name]
    accepted = _accepted_options(entry.cls)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(f"baseline {name!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
                        f"accepted: {', '.join(sorted(accepted)) or '(none)'}")
    reason = _missing(entry)
    if reason is not None:
        raise ImportError(f"baseline {name!r} is unavailable: {reason}")
    if not isinstance(dim, int) or not isinstance(num_heads, int) or dim <= 0 or num_heads <= 0:
        raise ValueError(f"dim and num_heads must be positive ints, got {dim!r}, {num_heads!r}")
    if dim % num_heads:
        raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    return entry.cls(dim, num_heads, num_prefix_tokens=num_prefix_tokens, **options)
