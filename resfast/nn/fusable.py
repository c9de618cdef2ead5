"""What the fused ops can take in place of a torch.nn module.

A conv (:func:`conv_problem`, :func:`check_fusable_conv`), a BatchNorm
(:func:`is_fusable_bn`: ``nn.BatchNorm2d``, or torchvision's
``FrozenBatchNorm2d``, whose statistics and affine are constants), a ReLU,
an identity; and the arguments the fused functions take from them
(:func:`conv_args`, :func:`bn_args`). The fused modules, the fusion plan of a
Sequential and ``resfast.fuse`` all ask here.
"""
from typing import Dict, Optional

from torch import nn

from .. import functional as F
from ..functional import BatchNormArgs

__all__ = ["has_hooks", "check_fusable_conv", "check_fusable_bn", "conv_problem",
           "is_fusable_conv", "conv_args", "is_plain_bn", "is_frozen_bn", "is_fusable_bn",
           "bn_channels", "bn_args", "is_plain_relu", "is_identity"]


def has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


# ---- convs --------------------------------------------------------------------------

def check_fusable_conv(conv: nn.Module, name: str = "conv") -> None:
    """Raise ValueError unless ``conv`` is a Conv2d the fused kernel computes."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
    k = conv.kernel_size
    problems = []
    if k[0] != k[1]:
        problems.append(f"non-square kernel {k}")
    if conv.stride[0] != conv.stride[1] or conv.stride[0] not in (1, 2):
        problems.append(f"stride {conv.stride}")
    if isinstance(conv.padding, str) or conv.padding[0] != conv.padding[1]:
        problems.append(f"padding {conv.padding}")
    if conv.groups != 1:
        problems.append(f"groups={conv.groups}")
    if conv.dilation[0] != conv.dilation[1]:
        problems.append(f"dilation {conv.dilation}")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode={conv.padding_mode!r}")
    if problems:
        raise ValueError(f"{name} cannot be fused: " + ", ".join(problems))


def conv_problem(m: nn.Module, name: str = "conv") -> Optional[str]:
    """Why ``m`` cannot run as a fused conv (None: it can)."""
    if not isinstance(m, nn.Conv2d) or type(m).forward is not nn.Conv2d.forward:
        return f"{name} is a {type(m).__name__}, not a plain nn.Conv2d"
    if has_hooks(m):
        return f"{name} has hooks"
    try:
        check_fusable_conv(m, name)
    except ValueError as e:
        return str(e)
    return None


def is_fusable_conv(m: nn.Module) -> bool:
    return conv_problem(m) is None


def conv_args(conv: nn.Conv2d) -> Dict[str, int]:
    """The keyword arguments of the fused conv functions that a Conv2d sets."""
    return dict(stride=conv.stride[0], padding=conv.padding[0], dilation=conv.dilation[0])


# ---- BatchNorm ----------------------------------------------------------------------

def is_plain_bn(m: nn.Module, channels: Optional[int] = None) -> bool:
    """An ``nn.BatchNorm2d`` with its own forward and no hooks."""
    return (isinstance(m, nn.BatchNorm2d) and type(m).forward is nn.BatchNorm2d.forward
            and not has_hooks(m)
            and (channels is None or m.num_features == channels))


def _frozen_bn_classes():
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError:  # torchvision is optional; without it no model has its frozen BN
        return ()
    return (FrozenBatchNorm2d,)


def is_frozen_bn(m: nn.Module, channels: Optional[int] = None) -> bool:
    """torchvision's ``FrozenBatchNorm2d`` (the BN of its detection and segmentation
    models built from pretrained weights): ``x * scale + shift`` from four
    buffers, in training mode too."""
    classes = _frozen_bn_classes()
    if not classes or not isinstance(m, classes) or has_hooks(m):
        return False
    if not any(type(m).forward is c.forward for c in classes):
        return False
    n = m.weight.shape[0] if m.weight.dim() == 1 else -1
    return (all(getattr(m, k).shape == (n,) for k in ("bias", "running_mean", "running_var"))
            and (channels is None or n == channels))


def is_fusable_bn(m: nn.Module, channels: Optional[int] = None) -> bool:
    return is_plain_bn(m, channels) or is_frozen_bn(m, channels)


def bn_channels(m: nn.Module) -> int:
    """The channels of a BatchNorm that :func:`is_fusable_bn` accepts."""
    return m.num_features if isinstance(m, nn.BatchNorm2d) else m.weight.shape[0]


def bn_args(m: nn.Module) -> BatchNormArgs:
    """The :class:`BatchNormArgs` of a BatchNorm that :func:`is_fusable_bn` accepts."""
    if is_frozen_bn(m):
        return F.constant_batch_norm(m.weight, m.bias, m.running_mean, m.running_var, m.eps)
    return BatchNormArgs.of(m)


# ---- the rest -----------------------------------------------------------------------

def is_plain_relu(m: nn.Module) -> bool:
    return type(m) is nn.ReLU and not has_hooks(m)


def is_identity(m: nn.Module) -> bool:
    """``nn.Identity`` or an empty ``nn.Sequential`` (timm's disabled drop-block and
    anti-aliasing, a hand-written block's identity shortcut)."""
    return ((type(m) is nn.Identity or (type(m) is nn.Sequential and len(m) == 0))
            and not has_hooks(m))


def check_fusable_bn(bn: nn.Module, channels: int, name: str = "bn") -> None:
    if not isinstance(bn, nn.BatchNorm2d):
        raise ValueError(f"{name} must be an nn.BatchNorm2d, got {type(bn).__name__}")
    if bn.num_features != channels:
        raise ValueError(f"{name} has {bn.num_features} features but the conv gives {channels} "
                         "channels")
