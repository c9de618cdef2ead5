"""``resfast.fuse(model)``: run a user's model through the fused ops.

It walks the model and swaps in fused modules that keep every child module,
so ``state_dict`` keys and values stay as they were:

* ``nn.Sequential`` runs of ``Conv2d -> BatchNorm2d -> ReLU`` (also
  ``Conv2d -> BatchNorm2d``, ``Conv2d -> ReLU`` and ``BatchNorm2d -> ReLU``)
  become a :class:`resfast.nn.FusedSequential`, which walks a fusion plan over
  the same children (torchvision's VGG ``features`` is one such Sequential);
* torchvision's ``BasicBlock`` / ``Bottleneck``, and lookalikes with the same
  children, become :class:`resfast.nn.BasicBlock` / :class:`resfast.nn.Bottleneck`
  sharing those children (a lookalike is first checked to compute the same
  function as the fused block, on a random input, with randomized BN);
* torchvision's ``ResNet`` gets its stem (conv1 -> bn1 -> relu) fused.

What it cannot fuse (grouped or dilated convs, other norms, modules with hooks,
custom forwards) it leaves as it was. ``fused_modules(model)`` lists what was
fused; ``fuse(model, report=True)`` prints that and what was left, with why.

A fused module no longer calls its children's ``forward``: hooks registered on
those children afterwards do not fire.
"""
import copy
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import functional as F
from . import nn as rnn
from .functional import BatchNormArgs
from .nn.sequential import (
    FusedSequential,
    conv_problem,
    describe_plan,
    fusion_plan,
    has_hooks,
    is_plain_bn,
    is_plain_relu,
)

# FusedSequential and fusion_plan live in the nn layer (resfast.nn); re-exported for fuse()'s users
__all__ = ["fuse", "fused_modules", "FusedSequential", "fusion_plan"]


# ---- residual blocks ----------------------------------------------------------------

class _ShortcutNamed:
    """For lookalike blocks whose shortcut child is called ``shortcut`` (an empty
    ``nn.Sequential`` meaning identity), keeping that name in the state_dict."""

    @property
    def downsample(self):
        s = self._modules.get("shortcut")
        return None if isinstance(s, nn.Sequential) and len(s) == 0 else s


class BasicBlockShortcut(_ShortcutNamed, rnn.BasicBlock):
    """:class:`resfast.nn.BasicBlock` whose shortcut child is named ``shortcut``."""


class BottleneckShortcut(_ShortcutNamed, rnn.Bottleneck):
    """:class:`resfast.nn.Bottleneck` whose shortcut child is named ``shortcut``."""


_BASIC = {"required": ("conv1", "bn1", "conv2", "bn2"),
          "convs": (("conv1", 3, None), ("conv2", 3, 1))}
_BOTTLENECK = {"required": ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"),
               "convs": (("conv1", 1, 1), ("conv2", 3, None), ("conv3", 1, 1))}
# instance attributes a torchvision block has besides its modules
_BLOCK_ATTRS = {"stride", "training", "dilation"}


def _torchvision_block_kind(m: nn.Module) -> Optional[str]:
    mod = type(m).__module__
    if mod == "torchvision.models.resnet" and type(m).__name__ in ("BasicBlock", "Bottleneck"):
        return type(m).__name__
    return None


def _block_layout(m: nn.Module) -> Optional[str]:
    """"BasicBlock" / "Bottleneck" if ``m``'s children are laid out like torchvision's."""
    names = set(m._modules)
    for kind, layout in (("Bottleneck", _BOTTLENECK), ("BasicBlock", _BASIC)):
        req = set(layout["required"])
        if req <= names and names - req <= {"relu", "downsample", "shortcut"} and not (
                {"downsample", "shortcut"} <= names):
            return kind
    return None


