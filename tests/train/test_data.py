"""Data loaders on small files in the exact on-disk formats, transforms, errors."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

from resfast.data import (
    ArrayDataset,
    CifarTrainTransform,
    DataError,
    ImageNetTestTransform,
    ImageNetTrainTransform,
    build_datasets,
    dense_test_dataset,
    detect_format,
    load_cifar,
    load_digits,
    sample_rng,
)
from resfast.data.transforms import pad_crop_flip, pca_lighting


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar10(root, n_per_batch=6, seed=0):
    """A cifar-10-batches-py folder with the authors' keys (bytes), n images per batch."""
    rng = np.random.RandomState(seed)
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.randint(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.randint(0, 10, size=n_per_batch)]
        _write_pickle(os.path.join(d, name),
                      {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                       b"filenames": [b"x.png"] * n_per_batch})
        batches[name] = (data, labels)
    _write_pickle(os.path.join(d, "batches.meta"),
                  {b"label_names": [f"c{i}".encode() for i in range(10)],
                   b"num_cases_per_batch": n_per_batch, b"num_vis": 3072})
    return d, batches


def make_cifar100(root, n=8, seed=1):
    rng = np.random.RandomState(seed)
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d)
    out = {}
    for name in ("train", "test"):
        data = rng.randint(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.randint(0, 100, size=n)]
        _write_pickle(os.path.join(d, name), {b"data": data, b"fine_labels": fine,
                                              b"coarse_labels": [v // 5 for v in fine]})
        out[name] = (data, fine)
    _write_pickle(os.path.join(d, "meta"),
                  {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                   b"coarse_label_names": [f"g{i}".encode() for i in range(20)]})
    return d, out


def make_image_folder(root, classes=("cat", "dog", "eel"), per_class=2, sizes=((40, 30), (30, 50))):
    from PIL import Image

    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
            for i in range(per_class):
                w, h = sizes[i % len(sizes)]
                arr = rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8)
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(arr).save(os.path.join(root, split, c, f"{i}.{ext}"))
    return root


# ---- embedded -------------------------------------------------------------------

def test_embedded_digits_split():
    (xtr, ytr), (xte, yte), classes = load_digits()
    assert xtr.shape == (4000, 3, 32, 32) and xte.shape == (1000, 3, 32, 32)
    assert xtr.dtype == torch.uint8 and ytr.dtype == torch.int64
    assert torch.bincount(yte).tolist() == [100] * 10
    assert torch.bincount(ytr).tolist() == [400] * 10
    assert classes == [str(i) for i in range(10)]
    # grey digits: all three channels equal, the 2-pixel border empty, real ink in the middle
    assert torch.equal(xtr[:, 0], xtr[:, 1]) and torch.equal(xtr[:, 0], xtr[:, 2])
    assert xtr[:, :, :2].max() == 0 and xtr[:, :, :, -2:].max() == 0
    assert xtr.float().mean() > 10
    # deterministic split, disjoint train and test
    (xtr2, ytr2), _, _ = load_digits()
    assert torch.equal(xtr, xtr2) and torch.equal(ytr, ytr2)
    train_set = {bytes(x.numpy()) for x in xtr[:, 0]}
    assert not any(bytes(x.numpy()) in train_set for x in xte[:, 0])


def test_build_embedded_defaults():
    train, test, info = build_datasets("embedded", train_subset=100, test_subset=50)
    assert (len(train), len(test)) == (100, 50)
    assert info.kind == "embedded" and info.num_classes == 10 and info.image_size == 32
    x, y = train[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # same (seed, epoch, index) -> same pixels; another epoch -> another crop/flip for some sample
    assert torch.equal(train[3][0], x)
    train.set_epoch(1)
    assert any(not torch.equal(train[i][0], _at_epoch(train, 0, i)) for i in range(10))
    assert train.transform.flip is False  # digits are not mirror-symmetric: crops only


def _at_epoch(ds, epoch, i):
    old = ds.epoch
    ds.set_epoch(epoch)
    try:
        return ds[i][0]
    finally:
        ds.set_epoch(old)


# ---- CIFAR --------------------------------------------------------------------

def test_cifar10_batches(tmp_path):
    d, batches = make_cifar10(str(tmp_path))
    for path in (d, str(tmp_path)):  # the batch folder itself or its parent
        (xtr, ytr), (xte, yte), classes = load_cifar(path)
        assert xtr.shape == (30, 3, 32, 32) and xte.shape == (6, 3, 32, 32)
        assert classes == [f"c{i}" for i in range(10)]
    data, labels = batches["data_batch_2"]
    # row layout: 1024 red, 1024 green, 1024 blue, each row-major 32x32
    img = xtr[6 + 4]
    assert torch.equal(img[0].flatten(), torch.from_numpy(data[4, :1024]))
    assert torch.equal(img[2, 5], torch.from_numpy(data[4, 2048 + 5 * 32:2048 + 6 * 32]))
    assert ytr[6 + 4] == labels[4]
    assert yte.tolist() == batches["test_batch"][1]
    assert detect_format(d) == "cifar"
    train, test, info = build_datasets(d)
    assert info.kind == "cifar10" and info.num_classes == 10 and len(train) == 30
    assert train.transform.flip is True  # the ResNet paper's CIFAR recipe: crops and flips


def test_cifar100(tmp_path):
    d, out = make_cifar100(str(tmp_path))
    (xtr, ytr), (xte, yte), classes = load_cifar(d)
    assert xtr.shape == (8, 3, 32, 32) and len(classes) == 100
    assert ytr.tolist() == out["train"][1]
    _, _, info = build_datasets(str(tmp_path))
    assert info.kind == "cifar100" and info.num_classes == 100


def test_cifar_missing_file(tmp_path):
    d, _ = make_cifar10(str(tmp_path))
    os.remove(os.path.join(d, "data_batch_3"))
    with pytest.raises(DataError, match="data_batch_3.*missing"):
        load_cifar(d)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_keys", "wrong_shape"])
def test_cifar_corrupt_file(tmp_path, damage):
    d, _ = make_cifar10(str(tmp_path))
    path = os.path.join(d, "test_batch")
    if damage == "truncate":
        with open(path, "rb") as f:
            blob = f.read()
        with open(path, "wb") as f:
            f.write(blob[: len(blob) // 2])
    elif damage == "garbage":
        with open(path, "wb") as f:
            f.write(b"this is not a pickle")
    elif damage == "wrong_keys":
        _write_pickle(path, {b"pixels": np.zeros((2, 3072), np.uint8)})
    else:
        _write_pickle(path, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match="test_batch"):
        load_cifar(d)


def test_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="cannot tell the format"):
        build_datasets(str(tmp_path))


# ---- ImageFolder ----------------------------------------------------------------

def test_image_folder(tmp_path):
    root = make_image_folder(str(tmp_path))
    assert detect_format(root) == "imagefolder"
    train, test, info = build_datasets(root, train_scale=(40, 48), test_scale=36, crop=32)
    assert info.classes == ["cat", "dog", "eel"] and info.kind == "imagefolder"
    assert len(train) == 6 and len(test) == 6
    x, y = train[5]
    assert x.shape == (3, 32, 32) and y == 2
    xt, _ = test[0]
    assert xt.shape == (3, 32, 32)
    dense = dense_test_dataset(info, 36)
    xd, _ = dense[1]  # a 30x50 (w x h) image: shorter side 30 -> 36, the other 60
    assert xd.shape == (3, 60, 36)


def test_image_folder_corrupt_image(tmp_path):
    root = make_image_folder(str(tmp_path))
    bad = os.path.join(root, "train", "dog", "0.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8 not really a jpeg")
    train, _, _ = build_datasets(root, train_scale=(40, 48), test_scale=36, crop=32)
    idx = [i for i, (p, _) in enumerate(train.samples) if p == bad][0]
    with pytest.raises(DataError, match="0.jpg"):
        train[idx]


def test_image_folder_missing_val(tmp_path):
    root = make_image_folder(str(tmp_path))
    import shutil

    shutil.rmtree(os.path.join(root, "val"))
    with pytest.raises(DataError, match="neither val/ nor test/"):
        build_datasets(root)


# ---- transforms -------------------------------------------------------------------

def test_pad_crop_flip_is_a_shifted_window():
    img = torch.arange(2 * 6 * 6, dtype=torch.uint8).view(2, 6, 6) + 1
    seen = set()
    for i in range(200):
        rng = random.Random(i)
        out = pad_crop_flip(img, rng, pad=2)
        assert out.shape == img.shape
        rng = random.Random(i)
        dy, dx = rng.randint(0, 4), rng.randint(0, 4)
        flip = rng.random() < 0.5
        padded = torch.nn.functional.pad(img, (2, 2, 2, 2))
        ref = padded[:, dy:dy + 6, dx:dx + 6]
        ref = ref.flip(-1) if flip else ref
        assert torch.equal(out, ref)
        seen.add((dy, dx, flip))
    assert len(seen) > 30


def test_seeded_augmentation():
    t = CifarTrainTransform([0.5] * 3, [0.25] * 3)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    a = t(img, sample_rng(0, 1, 7))
    assert torch.equal(a, t(img, sample_rng(0, 1, 7)))
    assert not all(torch.equal(t(img, sample_rng(0, 1, i)), a) for i in range(8, 12))


def test_imagenet_transforms():
    from PIL import Image

    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (300, 400, 3), dtype=np.uint8))
    t = ImageNetTrainTransform(scale=(256, 480), crop=224)
    for i in range(3):
        x = t(img, sample_rng(0, 0, i))
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    x = ImageNetTestTransform(scale=256, crop=224)(img)
    assert x.shape == (3, 224, 224)
    assert ImageNetTestTransform(scale=256, crop=None)(img).shape == (3, 256, 341)


def test_pca_lighting_shifts_each_channel_uniformly():
    x = torch.rand(3, 8, 8)
    y = pca_lighting(x, random.Random(3), 0.1)
    shift = (y - x).flatten(1)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-6)
    assert shift.abs().max() > 0
    assert torch.equal(pca_lighting(x, random.Random(3), 0.0), x)


def test_array_dataset_checks():
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2), ["a"])
