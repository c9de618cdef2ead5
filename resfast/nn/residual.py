"""``FusedResidualBlock``: a user's residual block run through the fused ops.

A residual block computes ``[relu](branch(x) + shortcut(x))`` where the branch
is a chain of conv -> BN (-> ReLU) steps and the shortcut is the identity, a
module applied to x, or a second such chain (a projection written inline).
:class:`ResidualPlan` names the block's own children that play each part, so
the fused block keeps the children, parameter names and ``state_dict`` of the
block it replaces; ``resfast.fuse`` finds the plan by tracing the block's
forward (``resfast.fusion.blocks``).

Fused, each BN + ReLU is applied while the next conv loads its input, and the
last BN together with the residual add and the ReLU, in one pass.
"""
import copy
from typing import NamedTuple, Tuple, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from ..functional import Pending
from .fusable import bn_args, conv_args
from .sequential import fusion_plan, run_plan

__all__ = ["ConvBN", "SequentialStep", "ResidualPlan", "FusedResidualBlock"]


class ConvBN(NamedTuple):
    """conv -> BN (-> ReLU): the paths of the conv and the BN inside the block."""

    conv: str
    bn: str
    relu: bool


class SequentialStep(NamedTuple):
    """A Sequential child (path inside the block) whose fusion plan runs in the chain:
    its pending output goes on to the next conv or the add. ``relu``: a ReLU after it."""

    path: str
    relu: bool


Step = Union[ConvBN, SequentialStep]


class ResidualPlan(NamedTuple):
    """``[relu](branch(x) + shortcut(x))``.

    ``shortcut``: None for the identity, the path of a child module applied to x
    (run as it is; ``resfast.fuse`` fuses it on its own where it can), or a chain
    of steps like the branch."""

    branch: Tuple[Step, ...]
    shortcut: Union[None, str, Tuple[Step, ...]]
    relu: bool


def _run_chain(block: nn.Module, steps: Tuple[Step, ...], x: Tensor) -> Pending:
    h: Union[Tensor, Pending] = x
    for step in steps:
        if isinstance(step, ConvBN):
            conv = block.get_submodule(step.conv)
            h = F.conv_bn_pending(h, conv.weight, conv.bias, bn_args(block.get_submodule(step.bn)),
                                  relu=step.relu, **conv_args(conv))
        else:
            seq = block.get_submodule(step.path)
            h = run_plan(list(seq), fusion_plan(seq), h)
            if step.relu:  # relu(relu(a)) = relu(a); a pending BN takes the ReLU as it is
                h = (h._replace(relu=True) if isinstance(h, Pending)
                     else Pending(h, None, None, True))
    if isinstance(h, Tensor):
        return Pending(h, None, None, False)
    return h


class FusedResidualBlock(nn.Module):
    """A residual block on the fused ops: the children and attributes of the block
    it was made from (:meth:`from_block`; not its methods) and a
    :class:`ResidualPlan` over them."""

    def __init__(self):
        raise TypeError("a FusedResidualBlock is made from a block: FusedResidualBlock.from_block")

    @classmethod
    def from_block(cls, block: nn.Module, plan: ResidualPlan, kind: str) -> "FusedResidualBlock":
        """Share ``block``'s children, parameters and buffers (not copies), keep its
        other attributes; the containers are copied, so swapping a child of one
        leaves the other as it was."""
        self = cls.__new__(cls)
        self.__dict__.update({k: (copy.copy(v) if isinstance(v, (dict, set)) else v)
                              for k, v in vars(block).items()})
        self._residual_plan = plan
        self._kind = kind
        self._fused_from = f"{type(block).__module__}.{type(block).__qualname__}"
        return self

    @property
    def residual_plan(self) -> ResidualPlan:
        return self._residual_plan

    @property
    def kind(self) -> str:
        """What the block is: ``BasicBlock``, ``Bottleneck`` or ``residual block (...)``."""
        return self._kind

    def forward(self, x: Tensor) -> Tensor:
        plan = self._residual_plan
        out = _run_chain(self, plan.branch, x)
        if out.relu:  # a ReLU before the add: applied first
            out = Pending(F.finish(out), None, None, False)
        if plan.shortcut is None:
            shortcut = x
        elif isinstance(plan.shortcut, str):
            shortcut = self.get_submodule(plan.shortcut)(x)
        else:
            shortcut = F.materialize(_run_chain(self, plan.shortcut, x))
        y = F.finish(out, shortcut, relu=plan.relu)
        if (x.dim() == 4 and x.is_contiguous()
                and not x.is_contiguous(memory_format=torch.channels_last)):
            y = y.contiguous()  # NCHW callers get NCHW (the GPU's kernels write channels_last)
        return y

    def extra_repr(self) -> str:
        return f"{self._kind}, fused from {self._fused_from}"


def chain_kernel_sizes(block: nn.Module, steps: Tuple[Step, ...]) -> Tuple[int, ...]:
    """The kernel sizes of the convs of a chain, in order."""
    sizes = []
    for step in steps:
        if isinstance(step, ConvBN):
            sizes.append(block.get_submodule(step.conv).kernel_size[0])
        else:
            sizes += [m.kernel_size[0] for m in block.get_submodule(step.path)
                      if isinstance(m, nn.Conv2d)]
    return tuple(sizes)
