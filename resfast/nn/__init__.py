"""Drop-in modules over the fused ops (the nn layer).

:mod:`.layers`: ``Conv2dBNReLU``, ``BatchNormAddReLU``, ``AddReLU``,
``BNReLUConv2d`` and torchvision's ``BasicBlock`` / ``Bottleneck``, each keeping
the parameter and buffer names of the torch.nn layers it replaces.
:mod:`.sequential`: ``FusedSequential``, an ``nn.Sequential`` that runs a
fusion plan over its children (VGG's ``features``; what ``resfast.fuse`` makes
of users' Sequentials).
:mod:`.residual`: ``FusedResidualBlock``, a user's residual block (torchvision's,
timm's, hand-written) run through the fused ops over its own children.
:mod:`.fusable`: what the fused ops can take in place of a torch.nn module.
"""
from .fusable import check_fusable_bn, check_fusable_conv
from .layers import AddReLU, BasicBlock, BatchNormAddReLU, BNReLUConv2d, Bottleneck, Conv2dBNReLU
from .residual import FusedResidualBlock, ResidualPlan
from .sequential import FusedSequential, Step, fusion_plan

__all__ = ["Conv2dBNReLU", "BatchNormAddReLU", "AddReLU", "BNReLUConv2d", "BasicBlock",
           "Bottleneck", "FusedSequential", "Step", "fusion_plan", "FusedResidualBlock",
           "ResidualPlan", "check_fusable_conv", "check_fusable_bn"]
