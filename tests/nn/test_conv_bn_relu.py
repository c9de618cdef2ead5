"""conv (3x3 / 1x1, stride 1 / 2, +-bias) + BN (+ ReLU) against torch.nn (the module's
plain torch.nn twin, resfast.twin: nn.Conv2d -> nn.BatchNorm2d -> ReLU over the same children)."""
import pytest
import torch
from torch import nn

import resfast
from resfast.twin import torch_twin
from tests.support.helpers import DEVICES, LOW_PRECISION, check_module_pair, no_resfast_ops

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# (N, C_in, C_out, H, W, K, stride): odd channels, odd and tiny maps, N=1
SHAPES = [
    (2, 3, 8, 13, 13, 3, 1),
    (1, 63, 16, 7, 7, 3, 2),
    (3, 16, 63, 7, 7, 1, 1),
    (2, 8, 5, 13, 13, 1, 2),
    (4, 5, 6, 1, 1, 1, 1),
]


def _randomize_bn(bn):
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_bn_relu(device, dtype, shape, layout, training):
    n, cin, cout, h, w, k, stride = shape
    if dtype in LOW_PRECISION:
        n *= 4  # fewer ReLU mask flips per element: see GRAD_FLOOR in tests/support/helpers.py
    if training and n * ((h - 1) // stride + 1) * ((w - 1) // stride + 1) == 1:
        pytest.skip("BN training needs more than one value per channel")
    bias = cout % 2 == 1  # both cases over the shapes
    ref = torch_twin(resfast.nn.Conv2dBNReLU(cin, cout, k, stride, bias=bias, relu=True))
    _randomize_bn(ref.bn)
    ours = resfast.nn.Conv2dBNReLU(cin, cout, k, stride, bias=bias, relu=True)
    check_module_pair(ours, ref, [torch.randn(n, cin, h, w)], dtype=dtype, device=device,
                      training=training, layout=layout)


# (N, C_in, C_out, H, W, K, stride, dilation): FCN / DeepLab's dilated 3x3s, odd sizes; the
# dilated kernel spans 5x5 (7x7), more than the 1-pixel-padded map's edge on the small side
DILATED = [
    (2, 5, 8, 11, 9, 3, 1, 2),
    (1, 13, 6, 13, 10, 3, 2, 3),
    (2, 17, 7, 5, 6, 3, 1, 2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DILATED, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dilated_conv_bn_relu(device, dtype, shape, layout, training):
    n, cin, cout, h, w, k, stride, dilation = shape
    # In bf16/fp16 without the ReLU: at these sizes one ReLU mask flip (a pre-activation
    # within rounding of 0) moves a gradient by 1-2%, above the floor, in torch as in ours
    # (measured over 8 seeds, dilation 1 and 2 alike: ours 0.3-4.5%, torch's own 0.3-4.5%);
    # the dilation's index math is held to float64 and float32, the ReLU by the tests above.
    relu = dtype not in LOW_PRECISION
    if not relu:
        n *= 4
    ref = torch_twin(resfast.nn.Conv2dBNReLU(cin, cout, k, stride, bias=True, relu=relu,
                                             dilation=dilation))
    _randomize_bn(ref.bn)
    assert ref.conv.dilation == (dilation, dilation) and ref.conv.padding == (dilation, dilation)
    ours = resfast.nn.Conv2dBNReLU(cin, cout, k, stride, bias=True, relu=relu, dilation=dilation)
    check_module_pair(ours, ref, [torch.randn(n, cin, h, w)], dtype=dtype, device=device,
                      training=training, layout=layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_bn_without_relu(device, training):
    ref = torch_twin(resfast.nn.Conv2dBNReLU(6, 10, 3, 1, relu=False))
    _randomize_bn(ref.bn)
    ours = resfast.nn.Conv2dBNReLU(6, 10, 3, 1, relu=False)
    check_module_pair(ours, ref, [torch.randn(2, 6, 9, 9)], dtype=torch.float32, device=device,
                      training=training)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_running_stats_over_steps(momentum):
    """Three training steps: running mean/var and num_batches_tracked follow
    nn.BatchNorm2d, including momentum=None (cumulative average)."""
    ref = torch_twin(resfast.nn.Conv2dBNReLU(4, 6, 3, momentum=momentum)).double()
    ours = resfast.nn.Conv2dBNReLU(4, 6, 3, momentum=momentum).double()
    ours.load_state_dict(ref.state_dict())
    for _ in range(3):
        x = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 2 + 1
        with no_resfast_ops():
            ref(x)
        ours(x)
    torch.testing.assert_close(ours.bn.running_mean, ref.bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.bn.running_var, ref.bn.running_var, rtol=1e-12, atol=1e-12)
    assert ours.bn.num_batches_tracked.item() == ref.bn.num_batches_tracked.item() == 3


def test_no_running_stats_uses_batch_statistics():
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False),
                        nn.BatchNorm2d(4, track_running_stats=False))
    ours = resfast.nn.Conv2dBNReLU(3, 4, 3, relu=False)
    ours.bn = nn.BatchNorm2d(4, track_running_stats=False)
    ours.conv.weight.data.copy_(ref[0].weight.data)
    ours.eval()
    ref.eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_requires_grad_on_any_subset():
    """Only some inputs need gradients: the others get none, the rest are right."""
    ref = torch_twin(resfast.nn.Conv2dBNReLU(3, 4, 3, bias=True)).double()
    ours = resfast.nn.Conv2dBNReLU(3, 4, 3, bias=True).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for m in (ref, ours):
        m.conv.weight.requires_grad_(False)
        m.bn.bias.requires_grad_(False)
    with no_resfast_ops():
        out_ref = ref(x)
    out = ours(x)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [ours.conv.bias, ours.bn.weight], g)
    with no_resfast_ops():
        want = torch.autograd.grad(out_ref, [ref.conv.bias, ref.bn.weight], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _profiled_ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("case", ["1x1", "1x1 on 15x16", "1x1 batch 4", "1x1 stride 2",
                                  "3x3 stride 2", "8 channels", "block, 8 channels"])
def test_nchw_inference_is_torch_nn_convolution_then_one_pass(case):
    """An NCHW eval layer that Winograd does not take (resfast.ops.conv_cpu, NCHW_EVAL):
    torch.nn's own convolution (a 1x1 stride-1 one on a map of at least 256 pixels and a
    batch of at least 8: a GEMM per image), then BN (+ the
    residual) + ReLU as one bn_act pass, in NCHW, and no oneDNN call with a post-op, whose
    NCHW form ATen runs as separate passes. The layers have a conv bias (the 1x1 GEMM's
    goes into BN's centre). Within 2x torch.nn's own float32 error against float64, or 4
    epsilons of the output's largest element."""
    torch.manual_seed(0)
    if case.startswith("block"):
        ours = resfast.nn.BasicBlock(8, 8)
        x = torch.randn(2, 8, 9, 11)
    else:
        cin = 8 if case == "8 channels" else 16
        k, stride = {"1x1": (1, 1), "1x1 on 15x16": (1, 1), "1x1 batch 4": (1, 1),
                     "1x1 stride 2": (1, 2), "3x3 stride 2": (3, 2), "8 channels": (3, 1)}[case]
        ours = resfast.nn.Conv2dBNReLU(cin, 24, k, stride, bias=True)
        x = torch.randn(4 if case == "1x1 batch 4" else 8, cin,
                        15 if case == "1x1 on 15x16" else 16, 16)
    for m in ours.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomize_bn(m)
    ours.eval()
    ref = torch_twin(ours).eval()
    with torch.no_grad():
        y, names = _profiled_ops(lambda: ours(x))
        with no_resfast_ops():
            want = ref(x)
            exact = torch_twin(ours).double().eval()(x.double())
    assert y.is_contiguous() and not y.is_contiguous(memory_format=torch.channels_last)
    conv = "aten::matmul" if case == "1x1" else "aten::convolution"
    assert {conv, "resfast::bn_act"} <= names
    assert not names & {"mkldnn::_convolution_pointwise", "aten::mul_", "aten::relu_",
                        "resfast::conv2d_winograd", "resfast::relayout"}
    if case == "1x1":
        assert "aten::convolution" not in names
    err, torch_err = (y.double() - exact).abs().max(), (want.double() - exact).abs().max()
    assert err <= max(2 * torch_err, 4 * 2.0 ** -24 * exact.abs().max()), (err, torch_err)
