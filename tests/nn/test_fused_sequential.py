"""FusedSequential over torchvision's FrozenBatchNorm2d (a constant BN, in training
mode too) against the same Sequential run by torch.nn: every step kind of the plan
that takes a BN (conv_bn_relu, conv_bn applied by the next conv, bn_relu, bn before a
conv), every dtype, both layouts, train and eval; the frozen buffers never change.
The plan over nn.BatchNorm2d: tests/fusion/test_fuse.py and the VGG networks."""
import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from resfast.nn import FusedSequential, fusion_plan
from tests.support.helpers import DEVICES, LOW_PRECISION, check_module_pair
from tests.support.residual_blocks import randomize_norms_

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _frozen_sequential():
    return nn.Sequential(
        nn.Conv2d(5, 32, 3, 1, 1, bias=False), FrozenBatchNorm2d(32), nn.ReLU(),  # conv_bn_relu
        nn.Conv2d(32, 32, 3, 2, 1, bias=True), FrozenBatchNorm2d(32),           # conv_bn
        nn.Conv2d(32, 24, 1), nn.Identity(),                                   # conv (prologue)
        FrozenBatchNorm2d(24), nn.ReLU(),                                      # bn_relu
        FrozenBatchNorm2d(24), nn.Conv2d(24, 8, 3, 1, 1, bias=False))          # bn, conv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_frozen_batch_norm_plan(device, dtype, layout, training):
    torch.manual_seed(0)
    ref = randomize_norms_(_frozen_sequential())
    ours = randomize_norms_(_frozen_sequential())
    ours.__class__ = FusedSequential
    assert [s.kind for s in fusion_plan(ours)] == ["conv_bn_relu", "conv_bn", "conv", "module",
                                                   "bn_relu", "bn", "conv"]
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    # low precision: 16x the elements, so that ReLU mask flips (as likely in torch) average
    # out; the convs are 32 wide because a bf16 bias gradient over 16 channels is a noisy
    # statistic (measured: 3.4x torch's own error on it, in NCHW)
    n, h = (8, 18) if dtype in LOW_PRECISION else (2, 9)
    check_module_pair(ours, ref, [torch.randn(n, 5, h, h)], dtype=dtype, device=device,
                      training=training, layout=layout)
    for k, v in ours.state_dict().items():
        assert torch.equal(v.cpu().to(before[k].dtype), before[k]), k
