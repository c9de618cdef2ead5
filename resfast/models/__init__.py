"""Complete VGG and ResNet families on resfast's fused ops.

``list_models()`` names them all; ``get_model(name, **kwargs)`` builds one.
Where torchvision has the network (resnet18..152, vgg11/13/16/19 and their
``_bn``) the ``state_dict`` is torchvision's, key for key.

Every builder takes ``num_classes``; ResNets also ``zero_init_residual`` and
``shortcut`` ("A" | "B" | "C"), pre-activation ResNets ``shortcut``, VGGs
``batch_norm``, ``dropout``, ``dense`` (dense evaluation) and ``init_weights``.
"""
import difflib
from typing import Callable, Dict, List

from torch import nn

from . import cifar, preact, resnet, vgg
from .cifar import (plain20, plain32, plain44, plain56, plain110, resnet20, resnet32, resnet44, resnet56,
                    resnet110, resnet1202)
from .preact import (PreActResNet, preact_resnet18, preact_resnet34, preact_resnet50, preact_resnet101,
                     preact_resnet110, preact_resnet152, preact_resnet164, preact_resnet1001)
from .resnet import (ResNet, plain18, plain34, plain50, plain101, plain152, resnet18, resnet34, resnet50,
                     resnet101, resnet152)
from .summary import summary
from .vgg import (VGG, multi_scale_eval, vgg11, vgg11_bn, vgg11_lrn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg16_c,
                  vgg16_c_bn, vgg19, vgg19_bn)

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    f.__name__: f for f in (
        vgg11, vgg11_bn, vgg11_lrn, vgg13, vgg13_bn, vgg16_c, vgg16_c_bn, vgg16, vgg16_bn, vgg19, vgg19_bn,
        resnet18, resnet34, resnet50, resnet101, resnet152, plain18, plain34, plain50, plain101, plain152,
        resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202, plain20, plain32, plain44, plain56, plain110,
        preact_resnet18, preact_resnet34, preact_resnet50, preact_resnet101, preact_resnet152,
        preact_resnet110, preact_resnet164, preact_resnet1001,
    )
}

# the torchvision builder of the same name exists (and has the same state_dict)
TORCHVISION_EQUIVALENT = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg11", "vgg11_bn",
                          "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")

# CIFAR-sized networks (32x32 input, 10 classes by default)
CIFAR_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202", "plain20", "plain32",
                "plain44", "plain56", "plain110", "preact_resnet110", "preact_resnet164", "preact_resnet1001")


def list_models() -> List[str]:
    """The names ``get_model`` accepts, sorted."""
    return sorted(_REGISTRY)


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the network ``name`` (see :func:`list_models`) with ``kwargs``
    passed to its builder (``num_classes``, ``shortcut``, ...)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    builder = _REGISTRY.get(name) or _REGISTRY.get(name.lower())
    if builder is None:
        close = difflib.get_close_matches(name.lower(), _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid names: {', '.join(list_models())}")
    return builder(**kwargs)


def default_input_size(name: str):
    """(C, H, W) a network is meant for: 32x32 for the CIFAR nets, else 224x224."""
    return (3, 32, 32) if name in CIFAR_MODELS else (3, 224, 224)


__all__ = ["list_models", "get_model", "summary", "default_input_size", "multi_scale_eval", "VGG", "ResNet",
           "PreActResNet", "TORCHVISION_EQUIVALENT", "CIFAR_MODELS", "cifar", "preact", "resnet", "vgg",
           *sorted(_REGISTRY)]
