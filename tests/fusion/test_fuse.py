"""resfast.fuse(): torchvision's ResNets and VGGs, and hand-written models.

After fusing, the state_dict is the same (keys and values), the model computes
the same function (outputs, every gradient, BN running statistics: see
tests/support/equivalence.py for the tolerances), what was fused is listed,
and what cannot be fused is left as it was. timm's models, FrozenBatchNorm2d
and torchvision's detection and segmentation models: test_models.py; how blocks
are recognised: test_blocks.py; the report and the CLI: test_report.py.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as TF
import torchvision
from torch import nn

import resfast
from resfast.fusion import fuse, fused_modules, unfused_modules
from resfast.nn import FusedResidualBlock, FusedSequential, fusion_plan
from tests.support.equivalence import build, check_equivalence, fill_, meta_build
from tests.support.residual_blocks import import_timm

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
REPO = Path(__file__).resolve().parents[2]


def _same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert sa[k].device.type == "meta" or torch.equal(sa[k], sb[k]), k


DOWNSAMPLE = "Sequential(conv_bn x1)"


# ---- torchvision -----------------------------------------------------------------------

def test_resnet18_fused_and_equivalent():
    ref = build(torchvision.models.resnet18)
    fused = fuse(ref)
    assert resfast.fuse is fuse
    assert type(ref.layer1[0]).__module__ == "torchvision.models.resnet"  # not in place by default
    _same_state(fused, ref)
    listed = dict(fused_modules(fused))
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert listed == {"": "ResNet stem (conv1 -> bn1 -> relu)", **{b: "BasicBlock" for b in blocks},
                      **{f"layer{i}.0.downsample": DOWNSAMPLE for i in (2, 3, 4)}}
    assert unfused_modules(fused) == []
    assert all(isinstance(fused.get_submodule(b), FusedResidualBlock) for b in blocks)
    # the blocks run the torchvision block's own children (no copies), which keep their names
    assert fused.layer2[0].downsample[0] is fused.get_submodule("layer2.0.downsample.0")
    assert fused.layer2[0].residual_plan.shortcut == "downsample"
    x = torch.randn(2, 3, 64, 64)
    check_equivalence(ref, lambda: fuse(ref), x, training=True, label="fused resnet18",
                      configs=[(F64, "nchw"), (BF16, "nhwc")])
    check_equivalence(ref, lambda: fuse(ref), x, training=False, label="fused resnet18",
                      configs=[(F32, "nhwc")])


@pytest.mark.slow
def test_resnet50_fused_and_equivalent():
    ref = build(torchvision.models.resnet50)
    fused = fuse(ref)
    _same_state(fused, ref)
    kinds = [k for _, k in fused_modules(fused)]
    assert kinds.count("Bottleneck") == 16 and kinds[0].startswith("ResNet stem")
    assert unfused_modules(fused) == []
    x = torch.randn(2, 3, 64, 64)
    check_equivalence(ref, lambda: fuse(ref), x, training=True, configs=[(F64, "nchw")],
                      label="fused resnet50")
    check_equivalence(ref, lambda: fuse(ref), x, training=False, configs=[(F32, "nhwc")],
                      label="fused resnet50")


def test_vgg11_bn_fused_and_equivalent():
    ref = build(torchvision.models.vgg11_bn)
    fused = fuse(ref)
    _same_state(fused, ref)
    assert isinstance(fused.features, FusedSequential)
    assert type(fused.classifier) is nn.Sequential  # Linear/ReLU/Dropout: nothing to fuse
    assert fused_modules(fused) == [("features", "Sequential(conv_bn_relu x8)")]
    x = torch.randn(2, 3, 32, 32)
    check_equivalence(ref, lambda: fuse(ref), x, training=True, configs=[(F64, "nchw")],
                      label="fused vgg11_bn")
    check_equivalence(ref, lambda: fuse(ref), x, training=False, configs=[(F32, "nhwc")],
                      label="fused vgg11_bn")


@pytest.mark.parametrize("name, plan",
                         [("vgg16", "conv_relu x13"), ("vgg19_bn", "conv_bn_relu x16")])
def test_vgg_plans(name, plan):
    fused = fuse(meta_build(getattr(torchvision.models, name)))
    assert fused_modules(fused) == [("features", f"Sequential({plan})")]
    kinds = [s.kind for s in fusion_plan(fused.features)]
    assert kinds.count("module") == 5  # the max-pools


def test_unfusable_torchvision_models_left_as_they_were(capsys):
    # grouped 3x3 convs (ResNeXt) keep the blocks as they were; the stem and the downsample
    # Sequentials (Conv2d -> BatchNorm2d) are still fused
    resnext = fuse(meta_build(torchvision.models.resnext50_32x4d), report=True)
    assert fused_modules(resnext) == [("", "ResNet stem (conv1 -> bn1 -> relu)")] + [
        (f"layer{i}.0.downsample", DOWNSAMPLE) for i in range(1, 5)]
    assert type(resnext.layer1[0]) is torchvision.models.resnet.Bottleneck
    out = capsys.readouterr().out
    assert "kept   layer1.0: Bottleneck: conv2 cannot be fused: groups=32" in out
    assert len(unfused_modules(resnext)) == 16
    # wide ResNets are ordinary bottlenecks with wider 3x3s
    wide = fuse(meta_build(torchvision.models.wide_resnet50_2))
    assert [k for _, k in fused_modules(wide)].count("Bottleneck") == 16


# ---- a hand-written model ----------------------------------------------------------------

class CifarBlock(nn.Module):
    """The common hand-written CIFAR block: shortcut named ``shortcut`` (an empty
    Sequential for the identity), F.relu instead of a ReLU child."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = TF.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return TF.relu(out + self.shortcut(x))


