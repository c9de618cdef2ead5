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
from .preact import PreActResNet
from .registry import default_input_size, get_model, list_models, register_model
from .resnet import ResNet
from .summary import summary
from .vgg import VGG, multi_scale_eval

# every registered builder as an attribute (resfast.models.resnet50), from the registry
globals().update({m.name: m.builder for m in registry.registered()})

# the torchvision builder of the same name exists (and has the same state_dict)
TORCHVISION_EQUIVALENT = tuple(m.name for m in registry.registered() if m.torchvision is not None)

# CIFAR-sized networks (32x32 input, 10 classes by default)
CIFAR_MODELS = tuple(m.name for m in registry.registered() if m.dataset == "cifar")

__all__ = ["list_models", "get_model", "register_model", "summary", "default_input_size",
           "multi_scale_eval",
           "VGG", "ResNet", "PreActResNet", "TORCHVISION_EQUIVALENT", "CIFAR_MODELS", "cifar",
           "preact", "registry", "resnet", "vgg", *list_models()]
