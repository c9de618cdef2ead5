"""torchvision's ResNet with its stem (conv1 -> bn1 -> relu) on the fused ops.

The stem is not a child of its own, so fusing it means changing the forward of
the model: the model's class becomes a subclass of torchvision's ``ResNet``
that runs the stem as one fused conv (same children, same ``state_dict``).
"""
from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as F
from ..nn.fusable import bn_args, conv_args, conv_problem, is_fusable_bn, is_plain_relu

__all__ = ["is_torchvision_resnet", "stem_problem", "fused_resnet_class"]


def is_torchvision_resnet(m: nn.Module) -> bool:
    return type(m).__module__ == "torchvision.models.resnet" and type(m).__name__ == "ResNet"


def stem_problem(m: nn.Module) -> Optional[str]:
    """Why the stem of a torchvision ResNet cannot be fused (None: it can)."""
    conv, bn, relu = (m._modules.get(k) for k in ("conv1", "bn1", "relu"))
    if conv is None or bn is None or relu is None:
        return "no conv1/bn1/relu stem"
    problem = conv_problem(conv, "conv1")
    if problem:
        return problem
    if not is_fusable_bn(bn, conv.out_channels):
        return f"bn1 is a {type(bn).__name__}, not a BatchNorm resfast fuses"
    if not is_plain_relu(relu):
        return f"relu is a {type(relu).__name__}"
    return None


def fused_resnet_class():
    cls = globals().get("_FusedTorchvisionResNet")
    if cls is not None:
        return cls
    from torchvision.models.resnet import ResNet

    def _forward_impl(self, x: Tensor) -> Tensor:
        conv = self.conv1
        x = F.channels_last_input(x)  # the fused network runs channels_last from here
        x = F.finish(F.conv_bn_pending(x, conv.weight, conv.bias, bn_args(self.bn1), relu=True,
                                       **conv_args(conv)))
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    cls = type("_FusedTorchvisionResNet", (ResNet,), {
        "_forward_impl": _forward_impl, "__module__": __name__,
        "__doc__": "torchvision's ResNet with its stem (conv1 -> bn1 -> relu) on the fused ops."})
    globals()["_FusedTorchvisionResNet"] = cls
    return cls


def __getattr__(name):
    # lets pickle find the class of a fused torchvision ResNet in a fresh process
    if name == "_FusedTorchvisionResNet":
        return fused_resnet_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
