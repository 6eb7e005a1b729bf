"""Constructor-argument checks for the module and the models, with errors that name the argument.

A layer built with a bad argument must fail when it is built, not at its first forward. ``bool`` is
not accepted where an int is meant (``True`` is an int to Python, but ``landmarks=True`` is a
mistake), nor ``float`` or ``str``; numpy integers are accepted (``numbers.Integral``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(name: str, value) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def non_negative_int(name: str, value) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r}")
    return value


def int_sequence(name: str, value, count: int, *, minimum: int = 1) -> tuple[int, ...]:
    """A sequence (not a str) of `count` ints, each at least `minimum`."""
    if not (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == count
            and all(_is_int(v) for v in value)):
        raise ValueError(f"{name} must be {count} ints, got {value!r}")
    if any(v < minimum for v in value):
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {what}, got {tuple(value)}")
    return tuple(int(v) for v in value)


def landmark_size(name: str, value) -> int | tuple[int, int]:
    """A positive int L (1-D sequences) or a pair (Lh, Lw) of positive ints (2-D token grids)."""
    if _is_int(value):
        return positive_int(name, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value)):
        raise ValueError(f"{name} must be a positive int L (1-D tokens) or a pair (Lh, Lw) of positive ints "
                         f"(2-D token grid), got {value!r}")
    if any(v < 1 for v in value):
        raise ValueError(f"{name} must be positive, got {tuple(value)}")
    return int(value[0]), int(value[1])


def landmark_pair(name: str, value) -> tuple[int, int]:
    """A pair (Lh, Lw) of positive ints: the landmark grid of a model whose tokens are always 2-D."""
    size = landmark_size(name, value)
    if isinstance(size, int):
        raise ValueError(f"{name} must be a pair (Lh, Lw) of positive ints: this model's tokens form a 2-D grid, "
                         f"got {value!r}")
    return size


def dim_and_heads(dim_name: str, dim, heads_name: str, heads) -> tuple[int, int]:
    dim, heads = positive_int(dim_name, dim), positive_int(heads_name, heads)
    if dim % heads:
        raise ValueError(f"{dim_name}={dim} must be divisible by {heads_name}={heads}")
    return dim, heads


def scale(name: str, value) -> float | None:
    """None (head_dim^-1/2) or a finite positive float: the logits' inverse temperature. Zero would make
    every attention map uniform (and cut the gradient to q and k), a negative one would reverse it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be None or a finite positive float, got {value!r}")
    return float(value)


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def probability(name: str, value) -> float:
    """A rate in [0, 1): dropout and drop-path rates."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def model_head_args(num_classes, in_chans, landmarks, mlp_ratio, drop_rate, drop_path_rate):
    """The arguments every crosshead model shares, checked: (num_classes, in_chans, landmarks,
    mlp_ratio, drop_rate, drop_path_rate)."""
    return (non_negative_int("num_classes", num_classes), positive_int("in_chans", in_chans),
            landmark_pair("landmarks", landmarks), positive_float("mlp_ratio", mlp_ratio),
            probability("drop_rate", drop_rate), probability("drop_path_rate", drop_path_rate))
