"""``--backend torch``: the same network computed by plain torch.nn.

:func:`to_torch` turns a model built from ``resfast.nn`` layers into one that
runs only torch.nn / torch.nn.functional code, in place, by switching each
fused layer's class to a subclass whose forward is the unfused composite
(conv -> BN -> ReLU, residual add ...). The modules keep their children,
parameters and buffers, so the state_dict keys (torchvision's) do not change and
a checkpoint of one backend loads into the other. :func:`resfast_ops_called`
runs a forward and lists the ``resfast::`` ops it dispatched, which the trainer
uses to prove that the torch backend calls none.
"""
from typing import Set

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resfast import nn as rnn
from resfast.functional import shortcut_a

from .sync_bn import batch_norm


class TorchConv2dBNReLU(rnn.Conv2dBNReLU):
    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        return F.relu(y) if self.relu else y


class TorchBatchNormAddReLU(rnn.BatchNormAddReLU):
    def forward(self, y: Tensor, residual: Tensor) -> Tensor:  # type: ignore[override]
        return F.relu(batch_norm(self, y) + residual)


class TorchAddReLU(rnn.AddReLU):
    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        return F.relu(y + residual)


class TorchBNReLUConv2d(rnn.BNReLUConv2d):
    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.relu(self.bn(x)))


def _torch_shortcut(block, x: Tensor) -> Tensor:
    if block.option_a is not None:
        return shortcut_a(x, *block.option_a)
    if block.downsample is not None:
        return block.downsample(x)
    return x


class TorchBasicBlock(rnn.BasicBlock):
    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + _torch_shortcut(self, x))


class TorchBottleneck(rnn.Bottleneck):
    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + _torch_shortcut(self, x))


TORCH_EQUIVALENT = {
    rnn.Conv2dBNReLU: TorchConv2dBNReLU,
    rnn.BatchNormAddReLU: TorchBatchNormAddReLU,
    rnn.AddReLU: TorchAddReLU,
    rnn.BNReLUConv2d: TorchBNReLUConv2d,
    rnn.BasicBlock: TorchBasicBlock,
    rnn.Bottleneck: TorchBottleneck,
}


def to_torch(model: nn.Module) -> nn.Module:
    """Switch every ``resfast.nn`` fused layer of ``model`` to its plain torch
    composite (in place; returns ``model``). Same modules, tensors and keys."""
    for m in model.modules():
        equiv = TORCH_EQUIVALENT.get(type(m))
        if equiv is not None:
            m.__class__ = equiv
    return model


def has_fused_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds layers that run the resfast fused ops."""
    fused = tuple(TORCH_EQUIVALENT)
    plain = tuple(TORCH_EQUIVALENT.values())
    return any(isinstance(m, fused) and not isinstance(m, plain) for m in model.modules())


def resfast_ops_called(model: nn.Module, example: Tensor) -> Set[str]:
    """The ``resfast::`` ops a forward of ``model`` on ``example`` dispatches.

    Runs in eval mode without gradients (nothing is updated: no running
    statistics, no dropout RNG), then restores the module's mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found: Set[str] = set()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if getattr(func, "namespace", None) == "resfast":
                found.add(str(func.name()))
            return func(*args, **(kwargs or {}))

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), Recorder():
            model(example)
    finally:
        model.train(was_training)
    return found
