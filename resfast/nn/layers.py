"""Drop-in modules over the fused ops.

Each keeps the parameter and buffer names of the torch.nn / torchvision layers
it replaces (``conv.weight``, ``bn.running_mean``, ``conv1``, ``bn1``,
``downsample.0`` ...), so ``load_state_dict`` from the unfused layers works
unchanged; the child ``nn.Conv2d`` / ``nn.BatchNorm2d`` modules hold the
tensors and ``forward`` runs the fused path.
"""
from typing import Optional

from torch import Tensor, nn

from .. import functional as F
from ..functional import BatchNormArgs
from .fusable import check_fusable_bn, check_fusable_conv, conv_args


class Conv2dBNReLU(nn.Module):
    """``relu(bn(conv(x)))`` (``relu=False``: ``bn(conv(x))``) with children
    ``conv`` and ``bn``. In eval mode BN is folded into the conv (one pass)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: Optional[int] = None, bias: bool = False, relu: bool = True,
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, device=None, dtype=None,
                 dilation: int = 1):
        super().__init__()
        padding = dilation * (kernel_size // 2) if padding is None else padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                              bias=bias, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, device=device,
                                 dtype=dtype)
        self.relu = relu
        check_fusable_conv(self.conv)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> "Conv2dBNReLU":
        """Wrap existing modules (sharing their tensors)."""
        check_fusable_conv(conv)
        check_fusable_bn(bn, conv.out_channels)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.conv, self.bn, self.relu = conv, bn, relu
        return self

    def forward(self, x: Tensor) -> Tensor:
        return F.conv_bn_relu(x, self.conv.weight, self.conv.bias, BatchNormArgs.of(self.bn),
                              relu=self.relu, **conv_args(self.conv))

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class BatchNormAddReLU(nn.BatchNorm2d):
    """``relu(bn(y) + residual)``: an ``nn.BatchNorm2d`` (same tensors and names)
    whose forward also takes the residual."""

    def forward(self, y: Tensor, residual: Tensor) -> Tensor:  # type: ignore[override]
        return F.bn_add_relu(y, residual, BatchNormArgs.of(self))


class AddReLU(nn.Module):
    """``relu(y + residual)``."""

    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        return F.add_relu(y, residual)


class BNReLUConv2d(nn.Module):
    """Pre-activation ``conv(relu(bn(x)))`` with children ``bn`` and ``conv``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: Optional[int] = None, bias: bool = False, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, device=None, dtype=None, dilation: int = 1):
        super().__init__()
        padding = dilation * (kernel_size // 2) if padding is None else padding
        self.bn = nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum, device=device,
                                 dtype=dtype)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                              bias=bias, device=device, dtype=dtype)
        check_fusable_conv(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        return F.bn_relu_conv(x, BatchNormArgs.of(self.bn), self.conv.weight, self.conv.bias,
                              **conv_args(self.conv))


def _shortcut(x: Tensor, downsample: Optional[nn.Module],
              option_a: Optional[tuple]) -> Optional[Tensor]:
    if option_a is not None:
        return F.shortcut_a(x, *option_a)
    if downsample is None:
        return None
    if (isinstance(downsample, nn.Sequential) and len(downsample) == 2
            and isinstance(downsample[0], nn.Conv2d) and isinstance(downsample[1], nn.BatchNorm2d)
            and downsample[0].kernel_size == (1, 1) and downsample[0].bias is None
            and downsample[0].groups == 1 and downsample[0].padding == (0, 0)):
        return F.projection(x, downsample[0].weight, BatchNormArgs.of(downsample[1]),
                            stride=downsample[0].stride[0])
    return downsample(x)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` on the fused ops (same attribute names).

    ``shortcut="A"`` replaces ``downsample`` by the parameter-free strided,
    zero-padded identity of the CIFAR ResNets (used where the shape changes)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None, shortcut: Optional[str] = None):
        super().__init__()
        if groups != 1 or base_width != 64 or dilation != 1:
            raise ValueError("BasicBlock only supports groups=1, base_width=64 and dilation=1")
        if norm_layer not in (None, nn.BatchNorm2d):
            raise ValueError("BasicBlock only supports nn.BatchNorm2d")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.option_a = ((planes, stride) if shortcut == "A"
                         and (stride != 1 or inplanes != planes) else None)
        if self.option_a and downsample is not None:
            raise ValueError("shortcut='A' takes no downsample module")

    def forward(self, x: Tensor) -> Tensor:
        return F.basic_block(x, self.conv1.weight, BatchNormArgs.of(self.bn1), self.conv2.weight,
                             BatchNormArgs.of(self.bn2), stride=self.stride,
                             shortcut=_shortcut(x, self.downsample, self.option_a))


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (stride in the 3x3) on the fused ops."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None, shortcut: Optional[str] = None):
        super().__init__()
        if groups != 1 or dilation != 1:
            raise ValueError("Bottleneck only supports groups=1 and dilation=1")
        if norm_layer not in (None, nn.BatchNorm2d):
            raise ValueError("Bottleneck only supports nn.BatchNorm2d")
        width = int(planes * (base_width / 64.0))
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        out = planes * self.expansion
        self.option_a = ((out, stride) if shortcut == "A" and (stride != 1 or inplanes != out)
                         else None)
        if self.option_a and downsample is not None:
            raise ValueError("shortcut='A' takes no downsample module")

    def forward(self, x: Tensor) -> Tensor:
        return F.bottleneck(x, self.conv1.weight, BatchNormArgs.of(self.bn1), self.conv2.weight,
                            BatchNormArgs.of(self.bn2), self.conv3.weight,
                            BatchNormArgs.of(self.bn3), stride=self.stride,
                            shortcut=_shortcut(x, self.downsample, self.option_a))
