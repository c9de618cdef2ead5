"""What fuse() reports (fuse(report=True), fused_modules, unfused_modules, report) and
the `resfast fuse-report NAME` command (resfast/fusion/cli.py)."""
import subprocess
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

import resfast
from resfast.__main__ import main
from resfast.fusion import fused_modules, report, unfused_modules
from resfast.fusion.cli import build_model, freeze_batch_norm
from tests.support.equivalence import meta_build
from tests.support.residual_blocks import import_timm

timm = import_timm()

REPO = Path(__file__).resolve().parents[2]


def test_report_lists_fused_and_kept(capsys):
    model = meta_build(lambda: timm.create_model("seresnet50", pretrained=False))
    fused = resfast.fuse(model, report=True)
    printed = capsys.readouterr().out.strip()
    assert printed == report(fused)
    lines = printed.splitlines()
    assert lines[0] == "resfast.fuse: 5 module(s) fused, 16 left as they were"
    assert lines[1] == "  fused  (model): ResNet stem (conv1 -> bn1 -> act1)"
    assert lines[2] == "  fused  layer1.0.downsample: Sequential(conv_bn x1)"
    assert lines[6] == ("  kept   layer1.0: Bottleneck: se (SEModule) in the residual branch "
                        "computes something besides conv, BN and ReLU")
    # a kept block's convs (and its SE module's) are covered by the block's line
    assert not any("layer1.0.se" in line or "layer1.0.conv" in line for line in lines)


def test_unfused_modules_of_a_model_not_fused_yet():
    model = meta_build(torchvision.models.resnet18)
    listed = unfused_modules(model)
    assert listed[0] == ("", "ResNet stem: fusable, not fused yet (resfast.fuse fuses it)")
    assert ("layer1.0", "BasicBlock: fusable, not fused yet (resfast.fuse fuses it)") in listed
    assert not any(name.startswith("layer1.0.") for name, _ in listed)  # covered by the block
    assert len(listed) == 9
    assert fused_modules(model) == []
    # and nothing is left once it is fused
    assert unfused_modules(resfast.fuse(model)) == []


def test_lone_convs_say_so():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, groups=2))
    assert unfused_modules(resfast.fuse(model)) == [
        ("0", "Conv2d: not followed by a BatchNorm or ReLU in its Sequential (nothing to fuse "
              "it with)"),
        ("2", "Conv2d: the conv cannot be fused: groups=2")]
    assert unfused_modules(nn.Conv2d(3, 8, 3)) == [("", "Conv2d: on its own (nothing to fuse it "
                                                        "with)")]


def test_fuse_report_command(capsys):
    assert main(["fuse-report", "timm:resnet26d"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "timm:resnet26d"
    assert out[1] == "resfast.fuse: 14 module(s) fused, 0 left as they were"
    assert out[2] == "  fused  (model): ResNet stem (conv1 -> bn1 -> act1)"
    assert "  fused  conv1: Sequential(conv_bn_relu x2, conv x1)" in out
    assert main(["fuse-report", "fasterrcnn_resnet50_fpn", "--frozen-bn"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fasterrcnn_resnet50_fpn with FrozenBatchNorm2d\n")
    assert "  fused  backbone.body.layer4.2: Bottleneck" in out
    assert ("  kept   backbone.body.conv1: Conv2d: runs in the forward of "
            "IntermediateLayerGetter") in out


def test_fuse_report_bad_names(capsys):
    assert main(["fuse-report", "resnt50"]) == 2
    err = capsys.readouterr().err
    assert "no torchvision or timm model named 'resnt50'; did you mean resnet50" in err
    assert main(["fuse-report", "keras:resnet50"]) == 2
    assert "unknown source 'keras'" in capsys.readouterr().err


def test_models_are_built_without_weights():
    """Both sources, no download (a detection model's default backbone weights included),
    on the meta device."""
    tv = build_model("torchvision:retinanet_resnet50_fpn")
    assert next(tv.parameters()).device.type == "meta"
    assert build_model("resnet18").__class__.__module__ == "torchvision.models.resnet"
    assert build_model("timm:resnet18").__class__.__module__ == "timm.models.resnet"
    assert build_model("resnet26d").__class__.__module__ == "timm.models.resnet"  # timm only


def test_freeze_batch_norm_keeps_the_statistics():
    from torchvision.ops.misc import FrozenBatchNorm2d
    model = torchvision.models.resnet18()
    with torch.no_grad():
        model.bn1.running_mean.uniform_()
    mean = model.bn1.running_mean.clone()
    frozen = freeze_batch_norm(model)
    assert isinstance(frozen.bn1, FrozenBatchNorm2d)
    assert torch.equal(frozen.bn1.running_mean, mean)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())


def test_python_dash_m(capsys):
    res = subprocess.run([sys.executable, "-m", "resfast", "fuse-report", "resnet18"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resfast.fuse: 12 module(s) fused, 0 left as they were" in res.stdout
    assert main([]) == 0 and "fuse-report NAME" in capsys.readouterr().out