class CifarBottleneck(nn.Module):
    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * planes, 1, stride, bias=False),
                                        nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        out = TF.relu(self.bn1(self.conv1(x)))
        out = TF.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return TF.relu(out + self.downsample(x))


class NoFinalReLU(CifarBlock):
    """Same children as a BasicBlock, another function (no ReLU after the add): fused
    as what it computes."""

    def forward(self, x):
        out = TF.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + self.shortcut(x)


class ScaledBranch(CifarBlock):
    """Same children as a BasicBlock, plus a multiplication: must not be fused."""

    def forward(self, x):
        out = TF.relu(self.bn1(self.conv1(x)))
        return TF.relu(0.5 * self.bn2(self.conv2(out)) + self.shortcut(x))


class HandWritten(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(CifarBlock(16, 16), CifarBlock(16, 32, 2), NoFinalReLU(32, 32),
                                    ScaledBranch(32, 32), CifarBottleneck(32, 8))
        self.mixed = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),  # 0-1 conv_relu
            nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 1),  # 2-3 bn_relu, 4 conv
            # 5 grouped, 6-7 bn_relu
            nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),  # 8-9 conv_bn
            nn.MaxPool2d(2),                                                                 # 10
            # 11 hooked, 12-13 bn_relu
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.mixed(self.blocks(self.stem(x))))


def _hand_written(calls):
    torch.manual_seed(0)
    model = fill_(HandWritten())
    model.mixed[11].register_forward_hook(lambda *args: calls.append(1))
    return model


def test_hand_written_model(capsys):
    calls = []
    ref = _hand_written(calls)
    fused = fuse(ref, report=True)
    out = capsys.readouterr().out
    _same_state(fused, ref)
    listed = dict(fused_modules(fused))
    assert listed == {
        "stem": "Sequential(conv_bn_relu x1)",
        "blocks.0": "BasicBlock",
        "blocks.1": "BasicBlock",
        "blocks.1.shortcut": DOWNSAMPLE,
        "blocks.2": "BasicBlock without a ReLU after the add",
        "blocks.4": "Bottleneck",
        "blocks.4.downsample": DOWNSAMPLE,
        "mixed": "Sequential(conv_relu x1, bn_relu x3, conv x1, conv_bn x1)",
    }
    assert unfused_modules(fused) == [
        ("blocks.3", "ScaledBranch: mul() in the residual branch computes something besides conv, "
                     "BN and ReLU"),
        ("mixed.5", "Conv2d: the conv cannot be fused: groups=4"),
        ("mixed.11", "Conv2d: the conv has hooks")]
    assert "kept   blocks.3: ScaledBranch: mul() in the residual branch" in out
    assert [(s.kind, s.index) for s in fusion_plan(fused.mixed)] == [
        ("conv_relu", (0, 1)), ("bn_relu", (2, 3)), ("conv", (4,)), ("module", (5,)),
        ("bn_relu", (6, 7)),
        ("conv_bn", (8, 9)), ("module", (10,)), ("module", (11,)), ("bn_relu", (12, 13))]
    assert type(fused.blocks[3]) is ScaledBranch
    # the children keep their names; the identity shortcut (an empty Sequential) is skipped
    assert "blocks.1.shortcut.0.weight" in fused.state_dict()
    assert fused.blocks[0].residual_plan.shortcut is None
    assert fused.blocks[1].residual_plan.shortcut == "shortcut"
    # the hooked conv ran as a module, so its hook still fires
    calls.clear()
    fused(torch.randn(2, 3, 16, 16))
    assert calls == [1]
    x = torch.randn(2, 3, 16, 16)
    check_equivalence(ref, lambda: fuse(ref), x, training=True, label="hand-written",
                      configs=[(F64, "nchw"), (F32, "nhwc"), (BF16, "nhwc")])
    check_equivalence(ref, lambda: fuse(ref), x, training=False, label="hand-written",
                      configs=[(F32, "nchw")])


