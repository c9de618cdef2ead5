"""``summary(name)``: layers, output shapes, parameters and multiply-adds.

The network runs once on the ``meta`` device (shapes only, no arithmetic, no
memory), in training mode so every conv and BN reaches resfast's ops with its
own parameter tensors. Rows come from two places:

* resfast's ops (``resfast::conv2d_bn``, ``resfast::bn_finalize``), each
  attributed to the Conv2d / BatchNorm2d that owns the weight it was given
  (fused modules never call their children's ``forward``);
* every leaf module that does run its own ``forward`` (pools, Linear, LRN,
  dropout, and the Conv2d / BatchNorm2d layers of an unfused torch model).

Multiply-adds count convolutions and fully-connected layers (what
torchvision's "GFLOPS" column and the papers count), per image.
"""
import argparse
import copy
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["summary", "profile", "Row", "Summary", "summary_main"]

_BATCH = 2  # BN in training mode needs more than one value per channel


class Row(NamedTuple):
    name: str
    kind: str
    output_shape: Tuple[int, ...]  # without the batch dimension
    params: int
    macs: int  # per image


class Summary(NamedTuple):
    name: str
    input_size: Tuple[int, ...]
    rows: List[Row]
    params: int
    trainable_params: int
    macs: int  # per image

    def __str__(self) -> str:
        return format_summary(self)


class _Recorder(TorchDispatchMode):
    """Sees resfast's ops below autograd; attributes them to modules by the
    identity of the weight tensor they get."""

    def __init__(self, owners: Dict[int, Tuple[str, nn.Module]],
                 on_row: Callable[[str, nn.Module, str, tuple, int], None]):
        super().__init__()
        self.owners = owners
        self.on_row = on_row
        self.last_shape: Optional[tuple] = None

    def owner(self, t) -> Optional[Tuple[str, nn.Module]]:
        while isinstance(t, Tensor):
            hit = self.owners.get(id(t))
            if hit is not None:
                return hit
            t = t._base  # a view of a parameter (dense VGG's FC-as-conv weights)
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = getattr(func, "_schema", None)
        qual = op.name if op is not None else ""
        if qual == "resfast::conv2d_bn":
            w, y = args[1], out[0]
            self.last_shape = tuple(y.shape)
            macs = y.numel() // y.shape[0] * w.shape[1] * w.shape[2] * w.shape[3]
            name, mod = self.owner(w) or ("(conv)", None)
            self.on_row(name, mod, "Conv2d", tuple(y.shape), macs)
        elif qual == "resfast::bn_stats":
            self.last_shape = tuple(args[0].shape)
        elif qual == "resfast::bn_finalize":
            hit = self.owner(args[2]) if len(args) > 2 else None
            if hit is not None and self.last_shape is not None:
                self.on_row(hit[0], hit[1], "BatchNorm2d", self.last_shape, 0)
        return out


def _module_macs(m: nn.Module, out) -> int:
    if not isinstance(out, Tensor):
        return 0
    if isinstance(m, nn.Conv2d):
        k = m.kernel_size[0] * m.kernel_size[1]
        return out.numel() // out.shape[0] * (m.in_channels // m.groups) * k
    if isinstance(m, nn.Linear):
        return out.numel() // out.shape[0] * m.in_features
    return 0


def profile(model: nn.Module, input_size: Sequence[int]) -> List[Row]:
    """The rows of :func:`summary` for ``model`` (already on the meta device) on
    an input of ``input_size`` = (C, H, W)."""
    rows: List[Row] = []
    seen = set()

    def add(name, mod, kind, shape, macs):
        params = 0
        if mod is not None and id(mod) not in seen:
            seen.add(id(mod))
            params = sum(p.numel() for p in mod.parameters(recurse=False))
        rows.append(Row(name, kind, tuple(shape[1:]), params, macs))

    owners = {}
    for name, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), (name, m))

    handles = []
    for name, m in model.named_modules():
        if next(m.children(), None) is None:
            def hook(mod, inputs, out, name=name):
                if isinstance(out, Tensor):
                    add(name, mod, type(mod).__name__, tuple(out.shape), _module_macs(mod, out))
            handles.append(m.register_forward_hook(hook))
    x = torch.empty((_BATCH, *input_size), device="meta")
    was_training = model.training
    model.train()
    try:
        with torch.no_grad(), _Recorder(owners, add):
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return rows


