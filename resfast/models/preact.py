"""Pre-activation ResNets (He et al. 2016, "Identity Mappings in Deep Residual
Networks"), full pre-activation units on the fused ops.

A unit computes ``x + F(x)`` with ``F = conv(relu(bn(conv(relu(bn(x))))))``
(bottleneck: three BN-ReLU-conv stages) and no ReLU after the addition.
On the fused ops each BN-ReLU is applied while the following conv loads its
input: the unit's first BN takes its statistics in one pass over x, every
later BN takes them in the epilogue of the conv before it.

As in the paper, the first unit follows the stem's own BN + ReLU (it has no
``bn1``) and the last unit is followed by a final BN + ReLU (``bn_final``)
before the pool. Shortcuts: "B" (default) a 1x1 conv on the pre-activated
input where the shape changes, "C" such projections everywhere, "A" the
zero-padded strided identity.
"""
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from ..functional import BatchNormArgs, Pending
from ._utils import check_num_classes, check_shortcut, init_conv_bn
from .registry import register_model
from .resnet import StemAndStages

__all__ = ["PreActBasicBlock", "PreActBottleneck", "PreActResNet", "preact_resnet18",
           "preact_resnet34", "preact_resnet50", "preact_resnet101", "preact_resnet152",
           "preact_resnet110", "preact_resnet164", "preact_resnet1001"]


class _PreActUnit(nn.Module):
    """Shared shortcut logic of the pre-activation units."""

    expansion = 1
    bn1: Optional[nn.BatchNorm2d]
    downsample: Optional[nn.Module]

    def _init_shortcut(self, inplanes: int, out: int, stride: int, downsample: Optional[nn.Module],
                       shortcut: Optional[str]) -> None:
        self.downsample = downsample
        self.stride = stride
        self.option_a = ((out, stride) if shortcut == "A" and (stride != 1 or inplanes != out)
                         else None)
        if self.option_a and downsample is not None:
            raise ValueError("shortcut='A' takes no downsample module")

    def _preactivate(self, x: Union[Tensor, Pending]):
        """(the pre-activated input, as a Pending or a Tensor; the shortcut)."""
        if self.bn1 is not None:
            if isinstance(x, Pending):
                x = F.finish(x)
            a: Union[Tensor, Pending] = F.batch_norm_pending(x, BatchNormArgs.of(self.bn1),
                                                             relu=True)
            raw = x
        else:
            # the first unit: x is already activated by the stem (maybe still pending)
            a = x
            raw = None
            if self.downsample is None:
                a = raw = F.materialize(x)
        if self.downsample is not None:
            conv = (self.downsample[0] if isinstance(self.downsample, nn.Sequential)
                    else self.downsample)
            sc = F.conv2d(a, conv.weight, conv.bias, stride=conv.stride[0], padding=conv.padding[0])
        elif self.option_a is not None:
            sc = F.shortcut_a(raw, *self.option_a)
        else:
            sc = raw
        return a, sc

    @staticmethod
    def _add(out: Tensor, shortcut: Tensor) -> Tensor:
        return F.finish(Pending(out, None, None, False), shortcut)


class PreActBasicBlock(_PreActUnit):
    """Full pre-activation basic unit: ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None,
                 preactivate: bool = True, shortcut: Optional[str] = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes) if preactivate else None
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self._init_shortcut(inplanes, planes, stride, downsample, shortcut)

    def forward(self, x: Union[Tensor, Pending]) -> Tensor:
        a, sc = self._preactivate(x)
        h = F.conv_bn_pending(a, self.conv1.weight, None, BatchNormArgs.of(self.bn2),
                              stride=self.stride, padding=1, relu=True)
        return self._add(F.conv2d(h, self.conv2.weight, padding=1), sc)


class PreActBottleneck(_PreActUnit):
    """Full pre-activation bottleneck unit: BN-ReLU-conv1x1, BN-ReLU-conv3x3
    (stride), BN-ReLU-conv1x1 (x4 channels), plus the shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None,
                 preactivate: bool = True, shortcut: Optional[str] = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes) if preactivate else None
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self._init_shortcut(inplanes, planes * self.expansion, stride, downsample, shortcut)

    def forward(self, x: Union[Tensor, Pending]) -> Tensor:
        a, sc = self._preactivate(x)
        h = F.conv_bn_pending(a, self.conv1.weight, None, BatchNormArgs.of(self.bn2), relu=True)
        h = F.conv_bn_pending(h, self.conv2.weight, None, BatchNormArgs.of(self.bn3),
                              stride=self.stride, padding=1, relu=True)
        return self._add(F.conv2d(h, self.conv3.weight), sc)


