"""``--backend torch``: the same network computed by plain torch.nn.

:func:`to_torch` turns a model built from resfast layers (``resfast.nn``,
``resfast.fusion.FusedSequential`` and the ``resfast.models`` networks) into one
that runs only torch.nn / torch.nn.functional code, in place, by switching each
fused module's class to a subclass whose forward is the unfused composite
(conv -> BN -> ReLU, residual add ...). The modules keep their children,
parameters and buffers, so the state_dict keys (torchvision's) do not change and
a checkpoint of one backend loads into the other. :func:`resfast_ops_called`
runs a forward and lists the ``resfast::`` ops it dispatched, which the trainer
uses to prove that the torch backend calls none.
"""
import sys
from typing import Dict, List, Set, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resfast import nn as rnn
from resfast.functional import shortcut_a

from .sync_bn import batch_norm


# ---- torch forwards of the resfast.nn layers ------------------------------------------

class _Conv2dBNReLU:
    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        return F.relu(y) if self.relu else y


class _BatchNormAddReLU:
    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        return F.relu(batch_norm(self, y) + residual)


class _AddReLU:
    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        return F.relu(y + residual)


class _BNReLUConv2d:
    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.relu(self.bn(x)))


def _shortcut(block, x: Tensor) -> Tensor:
    if getattr(block, "option_a", None) is not None:
        return shortcut_a(x, *block.option_a)
    if block.downsample is not None:
        return block.downsample(x)
    return x


class _BasicBlock:
    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + _shortcut(self, x))


class _Bottleneck:
    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + _shortcut(self, x))


class _FusedSequential:
    def forward(self, x):
        return nn.Sequential.forward(self, x)


# ---- torch forwards of the resfast.models networks ------------------------------------

class _PlainBasicBlock:
    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class _PlainBottleneck:
    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return F.relu(self.bn3(self.conv3(h)))


class _ResNet:
    def forward_features(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            h = self.maxpool(h)
        for stage in self.stages():
            for block in stage:
                h = block(h)
        return h


def _preactivate(unit, x: Tensor):
    """(pre-activated input, shortcut) of a full pre-activation unit; the first
    unit (no bn1) takes the stem's already activated output."""
    if unit.bn1 is not None:
        a, raw = F.relu(unit.bn1(x)), x
    else:
        a = raw = x
    if unit.downsample is not None:
        sc = unit.downsample(a)
    elif unit.option_a is not None:
        sc = shortcut_a(raw, *unit.option_a)
    else:
        sc = raw
    return a, sc


class _PreActBasicBlock:
    def forward(self, x: Tensor) -> Tensor:
        a, sc = _preactivate(self, x)
        return self.conv2(F.relu(self.bn2(self.conv1(a)))) + sc


class _PreActBottleneck:
    def forward(self, x: Tensor) -> Tensor:
        a, sc = _preactivate(self, x)
        h = F.relu(self.bn2(self.conv1(a)))
        h = F.relu(self.bn3(self.conv2(h)))
        return self.conv3(h) + sc


class _PreActResNet:
    def forward_features(self, x: Tensor) -> Tensor:
        return F.relu(self.bn_final(_ResNet.forward_features(self, x)))


class _VGG:
    def score_map(self, x: Tensor) -> Tensor:
        fc1, relu1, drop1, fc2, relu2, drop2, fc3 = self.classifier
        h = self.features(x)
        k = self.avgpool.output_size
        k = k if isinstance(k, int) else k[0]
        if h.shape[2] < k or h.shape[3] < k:
            raise ValueError(f"dense evaluation needs a feature map of at least {k}x{k}, got {tuple(h.shape[2:])}")
        c = fc1.in_features // (k * k)
        h = drop1(F.relu(F.conv2d(h, fc1.weight.view(fc1.out_features, c, k, k), fc1.bias)))
        h = drop2(F.relu(F.conv2d(h, fc2.weight[:, :, None, None], fc2.bias)))
        return F.conv2d(h, fc3.weight[:, :, None, None], fc3.bias)


def _rules() -> List[Tuple[Type[nn.Module], type]]:
    """(resfast class, torch mixin), most specific first."""
    rules: List[Tuple[Type[nn.Module], type]] = []
    try:  # the networks (absent in a checkout without resfast.models)
        from resfast.models import preact, resnet, vgg

        rules += [(preact.PreActResNet, _PreActResNet), (preact.PreActBasicBlock, _PreActBasicBlock),
                  (preact.PreActBottleneck, _PreActBottleneck), (resnet.ResNet, _ResNet),
                  (resnet.PlainBasicBlock, _PlainBasicBlock), (resnet.PlainBottleneck, _PlainBottleneck),
                  (vgg.VGG, _VGG)]
    except ImportError:
        pass
    try:
        from resfast.fusion import FusedSequential

        rules.append((FusedSequential, _FusedSequential))
    except ImportError:
        pass
    rules += [(rnn.Conv2dBNReLU, _Conv2dBNReLU), (rnn.BatchNormAddReLU, _BatchNormAddReLU),
              (rnn.AddReLU, _AddReLU), (rnn.BNReLUConv2d, _BNReLUConv2d), (rnn.BasicBlock, _BasicBlock),
              (rnn.Bottleneck, _Bottleneck)]
    return rules


_CLASSES: Dict[Tuple[type, type], type] = {}


def _torch_class(cls: type, mixin: type) -> type:
    """``cls`` with ``mixin``'s methods in front, registered in this module
    under a unique name (so pickling by reference works)."""
    key = (cls, mixin)
    if key not in _CLASSES:
        name = "Torch_" + f"{cls.__module__}.{cls.__qualname__}".replace(".", "_")
        new = type(name, (mixin, cls), {"_plain_torch": True, "__module__": __name__, "__qualname__": name,
                                        "__doc__": f"{cls.__name__} computed with plain torch.nn."})
        setattr(sys.modules[__name__], name, new)
        _CLASSES[key] = new
    return _CLASSES[key]


def to_torch(model: nn.Module) -> nn.Module:
    """Switch every fused resfast module of ``model`` to its plain torch
    composite (in place; returns ``model``). Same modules, tensors and keys."""
    rules = _rules()
    for m in model.modules():
        if getattr(type(m), "_plain_torch", False):
            continue
        for base, mixin in rules:
            if isinstance(m, base):
                m.__class__ = _torch_class(type(m), mixin)
                break
    return model


def has_fused_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds modules that run the resfast fused ops."""
    bases = tuple(base for base, _ in _rules())
    return any(isinstance(m, bases) and not getattr(type(m), "_plain_torch", False) for m in model.modules())


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
