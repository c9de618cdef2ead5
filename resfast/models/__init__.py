"""Complete VGG and ResNet families on resfast's fused ops.

Every builder registers itself (:mod:`.registry`, ``@register_model``) with the
data it is meant for and its torchvision twin: ``list_models()`` names them all,
``get_model(name, **kwargs)`` builds one, ``default_input_size(name)`` is its
input. Where torchvision has the network (``TORCHVISION_EQUIVALENT``:
resnet18..152, vgg11/13/16/19 and their ``_bn``) the ``state_dict`` is
torchvision's, key for key; ``CIFAR_MODELS`` take 32x32 images.

Every builder takes ``num_classes``; ResNets also ``zero_init_residual`` and
``shortcut`` ("A" | "B" | "C"), pre-activation ResNets ``shortcut``, VGGs
``batch_norm``, ``dropout``, ``dense`` (dense evaluation) and ``init_weights``.
"""
from . import cifar, preact, registry, resnet, vgg
from .cifar import (plain20, plain32, plain44, plain56, plain110, resnet20, resnet32,  # noqa: F401 (re-exported)
                    resnet44, resnet56, resnet110, resnet1202)
from .preact import (PreActResNet, preact_resnet18, preact_resnet34, preact_resnet50,  # noqa: F401
                     preact_resnet101, preact_resnet110, preact_resnet152, preact_resnet164, preact_resnet1001)
from .registry import default_input_size, get_model, list_models, register_model
from .resnet import (ResNet, plain18, plain34, plain50, plain101, plain152, resnet18, resnet34,  # noqa: F401
                     resnet50, resnet101, resnet152)
from .summary import summary
from .vgg import (VGG, multi_scale_eval, vgg11, vgg11_bn, vgg11_lrn, vgg13, vgg13_bn, vgg16,  # noqa: F401
                  vgg16_bn, vgg16_c, vgg16_c_bn, vgg19, vgg19_bn)

# the torchvision builder of the same name exists (and has the same state_dict)
TORCHVISION_EQUIVALENT = tuple(m.name for m in registry.registered() if m.torchvision is not None)

# CIFAR-sized networks (32x32 input, 10 classes by default)
CIFAR_MODELS = tuple(m.name for m in registry.registered() if m.dataset == "cifar")

__all__ = ["list_models", "get_model", "register_model", "summary", "default_input_size", "multi_scale_eval",
           "VGG", "ResNet", "PreActResNet", "TORCHVISION_EQUIVALENT", "CIFAR_MODELS", "cifar", "preact",
           "registry", "resnet", "vgg", *list_models()]
