"""CIFAR ResNets (He et al. 2015, section 4.2) and their plain twins.

32x32 input, a 3x3 conv with 16 channels, three stages of n basic blocks with
16, 32 and 64 channels (6n + 2 weight layers), global average pool, FC.
Option A shortcuts (zero-padded strided identity, no parameters) by default.
The module tree follows torchvision's ResNet: ``conv1``, ``bn1``,
``layer1..3``, ``fc``.
"""
from .. import nn as rnn
from .registry import register_model
from .resnet import PlainBasicBlock, ResNet

__all__ = ["cifar_resnet", "cifar_plain", "resnet20", "resnet32", "resnet44", "resnet56",
           "resnet110", "resnet1202", "plain20", "plain32", "plain44", "plain56", "plain110"]

WIDTHS = (16, 32, 64)


def _blocks_per_stage(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError("depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got "
                         f"{depth!r}")
    return (depth - 2) // 6


def cifar_resnet(depth: int, num_classes: int = 10, zero_init_residual: bool = False,
                 shortcut: str = "A") -> ResNet:
    """A CIFAR ResNet of ``depth`` = 6n + 2 layers."""
    n = _blocks_per_stage(depth)
    return ResNet(rnn.BasicBlock, [n] * 3, num_classes=num_classes,
                  zero_init_residual=zero_init_residual,
                  shortcut=shortcut, widths=WIDTHS, stem="cifar")


def cifar_plain(depth: int, num_classes: int = 10) -> ResNet:
    """A CIFAR plain net of ``depth`` = 6n + 2 layers (no shortcuts)."""
    n = _blocks_per_stage(depth)
    return ResNet(PlainBasicBlock, [n] * 3, num_classes=num_classes, widths=WIDTHS, stem="cifar")


@register_model(dataset="cifar")
def resnet20(num_classes: int = 10, zero_init_residual: bool = False,
             shortcut: str = "A") -> ResNet:
    return cifar_resnet(20, num_classes, zero_init_residual, shortcut)


@register_model(dataset="cifar")
def resnet32(num_classes: int = 10, zero_init_residual: bool = False,
             shortcut: str = "A") -> ResNet:
    return cifar_resnet(32, num_classes, zero_init_residual, shortcut)


@register_model(dataset="cifar")
def resnet44(num_classes: int = 10, zero_init_residual: bool = False,
             shortcut: str = "A") -> ResNet:
    return cifar_resnet(44, num_classes, zero_init_residual, shortcut)


@register_model(dataset="cifar")
def resnet56(num_classes: int = 10, zero_init_residual: bool = False,
             shortcut: str = "A") -> ResNet:
    return cifar_resnet(56, num_classes, zero_init_residual, shortcut)


@register_model(dataset="cifar")
def resnet110(num_classes: int = 10, zero_init_residual: bool = False,
              shortcut: str = "A") -> ResNet:
    return cifar_resnet(110, num_classes, zero_init_residual, shortcut)


@register_model(dataset="cifar")
def resnet1202(num_classes: int = 10, zero_init_residual: bool = False,
               shortcut: str = "A") -> ResNet:
    return cifar_resnet(1202, num_classes, zero_init_residual, shortcut)


@register_model(dataset="cifar")
def plain20(num_classes: int = 10) -> ResNet:
    return cifar_plain(20, num_classes)


@register_model(dataset="cifar")
def plain32(num_classes: int = 10) -> ResNet:
    return cifar_plain(32, num_classes)


@register_model(dataset="cifar")
def plain44(num_classes: int = 10) -> ResNet:
    return cifar_plain(44, num_classes)


@register_model(dataset="cifar")
def plain56(num_classes: int = 10) -> ResNet:
    return cifar_plain(56, num_classes)


@register_model(dataset="cifar")
def plain110(num_classes: int = 10) -> ResNet:
    return cifar_plain(110, num_classes)