def _block_problem(m: nn.Module, kind: str) -> Optional[str]:
    layout = _BASIC if kind == "BasicBlock" else _BOTTLENECK
    if has_hooks(m):
        return "has hooks"
    prev = None
    for (name, k, s), bn_name in zip(layout["convs"],
                                     [c[0].replace("conv", "bn") for c in layout["convs"]]):
        conv, bn = m._modules[name], m._modules[bn_name]
        problem = conv_problem(conv, name)
        if problem:
            return problem
        if conv.kernel_size[0] != k or conv.padding[0] != k // 2:
            return (f"{name} is {conv.kernel_size} with padding {conv.padding}, expected {k}x{k} "
                    f"with padding {k // 2}")
        if conv.bias is not None:
            return f"{name} has a bias"
        if s is not None and conv.stride[0] != s:
            return (f"{name} has stride {conv.stride[0]} (the stride belongs in the "
                    f"{'first' if k == 3 else '3x3'} conv)")
        if not is_plain_bn(bn, conv.out_channels):
            return f"{bn_name} is not a plain nn.BatchNorm2d over {conv.out_channels} channels"
        if prev is not None and conv.in_channels != prev:
            return f"{name} takes {conv.in_channels} channels, the previous conv gives {prev}"
        prev = conv.out_channels
    relu = m._modules.get("relu")
    if relu is not None and not is_plain_relu(relu):
        return f"relu is a {type(relu).__name__}"
    extra = {k for k, v in vars(m).items() if not k.startswith("_")
             and not (k in ("downsample", "shortcut") and v is None)} - _BLOCK_ATTRS
    if extra:
        return f"has attributes {sorted(extra)} a torchvision block does not have"
    return None


def _build_block(m: nn.Module, kind: str) -> nn.Module:
    named_shortcut = "shortcut" in m._modules
    if kind == "BasicBlock":
        cls = BasicBlockShortcut if named_shortcut else rnn.BasicBlock
        stride = m._modules["conv1"].stride[0]
    else:
        cls = BottleneckShortcut if named_shortcut else rnn.Bottleneck
        stride = m._modules["conv2"].stride[0]
    new = cls.__new__(cls)
    state = {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in vars(m).items()}
    new.__dict__.update(state)
    new.stride = stride
    new.option_a = None
    return new


def _randomize_bn(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                def rand(t, lo, hi):
                    if t is not None:
                        t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float32) * (hi - lo)
                                + lo)
                rand(bn.weight, 0.5, 1.5)
                rand(bn.bias, -0.5, 0.5)
                rand(bn.running_mean, -0.5, 0.5)
                rand(bn.running_var, 0.5, 2.0)


def _same_function(m: nn.Module, kind: str) -> bool:
    """Whether a lookalike block computes torchvision's block function: its copy
    (BN randomized, eval mode) against the fused block built from that copy."""
    ref = copy.deepcopy(m)
    gen = torch.Generator().manual_seed(0)
    _randomize_bn(ref, gen)
    ref.eval()
    fused = _build_block(ref, kind).eval()
    p = ref._modules["conv1"].weight
    if p.device.type == "meta":
        return False  # nothing to compute with: not verified, so not fused
    x = torch.randn((2, ref._modules["conv1"].in_channels, 8, 8),
                    generator=gen).to(device=p.device, dtype=p.dtype)
    try:
        with torch.no_grad():
            want, got = ref(x), fused(x)
        if not isinstance(want, Tensor) or want.shape != got.shape:
            return False
        tol = 1e-3 if p.dtype in (torch.float32, torch.float64) else 3e-2
        err = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)
        return bool(err <= tol)
    except Exception:  # noqa: BLE001  (a block whose forward fails here is not a lookalike)
        return False


# ---- torchvision's ResNet stem ------------------------------------------------------

def _stem_problem(m: nn.Module) -> Optional[str]:
    conv, bn, relu = (m._modules.get(k) for k in ("conv1", "bn1", "relu"))
    if conv is None or bn is None or relu is None:
        return "no conv1/bn1/relu stem"
    problem = conv_problem(conv, "conv1")
    if problem:
        return problem
    if not is_plain_bn(bn, conv.out_channels) or not is_plain_relu(relu):
        return "bn1/relu are not a plain BatchNorm2d / ReLU"
    return None


