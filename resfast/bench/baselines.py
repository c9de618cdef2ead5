"""The torch.nn side of every comparison.

Each class computes what a resfast module computes, written as torchvision
writes it (``nn.Conv2d`` -> ``nn.BatchNorm2d`` -> in-place ReLU, ``out +=
identity``), over *copies of the resfast module's own children*: the same
weights, the same BN settings, no resfast op anywhere. ``eager_twin(module)``
picks the class; ``torch.compile`` of the twin is the third provider.

For the ImageNet networks torchvision has, the benchmark uses
``torchvision.models.<name>`` itself when torchvision is installed (same
state_dict, loaded from the resfast model), and :class:`ResNetRef` /
:class:`VGGRef` otherwise; each result row names the baseline it used.
"""
import copy
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import nn as rnn

__all__ = ["ConvBNReLU", "BNAddReLU", "BNReLUConv", "BasicBlockRef", "BottleneckRef", "PlainBlockRef",
           "ResNetRef", "VGGRef", "eager_twin", "torchvision_twin"]


def shortcut_a(x: Tensor, out_channels: int, stride: int) -> Tensor:
    """Option A shortcut in plain torch: strided identity, zero-padded channels."""
    y = x[:, :, ::stride, ::stride] if stride > 1 else x
    extra = out_channels - x.shape[1]
    return nn.functional.pad(y, (0, 0, 0, 0, extra // 2, extra - extra // 2)) if extra else y


class ConvBNReLU(nn.Module):
    """``relu(bn(conv(x)))`` (``relu=False``: ``bn(conv(x))``)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.use_relu = relu

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        return torch.relu_(y) if self.use_relu else y


class BNAddReLU(nn.Module):
    """``relu(bn(y) + residual)``."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.bn = bn

    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        out = self.bn(y)
        out += residual
        return torch.relu_(out)


class BNReLUConv(nn.Module):
    """Pre-activation ``conv(relu(bn(x)))``."""

    def __init__(self, bn: nn.BatchNorm2d, conv: nn.Conv2d):
        super().__init__()
        self.bn, self.conv = bn, conv

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(torch.relu_(self.bn(x)))


class BasicBlockRef(nn.Module):
    """torchvision's ``BasicBlock.forward`` over a resfast block's children."""

    def __init__(self, block: rnn.BasicBlock):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = block.conv1, block.bn1, block.conv2, block.bn2
        self.downsample = block.downsample
        self.option_a: Optional[Tuple[int, int]] = block.option_a

    def _identity(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            return self.downsample(x)
        if self.option_a is not None:
            return shortcut_a(x, *self.option_a)
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self._identity(x)
        return torch.relu_(out)


class BottleneckRef(BasicBlockRef):
    """torchvision's ``Bottleneck.forward`` (stride in the 3x3) over a resfast block's children."""

    def __init__(self, block: rnn.Bottleneck):
        nn.Module.__init__(self)
        self.conv1, self.bn1, self.conv2, self.bn2 = block.conv1, block.bn1, block.conv2, block.bn2
        self.conv3, self.bn3 = block.conv3, block.bn3
        self.downsample = block.downsample
        self.option_a = block.option_a

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu_(self.bn1(self.conv1(x)))
        out = torch.relu_(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self._identity(x)
        return torch.relu_(out)


class PlainBlockRef(nn.Module):
    """A plain (shortcut-free) block: conv -> BN -> ReLU for each conv."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList()
        i = 1
        while hasattr(block, f"conv{i}"):
            self.layers.append(ConvBNReLU(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")))
            i += 1

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _block_twin(block: nn.Module) -> nn.Module:
    if isinstance(block, rnn.Bottleneck):
        return BottleneckRef(block)
    if isinstance(block, rnn.BasicBlock):
        return BasicBlockRef(block)
    if hasattr(block, "conv1") and hasattr(block, "bn1"):
        return PlainBlockRef(block)
    raise TypeError(f"no torch.nn twin for block {type(block).__name__}")


class ResNetRef(nn.Module):
    """A resfast ``ResNet`` (ImageNet or CIFAR stem, any shortcut option, plain
    nets too) as torchvision's ``ResNet.forward`` over its children."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.maxpool = net.conv1, net.bn1, net.maxpool
        self.stages = nn.ModuleList(nn.Sequential(*(_block_twin(b) for b in stage)) for stage in net.stages())
        self.avgpool, self.fc = net.avgpool, net.fc

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu_(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for stage in self.stages:
            x = stage(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class VGGRef(nn.Module):
    """A resfast ``VGG`` as torchvision's ``VGG.forward``: ``nn.Sequential``'s own
    forward over the same feature layers."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.features = nn.Sequential(*net.features)
        self.avgpool, self.classifier = net.avgpool, net.classifier

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


def eager_twin(module: nn.Module) -> nn.Module:
    """A pure torch.nn module computing what ``module`` (a resfast module or
    network) computes, over deep copies of its children."""
    from ..models import VGG, ResNet

    m = copy.deepcopy(module)
    if isinstance(m, rnn.Conv2dBNReLU):
        return ConvBNReLU(m.conv, m.bn, m.relu)
    if isinstance(m, rnn.BatchNormAddReLU):
        ref = next(iter(m.state_dict().values()), None)
        like = dict(device=ref.device, dtype=m.weight.dtype if m.weight is not None else m.running_mean.dtype) \
            if ref is not None else {}
        bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **like)
        bn.load_state_dict(m.state_dict())
        return BNAddReLU(bn.train(m.training))
    if isinstance(m, rnn.BNReLUConv2d):
        return BNReLUConv(m.bn, m.conv)
    if isinstance(m, (rnn.BasicBlock, rnn.Bottleneck)):
        return _block_twin(m)
    if isinstance(m, ResNet):
        return ResNetRef(m)
    if isinstance(m, VGG):
        if getattr(m, "dense", False):
            raise TypeError("no torch.nn twin for dense-evaluation VGG")
        return VGGRef(m)
    raise TypeError(f"no torch.nn twin for {type(module).__name__}")


def torchvision_twin(name: str, module: nn.Module) -> Optional[nn.Module]:
    """``torchvision.models.<name>`` with ``module``'s weights (its state_dict is
    torchvision's, key for key), or None when torchvision is not installed or
    has no such network."""
    try:
        import torchvision
    except ImportError:
        return None
    builder = getattr(torchvision.models, name, None)
    if builder is None:
        return None
    ref = module.state_dict()
    first = next(iter(ref.values()))
    num_classes = module.fc.out_features if hasattr(module, "fc") else module.classifier[-1].out_features
    with torch.device("meta"):
        tv = builder(weights=None, num_classes=num_classes)
    tv = tv.to_empty(device=first.device)
    tv.load_state_dict(ref, strict=True)
    return tv.train(module.training)
