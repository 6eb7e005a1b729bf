"""Feature extraction the way timm does it, without needing timm.

- :func:`take_indices`: which of a model's feature levels a request means (timm's
  ``feature_take_indices``: ``None`` all, an int n the last n, a sequence those, negatives from the end).
- :class:`FeatureInfo`: timm's description of the levels a features model returns (``info``,
  ``out_indices``, ``get_dicts``, ``channels``, ``reduction``, ``module_name``), what Hugging Face's
  ``TimmBackbone`` reads.
- :class:`FeaturesOnly`: the ``features_only=True`` form of a model: the model itself, pruned after its
  last requested level and without its classifier, whose ``forward`` returns the requested levels
  through the model's ``forward_intermediates``. Parameter names stay the model's, so a classifier's
  ``state_dict`` loads into its features model with ``strict=False``.
"""

from __future__ import annotations

import copy
from typing import Sequence

from torch import Tensor

FEATURE_CLASSES = (None, "getter", "list")  # feature_cls values served; every one returns a list


def take_indices(count: int, indices: int | Sequence[int] | None = None, name: str = "indices"
                 ) -> tuple[list[int], int]:
    """Absolute level indices for ``indices`` among ``count`` levels, and the largest of them."""
    if indices is None:
        indices = count
    if isinstance(indices, bool) or not isinstance(indices, (int, Sequence)) or isinstance(indices, str):
        raise ValueError(f"{name} must be None, an int (the last n levels) or a sequence of ints, got {indices!r}")
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"{name}={indices} asks for the last {indices} levels; this model has 1 to {count}")
        taken = list(range(count - indices, count))
    else:
        taken = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
                raise ValueError(f"{name} entries must be ints in [-{count}, {count}), got {i!r} in {tuple(indices)}")
            taken.append(i % count)
        if not taken:
            raise ValueError(f"{name} must name at least one level, got {tuple(indices)}")
        if len(set(taken)) != len(taken) or taken != sorted(taken):
            raise ValueError(f"{name} must name distinct levels in increasing order, got {tuple(indices)} "
                             f"(levels {taken})")
    return taken, max(taken)


def check_output_fmt(output_fmt: str, allowed: tuple[str, ...]) -> str:
    if output_fmt not in allowed:
        raise ValueError(f"output_fmt must be one of {allowed}, got {output_fmt!r}")
    return output_fmt


class FeatureInfo:
    """The feature levels of a model (``info``: one dict per level with num_chs, reduction, module,
    index) and the ones a features model returns (``out_indices``, absolute)."""

    def __init__(self, info: list[dict], out_indices: int | Sequence[int]):
        self.info = [dict(level, index=i) for i, level in enumerate(info)]
        self.out_indices = tuple(take_indices(len(self.info), out_indices, "out_indices")[0])

    def from_other(self, out_indices: int | Sequence[int]) -> "FeatureInfo":
        return FeatureInfo(copy.deepcopy(self.info), out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None):
        """``key`` of each returned level (idx None), of level ``idx`` (int), or of levels ``idx``."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None):
        def pick(i):
            return self.info[i] if keys is None else {k: self.info[i][k] for k in keys}
        if idx is None:
            return [pick(i) for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [pick(i) for i in idx]
        return pick(idx)

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, levels={self.get_dicts()})"


class FeaturesOnly:
    """Mixin that turns a model with ``forward_intermediates`` and ``prune_intermediate_layers`` into
    its ``features_only`` form; call :meth:`_become_features` at the end of ``__init__``.

    ``return_layers`` ({module name: id}) chooses the levels ``forward`` returns, as in timm's
    FeatureListNet: Hugging Face's ``TimmBackbone`` sets it to every level for ``output_hidden_states``.
    Levels after the last requested one were pruned and are never returned.
    """

    def _become_features(self, out_indices, *, output_fmt: str = "NCHW", norm: bool = False) -> None:
        levels = list(self.feature_info)
        taken, _ = take_indices(len(levels), out_indices, "out_indices")
        self.prune_intermediate_layers(taken, prune_norm=not norm, prune_head=True)
        self.feature_info = FeatureInfo(levels, taken)
        self.out_indices = self.feature_info.out_indices
        self.return_layers = {d["module"]: str(d["index"]) for d in self.feature_info.get_dicts()}
        self.output_fmt, self.norm_features = output_fmt, norm
        self._computed_levels = max(taken) + 1

    def forward(self, x: Tensor) -> list[Tensor]:
        wanted = [d["index"] for d in self.feature_info.info[:self._computed_levels]
                  if d["module"] in self.return_layers]
        if not wanted:
            raise ValueError(f"return_layers {self.return_layers} names none of the computed levels "
                             f"{self.feature_info.module_name(list(range(self._computed_levels)))}")
        return self.forward_intermediates(x, indices=wanted, norm=self.norm_features, output_fmt=self.output_fmt,
                                          intermediates_only=True)


def features_kwargs(name: str, kwargs: dict, default_out_indices) -> dict:
    """Pops timm's features_only arguments (out_indices, feature_cls, feature_cfg, output_fmt) from kwargs."""
    cfg = dict(kwargs.pop("feature_cfg", None) or {})
    for key in ("out_indices", "feature_cls", "output_fmt"):
        if key in kwargs:
            cfg[key] = kwargs.pop(key)
    unknown = set(cfg) - {"out_indices", "feature_cls", "output_fmt", "norm", "flatten_sequential"}
    if unknown:
        raise ValueError(f"{name}: feature_cfg keys {sorted(unknown)} are not supported (known: out_indices, "
                         "feature_cls, output_fmt, norm, flatten_sequential)")
    if cfg.get("feature_cls") not in FEATURE_CLASSES:
        raise ValueError(f"{name}: feature_cls={cfg['feature_cls']!r} is not offered; crosshead models extract "
                         "features through forward_intermediates and return a list (feature_cls 'getter' or "
                         "'list')")
    return dict(out_indices=cfg.get("out_indices", default_out_indices), output_fmt=cfg.get("output_fmt", "NCHW"),
                norm=bool(cfg.get("norm", False)))
