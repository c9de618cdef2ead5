"""``FusedSequential``: an ``nn.Sequential`` that runs a fusion plan over its children.

The plan (:func:`fusion_plan`) groups runs of ``Conv2d -> BatchNorm2d -> ReLU``
(also ``Conv2d -> BatchNorm2d``, ``Conv2d -> ReLU`` and ``BatchNorm2d -> ReLU``)
into fused steps; everything else runs as it is. The VGG networks' ``features``
are one, and ``resfast.fuse`` makes users' Sequentials into them. What counts
as a fusable conv, BatchNorm (``nn.BatchNorm2d`` or torchvision's
``FrozenBatchNorm2d``) or ReLU is decided in :mod:`.fusable`.
"""
from typing import List, NamedTuple, Tuple

import torch
from torch import Tensor, nn

from .. import functional as F
from ..ops.conv2d_bn import output_format
from ..ops.layout import to_memory_format
from .fusable import bn_args, conv_args, is_fusable_bn, is_fusable_conv, is_plain_relu

__all__ = ["FusedSequential", "Step", "fusion_plan", "run_plan", "describe_plan", "FUSED_KINDS"]


# ---- the plan of a Sequential -------------------------------------------------------

class Step(NamedTuple):
    """One step of a fusion plan: ``kind`` over the children at ``index``.

    kinds: ``conv_bn_relu``, ``conv_bn`` (output left pending: its BN-apply and
    ReLU run in the next conv's prologue or in one elementwise pass),
    ``conv_relu`` (bias + ReLU in the conv's epilogue), ``conv`` (a conv that
    applies the pending input in its prologue), ``bn_relu``, ``bn``, and
    ``module`` (the child runs as it is)."""

    kind: str
    index: Tuple[int, ...]


FUSED_KINDS = ("conv_bn_relu", "conv_bn", "conv_relu", "conv", "bn_relu", "bn")


def fusion_plan(modules) -> List[Step]:
    """The fusion plan over a list of modules (a Sequential's children, in order)."""
    mods = list(modules)
    n = len(mods)
    plan: List[Step] = []
    pending = False  # whether the previous step leaves a pending activation
    i = 0
    while i < n:
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < n else None
        if is_fusable_conv(m):
            if nxt is not None and is_fusable_bn(nxt, m.out_channels):
                if i + 2 < n and is_plain_relu(mods[i + 2]):
                    plan.append(Step("conv_bn_relu", (i, i + 1, i + 2)))
                    i += 3
                else:
                    plan.append(Step("conv_bn", (i, i + 1)))
                    i += 2
                pending = True
                continue
            if nxt is not None and is_plain_relu(nxt):
                plan.append(Step("conv_relu", (i, i + 1)))
                i, pending = i + 2, False
                continue
            if pending:
                plan.append(Step("conv", (i,)))
                i, pending = i + 1, False
                continue
        elif is_fusable_bn(m):
            if nxt is not None and is_plain_relu(nxt):
                plan.append(Step("bn_relu", (i, i + 1)))
                i, pending = i + 2, True
                continue
            if nxt is not None and is_fusable_conv(nxt) and is_fusable_bn(m, nxt.in_channels):
                plan.append(Step("bn", (i,)))
                i, pending = i + 1, True
                continue
        plan.append(Step("module", (i,)))
        i, pending = i + 1, False
    return plan


def describe_plan(plan: List[Step]) -> str:
    counts = {}
    for s in plan:
        if s.kind != "module":
            counts[s.kind] = counts.get(s.kind, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in counts.items())


def run_plan(modules, plan: List[Step], x):
    """Run a fusion plan; returns a Tensor or a :class:`Pending` (the caller
    finishes it, or hands it to a conv that applies it in its prologue)."""
    h = x
    for step in plan:
        kind, idx = step
        if kind.startswith("conv"):
            conv = modules[idx[0]]
            if kind.startswith("conv_bn"):
                h = F.conv_bn_pending(h, conv.weight, conv.bias, bn_args(modules[idx[1]]),
                                      relu=kind == "conv_bn_relu", **conv_args(conv))
            else:
                h = F.conv2d(h, conv.weight, conv.bias, relu=kind == "conv_relu", **conv_args(conv))
        elif kind.startswith("bn"):
            h = F.batch_norm_pending(F.materialize(h), bn_args(modules[idx[0]]),
                                     relu=kind == "bn_relu")
        else:
            h = modules[idx[0]](F.materialize(h))
    return h


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose forward runs a fusion plan over its children
    (:func:`fusion_plan`): the same children, indices and ``state_dict``.

    The plan is rebuilt on every call (a few isinstance checks), so the
    Sequential may still be edited. On a GPU activations stay channels_last inside (an
    NCHW input is copied once, at the entry); on the CPU the ops compute in the input's
    layout. The output comes back in the input's memory format."""

    def forward(self, x):
        plan = fusion_plan(self)
        if not isinstance(x, Tensor) or x.dim() != 4 or not any(s.kind != "module" for s in plan):
            return super().forward(x)
        mods = list(self)
        h = x
        if plan[0].kind.startswith("conv") and output_format(x) == torch.channels_last:
            # (where the ops compute in x's layout, the CPU's, an NCHW Sequential inside an
            # NCHW model stays NCHW, with no copy in or out; a network converts at its entry)
            h = F.channels_last_input(x)
        out = F.materialize(run_plan(mods, plan, h))
        if (isinstance(out, Tensor) and out.dim() == 4 and x.is_contiguous()
                and not x.is_contiguous(memory_format=torch.channels_last)):
            out = to_memory_format(out, torch.contiguous_format)
        return out

    def plan(self) -> List[Step]:
        return fusion_plan(self)
