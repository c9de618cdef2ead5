"""The plain torch.nn twin of every resfast module and network.

One reference computation, used wherever resfast is compared with torch.nn:
training's ``--backend torch``, the benchmarks' eager and torch.compile
baselines (torchvision's own network where it has one), and the tests' torch.nn
side. Each twin forward is written as torchvision writes it (conv -> BN ->
in-place ReLU, ``out += identity``) over the module's own children, with
torch.nn and torch.nn.functional only: no resfast op, which
:func:`recording_resfast_ops` lets a caller prove.

:func:`to_torch` switches, in place, each fused module's class to a subclass
whose forward is the twin's; the modules keep their children, parameters and
buffers, so the state_dict keys (torchvision's) do not change and a checkpoint
of one backend loads into the other. :func:`torch_twin` does it on a deep copy.

BatchNorm layers honour a ``stats_reducer`` attribute (synchronised BN,
:mod:`resfast.train.sync_bn`) as the fused ops do: :func:`batch_norm`.
"""
import contextlib
import copy
import sys
from typing import Dict, Iterator, List, Set, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import nn as rnn
from .dtypes import stats_dtype
from .functional import shortcut_a

__all__ = ["to_torch", "torch_twin", "has_fused_layers", "batch_norm", "recording_resfast_ops",
           "resfast_ops_called"]


def batch_norm(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``bn(x)`` in plain torch; in training mode its batch statistics go through
    ``bn.stats_reducer`` when the module has one (the fused ops do the same
    through ``BatchNormArgs.stats_reducer``)."""
    reducer = getattr(bn, "stats_reducer", None)
    if reducer is None or not bn.training:
        return nn.BatchNorm2d.forward(bn, x)
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input, got shape {tuple(x.shape)}")
    sdt = stats_dtype(x)
    xs = x.to(sdt)
    var, mean = torch.var_mean(xs, dim=(0, 2, 3), correction=0)
    count = x.numel() // x.shape[1]
    mean, var, total = reducer(mean, var, count)
    if bn.track_running_stats and bn.running_mean is not None:
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {total}")
        with torch.no_grad():
            momentum = bn.momentum
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                if momentum is None:
                    momentum = 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - momentum).add_(mean.detach().to(bn.running_mean.dtype),
                                                    alpha=momentum)
            unbiased = var.detach() * (total / (total - 1))
            bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype),
                                                   alpha=momentum)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(sdt)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(sdt)
    y = xs * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return y.to(x.dtype)


# ---- the resfast.nn layers ----------------------------------------------------------------

class _Conv2dBNReLU:
    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.conv(x))
        return torch.relu_(out) if self.relu else out


class _BatchNormAddReLU:
    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        out = batch_norm(self, y)
        out += residual
        return torch.relu_(out)


class _AddReLU:
    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        return torch.relu_(y + residual)


class _BNReLUConv2d:
    def forward(self, x: Tensor) -> Tensor:
        return self.conv(torch.relu_(self.bn(x)))


def _identity(block, x: Tensor) -> Tensor:
    if getattr(block, "option_a", None) is not None:
        return shortcut_a(x, *block.option_a)
    if block.downsample is not None:
        return block.downsample(x)
    return x


class _BasicBlock:
    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += _identity(self, x)
        return torch.relu_(out)


class _Bottleneck:
    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu_(self.bn1(self.conv1(x)))
        out = torch.relu_(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += _identity(self, x)
        return torch.relu_(out)


class _FusedSequential:
    def forward(self, x):
        return nn.Sequential.forward(self, x)


# ---- the resfast.models networks ----------------------------------------------------------

class _PlainBasicBlock:
    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu_(self.bn1(self.conv1(x)))
        return torch.relu_(self.bn2(self.conv2(out)))


class _PlainBottleneck:
    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu_(self.bn1(self.conv1(x)))
        out = torch.relu_(self.bn2(self.conv2(out)))
        return torch.relu_(self.bn3(self.conv3(out)))


class _ResNet:
    def forward_features(self, x: Tensor) -> Tensor:
        h = torch.relu_(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            h = self.maxpool(h)
        for stage in self.stages():
            for block in stage:
                h = block(h)
        return h


def _preactivate(unit, x: Tensor) -> Tuple[Tensor, Tensor]:
    """(pre-activated input, shortcut) of a full pre-activation unit; the first
    unit (no bn1) takes the stem's already activated output."""
    if unit.bn1 is not None:
        a, raw = torch.relu_(unit.bn1(x)), x
    else:
        a = raw = x
    if unit.downsample is not None:
        return a, unit.downsample(a)
    if unit.option_a is not None:
        return a, shortcut_a(raw, *unit.option_a)
    return a, raw


class _PreActBasicBlock:
    def forward(self, x: Tensor) -> Tensor:
        a, shortcut = _preactivate(self, x)
        out = self.conv2(torch.relu_(self.bn2(self.conv1(a))))
        out += shortcut
        return out


class _PreActBottleneck:
    def forward(self, x: Tensor) -> Tensor:
        a, shortcut = _preactivate(self, x)
        out = torch.relu_(self.bn2(self.conv1(a)))
        out = self.conv3(torch.relu_(self.bn3(self.conv2(out))))
        out += shortcut
        return out


class _PreActResNet:
    def forward_features(self, x: Tensor) -> Tensor:
        return torch.relu_(self.bn_final(_ResNet.forward_features(self, x)))


class _VGG:
    def forward(self, x: Tensor) -> Tensor:
        if self.dense:
            return self.forward_dense(x)
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)

    def score_map(self, x: Tensor) -> Tensor:
        fc1, relu1, drop1, fc2, relu2, drop2, fc3 = self.classifier
        h = self.features(x)
        k = self.avgpool.output_size
        k = k if isinstance(k, int) else k[0]
        if h.shape[2] < k or h.shape[3] < k:
            raise ValueError(f"dense evaluation needs a feature map of at least {k}x{k}, got "
                             f"{tuple(h.shape[2:])}")
        c = fc1.in_features // (k * k)
        h = drop1(torch.relu_(F.conv2d(h, fc1.weight.view(fc1.out_features, c, k, k), fc1.bias)))
        h = drop2(torch.relu_(F.conv2d(h, fc2.weight[:, :, None, None], fc2.bias)))
        return F.conv2d(h, fc3.weight[:, :, None, None], fc3.bias)