def _count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def format_summary(s: Summary) -> str:
    width = max([len(r.name) for r in s.rows] + [5])
    kind_w = max([len(r.kind) for r in s.rows] + [4])
    lines = [f"{s.name}: input {tuple(s.input_size)} (shapes per image, without the batch "
             "dimension)",
             f"{'Layer':<{width}}  {'Type':<{kind_w}}  {'Output shape':<20}  {'Params':>12}  "
             f"{'Mult-adds':>15}",
             "-" * (width + kind_w + 55)]
    for r in s.rows:
        shape = " x ".join(map(str, r.output_shape))
        macs = f"{r.macs:,}" if r.macs else "-"
        params = f"{r.params:,}" if r.params else "-"
        lines.append(f"{r.name:<{width}}  {r.kind:<{kind_w}}  {shape:<20}  {params:>12}  "
                     f"{macs:>15}")
    lines += ["-" * (width + kind_w + 55),
              f"Total params: {s.params:,} ({_count(s.params)})",
              f"Trainable params: {s.trainable_params:,}",
              f"Mult-adds (conv + FC, per image): {s.macs:,} ({_count(s.macs)}MACs)"]
    return "\n".join(lines)


def summary(model: Union[str, nn.Module], input_size: Optional[Sequence[int]] = None, *,
            print_fn: Optional[Callable[[str], None]] = print, **model_kwargs) -> Summary:
    """Print (with ``print_fn``; None: don't) and return the layer table of a
    registry network (``model`` a name, built with ``model_kwargs``) or of any
    ``nn.Module`` (copied to the meta device; the original is not touched).

    ``input_size``: (C, H, W), or an int for a square RGB image; by default
    32x32 for the CIFAR nets and 224x224 otherwise."""
    from . import default_input_size, get_model

    if isinstance(model, str):
        name = model
        with torch.device("meta"):
            net = get_model(model, **model_kwargs)
        default = default_input_size(model)
    elif isinstance(model, nn.Module):
        if model_kwargs:
            raise TypeError(f"model_kwargs {sorted(model_kwargs)} only apply to a model given by "
                            "name")
        name = type(model).__name__
        net = copy.deepcopy(model).to("meta")
        default = (3, 224, 224)
    else:
        raise TypeError(f"model must be a model name or an nn.Module, got {type(model).__name__}")
    input_size = _parse_input_size(input_size, default)
    rows = profile(net, input_size)
    params = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    result = Summary(name, tuple(input_size), rows, params, trainable, sum(r.macs for r in rows))
    if print_fn is not None:
        print_fn(format_summary(result))
    return result


def _parse_input_size(input_size, default) -> Tuple[int, int, int]:
    if input_size is None:
        return tuple(default)
    if isinstance(input_size, str):
        try:
            input_size = [int(v) for v in input_size.replace("x", ",").split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"input_size must look like 224 or 3,224,224, got "
                             f"{input_size!r}") from None
        if len(input_size) == 1:
            input_size = input_size[0]
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        input_size = (3, input_size, input_size)
    input_size = tuple(input_size)
    if len(input_size) == 2:
        input_size = (3, *input_size)
    if len(input_size) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                   for v in input_size):
        raise ValueError(f"input_size must be (C, H, W) of positive ints, got {input_size!r}")
    return input_size


def summary_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m resfast summary NAME [--input-size 224] [--num-classes 10]``."""
    from . import list_models

    parser = argparse.ArgumentParser(prog="resfast summary",
                                     description="Layers, output shapes, parameters and "
                                                 "multiply-adds of a network.")
    parser.add_argument("name", help="network name (see --list)", nargs="?")
    parser.add_argument("--input-size", default=None,
                        help="H (square), HxW or C,H,W; default 224 (32 for CIFAR nets)")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--shortcut", choices=["A", "B", "C"], default=None,
                        help="ResNet shortcut option")
    parser.add_argument("--list", action="store_true", help="list the network names and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(list_models()))
        return 0
    if args.name is None:
        parser.error("a network NAME is required (see --list)")
    kwargs = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.shortcut is not None:
        kwargs["shortcut"] = args.shortcut
    try:
        summary(args.name, args.input_size, **kwargs)
    except (ValueError, TypeError) as e:
        print(f"resfast summary: error: {e}", file=sys.stderr)
        return 2
    return 0
