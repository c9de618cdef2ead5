"""The training recipes' augmentations, as seeded functions.

Every random choice comes from the ``random.Random`` passed in, which the
datasets seed from (seed, epoch, index): a sample's augmentation does not
depend on the worker that loads it, on the loader's order or on any global RNG
state, so a run resumed from a checkpoint sees exactly the same pixels.

32x32 recipe (CIFAR ResNets): 4-pixel zero padding + random 32x32 crop, random
horizontal flip, per-channel mean/std normalisation.

ImageNet recipes (VGG, ResNet): shorter side rescaled to a fixed S or to a
random S in [S_min, S_max] (scale jittering), random 224 crop, random
horizontal flip, PCA lighting noise ("RGB colour shift", AlexNet), mean/std
normalisation. Test: shorter side rescaled to Q, centre crop (single crop), or
the whole rescaled image (dense evaluation).
"""
import math
import random
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Eigen-decomposition of the ImageNet RGB pixel covariance (pixels in [0, 1]),
# the values fb.resnet.torch and torchvision's references use for AlexNet-style
# PCA lighting.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The RNG of one sample in one epoch (independent streams for distinct triples)."""
    return random.Random((int(seed) & (2**64 - 1)) << 96 | (int(epoch) & (2**32 - 1)) << 64
                         | int(index))


class Normalize:
    """uint8 or [0, 1] float CHW -> (x - mean) / std in float32."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], scale255: bool):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale255 = scale255

    def __call__(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.scale255:
            x = x / 255.0
        return (x - self.mean) / self.std


def pad_crop_flip(img: Tensor, rng: random.Random, pad: int = 4, flip: bool = True) -> Tensor:
    """Zero-pad by ``pad`` pixels, take a random crop of the original size, and
    flip horizontally with probability 1/2 (CHW tensor of any dtype)."""
    c, h, w = img.shape
    dy, dx = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    do_flip = flip and rng.random() < 0.5
    out = img.new_zeros((c, h, w))
    # The crop of the padded image, [dy, dy + h) x [dx, dx + w), in original coordinates:
    y0, x0 = dy - pad, dx - pad
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + h, h), min(x0 + w, w)
    if sy1 > sy0 and sx1 > sx0:
        out[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[:, sy0:sy1, sx0:sx1]
    if do_flip:
        out = out.flip(-1)
    return out


class CifarTrainTransform:
    """pad-4 random crop + flip + normalise, for uint8 CHW tensors."""

    def __init__(self, mean, std, pad: int = 4, flip: bool = True):
        self.normalize = Normalize(mean, std, scale255=True)
        self.pad, self.flip = pad, flip

    def __call__(self, img: Tensor, rng: random.Random) -> Tensor:
        return self.normalize(pad_crop_flip(img, rng, self.pad, self.flip))


class CifarTestTransform:
    def __init__(self, mean, std):
        self.normalize = Normalize(mean, std, scale255=True)

    def __call__(self, img: Tensor, rng: Optional[random.Random] = None) -> Tensor:
        return self.normalize(img)


# ---- ImageNet-style (PIL images) --------------------------------------------------

def resize_shorter(img, size: int):
    """Rescale a PIL image so that its shorter side is ``size`` (bilinear)."""
    from PIL import Image

    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        nw, nh = size, max(1, round(h * size / w))
    else:
        nw, nh = max(1, round(w * size / h)), size
    return img.resize((nw, nh), Image.BILINEAR)


def pil_to_tensor(img) -> Tensor:
    """PIL RGB image -> uint8 CHW tensor."""
    import numpy as np

    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None].repeat(3, axis=2)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def pca_lighting(x: Tensor, rng: random.Random, alphastd: float = 0.1,
                 eigval=IMAGENET_PCA_EIGVAL, eigvec=IMAGENET_PCA_EIGVEC) -> Tensor:
    """AlexNet's colour shift: add sum_i alpha_i * lambda_i * p_i to every pixel,
    alpha_i ~ N(0, alphastd^2). ``x``: float CHW RGB in [0, 1]."""
    if alphastd <= 0:
        return x
    alpha = [rng.gauss(0.0, alphastd) for _ in range(3)]
    shift = [sum(eigvec[c][i] * alpha[i] * eigval[i] for i in range(3)) for c in range(3)]
    return x + torch.tensor(shift, dtype=x.dtype).view(3, 1, 1)


def parse_scale(spec) -> Tuple[int, int]:
    """'256' -> (256, 256); '256,512' or (256, 512) -> (256, 512)."""
    if isinstance(spec, (tuple, list)):
        lo, hi = (int(spec[0]), int(spec[-1]))
    else:
        parts = [p for p in str(spec).replace(":", ",").split(",") if p.strip()]
        if not 1 <= len(parts) <= 2:
            raise ValueError(f"scale must be S or S_min,S_max, got {spec!r}")
        lo, hi = int(parts[0]), int(parts[-1])
    if lo <= 0 or hi < lo:
        raise ValueError(f"bad scale range {spec!r}")
    return lo, hi


class ImageNetTrainTransform:
    """Scale jittering (shorter side S in [S_min, S_max]) + random crop + flip +
    PCA lighting + normalise. PIL image in, float CHW tensor out."""

    def __init__(self, scale=(256, 480), crop: int = 224, lighting: float = 0.1,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.scale = parse_scale(scale)
        if crop > self.scale[0]:
            raise ValueError(f"crop {crop} is larger than the smallest training scale "
                             f"{self.scale[0]}")
        self.crop, self.lighting = crop, lighting
        self.normalize = Normalize(mean, std, scale255=False)

    def __call__(self, img, rng: random.Random) -> Tensor:
        s = rng.randint(*self.scale)
        img = resize_shorter(img, s)
        w, h = img.size
        x0, y0 = rng.randint(0, w - self.crop), rng.randint(0, h - self.crop)
        img = img.crop((x0, y0, x0 + self.crop, y0 + self.crop))
        x = pil_to_tensor(img).float() / 255.0
        if rng.random() < 0.5:
            x = x.flip(-1)
        x = pca_lighting(x, rng, self.lighting)
        return self.normalize(x)


class ImageNetTestTransform:
    """Shorter side to Q, then a centre ``crop`` (single-crop evaluation) or, with
    ``crop=None``, the whole rescaled image (dense evaluation)."""

    def __init__(self, scale: int = 256, crop: Optional[int] = 224, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        self.scale, self.crop = int(scale), crop
        if crop is not None and crop > self.scale:
            raise ValueError(f"test crop {crop} is larger than the test scale {self.scale}")
        self.normalize = Normalize(mean, std, scale255=False)

    def __call__(self, img, rng: Optional[random.Random] = None) -> Tensor:
        img = resize_shorter(img, self.scale)
        if self.crop is not None:
            w, h = img.size
            x0, y0 = int(math.floor((w - self.crop) / 2)), int(math.floor((h - self.crop) / 2))
            img = img.crop((x0, y0, x0 + self.crop, y0 + self.crop))
        return self.normalize(pil_to_tensor(img).float() / 255.0)
