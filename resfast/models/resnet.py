"""ResNet (He et al. 2015) for ImageNet, and its plain twins, on the fused ops.

Same module tree as torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0`` ..., ``fc``), so torchvision checkpoints load as
they are. Blocks are :class:`resfast.nn.BasicBlock` / :class:`resfast.nn.Bottleneck`
(stride in the 3x3 conv, torchvision's "v1.5").

Shortcuts (``shortcut=``): "A" zero-padded strided identity where the shape
changes (no parameters), "B" a 1x1 conv + BN projection where the shape
changes (torchvision's default), "C" projections in every block.

Plain nets (``plain18`` ...) are the same stacks without shortcuts; there each
block's last BN + ReLU is left pending and applied in the next block's first
conv (prologue fusion across blocks).
"""
from typing import List, Optional, Sequence, Type, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import nn as rnn
from ..functional import BatchNormArgs, Pending
from ._utils import check_bool, check_num_classes, check_shortcut, init_conv_bn
from .registry import register_model

__all__ = ["ResNet", "PlainBasicBlock", "PlainBottleneck", "resnet18", "resnet34", "resnet50",
           "resnet101", "resnet152", "plain18", "plain34", "plain50", "plain101", "plain152"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class PlainBasicBlock(nn.Module):
    """BasicBlock without the shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x))))))``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride

    def forward_pending(self, x: Union[Tensor, Pending]) -> Pending:
        """The block's output left pending (its last BN + ReLU not yet applied)."""
        h = F.conv_bn_pending(x, self.conv1.weight, None, BatchNormArgs.of(self.bn1),
                              stride=self.stride, padding=1, relu=True)
        return F.conv_bn_pending(h, self.conv2.weight, None, BatchNormArgs.of(self.bn2), padding=1,
                                 relu=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.finish(self.forward_pending(x))


class PlainBottleneck(nn.Module):
    """Bottleneck without the shortcut: 1x1 -> 3x3 (stride) -> 1x1, BN + ReLU after each."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride

    def forward_pending(self, x: Union[Tensor, Pending]) -> Pending:
        h = F.conv_bn_pending(x, self.conv1.weight, None, BatchNormArgs.of(self.bn1), relu=True)
        h = F.conv_bn_pending(h, self.conv2.weight, None, BatchNormArgs.of(self.bn2),
                              stride=self.stride, padding=1, relu=True)
        return F.conv_bn_pending(h, self.conv3.weight, None, BatchNormArgs.of(self.bn3), relu=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.finish(self.forward_pending(x))


BlockType = Type[Union[rnn.BasicBlock, rnn.Bottleneck, PlainBasicBlock, PlainBottleneck]]


class StemAndStages(nn.Module):
    """What the ResNets and pre-activation ResNets share: the stem (conv + BN +
    ReLU, then a max-pool for ImageNet) and the stages ``layer1``..``layerN``."""

    def _build_stem(self, layers: Sequence[int], widths: Sequence[int], stem: str) -> None:
        """Checks the configuration, then registers conv1, bn1, relu, maxpool
        (torchvision's names and order, so checkpoints load)."""
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if len(layers) != len(widths) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                             for n in layers):
            raise ValueError(f"layers must be {len(widths)} positive ints (blocks per stage), got "
                             f"{list(layers)!r}")
        self.inplanes = widths[0]
        k, s = (7, 2) if stem == "imagenet" else (3, 1)
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=k, stride=s, padding=k // 2,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet"
                        else None)
        self.num_stages = len(widths)

    def stages(self) -> List[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def _stem_forward(self, x: Tensor) -> Union[Tensor, Pending]:
        """conv1 with bn1 + ReLU pending (applied by the first block's conv), or
        applied before the max-pool. The network runs channels_last: an NCHW input is
        copied once, here (the ops compute in their input's layout)."""
        conv = self.conv1
        x = F.channels_last_input(x)
        h: Union[Tensor, Pending] = F.conv_bn_pending(x, conv.weight, None,
                                                      BatchNormArgs.of(self.bn1),
                                                      stride=conv.stride[0],
                                                      padding=conv.padding[0], relu=True)
        if self.maxpool is not None:
            h = self.maxpool(F.materialize(h))
        return h


class ResNet(StemAndStages):
    """torchvision's ResNet on the fused ops, also the CIFAR variant.

    ``stem="imagenet"``: 7x7/2 conv + BN + ReLU + 3x3/2 max-pool;
    ``stem="cifar"``: 3x3 conv + BN + ReLU. ``widths`` are the base channels of
    the stages (64, 128, 256, 512 for ImageNet; 16, 32, 64 for CIFAR).
    """

    def __init__(self, block: BlockType, layers: Sequence[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, shortcut: str = "B",
                 widths: Sequence[int] = (64, 128, 256, 512), stem: str = "imagenet"):
        super().__init__()
        check_num_classes(num_classes)
        check_shortcut(shortcut)
        check_bool(zero_init_residual, "zero_init_residual")
        self.plain = block in (PlainBasicBlock, PlainBottleneck)
        self.shortcut = shortcut
        self._build_stem(layers, widths, stem)
        for i, (width, n) in enumerate(zip(widths, layers)):
            setattr(self, f"layer{i + 1}",
                    self._make_layer(block, width, n, stride=1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

        init_conv_bn(self)
        if zero_init_residual:
            if self.plain:
                raise ValueError("zero_init_residual applies to residual nets, not plain ones")
            for m in self.modules():
                if isinstance(m, rnn.Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, rnn.BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: BlockType, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers: List[nn.Module] = []
        out = planes * block.expansion
        for i in range(blocks):
            s = stride if i == 0 else 1
            if self.plain:
                layers.append(block(self.inplanes, planes, s))
            else:
                changes = s != 1 or self.inplanes != out
                downsample: Optional[nn.Module] = None
                if self.shortcut == "C" or (self.shortcut == "B" and changes):
                    downsample = nn.Sequential(_conv1x1(self.inplanes, out, s), nn.BatchNorm2d(out))
                layers.append(block(self.inplanes, planes, s, downsample,
                                    shortcut="A" if self.shortcut == "A" else None))
            self.inplanes = out
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """Everything before the global average pool."""
        h = self._stem_forward(x)
        for stage in self.stages():
            for block in stage:
                if self.plain:
                    h = block.forward_pending(h)
                else:
                    h = block(F.materialize(h))
        return F.materialize(h)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


_LAYERS = {18: (rnn.BasicBlock, [2, 2, 2, 2]), 34: (rnn.BasicBlock, [3, 4, 6, 3]),
           50: (rnn.Bottleneck, [3, 4, 6, 3]), 101: (rnn.Bottleneck, [3, 4, 23, 3]),
           152: (rnn.Bottleneck, [3, 8, 36, 3])}


def _resnet(depth: int, num_classes: int = 1000, zero_init_residual: bool = False,
            shortcut: str = "B") -> ResNet:
    block, layers = _LAYERS[depth]
    return ResNet(block, layers, num_classes=num_classes, zero_init_residual=zero_init_residual,
                  shortcut=shortcut)


def _plain(depth: int, num_classes: int = 1000) -> ResNet:
    block, layers = _LAYERS[depth]
    return ResNet(PlainBasicBlock if block is rnn.BasicBlock else PlainBottleneck, layers,
                  num_classes=num_classes)


@register_model(torchvision="resnet18")
def resnet18(num_classes: int = 1000, zero_init_residual: bool = False,
             shortcut: str = "B") -> ResNet:
    """ResNet-18: basic blocks 2-2-2-2."""
    return _resnet(18, num_classes, zero_init_residual, shortcut)


@register_model(torchvision="resnet34")
def resnet34(num_classes: int = 1000, zero_init_residual: bool = False,
             shortcut: str = "B") -> ResNet:
    """ResNet-34: basic blocks 3-4-6-3."""
    return _resnet(34, num_classes, zero_init_residual, shortcut)


@register_model(torchvision="resnet50")
def resnet50(num_classes: int = 1000, zero_init_residual: bool = False,
             shortcut: str = "B") -> ResNet:
    """ResNet-50: bottleneck blocks 3-4-6-3."""
    return _resnet(50, num_classes, zero_init_residual, shortcut)


@register_model(torchvision="resnet101")
def resnet101(num_classes: int = 1000, zero_init_residual: bool = False,
              shortcut: str = "B") -> ResNet:
    """ResNet-101: bottleneck blocks 3-4-23-3."""
    return _resnet(101, num_classes, zero_init_residual, shortcut)


@register_model(torchvision="resnet152")
def resnet152(num_classes: int = 1000, zero_init_residual: bool = False,
              shortcut: str = "B") -> ResNet:
    """ResNet-152: bottleneck blocks 3-8-36-3."""
    return _resnet(152, num_classes, zero_init_residual, shortcut)


@register_model()
def plain18(num_classes: int = 1000) -> ResNet:
    """Plain-18: ResNet-18 without shortcuts."""
    return _plain(18, num_classes)


@register_model()
def plain34(num_classes: int = 1000) -> ResNet:
    """Plain-34: ResNet-34 without shortcuts."""
    return _plain(34, num_classes)


@register_model()
def plain50(num_classes: int = 1000) -> ResNet:
    return _plain(50, num_classes)


@register_model()
def plain101(num_classes: int = 1000) -> ResNet:
    return _plain(101, num_classes)


@register_model()
def plain152(num_classes: int = 1000) -> ResNet:
    return _plain(152, num_classes)
