"""``resfast.fuse(model)``: run a user's model through the fused ops.

It walks the model and swaps in fused modules that keep every child module,
so ``state_dict`` keys and values stay as they were:

* residual blocks, recognised by what their forward computes (traced with
  torch.fx, then checked on a random input: :mod:`.blocks`), whatever their
  children are called: torchvision's and timm's ``BasicBlock`` / ``Bottleneck``
  (timm's ``*d`` average-pool shortcuts too), hand-written ones. Each becomes a
  :class:`resfast.nn.FusedResidualBlock` over the block's own children;
* ``nn.Sequential`` runs of ``Conv2d -> BatchNorm2d -> ReLU`` (also
  ``Conv2d -> BatchNorm2d``, ``Conv2d -> ReLU`` and ``BatchNorm2d -> ReLU``)
  become a :class:`resfast.nn.FusedSequential` (torchvision's VGG ``features``,
  timm's deep stems, a block's downsample);
* torchvision's and timm's ``ResNet`` get their stem (conv1 -> bn1 -> ReLU) fused and
  their input made channels_last there (:mod:`.stem`).

BatchNorm is ``nn.BatchNorm2d`` or torchvision's ``FrozenBatchNorm2d`` (the BN of
its detection and segmentation models built from pretrained weights), which
runs as a constant BN folded into the conv: no statistics, nothing updated.

What it cannot fuse stays as it was: a block with squeeze-excitation, drop
path, anti-aliasing, attention or anything else besides conv, BN and ReLU;
grouped convs; other norms; modules with hooks; convs run by a forward resfast
does not rewrite.
``fused_modules(model)`` lists what was fused, ``unfused_modules(model)``
every block and conv left as it was with why, and ``fuse(model,
report=True)`` prints both.

A fused module no longer calls its children's ``forward``: hooks registered on
those children afterwards do not fire.
"""
import copy
from typing import List, Set, Tuple

from torch import nn

from .. import nn as rnn
from ..nn.fusable import conv_problem, has_hooks
from ..nn.residual import ConvBN, FusedResidualBlock, SequentialStep
from ..nn.sequential import FusedSequential, describe_plan, fusion_plan
from .blocks import NotFusable, block_kind, check_behaviour, match_residual_block
from .stem import fused_resnet_class, is_fusable_resnet, is_fused_resnet, stem_label, stem_problem

__all__ = ["fuse", "fused_modules", "unfused_modules", "report", "FusedSequential",
           "fusion_plan"]

_NOT_YET = "fusable, not fused yet (resfast.fuse fuses it)"


def _is_fused(m: nn.Module) -> bool:
    """Made by fuse(): holds a user's children, some of which may fuse further."""
    return isinstance(m, (FusedResidualBlock, FusedSequential)) or is_fused_resnet(m)


def _is_resfast_own(m: nn.Module) -> bool:
    """resfast's own layers and networks: they run the fused ops already."""
    return type(m).__module__.startswith("resfast.") and not _is_fused(m)


def _has_conv(m: nn.Module) -> bool:
    return any(isinstance(c, nn.Conv2d) for c in m.modules())