def test_fused_sequential_keeps_the_input_layout():
    seq = fill_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                              nn.ReLU()))
    fused = fuse(seq)
    assert isinstance(fused, FusedSequential) and type(seq) is nn.Sequential
    x = torch.randn(2, 3, 9, 9)
    y = fused(x)
    assert y.is_contiguous() and not y.is_contiguous(memory_format=torch.channels_last)
    y_cl = fused(x.contiguous(memory_format=torch.channels_last))
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_cl)
    # a Sequential stays a Sequential: indexing, len, append still work
    assert len(fused) == 3 and isinstance(fused[0], nn.Conv2d)


def test_inplace_idempotent_and_top_level_block():
    model = _hand_written([])
    same = fuse(model, inplace=True)
    assert same is model and isinstance(model.blocks[0], FusedResidualBlock)
    before = fused_modules(model)
    again = fuse(model)
    assert fused_modules(again) == before
    # a block given as the model itself is replaced (use the return value)
    block = fill_(torchvision.models.resnet.BasicBlock(8, 8))
    fused = fuse(block)
    assert isinstance(fused, FusedResidualBlock) and fused_modules(fused) == [("", "BasicBlock")]
    x = torch.randn(2, 8, 6, 6)
    block.eval(), fused.eval()
    torch.testing.assert_close(fused(x), block(x), rtol=1e-5, atol=1e-5)


def test_bad_input():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fuse("resnet18")


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_fused_resnet_pickles(library, tmp_path):
    """A fused torchvision or timm ResNet saves whole and loads in a fresh process."""
    if library == "timm":
        timm = import_timm()
        model = fuse(build(lambda: timm.create_model("resnet18", pretrained=False))).eval()
    else:
        model = fuse(build(torchvision.models.resnet18)).eval()
    cls = {"torchvision": "_FusedTorchvisionResNet", "timm": "_FusedTimmResNet"}[library]
    path = tmp_path / "fused.pt"
    torch.save(model, path)
    x = torch.randn(1, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "y.pt")
    code = (
        "import torch, resfast\n"
        f"m = torch.load({str(path)!r}, weights_only=False)\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); y = torch.load({str(tmp_path / 'y.pt')!r})\n"
        f"assert type(m).__name__ == {cls!r}, type(m)\n"
        "assert type(m.layer1[0]).__name__ == 'FusedResidualBlock', type(m.layer1[0])\n"
        "with torch.no_grad(): torch.testing.assert_close(m(x), y)\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["resnet50", "vgg16_bn"])
def test_fuse_gpu(name, training):
    ref = build(getattr(torchvision.models, name))
    x = torch.randn(8, 3, 224, 224)
    check_equivalence(ref, lambda: fuse(ref), x, training=training, device="cuda",
                      label=f"fused {name}", configs=[(F32, "nhwc"), (BF16, "nhwc")])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph(training):
    """A fused model (timm's blocks, FrozenBatchNorm2d, a Sequential branch) compiles
    without a graph break and computes what it computes eagerly."""
    from tests.support import residual_blocks as rb

    def model():
        torch.manual_seed(0)
        return rb.randomize_norms_(nn.Sequential(
            rb.timm_basic_avg_down(3, 8, 2), rb.torchvision_frozen_bottleneck(8, 2),
            rb.SequentialBody(8, 8))).train(training)

    eager, src = fuse(model()), fuse(model())
    compiled = torch.compile(src, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 10, 10).contiguous(memory_format=torch.channels_last)
    out_e, out_c = eager(x), compiled(x)
    torch.testing.assert_close(out_c, out_e)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), src.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, msg=name)
    for (name, b_e), b_c in zip(eager.named_buffers(), src.buffers()):
        torch.testing.assert_close(b_c, b_e, msg=name)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_a_fused_timm_resnet_hands_its_features_back_in_the_input_layout(layout):
    # the fused stem makes the network channels_last; forward_features is public, so an NCHW
    # caller still gets NCHW features (and a channels_last one channels_last)
    timm = import_timm()
    model = fuse(build(lambda: timm.create_model("resnet18", pretrained=False))).eval()
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=fmt)
    with torch.no_grad():
        features = model.forward_features(x)
    assert features.is_contiguous(memory_format=fmt)
