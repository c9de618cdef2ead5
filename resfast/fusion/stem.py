"""torchvision's and timm's ResNets with their stem (conv1 -> bn1 -> ReLU) on the fused ops.

The stem is not a child of its own, so fusing it means changing the forward of the
model: the model's class becomes a subclass of the library's ``ResNet`` that runs the
stem through the fused ops (same children, same ``state_dict``). The input is made
channels_last there, as resfast's own networks make theirs: the fused layers compute in
their input's layout, and on the CPU a network of NCHW convolutions is the slower one
(timm's ResNet-50 with its stem left NCHW ran inference at 0.95x eager,
benchmarks/cpu_fuse.py). timm's deep stems (``conv1`` an ``nn.Sequential`` of convs,
fused on its own) get bn1 -> act1 as one fused BN + ReLU.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as F
from ..nn.fusable import bn_args, conv_args, conv_problem, is_fusable_bn, is_plain_relu

__all__ = ["is_fusable_resnet", "stem_problem", "fused_resnet_class", "is_fused_resnet"]

# the module of each library's ResNet -> the name of its stem's ReLU
_RELU = {"torchvision.models.resnet": "relu", "timm.models.resnet": "act1"}
_FUSED = {"torchvision.models.resnet": "_FusedTorchvisionResNet",
          "timm.models.resnet": "_FusedTimmResNet"}


def is_fusable_resnet(m: nn.Module) -> bool:
    """torchvision's or timm's ``ResNet`` itself (not a subclass: its forward may differ)."""
    return type(m).__module__ in _RELU and type(m).__name__ == "ResNet"


def is_fused_resnet(m: nn.Module) -> bool:
    return type(m).__module__ == __name__ and type(m).__name__ in _FUSED.values()


def stem_label(m: nn.Module) -> str:
    """How reports name the stem of a fusable or fused ResNet."""
    relu = _RELU[(type(m).__bases__[0] if is_fused_resnet(m) else type(m)).__module__]
    return f"ResNet stem (conv1 -> bn1 -> {relu})"


def stem_problem(m: nn.Module) -> Optional[str]:
    """Why the stem of a ResNet (:func:`is_fusable_resnet`) cannot be fused (None: it can)."""
    relu_name = _RELU[type(m).__module__]
    conv, bn, relu = (m._modules.get(k) for k in ("conv1", "bn1", relu_name))
    if conv is None or bn is None or relu is None:
        return f"no conv1/bn1/{relu_name} stem"
    if type(conv) is nn.Sequential:  # timm's deep stem: its convs are fused as a Sequential
        last = conv[-1] if len(conv) else None
        if not isinstance(last, nn.Conv2d):
            return "conv1 is a Sequential that does not end in a Conv2d"
        channels = last.out_channels
    else:
        problem = conv_problem(conv, "conv1")
        if problem:
            return problem
        channels = conv.out_channels
    if not is_fusable_bn(bn, channels):
        return f"bn1 is a {type(bn).__name__}, not a BatchNorm resfast fuses"
    if not is_plain_relu(relu):
        return f"{relu_name} is a {type(relu).__name__}"
    return None


def _stem(model: nn.Module, x: Tensor) -> Tensor:
    """conv1 -> bn1 -> ReLU through the fused ops, on x made channels_last (from here on the
    fused network runs channels_last)."""
    x = F.channels_last_input(x)
    conv, bn = model.conv1, bn_args(model.bn1)
    if isinstance(conv, nn.Conv2d):
        return F.finish(F.conv_bn_pending(x, conv.weight, conv.bias, bn, relu=True,
                                          **conv_args(conv)))
    return F.finish(F.batch_norm_pending(conv(x), bn, relu=True))


def _torchvision_forward_impl(self, x: Tensor) -> Tensor:
    x = self.maxpool(_stem(self, x))
    x = self.layer1(x)
    x = self.layer2(x)
    x = self.layer3(x)
    x = self.layer4(x)
    x = self.avgpool(x)
    x = torch.flatten(x, 1)
    return self.fc(x)


def _timm_forward_features(self, x: Tensor) -> Tensor:
    import timm.models.resnet as timm_resnet

    h = self.maxpool(_stem(self, x))
    if self.grad_checkpointing and not torch.jit.is_scripting():
        h = timm_resnet.checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], h,
                                       flatten=True)
    else:
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
    # the feature map is public (forward_features, forward_intermediates' callers): an NCHW
    # caller gets NCHW back, one copy of the last, smallest map
    return F._like_input(h, x)


def fused_resnet_class(library: str) -> type:
    """The fused subclass of the ResNet of ``library`` (its module: ``type(m).__module__`` of
    a model :func:`is_fusable_resnet` accepts), made once."""
    name = _FUSED[library]
    cls = globals().get(name)
    if cls is not None:
        return cls
    if name == "_FusedTorchvisionResNet":
        from torchvision.models.resnet import ResNet
        body = {"_forward_impl": _torchvision_forward_impl}
    else:
        from timm.models.resnet import ResNet
        body = {"forward_features": _timm_forward_features}
    cls = type(name, (ResNet,), {**body, "__module__": __name__,
                                 "__doc__": f"{library}.ResNet with its stem on the fused ops."})
    globals()[name] = cls
    return cls


def __getattr__(name):
    # lets pickle find the class of a fused ResNet in a fresh process
    for library, fused in _FUSED.items():
        if name == fused:
            return fused_resnet_class(library)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
