"""resfast::conv2d_bn_eval: a CPU eval layer's forward in one C++ call, its folded weights
cached in C++.

It makes the calls resfast.ops.conv_cpu.forward makes for an eval layer, so it must give
exactly the Python route's results (values, dtype, strides) on every branch: oneDNN with the
scale as a post-op, the folded weight with a residual, Winograd, the NCHW GEMM and ATen's
NCHW convolution, each in both layouts and dtypes. It is also held to torch.nn in float64
here; the Python route is held to torch.nn everywhere else (tests/nn, tests/models). Its
cache follows resfast.ops.fold's rules (tests/ops/test_fold.py runs them through the
layers, which take this op under no_grad), checked here at the op.
"""
import gc

import pytest
import torch
import torch.nn.functional as tnf

import resfast
from resfast import functional as F
from resfast.ops import eager, fold
from tests.support.helpers import assert_close

ops = torch.ops.resfast
CL = torch.channels_last
BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
DTYPES = [torch.float32] + ([torch.bfloat16] if BF16 else [])

# (name, C_in, C_out, kernel, stride, padding, dilation, N, H, W): one per branch of
# conv_cpu.forward's eval route (in float32), and both sides of each threshold
KINDS = [
    ("3x3", 6, 5, 3, 1, 1, 1, 2, 7, 9),          # oneDNN (too few channels for Winograd)
    ("3x3_stride2", 6, 5, 3, 2, 1, 1, 2, 7, 9),
    ("3x3_dilated", 6, 5, 3, 1, 2, 2, 2, 7, 9),
    ("winograd", 16, 16, 3, 1, 1, 1, 2, 16, 16),  # 32 tiles: the least Winograd takes
    ("winograd_too_few_tiles", 16, 16, 3, 1, 1, 1, 1, 16, 12),
    ("1x1_gemm", 8, 12, 1, 1, 0, 1, 8, 16, 16),   # NCHW: one GEMM per image from here
    ("1x1_batch_7", 8, 12, 1, 1, 0, 1, 7, 16, 16),
    ("1x1_map_15x17", 8, 12, 1, 1, 0, 1, 8, 15, 17),
    ("1x1_stride2", 8, 12, 1, 2, 0, 1, 8, 16, 16),
]


