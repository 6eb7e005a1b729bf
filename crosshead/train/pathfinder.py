"""A procedurally generated Pathfinder task (after Linsley et al. 2018, as used by Long Range Arena).

Each image shows several dashed, gently curving paths and two round markers. Label 1: both markers
sit on the two ends of the same path. Label 0: they sit on ends of two different paths. Every
image has the same number of paths and markers whatever its label, so only following a path from
one marker to the other solves the task.

This is a re-implementation from the task's description, not the LRA data: dash length, gaps,
curvature, clutter and the 32/64/128 scaling are our choices (``CONFIGS``). Paths never touch:
each keeps ``sep`` pixels from every other path and marker, well above the dash gaps, so the
label is a function of the pixels (tests/test_pathfinder.py checks it by flood fill after a
dilation that bridges the gaps).

Sample ``i`` of ``split`` is generated from ``numpy.random.default_rng([seed, size, split_id, i])``:
deterministic per (seed, size, split, index), independent of order, workers or how many samples
were made before it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path

import numpy as np

SPLITS = {"train": 0, "test": 1, "val": 2}


@dataclasses.dataclass(frozen=True)
class PathfinderConfig:
    """Geometry of the task, in pixels."""

    size: int = 32
    dashes: int = 5            # dashes per path
    dash: float = 2.5          # dash length
    gap: float = 1.5           # gap between dashes
    max_turn: float = 0.5      # max change of direction between dashes (radians)
    distractors: int = 1       # paths besides the two that may carry markers
    marker: float = 1.2        # marker radius
    line: float = 0.0          # line half-width (0: 1 px lines)
    sep: float = 6.0           # minimum centre-line distance between different paths and markers


CONFIGS = {
    32: PathfinderConfig(size=32),
    64: PathfinderConfig(size=64, dashes=9, dash=3.0, gap=2.0, marker=1.5, sep=6.5, distractors=3),
    128: PathfinderConfig(size=128, dashes=16, dash=3.5, gap=2.0, marker=1.5, sep=7.0, distractors=8,
                          max_turn=0.4),
}


def default_config(size: int) -> PathfinderConfig:
    """The task at 32, 64 or 128 pixels: paths about 0.6-0.7 of the side, more clutter as it grows."""
    if size not in CONFIGS:
        raise ValueError(f"Pathfinder sizes are 32, 64 and 128, got {size}")
    return CONFIGS[size]


def _disc(radius: float) -> np.ndarray:
    r = max(int(math.ceil(radius)), 0)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    keep = yy ** 2 + xx ** 2 <= radius ** 2 + 1e-9
    return np.stack([yy[keep], xx[keep]], 1)


def _stamp(mask: np.ndarray, pts: np.ndarray, radius: float) -> None:
    """Sets every pixel within radius of a point (pts (P, 2) as y, x floats)."""
    c = np.rint(pts).astype(np.int64)
    off = _disc(radius)
    yx = (c[:, None, :] + off[None]).reshape(-1, 2)
    H, W = mask.shape
    ok = (yx[:, 0] >= 0) & (yx[:, 0] < H) & (yx[:, 1] >= 0) & (yx[:, 1] < W)
    mask[yx[ok, 0], yx[ok, 1]] = True


def _random_path(rng: np.random.Generator, cfg: PathfinderConfig, tries: int = 200):
    """A dashed polyline inside the image, or None.

    Returns (dash segments (dashes, 2, 2) as y, x; centre-line points incl. gaps (P, 2); the two ends).
    """
    size = cfg.size
    margin = max(cfg.marker, 1.0) + 1
    step = cfg.dash + cfg.gap
    for _ in range(tries):
        start = rng.uniform(margin, size - 1 - margin, size=2)
        ang = rng.uniform(0, 2 * math.pi) + np.concatenate([[0.0], np.cumsum(
            rng.uniform(-cfg.max_turn, cfg.max_turn, size=cfg.dashes - 1))])
        d = np.stack([np.sin(ang), np.cos(ang)], 1)
        starts = start + np.concatenate([np.zeros((1, 2)), np.cumsum(d[:-1] * step, 0)])
        ends = starts + d * cfg.dash
        # centre line sampled every 0.25 px (dashes and gaps), for clearance checks
        t = np.linspace(0, 1, int(step / 0.25) + 1)[:-1, None, None]
        line = (starts[None] + t * (d * step)[None]).transpose(1, 0, 2).reshape(-1, 2)
        line = line[: -(int(step / 0.25) - int(cfg.dash / 0.25))] if cfg.gap > 0 else line
        if line.min() < margin or line.max() > size - 1 - margin:
            continue
        return np.stack([starts, ends], 1), line, (starts[0], ends[-1])
    return None


def _dash_points(dashes: np.ndarray, step: float = 0.25) -> np.ndarray:
    n = max(int(np.linalg.norm(dashes[0, 1] - dashes[0, 0]) / step), 1)
    t = np.linspace(0.0, 1.0, n + 1)[None, :, None]
    return (dashes[:, :1] * (1 - t) + dashes[:, 1:] * t).reshape(-1, 2)


def generate(index: int, size: int = 32, seed: int = 0, split: str = "train", cfg: PathfinderConfig | None = None,
             return_meta: bool = False):
    """One sample: (image uint8 (size, size), label int) [, meta dict with markers and paths]."""
    cfg = cfg or default_config(size)
    if cfg.size != size:
        raise ValueError(f"cfg.size={cfg.size} but size={size}")
    rng = np.random.default_rng([seed, size, SPLITS[split], index])
    label = int(rng.integers(2))
    line_r, marker_r, sep = cfg.line, max(cfg.marker, 1.0), cfg.sep
    for _attempt in range(100):
        occupied = np.zeros((size, size), bool)  # pixels closer than the clearance to something drawn
        paths = []

        def place():
            for _ in range(20):
                p = _random_path(rng, cfg)
                if p is None:
                    return None
                c = np.rint(p[1]).astype(np.int64)
                if not occupied[c[:, 0], c[:, 1]].any():
                    return p
            return None

        def occupy(p):
            _stamp(occupied, p[1], sep + line_r)
            _stamp(occupied, np.stack(p[2]), sep + marker_r)  # room for a marker at either end

        for _ in range(2):  # the two paths that carry markers
            p = place()
            if p is None:
                break
            paths.append(p)
            occupy(p)
        if len(paths) < 2:
            continue
        a_ends, b_ends = paths[0][2], paths[1][2]
        if label == 1:
            markers = [a_ends[0], a_ends[1]]
        else:
            markers = [a_ends[int(rng.integers(2))], b_ends[int(rng.integers(2))]]
        for _ in range(cfg.distractors):
            p = place()
            if p is not None:  # a crowded image may hold fewer distractors
                paths.append(p)
                occupy(p)
        image = np.zeros((size, size), bool)
        for dashes, _, _ in paths:
            _stamp(image, _dash_points(dashes), line_r)
        _stamp(image, np.stack(markers), marker_r)
        img = image.astype(np.uint8) * 255
        if return_meta:
            return img, label, dict(markers=np.stack(markers), paths=[p[1] for p in paths], ends=[p[2] for p in paths], line_r=line_r,
                                    marker_r=marker_r, gap=cfg.gap, sep=sep)
        return img, label
    raise RuntimeError(f"could not place the paths of sample {index} (size {size}, seed {seed})")


def generate_many(n: int, size: int = 32, seed: int = 0, split: str = "train", cfg: PathfinderConfig | None = None):
    """(images uint8 (n, size, size), labels int64 (n,))."""
    imgs = np.empty((n, size, size), np.uint8)
    labels = np.empty((n,), np.int64)
    for i in range(n):
        imgs[i], labels[i] = generate(i, size, seed, split, cfg)
    return imgs, labels


def cached(n: int, size: int, seed: int, split: str, cache_dir: str | os.PathLike):
    """generate_many through an .npz cache under cache_dir (written atomically)."""
    path = Path(cache_dir) / f"pathfinder{size}_seed{seed}_{split}_{n}.npz"
    if path.exists():
        with np.load(path) as f:
            return f["images"], f["labels"]
    imgs, labels = generate_many(n, size, seed, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, images=imgs, labels=labels)
    os.replace(tmp, path)
    return imgs, labels


def _write_pgm(path: str, img: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(f"P5 {img.shape[1]} {img.shape[0]} 255\n".encode())
        f.write(img.tobytes())


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate Pathfinder samples: cache an .npz, or preview a PGM grid.")
    ap.add_argument("--size", type=int, default=32, choices=(32, 64, 128))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="train", choices=sorted(SPLITS))
    ap.add_argument("--cache-dir", help="write the .npz cache here")
    ap.add_argument("--preview", help="write a PGM grid of the first 16 samples (labels in the file name order)")
    a = ap.parse_args(argv)
    if a.cache_dir:
        imgs, labels = cached(a.n, a.size, a.seed, a.split, a.cache_dir)
    else:
        imgs, labels = generate_many(a.n, a.size, a.seed, a.split)
    print(f"{len(labels)} samples of {a.size}x{a.size}, {int(labels.sum())} positive")
    if a.preview:
        k = min(16, len(imgs))
        cols = 4
        rows = math.ceil(k / cols)
        grid = np.full((rows * (a.size + 2), cols * (a.size + 2)), 128, np.uint8)
        for i in range(k):
            r, c = divmod(i, cols)
            grid[r * (a.size + 2):r * (a.size + 2) + a.size, c * (a.size + 2):c * (a.size + 2) + a.size] = imgs[i]
        _write_pgm(a.preview, grid)
        print("labels:", labels[:k].tolist())


if __name__ == "__main__":
    main()