def _fused_resnet_class():
    cls = globals().get("_FusedTorchvisionResNet")
    if cls is not None:
        return cls
    from torchvision.models.resnet import ResNet

    def _forward_impl(self, x: Tensor) -> Tensor:
        conv = self.conv1
        x = F.finish(F.conv_bn_pending(x, conv.weight, conv.bias, BatchNormArgs.of(self.bn1),
                                       stride=conv.stride[0], padding=conv.padding[0], relu=True))
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
        return _fused_resnet_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_torchvision_resnet(m: nn.Module) -> bool:
    return type(m).__module__ == "torchvision.models.resnet" and type(m).__name__ == "ResNet"


# ---- the walk -------------------------------------------------------------------------

class _Walk:
    def __init__(self):
        self.kept: List[Tuple[str, str]] = []

    def module(self, m: nn.Module, name: str) -> nn.Module:
        if isinstance(m, (rnn.BasicBlock, rnn.Bottleneck, FusedSequential)):
            return m  # already fused
        kind = _torchvision_block_kind(m)
        lookalike = False
        if kind is None:
            kind = _block_layout(m)
            lookalike = kind is not None
        if kind is not None:
            problem = _block_problem(m, kind)
            if problem is None and lookalike and not _same_function(m, kind):
                problem = (f"looks like a {kind} but does not compute torchvision's {kind} function"
                           " (or could not be checked: meta device)")
            if problem is None:
                return _build_block(m, kind)
            self.kept.append((name, f"{kind}: {problem}"))
        if _is_torchvision_resnet(m):
            problem = _stem_problem(m)
            if problem is None:
                m.__class__ = _fused_resnet_class()
            else:
                self.kept.append((name, f"ResNet stem: {problem}"))
        elif type(m) is nn.Sequential and not has_hooks(m):
            plan = fusion_plan(m)
            if any(s.kind != "module" for s in plan):
                m.__class__ = FusedSequential
            elif any(isinstance(c, nn.Conv2d) for c in m.children()):
                problems = {conv_problem(c, f"conv {i}") for i, c in m._modules.items()
                            if isinstance(c, nn.Conv2d)} - {None}
                self.kept.append((name, "Sequential: " + ("; ".join(sorted(problems)) or
                                                          "no Conv2d -> BatchNorm2d / ReLU run")))
        for child_name, child in list(m._modules.items()):
            if child is None:
                continue
            new = self.module(child, f"{name}.{child_name}" if name else child_name)
            if new is not child:
                m._modules[child_name] = new
        return m


def fuse(model: nn.Module, inplace: bool = False, report: bool = False) -> nn.Module:
    """Return ``model`` computing the same function through resfast's fused ops.

    ``state_dict`` keys and values are unchanged. With ``inplace=False`` (the
    default) the model is deep-copied first; with ``inplace=True`` the model's
    own modules are swapped (use the returned model: a top-level block is
    replaced, not mutated). ``report=True`` prints what was fused and what was
    left as it was, with why."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    walk = _Walk()
    model = walk.module(model, "")
    if report:
        fused = fused_modules(model)
        print(f"resfast.fuse: {len(fused)} module(s) fused, {len(walk.kept)} left as they were")
        for name, kind in fused:
            print(f"  fused  {name or '(model)'}: {kind}")
        for name, why in walk.kept:
            print(f"  kept   {name or '(model)'}: {why}")
    return model


def fused_modules(model: nn.Module) -> List[Tuple[str, str]]:
    """(qualified name, kind) of every fused module in ``model``, outermost first;
    the kinds: ``BasicBlock``, ``Bottleneck``, ``ResNet stem`` and
    ``Sequential(<plan summary>)``."""
    out = []
    resnet_cls = globals().get("_FusedTorchvisionResNet")
    for name, m in model.named_modules():
        if isinstance(m, rnn.BasicBlock):
            out.append((name, "BasicBlock"))
        elif isinstance(m, rnn.Bottleneck):
            out.append((name, "Bottleneck"))
        elif isinstance(m, FusedSequential):
            out.append((name, f"Sequential({describe_plan(fusion_plan(m))})"))
        elif resnet_cls is not None and type(m) is resnet_cls:
            out.append((name, "ResNet stem (conv1 -> bn1 -> relu)"))
    return out
