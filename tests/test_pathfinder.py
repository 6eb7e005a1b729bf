"""The procedural Pathfinder task: deterministic per seed, balanced, and its label readable from the pixels."""

import numpy as np
import pytest

from crosshead.train import pathfinder as pf

SIZES = (32, 64, 128)


@pytest.mark.parametrize("size", SIZES)
def test_shapes_values_balance(size):
    imgs, labels = pf.generate_many(60 if size == 128 else 120, size, seed=3)
    assert imgs.shape[1:] == (size, size) and imgs.dtype == np.uint8
    assert set(np.unique(imgs)) <= {0, 255}
    assert 0.3 < labels.mean() < 0.7
    assert (imgs > 0).mean(axis=(1, 2)).min() > 0.005


def test_deterministic_per_seed_and_order_free():
    a, la = pf.generate_many(8, 64, seed=1)
    b, lb = pf.generate_many(8, 64, seed=1)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    img5, lab5 = pf.generate(5, 64, seed=1)
    assert np.array_equal(img5, a[5]) and lab5 == la[5]
    c, _ = pf.generate_many(8, 64, seed=2)
    assert not np.array_equal(a, c)
    t, _ = pf.generate_many(8, 64, seed=1, split="test")
    assert not np.array_equal(a, t)


@pytest.mark.parametrize("size", SIZES)
def test_markers_and_clearance(size):
    for i in range(25):
        img, label, meta = pf.generate(i, size, seed=0, return_meta=True)
        paths, m = meta["paths"], meta["markers"]
        ends = meta["ends"]

        def owner(pt):
            return [j for j, (a, b) in enumerate(ends) if min(np.linalg.norm(pt - a), np.linalg.norm(pt - b)) < 1e-6]

        o0, o1 = owner(m[0]), owner(m[1])
        assert len(o0) == 1 and len(o1) == 1
        assert (o0 == o1) == bool(label)
        for j in range(len(paths)):
            for k in range(j + 1, len(paths)):
                dist = np.linalg.norm(paths[j][:, None] - paths[k][None], axis=-1).min()
                assert dist >= meta["sep"] - 1.0, (i, j, k, dist)  # centre lines are sampled 0.25 px apart
        for c in np.rint(m).astype(int):
            assert img[c[0], c[1]] == 255


@pytest.mark.parametrize("size", SIZES)
def test_label_is_connectivity_of_the_pixels(size):
    ndimage = pytest.importorskip("scipy.ndimage", reason="flood fill uses scipy")
    for i in range(40):
        img, label, meta = pf.generate(i, size, seed=7, return_meta=True)
        r = (meta["gap"] + 1.5) / 2  # bridges the dash gaps, far below the clearance between paths
        R = int(np.ceil(r))
        yy, xx = np.mgrid[-R:R + 1, -R:R + 1]
        grown = ndimage.binary_dilation(img > 0, structure=yy ** 2 + xx ** 2 <= r * r)
        comp, _ = ndimage.label(grown, structure=np.ones((3, 3)))
        a, b = np.rint(meta["markers"]).astype(int)
        assert (comp[a[0], a[1]] == comp[b[0], b[1]]) == bool(label), i


def test_cache_round_trip(tmp_path):
    imgs, labels = pf.cached(10, 32, 4, "train", tmp_path)
    again, labels2 = pf.cached(10, 32, 4, "train", tmp_path)
    fresh, labels3 = pf.generate_many(10, 32, 4, "train")
    assert np.array_equal(imgs, again) and np.array_equal(imgs, fresh) and np.array_equal(labels, labels3)
    assert len(list(tmp_path.glob("*.npz"))) == 1


def test_bad_size():
    with pytest.raises(ValueError, match="32, 64 and 128"):
        pf.generate(0, 48)
