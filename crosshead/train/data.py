"""Data sets for the training CLI: digits, pathfinder32/64/128, cifar10/100, imagefolder.

``build(name, split, image_size, ...)`` returns a ``torch.utils.data.Dataset`` of (image float
(C, H, W), label) and its ``DataInfo`` (channels, classes, normalisation). digits and pathfinder
need nothing but numpy/scikit-learn; cifar and imagefolder need torchvision (and the files on disk:
nothing is ever downloaded).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

NAMES = ("digits", "pathfinder32", "pathfinder64", "pathfinder128", "cifar10", "cifar100", "imagefolder")


@dataclasses.dataclass
class DataInfo:
    channels: int
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple


class TensorImages(Dataset):
    """In-memory images (N, C, H, W) float in [0, 1] with optional shift/flip augmentation.

    Augmentation draws from torch's global RNG (main process) or the worker's seeded RNG, so a run
    is reproducible from its seed and a checkpoint's RNG state.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, shift: int = 0, flip: bool = False):
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.shift, self.flip = shift, flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        if self.shift:
            dy, dx = torch.randint(-self.shift, self.shift + 1, (2,)).tolist()
            x = torch.roll(F.pad(x, [self.shift] * 4), (dy, dx), (1, 2))[:, self.shift:-self.shift, self.shift:-self.shift]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(2)
        return (x - self.mean) / self.std, int(self.labels[i])


def _digits(split: str, image_size: int, augment: bool, split_seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx_train, idx_test = train_test_split(np.arange(len(d.target)), test_size=0.2, random_state=split_seed,
                                           stratify=d.target)
    idx = idx_train if split == "train" else idx_test
    x = torch.tensor(d.images[idx], dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(d.target[idx])
    info = DataInfo(1, 10, image_size, (0.3,), (0.4,))
    shift = max(image_size // 16, 1) if (augment and split == "train") else 0
    return TensorImages(x, y, info.mean, info.std, shift=shift), info


def _pathfinder(size: int, split: str, image_size: int, n: int, seed: int, cache_dir: str | None):
    from . import pathfinder

    if cache_dir:
        imgs, labels = pathfinder.cached(n, size, seed, split, cache_dir)
    else:
        imgs, labels = pathfinder.generate_many(n, size, seed, split)
    x = torch.from_numpy(imgs).float().unsqueeze(1) / 255.0
    if image_size != size:
        x = F.interpolate(x, size=(image_size, image_size), mode="nearest")
    info = DataInfo(1, 2, image_size, (0.05,), (0.2,))
    return TensorImages(x, torch.from_numpy(labels), info.mean, info.std), info


def _torchvision(name: str, root: str, split: str, image_size: int, augment: bool):
    try:
        import torchvision
        from torchvision import transforms as T
    except ImportError as e:
        raise RuntimeError(f"data set {name!r} needs torchvision, which is not installed") from e
    if name.startswith("cifar"):
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    else:
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    train = split == "train"
    if name.startswith("cifar"):
        tf = [T.Resize(image_size)] if image_size != 32 else []
        if train and augment:
            tf += [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()]
    else:
        tf = ([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] if train and augment
              else [T.Resize(int(image_size / 0.875)), T.CenterCrop(image_size)])
    tf = T.Compose(tf + [T.ToTensor(), T.Normalize(mean, std)])
    if name in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            ds = cls(root, train=train, transform=tf, download=False)
        except RuntimeError as e:
            raise RuntimeError(f"{name} not found under --data-dir {root!r} (nothing is downloaded): {e}") from e
        n_classes = 10 if name == "cifar10" else 100
    else:
        ds = torchvision.datasets.ImageFolder(_imagefolder_dirs(root)[0 if train else 1], transform=tf)
        n_classes = len(ds.classes)
    return ds, DataInfo(3, n_classes, image_size, mean, std)


class DataError(ValueError):
    """A data set that cannot be used as asked (missing files, mismatched class folders)."""


def _imagefolder_dirs(root: str) -> tuple[str, str]:
    test = os.path.join(root, "val")
    return os.path.join(root, "train"), test if os.path.isdir(test) else os.path.join(root, "test")


def _class_folders(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir())  # as torchvision's find_classes


def check_imagefolder(root: str) -> None:
    """Labels are indices into each split's sorted class folder names, so train and val/test must hold
    the same class folders: otherwise a val class is scored as another, or its index is out of range."""
    train, test = _imagefolder_dirs(root)
    if not (os.path.isdir(train) and os.path.isdir(test)):
        raise DataError(f"imagefolder expects {root!r}/train and {root!r}/val (or /test) class folders")
    a, b = _class_folders(train), _class_folders(test)
    if a != b:
        tn = os.path.basename(test)
        raise DataError(f"imagefolder {root!r}: train and {tn} have different class folders (labels would not "
                        f"match): only in train: {sorted(set(a) - set(b))}, only in {tn}: {sorted(set(b) - set(a))}")


def check(name: str, data_dir: str | None) -> None:
    """What can be checked about a data set before anything is loaded; DataError if it cannot work."""
    if name in ("cifar10", "cifar100", "imagefolder") and not data_dir:
        raise DataError(f"data set {name!r} needs --data-dir")
    if name == "imagefolder":
        check_imagefolder(data_dir)


def build(name: str, split: str, *, image_size: int | None = None, data_dir: str | None = None,
          augment: bool = True, seed: int = 0, train_size: int = 20000, test_size: int = 2000,
          cache_dir: str | None = None):
    """(dataset, DataInfo) for split "train" or "test".

    image_size defaults: digits 32 (upsampled from 8×8), pathfinderS S, cifar 32, imagefolder 224.
    Pathfinder: ``train_size``/``test_size`` samples generated from ``seed`` (cached as .npz under
    cache_dir when given).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if image_size is not None and image_size <= 0:
        raise DataError(f"image_size must be positive (None: the data set's default), got {image_size}")
    if name == "digits":
        return _digits(split, image_size or 32, augment)
    if name.startswith("pathfinder"):
        size = int(name[len("pathfinder"):] or 32)
        n = train_size if split == "train" else test_size
        return _pathfinder(size, split, image_size or size, n, seed, cache_dir)
    if name in ("cifar10", "cifar100", "imagefolder"):
        check(name, data_dir)
        default = 32 if name.startswith("cifar") else 224
        return _torchvision(name, data_dir, split, image_size or default, augment)
    raise ValueError(f"unknown data set {name!r}; choose from {NAMES}")
