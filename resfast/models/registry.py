"""The model registry: every network builder registers itself with what it is for.

``@register_model(dataset=..., torchvision=...)`` on a builder records its name
(the function's), the data it is meant for ("imagenet": 3x224x224 input;
"cifar": 3x32x32) and the torchvision builder with the same ``state_dict``, if
any. :func:`list_models`, :func:`get_model`, :func:`default_input_size` and the
name lists ``TORCHVISION_EQUIVALENT`` / ``CIFAR_MODELS`` of
:mod:`resfast.models` all derive from it.
"""
import difflib
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, TypeVar

from torch import nn

INPUT_SIZES = {"imagenet": (3, 224, 224), "cifar": (3, 32, 32)}


class ModelInfo(NamedTuple):
    name: str
    builder: Callable[..., nn.Module]
    dataset: str  # "imagenet" or "cifar"
    input_size: Tuple[int, int, int]  # (C, H, W) the network is meant for
    torchvision: Optional[str]  # torchvision.models builder with the same state_dict


_MODELS: Dict[str, ModelInfo] = {}
Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


def register_model(*, dataset: str = "imagenet", torchvision: Optional[str] = None,
                   input_size: Optional[Tuple[int, int, int]] = None
                   ) -> Callable[[Builder], Builder]:
    """Register the decorated builder under its function name. ``input_size``
    defaults to the data set's (3x224x224 for ImageNet, 3x32x32 for CIFAR)."""
    if dataset not in INPUT_SIZES:
        raise ValueError(f"dataset must be one of {sorted(INPUT_SIZES)}, got {dataset!r}")

    def register(builder: Builder) -> Builder:
        name = builder.__name__
        if name in _MODELS:
            raise ValueError(f"a model named {name!r} is already registered")
        _MODELS[name] = ModelInfo(name, builder, dataset, tuple(input_size or INPUT_SIZES[dataset]),
                                  torchvision)
        return builder

    return register


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name`` (case-insensitive); ValueError listing the valid names."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    info = _MODELS.get(name) or _MODELS.get(name.lower())
    if info is None:
        close = difflib.get_close_matches(name.lower(), _MODELS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid names: {', '.join(list_models())}")
    return info


def list_models() -> List[str]:
    """The names ``get_model`` accepts, sorted."""
    return sorted(_MODELS)


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the network ``name`` (see :func:`list_models`) with ``kwargs``
    passed to its builder (``num_classes``, ``shortcut``, ...)."""
    return model_info(name).builder(**kwargs)


def default_input_size(name: str) -> Tuple[int, int, int]:
    """(C, H, W) the network ``name`` is meant for; ImageNet's for a name not registered."""
    info = _MODELS.get(name) or _MODELS.get(name.lower())
    return info.input_size if info is not None else INPUT_SIZES["imagenet"]


def registered() -> List[ModelInfo]:
    """Every entry, in registration order."""
    return list(_MODELS.values())