def _problem(kind, dtype, layout, bias, residual, seed=0):
    name, cin, cout, k, stride, padding, dilation, n, h, w = kind
    g = torch.Generator().manual_seed(seed)
    fmt = CL if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(n, cin, h, w, generator=g).to(dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(dtype)
    bn = torch.nn.BatchNorm2d(cout).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.weight[1] = 0.0  # gamma 0 (zero_init_residual): folded where the scale cannot stay out
        bn.bias.uniform_(-0.5, 0.5, generator=g)
        bn.running_mean.uniform_(-0.2, 0.2, generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
    b = torch.randn(cout, generator=g).to(dtype) if bias else None
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    r = (torch.randn(n, cout, ho, wo, generator=g).to(dtype).contiguous(memory_format=fmt)
         if residual else None)
    return x, weight, b, bn, r, (stride, padding, dilation)


def _ours(x, weight, b, bn, r, relu, conf):
    stride, padding, dilation = conf
    return ops.conv2d_bn_eval(x, weight, b, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                              bn.eps, r, relu, stride, padding, dilation)


def _python_route(x, weight, b, bn, r, relu, conf):
    """What resfast.functional computes for the layer without this op: resfast::conv2d_bn's
    implementation (conv_cpu.forward), called for inference."""
    stride, padding, dilation = conf
    scale, shift, centre = F._running_scale_shift(F.BatchNormArgs.of(bn), torch.float32)
    y, _, _ = eager.conv2d_bn(x, weight, b, None, None, False, stride, padding, False, relu,
                              None, scale, shift, centre, r, dilation)
    return y


# The calls that tell conv_cpu.forward's branches apart (at these sizes the NCHW GEMM and
# ATen's convolution can agree to the bit, so the bits alone would not show a wrong branch)
ROUTE_OPS = ("aten::matmul", "aten::convolution", "mkldnn::_convolution_pointwise",
             "mkldnn::_reorder_convolution_weight", "resfast::conv2d_winograd",
             "resfast::winograd_weight", "resfast::bn_act", "resfast::relayout")


def _calls(fn):
    """The ROUTE_OPS fn calls, sorted, and its result."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return sorted(e.name for e in prof.events() if e.name in ROUTE_OPS), out


def _equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.stride() == b.stride(), f"strides {a.stride()} vs {b.stride()}"
    assert torch.equal(a, b), f"max difference {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("kind", KINDS, ids=[k[0] for k in KINDS])
def test_equals_the_python_route_bitwise(kind, layout, dtype, bias, residual, relu):
    x, weight, b, bn, r, conf = _problem(kind, dtype, layout, bias, residual)
    with torch.no_grad():
        for _ in range(2):  # the fold (with its packing calls), then the cached one
            want_calls, want = _calls(lambda: _python_route(x, weight, b, bn, r, relu, conf))
            calls, got = _calls(lambda: _ours(x, weight, b, bn, r, relu, conf))
            _equal(got, want)
            assert calls == want_calls
            assert calls  # the profile saw the convolution


@pytest.mark.skipif(not BF16, reason="oneDNN has no bfloat16 convolution on this CPU")
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_float32_input_with_bfloat16_weights(layout):
    """Mixed precision as conv2d_bn takes it: the input cast to the weight's dtype."""
    x, weight, b, bn, r, conf = _problem(KINDS[0], torch.bfloat16, layout, True, True)
    x = x.float()
    with torch.no_grad():
        _equal(_ours(x, weight, b, bn, r, True, conf),
               _python_route(x, weight, b, bn, r, True, conf))


@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("kind", KINDS, ids=[k[0] for k in KINDS])
def test_matches_torch_nn(kind, layout, dtype, residual, monkeypatch):
    """Against torch.nn's conv, BN and ReLU in float64: within 2x torch.nn's own error in
    float32 (Winograd's larger one is bounded in tests/ops/test_conv2d_winograd.py: off here),
    and in bfloat16 within 2x that of torch.nn's bfloat16 conv."""
    monkeypatch.setenv("RESFAST_CPU_WINOGRAD", "off")
    x, weight, b, bn, r, conf = _problem(kind, dtype, layout, True, residual)
    stride, padding, dilation = conf

    def torch_nn(dt):
        y = tnf.conv2d(x.to(dt), weight.to(dt), b.to(dt), stride, padding, dilation)
        bn_dt = {k: v.to(dt) for k, v in bn.state_dict().items() if v.is_floating_point()}
        y = tnf.batch_norm(y, bn_dt["running_mean"], bn_dt["running_var"], bn_dt["weight"],
                           bn_dt["bias"], False, 0.0, bn.eps)
        return torch.relu(y if r is None else y + r.to(dt))

    with torch.no_grad():
        ours = _ours(x, weight, b, bn, r, True, conf)
        assert ours.dtype == dtype
        assert_close("output", ours, torch_nn(torch.float64), torch_same=torch_nn(dtype),
                     dtype=dtype)


def _cache():
    hits, misses, entries = ops.conv2d_bn_eval_cache(False)
    return {"hit": hits, "miss": misses, "entries": entries}


def test_cache_reuses_and_refolds():
    """Reused while nothing changes; refolded after an in-place change to the weight (its
    version), to any BN vector or the bias (compared by value, also through .data), to eps,
    and for another input shape (oneDNN packs for the shape)."""
    x, weight, b, bn, r, conf = _problem(KINDS[0], torch.float32, "nhwc", True, False)

    def call_and_count(expect, x=x):
        before = _cache()
        with torch.no_grad():
            y = _ours(x, weight, b, bn, r, True, conf)
            want = _python_route(x, weight, b, bn, r, True, conf)
        after = _cache()
        assert (after["hit"] - before["hit"], after["miss"] - before["miss"]) == (
            (1, 0) if expect == "hit" else (0, 1))
        _equal(y, want)

    call_and_count("miss")
    call_and_count("hit")
    with torch.no_grad():
        weight.mul_(0.5)
    call_and_count("miss")
    for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias, b):
        t.data.add_(0.25)  # .data: unseen by the version counter, seen by the comparison
        call_and_count("miss")
        call_and_count("hit")
    bn.eps = 1e-3
    call_and_count("miss")
    call_and_count("miss", x[:1])
    call_and_count("miss")


SWEEP_PERIOD = 64  # csrc/cpu/conv2d_bn_eval.cpp: dead weights' entries go at every 64th call


def test_clear_and_entries_die_with_their_weights():
    fold.clear_cache()
    x, weight, b, bn, r, conf = _problem(KINDS[0], torch.float32, "nhwc", False, False)
    other = _problem(KINDS[0], torch.float32, "nhwc", False, False, seed=1)
    with torch.no_grad():
        _ours(x, weight, b, bn, r, True, conf)
        _ours(*other[:5], True, other[5])
    assert _cache()["entries"] == 2
    del weight
    gc.collect()
    with torch.no_grad():
        for _ in range(SWEEP_PERIOD):  # the folded weights of the dead one are dropped
            _ours(*other[:5], True, other[5])
    assert _cache()["entries"] == 1
    fold.clear_cache()
    assert _cache()["entries"] == 0


def test_what_a_fold_depends_on():
    """A weight packed for oneDNN is packed for the input's shape: another batch folds again.
    Winograd's transformed weight and the NCHW routes' scale and shift do not depend on it:
    another batch or map size reuses them (as resfast.ops.fold's entries did)."""
    for kind, layout, expect in ((KINDS[0], "nhwc", "miss"), (KINDS[3], "nhwc", "hit"),
                                 (KINDS[3], "nchw", "hit"), (KINDS[0], "nchw", "hit"),
                                 (KINDS[5], "nchw", "hit")):
        x, weight, b, bn, r, conf = _problem(kind, torch.float32, layout, True, False)
        with torch.no_grad():
            _ours(x, weight, b, bn, r, True, conf)
            before = _cache()
            bigger = torch.cat([x, x]).contiguous(memory_format=torch.channels_last if
                                                  layout == "nhwc" else torch.contiguous_format)
            y = _ours(bigger, weight, b, bn, r, True, conf)
            after = _cache()
            _equal(y, _python_route(bigger, weight, b, bn, r, True, conf))
        assert after[expect] == before[expect] + 1, (kind[0], layout)


def test_layers_cast_the_bias_and_residual_as_the_python_route_does(monkeypatch):
    """resfast.functional gives the op a bias and a residual in the conv's dtype, as it gives
    conv2d_bn: a float64 bias on a float32 layer computes what the Python route computes."""
    x, weight, _, bn, r, (stride, padding, dilation) = _problem(KINDS[0], torch.float32, "nchw",
                                                               False, True)
    b = torch.randn(weight.shape[0], dtype=torch.float64)
    args = F.BatchNormArgs.of(bn)
    with torch.no_grad():
        before = _cache()
        ours = F.conv_bn_add_relu(x, weight, b, args, r.double(), stride=stride,
                                  padding=padding, dilation=dilation)
        assert _cache()["miss"] == before["miss"] + 1  # it took the op
        monkeypatch.setattr(eager, "takes_eval_call", lambda *args: False)
        want = F.conv_bn_add_relu(x, weight, b, args, r.double(), stride=stride,
                                  padding=padding, dilation=dilation)
    _equal(ours, want)


def test_inference_tensors_are_folded_every_call():
    with torch.inference_mode():
        x, weight, b, bn, r, conf = _problem(KINDS[0], torch.float32, "nhwc", True, False)
        before = _cache()
        first = _ours(x, weight, b, bn, r, True, conf)
        weight.mul_(-1.0)  # no version counter to tell
        second = _ours(x, weight, b, bn, r, True, conf)
        assert _cache() == before
        _equal(second, _python_route(x, weight, b, bn, r, True, conf))
        assert not torch.equal(first, second)


def test_layers_take_it_for_inference_only():
    """resfast's layers call it under no_grad and inference_mode, and keep the autograd
    route where a gradient will flow (its backward raises)."""
    torch.manual_seed(0)
    layer = resfast.nn.Conv2dBNReLU(6, 8, 3).eval()
    x = torch.randn(2, 6, 9, 9).contiguous(memory_format=CL)

    def calls(fn):
        before = _cache()
        fn()
        after = _cache()
        return after["hit"] + after["miss"] - before["hit"] - before["miss"]

    with torch.no_grad():
        assert calls(lambda: layer(x)) == 1
    with torch.inference_mode():
        assert calls(lambda: layer(x)) == 1
    assert calls(lambda: layer(x).sum().backward()) == 0
    assert layer.conv.weight.grad is not None
    x.requires_grad_()
    y = ops.conv2d_bn_eval(x, layer.conv.weight, None, layer.bn.running_mean,
                           layer.bn.running_var, layer.bn.weight, layer.bn.bias, 1e-5, None, True,
                           1, 1, 1)
    with pytest.raises(RuntimeError, match="not implemented"):
        y.sum().backward()


@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.randn(6, 7, 9)), "x must be a 4-D tensor"),
    (dict(weight=torch.randn(5, 4, 3, 3)), "weight has 4 input channels but x has 6"),
    (dict(weight=torch.randn(5, 6, 3, 3).double()), "float32 or bfloat16"),
    (dict(x=torch.randn(0, 6, 7, 9)), "non-empty x"),
    (dict(running_var=torch.ones(4)), r"running_var must have shape \(5,\)"),
    (dict(bias=torch.zeros(5, 1)), r"bias must have shape \(5,\)"),
    (dict(residual=torch.zeros(2, 5, 7, 8)), "residual must have the output's shape"),
    (dict(residual=torch.zeros(2, 5, 7, 9).double()), "residual must have the output's dtype"),
    (dict(stride=3), "stride must be 1 or 2"),
    (dict(x=torch.randn(2, 6, 1, 1), padding=0), "smaller than the kernel"),
])
def test_bad_input_names_the_argument(bad, message):
    x, weight, b, bn, r, conf = _problem(KINDS[0], torch.float32, "nhwc", True, True)
    args = dict(x=x, weight=weight, bias=b, running_mean=bn.running_mean,
                running_var=bn.running_var, bn_weight=bn.weight, bn_bias=bn.bias, eps=1e-5,
                residual=r, relu=True, stride=1, padding=1, dilation=1)
    args.update(bad)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        ops.conv2d_bn_eval(*args.values())


def test_nchw_input_with_a_channels_last_weight_gives_nchw():
    """The layout the op's fake promises (the input's): ATen's convolution would compute
    channels_last for a channels_last weight, so the NCHW route gives it an NCHW one."""
    x, weight, b, bn, r, conf = _problem(KINDS[0], torch.float32, "nchw", True, True)
    weight = weight.contiguous(memory_format=CL)
    with torch.no_grad():
        ours = _ours(x, weight, b, bn, r, True, conf)
        _equal(ours, _python_route(x, weight, b, bn, r, True, conf))
    assert ours.is_contiguous()
