"""VGG (Simonyan & Zisserman, configurations A, A-LRN, B, C, D, E) on the fused ops.

The layout is torchvision's (``features.N.*``, ``classifier.N.*``), so a
torchvision VGG ``state_dict`` loads unchanged. ``features`` is a
:class:`resfast.nn.FusedSequential`: Conv2d [-> BatchNorm2d] -> ReLU runs go
through the fused conv (training-mode BN statistics in the conv's epilogue,
BN-apply + ReLU in the next conv's prologue; eval mode folds BN into the conv;
without BN the bias and ReLU ride in the conv's epilogue).

Dense evaluation (``dense=True`` or :meth:`VGG.forward_dense`): the three FC
layers become a 7x7 conv and two 1x1 convs sharing the FC weights, the network
runs on an image of any size >= 224 and the class score map is averaged over
space. :func:`multi_scale_eval` averages the soft-max posteriors over several
test scales (and horizontal flips).
"""
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from ..nn import FusedSequential
from ._utils import check_bool, check_num_classes, init_conv_bn
from .registry import register_model

__all__ = ["VGG", "CONFIGS", "make_layers", "multi_scale_eval", "vgg11", "vgg11_bn", "vgg11_lrn",
           "vgg13", "vgg13_bn", "vgg16_c", "vgg16_c_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]

# channel widths, "M" = 2x2 max-pool, "LRN" = local response normalisation,
# (C, 1) = a 1x1 conv (configuration C).
Entry = Union[int, str, Tuple[int, int]]
CONFIGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M", 512, 512, (512, 1), "M", 512, 512,
          (512, 1), "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512,
          512, 512, "M"],
}