class PreActResNet(StemAndStages):
    """A pre-activation ResNet. ``stem="imagenet"``: 7x7/2 conv + BN + ReLU +
    3x3/2 max-pool, stages of 64..512 base channels; ``stem="cifar"``: 3x3 conv
    + BN + ReLU, stages of 16, 32, 64."""

    def __init__(self, block, layers: Sequence[int], num_classes: int = 1000, shortcut: str = "B",
                 widths: Sequence[int] = (64, 128, 256, 512), stem: str = "imagenet"):
        super().__init__()
        check_num_classes(num_classes)
        check_shortcut(shortcut)
        self.shortcut = shortcut
        self._build_stem(layers, widths, stem)
        for i, (width, n) in enumerate(zip(widths, layers)):
            setattr(self, f"layer{i + 1}",
                    self._make_layer(block, width, n, 1 if i == 0 else 2, first=i == 0))
        self.bn_final = nn.BatchNorm2d(self.inplanes)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)
        init_conv_bn(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int,
                    first: bool) -> nn.Sequential:
        layers: List[nn.Module] = []
        out = planes * block.expansion
        for i in range(blocks):
            s = stride if i == 0 else 1
            changes = s != 1 or self.inplanes != out
            downsample = None
            if self.shortcut == "C" or (self.shortcut == "B" and changes):
                downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, s, bias=False))
            layers.append(block(self.inplanes, planes, s, downsample,
                                preactivate=not (first and i == 0),
                                shortcut="A" if self.shortcut == "A" else None))
            self.inplanes = out
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        h = self._stem_forward(x)
        for stage in self.stages():
            for block in stage:
                h = block(h)
        return F.finish(F.batch_norm_pending(h, BatchNormArgs.of(self.bn_final), relu=True))

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


_IMAGENET = {18: (PreActBasicBlock, [2, 2, 2, 2]), 34: (PreActBasicBlock, [3, 4, 6, 3]),
             50: (PreActBottleneck, [3, 4, 6, 3]), 101: (PreActBottleneck, [3, 4, 23, 3]),
             152: (PreActBottleneck, [3, 8, 36, 3])}


def _imagenet(depth: int, num_classes: int, shortcut: str) -> PreActResNet:
    block, layers = _IMAGENET[depth]
    return PreActResNet(block, layers, num_classes=num_classes, shortcut=shortcut)


def _cifar(block, n: int, num_classes: int, shortcut: str) -> PreActResNet:
    return PreActResNet(block, [n] * 3, num_classes=num_classes, shortcut=shortcut,
                        widths=(16, 32, 64), stem="cifar")


@register_model()
def preact_resnet18(num_classes: int = 1000, shortcut: str = "B") -> PreActResNet:
    return _imagenet(18, num_classes, shortcut)


@register_model()
def preact_resnet34(num_classes: int = 1000, shortcut: str = "B") -> PreActResNet:
    return _imagenet(34, num_classes, shortcut)


@register_model()
def preact_resnet50(num_classes: int = 1000, shortcut: str = "B") -> PreActResNet:
    return _imagenet(50, num_classes, shortcut)


@register_model()
def preact_resnet101(num_classes: int = 1000, shortcut: str = "B") -> PreActResNet:
    return _imagenet(101, num_classes, shortcut)


@register_model()
def preact_resnet152(num_classes: int = 1000, shortcut: str = "B") -> PreActResNet:
    return _imagenet(152, num_classes, shortcut)


@register_model(dataset="cifar")
def preact_resnet110(num_classes: int = 10, shortcut: str = "B") -> PreActResNet:
    """CIFAR pre-activation ResNet-110: 3 x 18 basic units, 16-32-64 channels."""
    return _cifar(PreActBasicBlock, 18, num_classes, shortcut)


@register_model(dataset="cifar")
def preact_resnet164(num_classes: int = 10, shortcut: str = "B") -> PreActResNet:
    """CIFAR pre-activation ResNet-164: 3 x 18 bottleneck units, 64-128-256 output channels."""
    return _cifar(PreActBottleneck, 18, num_classes, shortcut)


@register_model(dataset="cifar")
def preact_resnet1001(num_classes: int = 10, shortcut: str = "B") -> PreActResNet:
    """CIFAR pre-activation ResNet-1001: 3 x 111 bottleneck units."""
    return _cifar(PreActBottleneck, 111, num_classes, shortcut)
