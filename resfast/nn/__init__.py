"""Drop-in modules over the fused ops (the nn layer).

:mod:`.layers`: ``Conv2dBNReLU``, ``BatchNormAddReLU``, ``AddReLU``,
``BNReLUConv2d`` and torchvision's ``BasicBlock`` / ``Bottleneck``, each keeping
the parameter and buffer names of the torch.nn layers it replaces.
:mod:`.sequential`: ``FusedSequential``, an ``nn.Sequential`` that runs a
fusion plan over its children (VGG's ``features``; what ``resfast.fuse`` makes
of users' Sequentials).
"""
from .layers import (
                     AddReLU,
                     BasicBlock,
                     BatchNormAddReLU,
                     BNReLUConv2d,
                     Bottleneck,
                     Conv2dBNReLU,
                     check_fusable_bn,
                     check_fusable_conv,
)
from .sequential import FusedSequential, Step, fusion_plan

__all__ = ["Conv2dBNReLU", "BatchNormAddReLU", "AddReLU", "BNReLUConv2d", "BasicBlock",
           "Bottleneck",
           "FusedSequential", "Step", "fusion_plan", "check_fusable_conv", "check_fusable_bn"]
