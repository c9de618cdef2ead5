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
    pass


def _torchvision_names() -> List[str]:
    import torchvision
    return torchvision.models.list_models()


def _timm_names() -> List[str]:
    try:
        import timm
    except ImportError:
        return []
    return timm.list_models()


def _build_torchvision(name: str) -> nn.Module:
    import torchvision
    builder = torchvision.models.get_model_builder(name)
    kwargs = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # its default is a pretrained download
    return builder(**kwargs)


def _build_timm(name: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UnknownModel("timm models need the timm package: pip install timm") from None
    return timm.create_model(name, pretrained=False)


def build_model(name: str) -> nn.Module:
    """An untrained torchvision or timm model by name: ``resnet50`` (torchvision
    first, then timm), ``timm:resnet50d``, ``torchvision:fasterrcnn_resnet50_fpn``.
    Built on the meta device (no memory, no init) where the builder allows."""
    source, _, bare = name.rpartition(":")
    if source and source not in SOURCES:
        raise UnknownModel(f"unknown source {source!r} in {name!r}: use "
                           + " or ".join(f"{s}:NAME" for s in SOURCES))
    tv = _torchvision_names() if source in ("", "torchvision") else []
    tm = _timm_names() if source in ("", "timm") and bare not in tv else []
    if bare in tv:
        build = _build_torchvision
    elif bare in tm:
        build = _build_timm
    else:
        close = difflib.get_close_matches(bare, sorted(set(tv + tm)), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = source or "torchvision or timm"
        raise UnknownModel(f"no {where} model named {bare!r}{hint}")
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
    except UnknownModel as e:
        print(f"resfast fuse-report: error: {e}", file=sys.stderr)
        return 2
    if args.frozen_bn:
        freeze_batch_norm(model)
    print(f"{args.name}" + (" with FrozenBatchNorm2d" if args.frozen_bn else ""))
    fuse(model, inplace=True, report=True)
    return 0