def make_layers(cfg: List[Entry], batch_norm: bool = False) -> FusedSequential:
    """torchvision's ``make_layers`` (same modules, same indices) as a FusedSequential."""
    layers: List[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif v == "LRN":
            # Krizhevsky et al.'s constants, as the VGG paper used them
            layers.append(nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0))
        else:
            width, k = (v, 3) if isinstance(v, int) else v
            layers.append(nn.Conv2d(in_channels, width, kernel_size=k, padding=k // 2))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            in_channels = width
    return FusedSequential(*layers)


class VGG(nn.Module):
    """torchvision's VGG (features, avgpool to 7x7, classifier FC-4096, FC-4096,
    FC-num_classes with dropout) with fused features and a dense-evaluation mode."""

    def __init__(self, features: nn.Sequential, num_classes: int = 1000, init_weights: bool = True,
                 dropout: float = 0.5, dense: bool = False):
        super().__init__()
        check_num_classes(num_classes)
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        self.dense = check_bool(dense, "dense")
        if init_weights:
            init_conv_bn(self)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        if self.dense:
            return self.forward_dense(x)
        x = self.features(F.channels_last_input(x))  # the network runs channels_last
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)

    def forward_dense(self, x: Tensor) -> Tensor:
        """Dense evaluation: FC layers as convolutions (7x7, 1x1, 1x1) over the
        whole feature map, the class score map averaged over space. Any input
        of at least 224x224 (a 7x7 feature map); returns (N, num_classes)."""
        return self.score_map(x).mean(dim=(2, 3))

    def score_map(self, x: Tensor) -> Tensor:
        """The (N, num_classes, H', W') class score map of dense evaluation."""
        fc1, relu1, drop1, fc2, relu2, drop2, fc3 = self.classifier
        h = self.features(F.channels_last_input(x))
        k = self.avgpool.output_size
        k = k if isinstance(k, int) else k[0]
        if h.shape[2] < k or h.shape[3] < k:
            raise ValueError(f"dense evaluation needs a feature map of at least {k}x{k} (an input "
                             f"of at least {32 * k}x{32 * k}), got {tuple(h.shape[2:])} from an "
                             f"input of {tuple(x.shape[2:])}")
        c = fc1.in_features // (k * k)
        h = F.conv2d(h, fc1.weight.view(fc1.out_features, c, k, k), fc1.bias, relu=True)
        h = drop1(h)
        h = F.conv2d(h, fc2.weight.view(fc2.out_features, fc2.in_features, 1, 1), fc2.bias,
                     relu=True)
        h = drop2(h)
        return F.conv2d(h, fc3.weight.view(fc3.out_features, fc3.in_features, 1, 1), fc3.bias)


def multi_scale_eval(model: nn.Module, images: Tensor, scales: Sequence[int] = (256, 384, 512),
                     flip: bool = True) -> Tensor:
    """Multi-scale dense evaluation: the images (N, 3, H, W) are rescaled so
    their smaller side is each test scale Q, run densely (``model.forward_dense``
    where the model has it, else ``model``), optionally also flipped
    horizontally, and the soft-max class posteriors averaged. Returns (N,
    num_classes) probabilities. Runs without gradients; put the model in eval
    mode first."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a 4-D tensor (N, C, H, W), got {got}")
    scales = list(scales)
    if not scales or any(isinstance(q, bool) or not isinstance(q, int) or q < 1 for q in scales):
        raise ValueError(f"scales must be a non-empty list of positive ints, got {scales!r}")
    run = getattr(model, "forward_dense", model)
    h, w = images.shape[2:]
    total, count = None, 0
    with torch.no_grad():
        for q in scales:
            size = (q, max(1, round(w * q / h))) if h <= w else (max(1, round(h * q / w)), q)
            x = images if tuple(images.shape[2:]) == size else torch.nn.functional.interpolate(
                images, size=size, mode="bilinear", align_corners=False, antialias=True)
            views = [x, x.flip(3)] if flip else [x]
            for v in views:
                p = torch.softmax(run(v).float(), dim=1)
                total = p if total is None else total + p
                count += 1
    return total / count


def _vgg(cfg: str, batch_norm: bool, num_classes: int = 1000, **kwargs) -> VGG:
    check_num_classes(num_classes)
    check_bool(batch_norm, "batch_norm")
    return VGG(make_layers(CONFIGS[cfg], batch_norm), num_classes=num_classes, **kwargs)


@register_model(torchvision="vgg11")
def vgg11(num_classes: int = 1000, batch_norm: bool = False, **kwargs) -> VGG:
    """VGG configuration A (11 weight layers)."""
    return _vgg("A", batch_norm, num_classes, **kwargs)


@register_model(torchvision="vgg11_bn")
def vgg11_bn(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG A with BatchNorm after every conv (torchvision's vgg11_bn)."""
    return _vgg("A", True, num_classes, **kwargs)


@register_model()
def vgg11_lrn(num_classes: int = 1000, batch_norm: bool = False, **kwargs) -> VGG:
    """VGG configuration A-LRN: A with local response normalisation after the first layer."""
    return _vgg("A-LRN", batch_norm, num_classes, **kwargs)


@register_model(torchvision="vgg13")
def vgg13(num_classes: int = 1000, batch_norm: bool = False, **kwargs) -> VGG:
    """VGG configuration B (13 weight layers)."""
    return _vgg("B", batch_norm, num_classes, **kwargs)


@register_model(torchvision="vgg13_bn")
def vgg13_bn(num_classes: int = 1000, **kwargs) -> VGG:
    return _vgg("B", True, num_classes, **kwargs)


@register_model()
def vgg16_c(num_classes: int = 1000, batch_norm: bool = False, **kwargs) -> VGG:
    """VGG configuration C: 16 weight layers, with a 1x1 conv ending stages 3, 4 and 5."""
    return _vgg("C", batch_norm, num_classes, **kwargs)


@register_model()
def vgg16_c_bn(num_classes: int = 1000, **kwargs) -> VGG:
    return _vgg("C", True, num_classes, **kwargs)


@register_model(torchvision="vgg16")
def vgg16(num_classes: int = 1000, batch_norm: bool = False, **kwargs) -> VGG:
    """VGG configuration D (16 weight layers, all 3x3)."""
    return _vgg("D", batch_norm, num_classes, **kwargs)


@register_model(torchvision="vgg16_bn")
def vgg16_bn(num_classes: int = 1000, **kwargs) -> VGG:
    return _vgg("D", True, num_classes, **kwargs)


@register_model(torchvision="vgg19")
def vgg19(num_classes: int = 1000, batch_norm: bool = False, **kwargs) -> VGG:
    """VGG configuration E (19 weight layers)."""
    return _vgg("E", batch_norm, num_classes, **kwargs)


@register_model(torchvision="vgg19_bn")
def vgg19_bn(num_classes: int = 1000, **kwargs) -> VGG:
    return _vgg("E", True, num_classes, **kwargs)
