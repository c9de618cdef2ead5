"""Basic and bottleneck blocks (identity, projection and option-A shortcuts)
against torchvision's blocks with the same weights (option A, which torchvision
does not have: against the block's plain torch.nn twin, resfast.twin)."""
import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock as TVBasic
from torchvision.models.resnet import Bottleneck as TVBottleneck

import resfast
from resfast.twin import torch_twin
from tests.support.helpers import DEVICES, LOW_PRECISION, check_module_pair

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _projection(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def _randomize(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2)
    return module


# (C_in, planes, stride, projection)
BASIC = [(16, 16, 1, False), (8, 16, 2, True), (13, 13, 1, False)]
BOTTLENECK = [(32, 8, 1, False), (16, 8, 2, True), (12, 4, 1, True)]


# bfloat16 / float16: a block's gradient errors are mostly a few ReLU flips per step, in
# torch and resfast alike, each moving one tensor by chance. At 8 images the (16, 8, 2, True)
# bottleneck's eval step has ~3 and one draw in 12 put resfast's conv3.weight past 3x torch's
# error on the same draw; at 32 images the worst of 12 draws used 0.58 of the bound
# (check_module_pair's, with torch's mean error over the step's gradients as a floor).
LOW_BATCH = 32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conf", BASIC, ids=str)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_basic_block(device, dtype, conf, layout, training):
    cin, planes, stride, proj = conf
    n = LOW_BATCH if dtype in LOW_PRECISION else 2
    ds = _projection(cin, planes, stride) if proj else None
    ref = _randomize(TVBasic(cin, planes, stride, ds))
    ours = resfast.nn.BasicBlock(cin, planes, stride,
                                 _projection(cin, planes, stride) if proj else None)
    check_module_pair(ours, ref, [torch.randn(n, cin, 9, 9)], dtype=dtype, device=device,
                      training=training, layout=layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conf", BOTTLENECK, ids=str)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bottleneck(device, dtype, conf, layout, training):
    cin, planes, stride, proj = conf
    n = LOW_BATCH if dtype in LOW_PRECISION else 2
    ds = _projection(cin, planes * 4, stride) if proj else None
    ref = _randomize(TVBottleneck(cin, planes, stride, ds))
    ours = resfast.nn.Bottleneck(cin, planes, stride,
                                 _projection(cin, planes * 4, stride) if proj else None)
    check_module_pair(ours, ref, [torch.randn(n, cin, 7, 7)], dtype=dtype, device=device,
                      training=training, layout=layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_basic_block_option_a(device, training):
    ref = _randomize(torch_twin(resfast.nn.BasicBlock(16, 32, 2, shortcut="A")))
    ours = resfast.nn.BasicBlock(16, 32, 2, shortcut="A")
    check_module_pair(ours, ref, [torch.randn(2, 16, 8, 8)], dtype=torch.float64, device=device,
                      training=training)