def _rules() -> List[Tuple[Type[nn.Module], type]]:
    """(resfast class, twin forward), most specific first."""
    from .models import preact, resnet, vgg

    return [(preact.PreActResNet, _PreActResNet), (preact.PreActBasicBlock, _PreActBasicBlock),
            (preact.PreActBottleneck, _PreActBottleneck), (resnet.ResNet, _ResNet),
            (resnet.PlainBasicBlock, _PlainBasicBlock), (resnet.PlainBottleneck, _PlainBottleneck),
            (vgg.VGG, _VGG), (rnn.FusedSequential, _FusedSequential),
            (rnn.Conv2dBNReLU, _Conv2dBNReLU), (rnn.BatchNormAddReLU, _BatchNormAddReLU),
            (rnn.AddReLU, _AddReLU), (rnn.BNReLUConv2d, _BNReLUConv2d),
            (rnn.BasicBlock, _BasicBlock), (rnn.Bottleneck, _Bottleneck)]


_CLASSES: Dict[Tuple[type, type], type] = {}


def _torch_class(cls: type, mixin: type) -> type:
    """``cls`` with ``mixin``'s methods in front, registered in this module
    under a unique name (so pickling by reference works)."""
    key = (cls, mixin)
    if key not in _CLASSES:
        name = "Torch_" + f"{cls.__module__}.{cls.__qualname__}".replace(".", "_")
        new = type(name, (mixin, cls), {
            "_plain_torch": True, "__module__": __name__, "__qualname__": name,
            "__doc__": f"{cls.__name__} computed with plain torch.nn."})
        setattr(sys.modules[__name__], name, new)
        _CLASSES[key] = new
    return _CLASSES[key]


def to_torch(model: nn.Module) -> nn.Module:
    """Switch every fused resfast module of ``model`` to its twin (in place;
    returns ``model``). Same modules, tensors and state_dict keys."""
    rules = _rules()
    for m in model.modules():
        if getattr(type(m), "_plain_torch", False):
            continue
        for base, mixin in rules:
            if isinstance(m, base):
                m.__class__ = _torch_class(type(m), mixin)
                break
    return model


def torch_twin(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` computed with plain torch.nn (same weights and buffers)."""
    return to_torch(copy.deepcopy(module))


def has_fused_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds modules that run the resfast fused ops."""
    bases = tuple(base for base, _ in _rules())
    return any(isinstance(m, bases) and not getattr(type(m), "_plain_torch", False)
               for m in model.modules())


@contextlib.contextmanager
def recording_resfast_ops() -> Iterator[Set[str]]:
    """Collects the names of the ``resfast::`` ops dispatched inside the block
    (forward and, if run inside, backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found: Set[str] = set()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if getattr(func, "namespace", None) == "resfast":
                found.add(str(func.name()))
            return func(*args, **(kwargs or {}))

    with Recorder():
        yield found


def resfast_ops_called(model: nn.Module, example: Tensor) -> Set[str]:
    """The ``resfast::`` ops a forward of ``model`` on ``example`` dispatches.

    Runs in eval mode without gradients (nothing is updated: no running
    statistics, no dropout RNG), then restores the module's mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), recording_resfast_ops() as found:
            model(example)
    finally:
        model.train(was_training)
    return found
