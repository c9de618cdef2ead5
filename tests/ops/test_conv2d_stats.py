"""resfast::conv2d_stats: the CPU training conv with its autograd formula in C++.

It must compute exactly what ``conv2d_bn(x, weight, bias, stats=True)`` computes (the same
oneDNN and BN calls): outputs and every gradient bitwise equal, whichever of y, mean and var
reach the loss, in both layouts, float32 and bfloat16, mixed precision, strided and dilated.
conv2d_bn itself is held to torch.nn and gradchecked in float64 (tests/ops/test_conv_cpu.py,
test_opcheck.py), which this op cannot be: oneDNN has no float64 kernel.
"""
import pytest
import torch

import resfast  # noqa: F401  (registers the ops)
from resfast.ops import eager

ops = torch.ops.resfast
CL = torch.channels_last
BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
DTYPES = [(torch.float32, torch.float32)] + (
    [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)] if BF16 else [])
# which outputs reach the loss
LOSSES = {"y": (1, 0, 0), "mean": (0, 1, 0), "var": (0, 0, 1), "all": (1, 0.3, 0.7),
          "stats": (0, 0.3, 0.7)}
# (N, C_in, C_out, H, W, K, stride, padding, dilation)
SHAPES = [(2, 5, 4, 7, 9, 3, 1, 1, 1), (3, 16, 8, 8, 8, 1, 2, 0, 1), (1, 3, 8, 13, 12, 3, 2, 2, 2)]


def _run(fn, x0, w0, b0, stride, padding, dilation, loss):
    x = x0.clone().requires_grad_()
    w = w0.clone().requires_grad_()
    b = None if b0 is None else b0.clone().requires_grad_()
    y, mean, var = fn(x, w, b, stride, padding, dilation)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(y.shape, generator=gen).to(y.dtype)
    ky, km, kv = LOSSES[loss]
    total = (y.float() * g.float()).sum() * ky + mean.sum() * km + var.sum() * kv
    total.backward()
    return [y, mean, var, x.grad, w.grad, None if b is None else b.grad]


def _conv2d_bn(x, w, b, stride, padding, dilation):
    return ops.conv2d_bn(x, w, b, None, None, False, stride, padding, True, False,
                         dilation=dilation)


def _equal(a, b, name):
    assert (a is None) == (b is None), name
    if a is not None:
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.stride() == b.stride(), f"{name}: strides {a.stride()} vs {b.stride()}"
        assert torch.equal(a, b), f"{name}: max difference {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"x_{d[0]}-w_{d[1]}")
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_conv2d_bn_bitwise(shape, bias, layout, dtypes, loss):
    n, cin, cout, h, w, k, stride, padding, dilation = shape
    torch.manual_seed(0)
    x = torch.randn(n, cin, h, w, dtype=dtypes[0]) * 2 + 0.5
    x = x.contiguous(memory_format=CL if layout == "nhwc" else torch.contiguous_format)
    weight = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtypes[1])
    b = torch.randn(cout) if bias else None
    ours = _run(ops.conv2d_stats, x, weight, b, stride, padding, dilation, loss)
    ref = _run(_conv2d_bn, x, weight, b, stride, padding, dilation, loss)
    for name, a, r in zip(("y", "mean", "var", "grad x", "grad weight", "grad bias"), ours, ref):
        _equal(a, r, name)
    if layout == "nchw":  # an NCHW leaf's gradient comes back NCHW, as torch.nn's does
        assert ours[3].is_contiguous()


def test_the_eager_route_takes_it_for_training_convs_only():
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    y = eager.conv2d_bn(x, w, None, None, None, False, 1, 1, True, False)[0]
    assert "Conv2dStats" in y.grad_fn.name()
    for args in [(None, None, True, 1, 1, True, False),          # a ReLU prologue
                 (None, None, False, 1, 1, False, True)]:        # no statistics, ReLU out
        z = eager.conv2d_bn(x, w, None, *args)[0]
        assert "Conv2dStats" not in z.grad_fn.name()
    with torch.no_grad():  # inference also takes it (no node), with the same results
        ours = eager.conv2d_bn(x, w, None, None, None, False, 1, 1, True, False)
        ref = ops.conv2d_bn(x, w, None, None, None, False, 1, 1, True, False)
    for a, r in zip(ours, ref):
        _equal(a, r, "no_grad output")


