"""Residual blocks as people write them, for the tests of resfast.fuse and
FusedResidualBlock: timm's and torchvision's, hand-written ones with other
names and other spellings of ReLU and add, and ones that must stay unfused."""
import torch
import torch.nn.functional as TF
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


def randomize_norms_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine and running statistics (BatchNorm2d and FrozenBatchNorm2d),
    so that eval-mode and frozen BN are not the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                for name, lo, hi in (("weight", 0.5, 1.5), ("bias", -0.5, 0.5),
                                     ("running_mean", -0.3, 0.3), ("running_var", 0.5, 2.0)):
                    t = getattr(m, name)
                    t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    return model


def conv_bn(cin, cout, k, stride=1, norm=nn.BatchNorm2d, bias=False):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=bias), norm(cout))


class Renamed(nn.Module):
    """A basic block whose children have names of their own, with torch.relu,
    ``Tensor.relu`` and ``+=`` instead of ReLU children and ``+``."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.a_norm = nn.BatchNorm2d(cout)
        self.b = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b_norm = nn.BatchNorm2d(cout)
        self.proj = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        h = torch.relu(self.a_norm(self.a(x)))
        h = self.b_norm(self.b(h))
        h += self.proj(x)
        return h.relu()


class SequentialBody(nn.Module):
    """``relu(body(x) + skip(x))`` with the branch a Sequential of conv, BN, ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                  nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = conv_bn(cin, cout, 1, stride)

    def forward(self, x):
        return TF.relu(self.body(x) + self.skip(x), inplace=True)


class InlineProjection(nn.Module):
    """A bottleneck whose projection shortcut is written out in the block itself, a
    conv with a bias in the branch, and no ReLU after the add."""

    def __init__(self, cin, mid, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.sc_conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.sc_bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        h = TF.relu(self.bn1(self.conv1(x)))
        h = TF.relu(self.bn2(self.conv2(h)))
        return self.bn3(self.conv3(h)) + self.sc_bn(self.sc_conv(x))


class ReLUBeforeAdd(nn.Module):
    """The "ReLU before addition" variant of the identity-mappings paper:
    ``x + relu(bn2(conv2(relu(bn1(conv1(x))))))``."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        h = TF.relu(self.bn1(self.conv1(x)))
        return x + TF.relu(self.bn2(self.conv2(h)))


def torchvision_frozen_bottleneck(cin, planes, stride=1):
    """torchvision's Bottleneck with FrozenBatchNorm2d, as in its detection backbones."""
    from torchvision.models.resnet import Bottleneck
    ds = (conv_bn(cin, planes * 4, 1, stride, FrozenBatchNorm2d)
          if stride != 1 or cin != planes * 4 else None)
    return Bottleneck(cin, planes, stride, ds, norm_layer=FrozenBatchNorm2d)


def timm_basic_avg_down(cin, planes, stride=2):
    """timm's BasicBlock with the average-pool downsample of its ``*d`` ResNets."""
    from timm.models.resnet import BasicBlock, downsample_avg
    return BasicBlock(cin, planes, stride, downsample_avg(cin, planes, 1, stride))


def timm_bottleneck(cin, planes, stride=1):
    from timm.models.resnet import Bottleneck, downsample_conv
    ds = downsample_conv(cin, planes * 4, 1, stride) if stride != 1 or cin != planes * 4 else None
    return Bottleneck(cin, planes, stride, ds)
