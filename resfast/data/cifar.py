"""CIFAR-10 / CIFAR-100 in the python batch format the authors distribute.

CIFAR-10 (``cifar-10-batches-py``): pickles ``data_batch_1`` .. ``data_batch_5``
and ``test_batch``, each a dict with ``b'data'`` (N x 3072 uint8, the 1024 red,
then green, then blue values of a 32x32 image, row-major) and ``b'labels'``;
``batches.meta`` holds ``b'label_names'``.
CIFAR-100 (``cifar-100-python``): pickles ``train`` and ``test`` with
``b'fine_labels'`` (and ``b'coarse_labels'``); ``meta`` holds ``b'fine_label_names'``.
"""
import os
import pickle
from typing import List, Optional, Tuple

import numpy as np
import torch

from .errors import DataError

CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = ["test_batch"]
CIFAR10_META = "batches.meta"
CIFAR100_TRAIN = ["train"]
CIFAR100_TEST = ["test"]
CIFAR100_META = "meta"


def find_root(path: str) -> Optional[Tuple[str, str]]:
    """(folder, 'cifar10'|'cifar100') if ``path`` is, or directly contains, a CIFAR
    python batch folder; else None."""
    for cand in (path, os.path.join(path, "cifar-10-batches-py"),
                 os.path.join(path, "cifar-100-python")):
        if (os.path.isfile(os.path.join(cand, "data_batch_1"))
            or os.path.isfile(os.path.join(cand, CIFAR10_META))):
            return cand, "cifar10"
        if (os.path.isfile(os.path.join(cand, "train"))
            and os.path.isfile(os.path.join(cand, CIFAR100_META))):
            return cand, "cifar100"
    return None


def _unpickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"CIFAR file {path!r} is missing")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001  (any unpickling failure means a corrupt file)
        raise DataError(f"CIFAR file {path!r} is corrupt or not a CIFAR pickle: "
                        f"{type(e).__name__}: {e}") from e
    if not isinstance(d, dict):
        raise DataError(f"CIFAR file {path!r} does not hold a dict (got {type(d).__name__})")
    return d


def _key(d: dict, name: str):
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    return None


def read_batch(path: str, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    """One pickle -> (uint8 (N, 3, 32, 32), int64 (N,))."""
    d = _unpickle(path)
    data, labels = _key(d, "data"), _key(d, label_key)
    if data is None or labels is None:
        raise DataError(f"CIFAR file {path!r} lacks b'data' or b'{label_key}' (keys: "
                        f"{sorted(map(str, d))})")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"CIFAR file {path!r}: b'data' must be uint8 (N, 3072), got {data.dtype} "
                        f"{data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"CIFAR file {path!r}: {data.shape[0]} images but {labels.shape[0]} labels")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(path: str):
    """((train_images, train_labels), (test_images, test_labels), classes)."""
    found = find_root(path)
    if found is None:
        raise DataError(f"{path!r} is not a CIFAR python batch folder (expected data_batch_1..5, "
                        f"test_batch and batches.meta, or train, test and meta)")
    root, kind = found
    if kind == "cifar10":
        train_files, test_files, meta_file, label_key, names_key = \
            CIFAR10_TRAIN, CIFAR10_TEST, CIFAR10_META, "labels", "label_names"
    else:
        train_files, test_files, meta_file, label_key, names_key = \
            CIFAR100_TRAIN, CIFAR100_TEST, CIFAR100_META, "fine_labels", "fine_label_names"

    def read_all(files):
        parts = [read_batch(os.path.join(root, f), label_key) for f in files]
        return (torch.from_numpy(np.concatenate([p[0] for p in parts])),
                torch.from_numpy(np.concatenate([p[1] for p in parts])))

    train, test = read_all(train_files), read_all(test_files)
    num_classes = int(max(train[1].max(), test[1].max())) + 1
    classes: List[str] = [str(i) for i in range(num_classes)]
    meta_path = os.path.join(root, meta_file)
    if os.path.exists(meta_path):
        names = _key(_unpickle(meta_path), names_key)
        if names is not None:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if int(train[1].min()) < 0 or num_classes > len(classes):
        raise DataError(f"CIFAR labels in {root!r} run outside 0..{len(classes) - 1}")
    return train, test, classes
