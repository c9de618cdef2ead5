"""Datasets whose augmentation is seeded per (seed, epoch, index).

Call ``set_epoch(epoch)`` before each epoch (the trainer does, together with the
sampler's); with non-persistent DataLoader workers the new epoch reaches them
with the dataset each time an iterator is created.
"""
import random
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import DataError
from .transforms import sample_rng


class SeededDataset(Dataset):
    """Base: ``transform(sample, rng)`` with ``rng = sample_rng(seed, epoch, index)``."""

    def __init__(self, transform: Optional[Callable], seed: int = 0):
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _apply(self, sample, index: int):
        if self.transform is None:
            return sample
        return self.transform(sample, sample_rng(self.seed, self.epoch, index))


class ArrayDataset(SeededDataset):
    """In-memory uint8 images (N, C, H, W) with int64 labels."""

    def __init__(self, images: Tensor, labels: Tensor, classes: Sequence[str], transform=None,
                 seed: int = 0, name: str = "array"):
        super().__init__(transform, seed)
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        self.images, self.labels = images.contiguous(), labels.long()
        self.classes = list(classes)
        self.name = name

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self._apply(self.images[index], index), self.labels[index]

    def channel_stats(self) -> Tuple[List[float], List[float]]:
        """Per-channel mean and std of the pixels, in [0, 1] units."""
        n, c = self.images.shape[:2]
        s = torch.zeros(c, dtype=torch.float64)
        s2 = torch.zeros(c, dtype=torch.float64)
        for i in range(0, n, 4096):
            chunk = self.images[i:i + 4096].to(torch.float64).div_(255.0)
            s += chunk.sum(dim=(0, 2, 3))
            s2 += chunk.square().sum(dim=(0, 2, 3))
        count = n * self.images.shape[2] * self.images.shape[3]
        mean = s / count
        std = (s2 / count - mean.square()).clamp_min(1e-12).sqrt()
        return mean.tolist(), std.tolist()

    def subset(self, n: Optional[int]) -> "ArrayDataset":
        """The first n examples (the data sets here are already in random order)."""
        if n is None or n >= len(self):
            return self
        return ArrayDataset(self.images[:n], self.labels[:n], self.classes, self.transform,
                            self.seed, self.name)


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderDataset(SeededDataset):
    """An ImageNet-style tree ``root/<class>/<image>``; classes are the sorted
    sub-folder names (torchvision's convention). Images are decoded with PIL
    and converted to RGB; an unreadable image raises :class:`DataError` naming it."""

    def __init__(self, root, transform=None, seed: int = 0,
                 classes: Optional[Sequence[str]] = None):
        super().__init__(transform, seed)
        import os

        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise DataError(f"image folder {self.root!r} does not exist or is not a directory")
        found = sorted(e.name for e in os.scandir(self.root) if e.is_dir()
                       and not e.name.startswith("."))
        self.classes = list(classes) if classes is not None else found
        if not self.classes:
            raise DataError(f"image folder {self.root!r} has no class sub-folders (expected "
                            "root/<class>/<image>)")
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples: List[Tuple[str, int]] = []
        for c in found:
            if c not in index:
                raise DataError(f"class folder {os.path.join(self.root, c)!r} is not among the "
                                "training classes")
            for dirpath, _, files in sorted(os.walk(os.path.join(self.root, c), followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), index[c]))
        if not self.samples:
            raise DataError(f"image folder {self.root!r} contains no images "
                            f"({', '.join(IMG_EXTENSIONS)})")
        self.name = os.path.basename(os.path.normpath(self.root))

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        from PIL import Image, UnidentifiedImageError

        path, _ = self.samples[index]
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                return img.convert("RGB")
        except FileNotFoundError as e:
            raise DataError(f"image file {path!r} is missing") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"image file {path!r} is corrupt or not an image: {e}") from e

    def __getitem__(self, index: int):
        return self._apply(self.load(index), index), self.samples[index][1]

    def subset(self, n: Optional[int]) -> "ImageFolderDataset":
        """n examples chosen by a fixed random draw (the same every time)."""
        if n is None or n >= len(self):
            return self
        keep = sorted(random.Random(0).sample(range(len(self.samples)), n))
        new = object.__new__(ImageFolderDataset)
        new.__dict__.update(self.__dict__)
        new.samples = [self.samples[i] for i in keep]
        return new


def split_indices(labels: np.ndarray, test_per_class: int,
                  seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """A stratified, deterministic train/test split: ``test_per_class`` examples of
    every class go to the test set; both parts are returned in shuffled order."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    train, test = np.concatenate(train), np.concatenate(test)
    return train[rng.permutation(len(train))], test[rng.permutation(len(test))]