def test_bad_input_raises_value_errors_naming_it():
    x, w = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3)
    cases = [
        ((x.double(), w.double(), None, 1, 1, 1), "float32 or bfloat16"),
        ((x[:, :3], w, None, 1, 1, 1), "weight has 4 input channels but x has 3"),
        ((x, w, torch.zeros(3), 1, 1, 1), "bias must have shape"),
        ((x, w, None, 3, 1, 1), "stride must be 1 or 2"),
        ((x, w, None, 1, -1, 1), "padding >= 0"),
        ((x, w, None, 1, 1, 0), "dilation >= 1"),
        ((x[..., :1, :1], w, None, 1, 0, 1), "smaller than the kernel"),
        ((x[:0], w, None, 1, 1, 1), "non-empty x"),
        ((x[0], w, None, 1, 1, 1), "4-D"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            ops.conv2d_stats(*args)


def test_double_backward_raises():
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    y, mean, var = ops.conv2d_stats(x, w, None, 1, 1, 1)
    (gx,) = torch.autograd.grad((y.square().sum() + var.sum()), x, create_graph=True)
    with pytest.raises(RuntimeError, match="conv2d_stats_backward is not implemented"):
        gx.sum().backward()


def test_nothing_to_differentiate_costs_no_backward_call():
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    y, mean, var = ops.conv2d_stats(x, w, None, 1, 1, 1)
    with torch.profiler.profile() as prof:
        torch.autograd.grad(y.sum(), w)  # x needs no gradient: the mask asks for grad_weight
    backward = [e for e in prof.events() if e.name == "aten::convolution_backward"]
    assert len(backward) == 1
    assert not any(e.name == "resfast::bn_act" for e in prof.events())  # no statistics' pass


def _cl_view(t):
    n, c, h, w = t.shape
    return t.as_strided(t.shape, (c * h * w, 1, w * c, c))


@pytest.mark.parametrize("op", ["conv2d_stats", "conv2d_bn"])
@pytest.mark.parametrize("x", [
    lambda: torch.randn(2, 1, 8, 8),            # C == 1: dense in both layouts, NCHW strides
    lambda: _cl_view(torch.randn(2, 1, 8, 8)),  # ... channels_last strides
    lambda: torch.randn(2, 5, 1, 1),            # H*W == 1, padded to a 3x3 output
    lambda: _cl_view(torch.randn(2, 5, 1, 1)),
], ids=["c1-nchw", "c1-cl", "hw1-nchw", "hw1-cl"])
def test_a_tensor_dense_in_both_layouts_gets_the_strides_its_fake_promises(op, x):
    # such a tensor is read in the layout its strides suggest, and y written in it; the fake
    # must say the same (torch.compile trusts its strides)
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = x()
    w = torch.randn(4, x.shape[1], 3, 3)
    call = {"conv2d_stats": lambda x, w: ops.conv2d_stats(x, w, None, 1, 1, 1),
            "conv2d_bn": lambda x, w: ops.conv2d_bn(x, w, None, None, None, False, 1, 1, True,
                                                    False)}[op]
    real = call(x, w)
    with FakeTensorMode() as mode:
        fake = call(mode.from_tensor(x), mode.from_tensor(w))
    assert real[0].shape == fake[0].shape and real[0].stride() == fake[0].stride()
    xg = x.clone().requires_grad_() if x.is_contiguous() else _cl_view(x.clone()).detach()
    xg.requires_grad_()
    y = call(xg, w)[0]
    (gx,) = torch.autograd.grad(y.sum(), xg)
    assert gx.shape == xg.shape


def test_a_grayscale_network_input_is_made_channels_last():
    from resfast import functional as F

    x = torch.randn(2, 1, 8, 8)  # dense in both layouts, NCHW strides
    h = F.channels_last_input(x)
    assert h.stride() == (64, 1, 8, 1) and torch.equal(h, x)
    y = ops.conv2d_stats(h, torch.randn(4, 1, 3, 3), None, 1, 1, 1)[0]
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()


@pytest.mark.parametrize("loss", ["all", "stats"])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_conv2d_bn_bitwise_by_winograd(bias, loss, monkeypatch):
    """With RESFAST_CPU_WINOGRAD=all both routes run the 3x3 convolution and its input
    gradient by Winograd (the same ops on the same transformed weights), still bitwise."""
    monkeypatch.setenv("RESFAST_CPU_WINOGRAD", "all")
    torch.manual_seed(0)
    x = (torch.randn(2, 16, 16, 13) * 2 + 0.5).contiguous(memory_format=CL)  # 32 tiles
    weight = torch.randn(24, 16, 3, 3) / 12
    b = torch.randn(24) if bias else None
    with torch.profiler.profile() as prof:
        ours = _run(ops.conv2d_stats, x, weight, b, 1, 1, 1, loss)
        ref = _run(_conv2d_bn, x, weight, b, 1, 1, 1, loss)
    calls = sum(e.count for e in prof.key_averages() if e.key == "resfast::conv2d_winograd")
    assert calls == 4  # forward and input gradient, in each route
    for name, a, r in zip(("y", "mean", "var", "grad x", "grad weight", "grad bias"), ours, ref):
        _equal(a, r, name)
