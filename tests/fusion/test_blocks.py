"""How resfast.fuse recognises residual blocks: by what their forward computes
(resfast/fusion/blocks.py), whatever their children are called, and why it keeps
the ones it cannot fuse. The fused blocks' numerics: tests/nn/test_fused_residual_block.py."""
import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import resfast
from resfast.fusion import fused_modules, unfused_modules
from resfast.fusion.blocks import NotFusable, match_residual_block
from resfast.nn import FusedResidualBlock
from resfast.nn.residual import ConvBN, SequentialStep
from tests.support import residual_blocks as rb
from tests.support.equivalence import check_equivalence

rb.import_timm()
from timm.layers import BlurPool2d, DropBlock2d, DropPath  # noqa: E402
from timm.models import resnet as timm_resnet  # noqa: E402

# ---- recognised -------------------------------------------------------------------------


def test_names_do_not_matter():
    block = resfast.fuse(rb.Renamed(8, 16, 2))
    assert isinstance(block, FusedResidualBlock) and block.kind == "BasicBlock"
    assert block.residual_plan == ((ConvBN("a", "a_norm", True), ConvBN("b", "b_norm", False)),
                                   "proj", True)
    # an Identity shortcut is the identity
    assert resfast.fuse(rb.Renamed(8, 8)).residual_plan.shortcut is None


def test_a_sequential_branch_and_an_inline_projection():
    block = resfast.fuse(rb.SequentialBody(8, 16, 2))
    assert block.residual_plan == ((SequentialStep("body", False),), "skip", True)
    assert block.kind == "BasicBlock"
    inline = resfast.fuse(rb.InlineProjection(8, 4, 16, 2))
    assert inline.residual_plan == (
        (ConvBN("conv1", "bn1", True), ConvBN("conv2", "bn2", True),
         ConvBN("conv3", "bn3", False)),
        (ConvBN("sc_conv", "sc_bn", False),), False)
    assert inline.kind == "Bottleneck without a ReLU after the add"
    assert resfast.fuse(rb.ReLUBeforeAdd(8)).residual_plan.branch[-1].relu


def test_timm_blocks_with_identity_children_and_avg_pool_downsample():
    block = resfast.fuse(rb.timm_basic_avg_down(16, 32, 2))
    assert block.residual_plan == ((ConvBN("conv1", "bn1", True), ConvBN("conv2", "bn2", False)),
                                   "downsample", True)
    # the shortcut, AvgPool2d -> Conv2d -> BatchNorm2d, is fused on its own
    assert fused_modules(block) == [("", "BasicBlock"),
                                    ("downsample", "Sequential(conv_bn x1)")]
    # timm's attributes (se=None, drop_path=None ...) and children stay
    assert block.se is None and block.drop_path is None and isinstance(block.aa, nn.Identity)
    assert "fused from timm.models.resnet.BasicBlock" in repr(block)


def test_checked_on_a_cpu_copy_whatever_the_device():
    with torch.device("meta"):
        block = rb.timm_bottleneck(64, 16, 2)
    fused = resfast.fuse(block)
    assert isinstance(fused, FusedResidualBlock) and fused.conv1.weight.device.type == "meta"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_dilated_block(training):
    """A block with a dilated 3x3 (FCN / DeepLab's layer3-4) fuses, and computes what it did:
    one step in float64 and float32 against torch.nn (tests/support/equivalence.py)."""
    block = rb.randomize_norms_(Plain(dilation=2))
    fused = resfast.fuse(copy.deepcopy(block))
    assert isinstance(fused, FusedResidualBlock) and fused.kind == "BasicBlock"
    assert fused.residual_plan.branch == (ConvBN("conv1", "bn1", True),
                                          ConvBN("conv2", "bn2", False))
    check_equivalence(block, lambda: resfast.fuse(copy.deepcopy(block)), torch.randn(2, 8, 9, 7),
                      training=training, configs=[(torch.float64, "nchw"), (torch.float32, "nhwc")],
                      label="dilated block")


# ---- kept, with why ---------------------------------------------------------------------

class Scaled(rb.Renamed):
    def forward(self, x):
        return TF.relu(self.b_norm(self.b(torch.relu(self.a_norm(self.a(x))))) + 2 * x)


class GroupNormBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.GroupNorm(2, c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return TF.relu(self.bn2(self.conv2(TF.relu(self.gn1(self.conv1(x))))) + x)


class Plain(nn.Module):
    """A residual block made of plain children, for the variants below."""

    def __init__(self, c=8, **conv2):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        conv2.setdefault("padding", conv2.get("dilation", 1))
        self.conv2 = nn.Conv2d(c, c, 3, 1, bias=False, **conv2)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return TF.relu(self.bn2(self.conv2(TF.relu(self.bn1(self.conv1(x))))) + x)


class Reused(Plain):
    def forward(self, x):
        h = self.conv1(x)
        return TF.relu(self.bn2(self.conv2(TF.relu(self.bn1(h)))) + h)


class TrainingOnly(Plain):
    def forward(self, x):
        h = self.bn2(self.conv2(TF.relu(self.bn1(self.conv1(x)))))
        if self.training:
            h = h * 0.9
        return TF.relu(h + x)


class Untraceable(Plain):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return super().forward(x)


class TwoInputs(Plain):
    def forward(self, x, scale=None):
        return super().forward(x)


class EndsInMul(Plain):
    def forward(self, x):
        return super().forward(x) * 0.5


class InplaceShortcut(Plain):
    """The shortcut, an in-place ReLU, runs first and changes x under the branch: the
    graph looks like a residual block, the function is another one."""

    def __init__(self):
        super().__init__()
        self.sc = nn.ReLU(inplace=True)

    def forward(self, x):
        s = self.sc(x)
        return TF.relu(self.bn2(self.conv2(TF.relu(self.bn1(self.conv1(x))))) + s)


def _hooked():
    block = Plain()
    block.conv1.register_forward_hook(lambda *a: None)
    return block


def _hooked_block():
    block = Plain()
    block.register_forward_pre_hook(lambda *a: None)
    return block


KEPT = {
    "squeeze-excitation": (lambda: timm_resnet.Bottleneck(64, 16, attn_layer="se"),
                           "Bottleneck: se (SEModule) in the residual branch computes something "
                           "besides conv, BN and ReLU"),
    "attention": (lambda: timm_resnet.Bottleneck(64, 16, attn_layer="eca"),
                  "Bottleneck: se (EcaModule) in the residual branch"),
    "drop path": (lambda: timm_resnet.BasicBlock(16, 16, drop_path=DropPath(0.1)),
                  "BasicBlock: drop_path (DropPath) in the residual branch"),
    "drop block": (lambda: timm_resnet.BasicBlock(
        16, 16, drop_block=partial(DropBlock2d, drop_prob=0.1)),
        "BasicBlock: drop_block (DropBlock2d) in the residual branch"),
    "anti-aliasing": (lambda: timm_resnet.BasicBlock(16, 16, 2, aa_layer=BlurPool2d,
                                                     downsample=rb.conv_bn(16, 16, 1, 2)),
                      "BasicBlock: aa (BlurPool2d) in the residual branch"),
    "scaled shortcut": (lambda: Scaled(8, 8), "Scaled: mul() in the residual branch"),
    "group norm": (lambda: GroupNormBlock(8),
                   "GroupNormBlock: gn1 is a GroupNorm (resfast fuses nn.BatchNorm2d and "
                   "torchvision's FrozenBatchNorm2d)"),
    "grouped conv": (lambda: Plain(groups=2), "Plain: conv2 cannot be fused: groups=2"),
    "unequal dilation": (lambda: Plain(dilation=(1, 2), padding=(1, 2)),
                         "Plain: conv2 cannot be fused: padding (1, 2), dilation (1, 2)"),
    "hooked child": (_hooked, "Plain: conv1 has hooks"),
    "hooked block": (_hooked_block, "Plain: it has hooks"),
    "value used twice": (Reused, "Reused: the output of conv1 (Conv2d) is used more than once"),
    "training only": (TrainingOnly, "TrainingOnly: its forward computes something else in "
                                    "training than in eval mode"),
    "untraceable": (Untraceable, "Untraceable: its forward cannot be traced by torch.fx "
                                 "(TraceError: symbolically traced variables cannot be used as "
                                 "inputs to control flow)"),
    "two inputs": (TwoInputs, "TwoInputs: its forward takes 2 arguments, not one tensor"),
    "ends in a mul": (EndsInMul, "EndsInMul: it ends in mul(), not in the residual add"),
    "another function": (InplaceShortcut, "InplaceShortcut (shaped like a BasicBlock): its fused "
                                          "form computes another function in eval mode"),
}


@pytest.mark.parametrize("case", list(KEPT))
def test_kept_with_why(case, capsys):
    builder, why = KEPT[case]
    block = builder()
    fused = resfast.fuse(block, report=True)
    assert type(fused) is type(block) and not isinstance(fused, FusedResidualBlock)
    listed = unfused_modules(fused)
    assert listed and listed[0][0] == "" and listed[0][1].startswith(why), listed
    assert f"kept   (model): {why}" in capsys.readouterr().out


def test_not_a_residual_block():
    """Modules that are no residual block are walked through, not reported."""
    seq_like = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    assert match_residual_block(seq_like) is None
    attn = timm_resnet.Bottleneck(64, 16, attn_layer="cbam").se  # adds two pooled branches
    assert match_residual_block(attn) is None
    with pytest.raises(NotFusable, match="se \\(SEModule\\)"):
        match_residual_block(timm_resnet.Bottleneck(64, 16, attn_layer="se"))
