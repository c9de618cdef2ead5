"""``python -m resfast fuse-report NAME``: what ``resfast.fuse`` does to a
torchvision or timm model, without weights (built on the meta device, nothing
downloaded)."""
import argparse
import difflib
import inspect
import sys
from typing import List, Optional, Sequence

import torch
from torch import nn

SOURCES = ("torchvision", "timm")


class UnknownModel(ValueError):
    """A name fuse-report cannot build a model from (or the package it needs is missing)."""


_INSTALL = {"torchvision": "pip install torchvision", "timm": "pip install timm"}


def _names(source: str) -> Optional[List[str]]:
    """The model names of ``source``; None when the package is not installed."""
    try:
        if source == "torchvision":
            import torchvision
            return torchvision.models.list_models()
        import timm
        return timm.list_models()
    except ImportError:
        return None


def _build_torchvision(name: str) -> nn.Module:
    import torchvision
    builder = torchvision.models.get_model_builder(name)
    kwargs = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # its default is a pretrained download
    return builder(**kwargs)


def _build_timm(name: str) -> nn.Module:
    import timm
    return timm.create_model(name, pretrained=False)


def build_model(name: str) -> nn.Module:
    """An untrained torchvision or timm model by name: ``resnet50`` (torchvision
    first, then timm), ``timm:resnet50d``, ``torchvision:fasterrcnn_resnet50_fpn``.
    Built on the meta device (no memory, no init) where the builder allows."""
    source, _, bare = name.rpartition(":")
    if source and source not in SOURCES:
        raise UnknownModel(f"unknown source {source!r} in {name!r}: use "
                           + " or ".join(f"{s}:NAME" for s in SOURCES))
    names = {s: _names(s) for s in ((source,) if source else SOURCES)}
    build = None
    for s, builder in (("torchvision", _build_torchvision), ("timm", _build_timm)):
        if bare in (names.get(s) or ()):
            build = builder
            break
    if build is None:
        known = sorted({n for ns in names.values() for n in ns or ()})
        close = difflib.get_close_matches(bare, known, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        missing = [f"{s} is not installed ({_INSTALL[s]})" for s, ns in names.items() if ns is None]
        raise UnknownModel(f"no {source or 'torchvision or timm'} model named {bare!r}{hint}"
                           + "".join(f"; {m}" for m in missing))
    try:
        with torch.device("meta"):
            return build(bare)
    except Exception:  # noqa: BLE001  (a builder that computes at init: build it for real)
        return build(bare)


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """Every ``nn.BatchNorm2d`` replaced by torchvision's ``FrozenBatchNorm2d`` with
    its statistics, as torchvision's detection models are built from pretrained
    weights."""
    from torchvision.ops.misc import FrozenBatchNorm2d
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps).to(
                device=child.running_mean.device)
            for k in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, k).data = getattr(child, k).data.clone()
            setattr(model, name, frozen)
        else:
            freeze_batch_norm(child)
    return model


def fuse_report_main(argv: Optional[Sequence[str]] = None) -> int:
    from . import fuse

    parser = argparse.ArgumentParser(
        prog="resfast fuse-report",
        description="What resfast.fuse fuses in a torchvision or timm model, and what it keeps "
                    "as it was, with why. The model is built without weights (nothing is "
                    "downloaded).")
    parser.add_argument("name", help="model name: resnet50 (torchvision, else timm), "
                                     "timm:resnet50d, torchvision:fasterrcnn_resnet50_fpn")
    parser.add_argument("--frozen-bn", action="store_true",
                        help="replace nn.BatchNorm2d by torchvision's FrozenBatchNorm2d first "
                             "(what torchvision's detection models use with pretrained weights)")
    args = parser.parse_args(argv)
    try:
        model = build_model(args.name)
        if args.frozen_bn:
            freeze_batch_norm(model)
    except UnknownModel as e:
        print(f"resfast fuse-report: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.name}" + (" with FrozenBatchNorm2d" if args.frozen_bn else ""))
    fuse(model, inplace=True, report=True)
    return 0