def _within(name: str, prefixes: Set[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


class _Walk:
    """One pass over a model: swaps in the fused modules (``apply``) or only says
    what it would do; ``kept`` collects (name, why) for the blocks and stems left
    as they were, ``reported`` the names whose convs those entries cover."""

    def __init__(self, apply: bool):
        self.apply = apply
        self.kept: List[Tuple[str, str]] = []
        self.reported: Set[str] = set()

    def keep(self, name: str, why: str, covers: str) -> None:
        if not _within(name, self.reported):  # inside a block already listed: covered by it
            self.kept.append((name, why))
        self.reported.add(covers)

    def module(self, m: nn.Module, name: str) -> nn.Module:
        if not m._modules or not _has_conv(m) or _is_resfast_own(m):
            return m  # a layer, nothing with a conv, or resfast's own (fused already)
        if not _is_fused(m) and type(m) not in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
            m = self.block(m, name)
        if is_fusable_resnet(m):
            problem = stem_problem(m)
            if problem is not None:
                self.keep(name, f"ResNet stem: {problem}", f"{name}.conv1" if name else "conv1")
            elif self.apply:
                m.__class__ = fused_resnet_class(type(m).__module__)
            else:
                self.keep(name, f"ResNet stem: {_NOT_YET}", f"{name}.conv1" if name else "conv1")
        elif type(m) is nn.Sequential and not has_hooks(m) and self.apply:
            if any(s.kind != "module" for s in fusion_plan(m)):
                m.__class__ = FusedSequential
        for child_name, child in list(m._modules.items()):
            if child is None:
                continue
            new = self.module(child, f"{name}.{child_name}" if name else child_name)
            if new is not child:
                m._modules[child_name] = new
        return m

    def block(self, m: nn.Module, name: str) -> nn.Module:
        """``m`` fused if it is a residual block resfast fuses."""
        try:
            plan = match_residual_block(m)
        except NotFusable as e:
            self.keep(name, f"{type(m).__name__}: {e}", name)
            return m
        if plan is None:
            return m
        kind = block_kind(m, plan)
        why = check_behaviour(m, plan, kind)
        label = type(m).__name__ + ("" if kind == type(m).__name__ else f" (shaped like a {kind})")
        if why is not None:
            self.keep(name, f"{label}: {why}", name)
            return m
        if not self.apply:
            self.keep(name, f"{label}: {_NOT_YET}", name)
            return m
        return FusedResidualBlock.from_block(m, plan, kind)


def _plan_convs(block: FusedResidualBlock) -> Set[str]:
    plan = block.residual_plan
    steps = list(plan.branch) + (list(plan.shortcut) if isinstance(plan.shortcut, tuple) else [])
    return {s.conv for s in steps if isinstance(s, ConvBN)} | {
        f"{s.path}.{i}" for s in steps if isinstance(s, SequentialStep)
        for i, c in enumerate(block.get_submodule(s.path)) if isinstance(c, nn.Conv2d)}


def _conv_why(model: nn.Module, name: str, conv: nn.Conv2d) -> str:
    """Why a conv outside the fused modules and the reported blocks runs unfused."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    problem = conv_problem(conv, "the conv")
    if problem:
        return problem
    if type(parent) in (nn.Sequential, FusedSequential):
        step = next((s for s in fusion_plan(parent) if int(child) in s.index), None)
        if step is not None and step.kind != "module":
            return "its Sequential has hooks" if has_hooks(parent) else _NOT_YET
        return "not followed by a BatchNorm or ReLU in its Sequential (nothing to fuse it with)"
    if isinstance(parent, FusedResidualBlock):
        return "the block's shortcut on its own (nothing to fuse it with)"
    if isinstance(parent, nn.Sequential):
        return (f"inside {type(parent).__name__}, a subclass of nn.Sequential that resfast does "
                "not rewrite")
    return f"runs in the forward of {type(parent).__name__}, which resfast does not rewrite"


def _fused_convs(model: nn.Module) -> Set[str]:
    """Names of the convs that run through the fused ops."""
    done = set()
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, FusedResidualBlock):
            done |= {prefix + c for c in _plan_convs(m)}
        elif isinstance(m, FusedSequential):
            done |= {f"{prefix}{i}" for s in fusion_plan(m) if s.kind != "module" for i in s.index}
        elif is_fused_resnet(m):  # its stem (a deep stem's convs: its FusedSequential)
            done.add(prefix + "conv1")
        elif _is_resfast_own(m):
            done |= {prefix + n for n, c in m.named_modules() if isinstance(c, nn.Conv2d)}
    return done


def _unfused(model: nn.Module, walk: _Walk) -> List[Tuple[str, str]]:
    fused = _fused_convs(model)
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
             and name not in fused and not _within(name, walk.reported)]
    out = list(walk.kept)
    for name, conv in convs:
        out.append((name, "Conv2d: " + (_conv_why(model, name, conv) if name else
                                        "on its own (nothing to fuse it with)")))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(out, key=lambda e: order.get(e[0], -1))


def fuse(model: nn.Module, inplace: bool = False, report: bool = False) -> nn.Module:
    """Return ``model`` computing the same function through resfast's fused ops.

    ``state_dict`` keys and values are unchanged. With ``inplace=False`` (the
    default) the model is deep-copied first; with ``inplace=True`` the model's
    own modules are swapped (use the returned model: a top-level block is
    replaced, not mutated). ``report=True`` prints what was fused and what was
    left as it was, with why (:func:`report`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    walk = _Walk(apply=True)
    model = walk.module(model, "")
    if report:
        print(_format(fused_modules(model), _unfused(model, walk)))
    return model


def fused_modules(model: nn.Module) -> List[Tuple[str, str]]:
    """(qualified name, kind) of every fused module in ``model``, outermost first;
    the kinds: ``BasicBlock``, ``Bottleneck``, ``residual block (...)``,
    ``ResNet stem (conv1 -> bn1 -> relu)`` and ``Sequential(<plan summary>)``.
    What was left as it was: :func:`unfused_modules`."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, FusedResidualBlock):
            out.append((name, m.kind))
        elif isinstance(m, rnn.BasicBlock):
            out.append((name, "BasicBlock"))
        elif isinstance(m, rnn.Bottleneck):
            out.append((name, "Bottleneck"))
        elif isinstance(m, FusedSequential):
            out.append((name, f"Sequential({describe_plan(fusion_plan(m))})"))
        elif is_fused_resnet(m):
            out.append((name, stem_label(m)))
    return out


def unfused_modules(model: nn.Module) -> List[Tuple[str, str]]:
    """(qualified name, why) of every residual block, ResNet stem and conv of
    ``model`` that does not run through the fused ops, in model order. Convs
    inside a listed block are covered by its entry. On a model that was not
    fused, what ``fuse`` would fuse is listed as ``fusable, not fused yet``."""
    walk = _Walk(apply=False)
    walk.module(model, "")
    return _unfused(model, walk)


def report(model: nn.Module) -> str:
    """What ``fuse(model, report=True)`` prints, for a model that ``fuse`` returned."""
    return _format(fused_modules(model), unfused_modules(model))


def _format(fused: List[Tuple[str, str]], kept: List[Tuple[str, str]]) -> str:
    lines = [f"resfast.fuse: {len(fused)} module(s) fused, {len(kept)} left as they were"]
    lines += [f"  fused  {name or '(model)'}: {kind}" for name, kind in fused]
    lines += [f"  kept   {name or '(model)'}: {why}" for name, why in kept]
    return "\n".join(lines)
