"""Whole networks in inference, where their 3x3 convolutions run Winograd's F(4x4, 3x3)
(resfast.ops.winograd: the default for eval-mode layers under no_grad): the output against
torch.nn's in float64, beside torch.nn's own float32 error on the same input.

Winograd's float32 rounding is larger than the direct convolution's: per element up to ~50
epsilons of the summed terms against ~5 (tests/ops/test_conv2d_winograd.py), in norm
3.4-4.4x a training ResNet-20's direct-convolution error over four inputs. Through a
network the errors of its layers add rather than multiply, so the output is held to
WINOGRAD_FACTOR = 4 times torch.nn's own float32 error (measured here: 2.6-2.7x for
ResNet-20, 1.1-1.2x for ResNet-50, 0.7-0.8x for VGG-11-BN, whose direct channels_last
convolutions in torch err more). The training equivalence tests, which run the direct
convolution, keep their 2x (tests/support/equivalence.py). The networks run
at sizes where their stages down to 16x16 (ResNet-20: 8x8) take Winograd, and the test
counts that every such layer did.
"""
import copy

import pytest
import torch

import resfast.models as M
from resfast.twin import torch_twin
from tests.support.equivalence import fill_, meta_build
from tests.support.helpers import no_resfast_ops

WINOGRAD_FACTOR = 4.0
# (builder, batch, size, 3x3 convolutions that take Winograd): every 3x3 stride-1 layer with
# at least 16 channels in and out whose map is at least 8x8 and holds 32 tiles in the batch
CASES = {
    # 6 at 32x32, 5 at 16x16 and 5 at 8x8 (8 x 2 x 2 tiles); not the 3-channel stem, nor
    # the first of stages 2 and 3 (stride 2)
    "resnet20": (lambda: M.resnet20(), 8, 32, 16),
    # the bottlenecks' 3x3: 3 at 32x32 and 3 at 16x16 (2 x 4 x 4 tiles, the first of the
    # stage strided); 8x8 holds 8 tiles
    "resnet50": (lambda: M.resnet50(num_classes=10), 2, 128, 6),
    # 64 -> 128 at 32x32 and both at 16x16; not the 3-channel first, 8x8 holds 8 tiles
    "vgg11_bn": (lambda: M.vgg11_bn(num_classes=10), 2, 64, 3),
}


def _winograd_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == "resfast::conv2d_winograd")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_inference_output_by_winograd(case, seed):
    builder, batch, size, expected = CASES[case]
    torch.manual_seed(seed)
    ref = torch_twin(fill_(meta_build(builder).to_empty(device="cpu"))).eval()
    ours = meta_build(builder).to_empty(device="cpu")
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), no_resfast_ops():
        exact = copy.deepcopy(ref).double()(x.double())
        torch_err = ((ref(x).double() - exact).norm() / exact.norm()).item()
    with torch.no_grad():
        y, calls = _winograd_calls(lambda: ours(x))
    assert calls == expected
    err = ((y.double() - exact).norm() / exact.norm()).item()
    assert err <= WINOGRAD_FACTOR * torch_err, f"{err:.3g} > {WINOGRAD_FACTOR} x {torch_err:.3g}"
