"""``resfast::conv2d_weight_grad`` (csrc/cpu/conv2d_weight_grad.cpp,
resfast/ops/weight_grad.py): the weight's gradient of the CPU's training convolutions,
by one GEMM over the input's windows where the weight is large for the output positions,
by a direct vectorized loop (csrc/cpu/kernels/weight_grad_kernel.cpp) at few channels,
else by oneDNN.

Against the exact gradient (torch.nn.grad.conv2d_weight in float64), element by element:
within 16 float32 epsilons of the same sum over |x| and |grad_y|, the size of the terms
summed into that element (measured on these shapes: up to 2.8 for the direct loop, 3.6 for
the GEMM and 8.6 for oneDNN; a misplaced window or channel is off by the size of those
terms, ~10^7 epsilons). Then: which path runs, the
weight's layout kept, both training routes calling it, every instruction set, odd and
empty inputs, and bad input.
"""
import copy

import pytest
import torch

import resfast
from resfast.ops.weight_grad import path
from tests.support.helpers import CAPABILITIES, assert_conv_bn_step_close, run_with_capability

ops = torch.ops.resfast
_CL = torch.channels_last
BOUND = 16 * 2.0 ** -24

# (N, C_in, C_out, H, W, kernel, stride, padding): the GEMM's (a large weight over few
# positions: 3x3 with padding 0, 1 and 2, 1x1, stride 1 and 2, odd maps and channel
# counts), the direct loop's with channels_last activations (3x3 with at most 128 channels
# and a multiple of 16 out: strides 1 and 2, paddings 0-2, input channels that leave a
# partial block, maps split into strips of rows, in several images, and small maps grouped
# several images to a unit, in several units) and oneDNN's (the rest, a 1x1 and 144
# channels among them, and every NCHW x); test_every_path_is_covered says which
SHAPES = [(2, 64, 64, 4, 4, 3, 1, 1), (1, 96, 80, 7, 5, 3, 2, 1), (2, 256, 128, 2, 2, 1, 1, 0),
          (1, 512, 130, 3, 3, 1, 2, 0), (1, 128, 96, 2, 2, 3, 1, 2), (3, 40, 70, 3, 4, 3, 1, 0),
          (1, 130, 70, 6, 7, 1, 2, 0), (1, 50, 60, 5, 3, 3, 1, 2), (2, 16, 16, 8, 8, 3, 1, 1),
          (2, 5, 4, 6, 7, 3, 2, 1), (1, 8, 24, 9, 9, 1, 1, 0), (3, 5, 16, 7, 7, 3, 2, 0),
          (2, 13, 32, 9, 6, 3, 1, 2), (1, 3, 16, 33, 35, 3, 1, 1), (5, 24, 48, 4, 4, 3, 1, 1),
          (2, 128, 128, 9, 9, 3, 1, 1), (2, 16, 32, 24, 24, 3, 2, 1),
          (20, 16, 16, 8, 8, 3, 1, 1), (3, 7, 32, 40, 30, 3, 1, 1), (2, 16, 16, 8, 8, 1, 1, 0),
          (2, 144, 144, 8, 8, 3, 1, 1)]


def _positions(shape):
    n, cin, cout, h, w, k, s, p = shape
    return n * ((h + 2 * p - k) // s + 1) * ((w + 2 * p - k) // s + 1)

def _grads(shape, x_layout, w_layout, seed=0):
    n, cin, cout, h, w, k, s, p = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(cout, cin, k, k, generator=gen, dtype=torch.float64)
    g = torch.randn(torch.nn.functional.conv2d(x, weight, stride=s, padding=p).shape,
                    generator=gen, dtype=torch.float64)
    x32, g32, w32 = x.float(), g.float(), weight.float()
    if x_layout == "channels_last":
        x32, g32 = x32.contiguous(memory_format=_CL), g32.contiguous(memory_format=_CL)
    if w_layout == "channels_last":
        w32 = w32.contiguous(memory_format=_CL)
    return (x, g, weight), (x32, g32, w32)


def _check(got, x, g, weight, s, p, dilation=1):
    exact = torch.nn.grad.conv2d_weight(x, weight.shape, g, stride=s, padding=p,
                                        dilation=dilation)
    mag = torch.nn.grad.conv2d_weight(x.abs(), weight.shape, g.abs(), stride=s, padding=p,
                                      dilation=dilation)
    assert got.shape == exact.shape and got.dtype == torch.float32
    assert ((got.double() - exact).abs() / (mag + 1e-30)).max().item() <= BOUND


@pytest.mark.parametrize("w_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("x_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES)
def test_against_the_exact_gradient(shape, x_layout, w_layout):
    (x, g, weight), (x32, g32, w32) = _grads(shape, x_layout, w_layout)
    s, p = shape[6], shape[7]
    got = ops.conv2d_weight_grad(g32, x32, w32, s, p, 1)
    _check(got, x, g, weight, s, p)
    assert got.stride() == w32.stride()  # the weight's layout: no copy left to the caller


# oneDNN's AVX2 weight gradient of a strided 1x1 convolution over channels_last input with
# under 8 channels (torch 2.14.1, uxlfoundation/oneDNN#6035): in 17 of these 21 cases it
# measured 38-97% off or hung (32x32 over 1-3 channels); at 52x52 and 56x56 it corrupted the
# heap. The op and conv2d_bn's reference backward (conv_cpu.convolution_backward) go around it.
@pytest.mark.parametrize("c_in", range(1, 8))
@pytest.mark.parametrize("size", [20, 26, 32])
def test_strided_1x1_few_channels(c_in, size):
    shape = (8, c_in, 17, size, size, 1, 2, 0)
    (x, g, weight), (x32, g32, w32) = _grads(shape, "channels_last", "nchw")
    assert path(g32, x32, w32, 2, 0, 1) == "onednn"
    _check(ops.conv2d_weight_grad(g32, x32, w32, 2, 0, 1), x, g, weight, 2, 0)
    grad_a, grad_w, grad_b = resfast.ops.conv_cpu.convolution_backward(
        g32, x32, w32, 2, 0, 1, [True, True, False])
    _check(grad_w, x, g, weight, 2, 0)
    exact_a = torch.nn.grad.conv2d_input(x.shape, weight, g, stride=2)
    torch.testing.assert_close(grad_a.double(), exact_a, rtol=1e-5, atol=1e-5)
    assert grad_b is None
    only_w = resfast.ops.conv_cpu.convolution_backward(g32, x32, w32, 2, 0, 1,
                                                       [False, True, False])
    assert only_w[0] is None and torch.equal(only_w[1], grad_w)


def _paths(x_layout):
    found = {}
    for shape in SHAPES:
        _, (x32, g32, w32) = _grads(shape, x_layout, "nchw")
        found.setdefault(path(g32, x32, w32, shape[6], shape[7], 1), []).append(shape)
    return found


def _direct_rule(shape):
    """The direct loop's shapes as the op's comment states them (channels_last float32)."""
    n, cin, cout, h, w, k, s, p = shape
    return k == 3 and cout % 16 == 0 and max(cin, cout) <= 128


def test_every_path_is_covered():
    found = _paths("channels_last")
    gemm = {(k, s, p) for _, _, _, _, _, k, s, p in found["gemm"]}
    assert {k for k, _, _ in gemm} == {1, 3} and {s for _, s, _ in gemm} == {1, 2}
    assert {p for k, _, p in gemm if k == 3} == {0, 1, 2}
    assert set(_paths("nchw")) == {"gemm", "onednn"}  # the direct loop reads channels_last
    if ops.cpu_isa() != "AVX2":
        assert "direct" not in found
        pytest.skip(f"the direct loop runs on AVX2 CPUs only (this one runs {ops.cpu_isa()})")
    direct = found["direct"]
    assert all(_direct_rule(sh) for sh in direct)
    assert not any(_direct_rule(sh) for sh in found["onednn"])
    assert {(k, cin) for _, cin, _, _, _, k, *_ in found["onednn"]} >= {(1, 16), (3, 144)}
    assert {s for *_, s, _ in direct} == {1, 2} and {p for *_, p in direct} == {0, 1, 2}
    assert {cin % 6 for _, cin, *_ in direct} >= {1, 3, 5}  # partial blocks of 6
    per_image = {sh: _positions(sh) // sh[0] for sh in direct}
    assert any(p > 512 and sh[0] > 1 for sh, p in per_image.items())  # strips, several images
    assert any(p * sh[0] > 2 * 512 for sh, p in per_image.items() if p < 256)  # several groups
    assert max(max(sh[1], sh[2]) for sh in direct) == 128


@pytest.mark.parametrize("n,gemm", [(1, True), (2, False)])
def test_threshold_is_the_ops(n, gemm):
    """The C++ op takes the GEMM from 4096 weight elements per output position on: a 64x64
    1x1 weight (4096 elements) over 1 position does, over 2 not."""
    x, w, g = torch.randn(n, 64, 1, 1), torch.randn(64, 64, 1, 1), torch.randn(n, 64, 1, 1)
    assert path(g, x, w, 1, 0, 1) == ("gemm" if gemm else "onednn")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = ops.conv2d_weight_grad(g, x, w, 1, 0, 1)
    mm = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::mm"))
    assert mm == (1 if gemm else 0)
    _check(got, x.double(), g.double(), w.double(), 1, 0)


def _direct():
    """The path the direct loop's shapes take: "direct" on AVX2 CPUs, else oneDNN's."""
    return "direct" if ops.cpu_isa() == "AVX2" else "onednn"


@pytest.mark.parametrize("case", ["gemm", "direct", "strided weight", "nchw x", "bfloat16",
                                  "float64", "dilated"])
def test_which_path_runs(case):
    """The GEMM runs on a large float32 weight over few positions (one aten::mm), the
    direct loop on 96 channels over more positions in channels_last, also for a weight
    dense in neither layout; NCHW activations, other dtypes and dilation take oneDNN's
    gradient (or ATen's for float64), equal bitwise to aten::convolution_backward's."""
    expected = {"gemm": "gemm", "direct": _direct(), "strided weight": _direct()}.get(case,
                                                                                     "onednn")
    dt = {"bfloat16": torch.bfloat16, "float64": torch.float64}.get(case, torch.float32)
    d = 2 if case == "dilated" else 1
    size = 3 if case == "gemm" else 12
    fmt = torch.contiguous_format if case == "nchw x" else _CL
    x = torch.randn(2, 96, size, size, dtype=dt).contiguous(memory_format=fmt)
    w = torch.randn(96, 96, 3, 3, dtype=dt).contiguous(memory_format=_CL)
    if case == "strided weight":
        w = torch.randn(96, 96, 3, 6, dtype=dt)[..., ::2]
    out = size - 2 * (d - 1)
    g = torch.randn(2, 96, out, out, dtype=dt).contiguous(memory_format=fmt)
    assert path(g, x, w, 1, 1, d) == expected
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = ops.conv2d_weight_grad(g, x, w, 1, 1, d)
    mm = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::mm"))
    backward = sum(e.count for e in prof.key_averages()
                   if e.key == "aten::convolution_backward")
    assert (mm, backward) == {"gemm": (1, 0), "direct": (0, 0)}.get(expected, (0, 1))
    if expected == "onednn":
        ref = torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [d, d], False,
                                                  [0, 0], 1, [False, True, False])[1]
        assert torch.equal(got, ref) and got.dtype == dt
    else:
        _check(got, x.double(), g.double(), w.double(), 1, 1)


@pytest.mark.parametrize("way", ["gemm", "direct"])
@pytest.mark.parametrize("route", ["one call", "op by op"])
def test_training_routes_take_it(route, way, monkeypatch):
    """A training conv + BN + ReLU whose weight gradient is the GEMM's (64 -> 96 channels,
    3x3, over 2 x 2 x 2 positions) or the direct loop's (16 -> 32 channels over 2 x 9 x 7),
    through the C++ route (conv2d_stats_backward) and the conv2d_bn op: one
    conv2d_weight_grad call each; output, every gradient and the running statistics match
    torch.nn in float64 to float32 rounding."""
    if route == "op by op":
        monkeypatch.setattr(resfast.ops.eager, "takes_one_call", lambda *a: False)
        monkeypatch.setattr(resfast.ops.eager, "_conv_direct", lambda *a: False)
    torch.manual_seed(0)
    cin, cout, h, w = (64, 96, 2, 2) if way == "gemm" else (16, 32, 9, 7)
    layer = resfast.nn.Conv2dBNReLU(cin, cout, 3, 1).train()
    ref = torch.nn.Sequential(copy.deepcopy(layer.conv), copy.deepcopy(layer.bn),
                              torch.nn.ReLU()).double().train()
    x = torch.randn(2, cin, h, w).to(memory_format=_CL)
    xr = x.double().requires_grad_()
    x.requires_grad_()
    y = layer(x)
    g = torch.randn_like(y)
    expected = way if way == "gemm" else _direct()
    assert path(g, x, layer.conv.weight, 1, 1, 1) == expected
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y.backward(g)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("resfast::conv2d_weight_grad") == 1
    # the input's gradient; a weight gradient by oneDNN would be a second call
    assert counts.get("aten::convolution_backward") == (1 if expected == way else 2)
    yr = ref(xr)
    yr.backward(g.double())
    assert_conv_bn_step_close(layer, ref, x, xr, y, yr, 1e-5, 1e-5)
    assert layer.conv.weight.grad.stride() == layer.conv.weight.stride()


@pytest.mark.parametrize("shape", [(1, 64, 64, 2, 2, 3, 1, 1), (1, 16, 16, 6, 6, 3, 1, 1)])
def test_expanded_input_and_empty_batch(shape):
    """Both paths (the GEMM's, then oneDNN's) on an x with stride 0 over its channels,
    and on an empty batch."""
    (x, g, weight), (x32, g32, w32) = _grads(shape, "nchw", "nchw")
    xe = x32[:, :1].expand(x32.shape)
    _check(ops.conv2d_weight_grad(g32, xe, w32, 1, 1, 1), xe.double(), g, weight, 1, 1)
    empty = ops.conv2d_weight_grad(g32[:0], x32[:0], w32, 1, 1, 1)
    assert torch.equal(empty, torch.zeros_like(w32))


@pytest.mark.parametrize("change,match", [
    ("x 3-D", "x must be 4-D"),
    ("dtypes differ", "one dtype"),
    ("channels differ", "input channels"),
    ("grad_y shape", "grad_y must have the output's shape"),
    ("stride 0", "stride and dilation must be >= 1"),
    ("kernel too large", "smaller than the kernel"),
    ("integer x", "floating point"),
    ("kernel 0x0", "at least 1x1"),
])
def test_bad_input_is_named(change, match):
    x, w, g = torch.randn(1, 8, 5, 5), torch.randn(4, 8, 3, 3), torch.randn(1, 4, 5, 5)
    s, p = 1, 1
    if change == "x 3-D":
        x = x[0]
    elif change == "dtypes differ":
        g = g.double()
    elif change == "channels differ":
        w = torch.randn(4, 7, 3, 3)
    elif change == "grad_y shape":
        g = torch.randn(1, 4, 4, 5)
    elif change == "stride 0":
        s = 0
    elif change == "kernel too large":
        w, p = torch.randn(4, 8, 7, 7), 0
    elif change == "integer x":
        x = x.long()
    elif change == "kernel 0x0":
        w = torch.randn(4, 8, 0, 0)
    with pytest.raises(ValueError, match=match):
        ops.conv2d_weight_grad(g, x, w, s, p, 1)


def test_no_gradient_through_it():
    x = torch.randn(1, 8, 5, 5, requires_grad=True)
    w, g = torch.randn(4, 8, 3, 3), torch.randn(1, 4, 5, 5)
    with pytest.raises(RuntimeError, match="derivative|not implemented"):
        ops.conv2d_weight_grad(g, x, w, 1, 1, 1).sum().backward()


def test_path_checks_its_input():
    x, w, g = torch.randn(1, 8, 5, 5), torch.randn(4, 7, 3, 3), torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="input channels"):
        path(g, x, w, 1, 1, 1)


@pytest.mark.parametrize("empty", ["batch", "input channels"])
def test_empty_input_is_zeros(empty):
    n, cin = (0, 16) if empty == "batch" else (2, 0)
    x = torch.randn(n, cin, 8, 8).contiguous(memory_format=_CL)
    w = torch.randn(16, cin, 3, 3)
    g = torch.randn(n, 16, 8, 8).contiguous(memory_format=_CL)
    assert path(g, x, w, 1, 1, 1) == "zeros"
    assert torch.equal(ops.conv2d_weight_grad(g, x, w, 1, 1, 1), torch.zeros_like(w))


# ---- every instruction set the build contains -------------------------------------------

_ISA_SCRIPT = r"""
import sys, torch, resfast
from tests.ops.test_conv2d_weight_grad import SHAPES, _grads, path
ops = torch.ops.resfast
results = []
for shape in SHAPES:
    _, (x32, g32, w32) = _grads(shape, "channels_last", "channels_last")
    s, p = shape[6], shape[7]
    got = ops.conv2d_weight_grad(g32, x32, w32, s, p, 1)
    results.append((shape, path(g32, x32, w32, s, p, 1), got))
torch.save({"isa": ops.cpu_isa(), "results": results}, sys.argv[1])
"""


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_each_instruction_set(capability, tmp_path):
    """ATEN_CPU_CAPABILITY picks the instruction set (in a fresh process): each set this build
    has gives gradients within the bound on every shape; the direct loop runs under AVX2
    only, the others take oneDNN's there."""
    saved = run_with_capability(capability, _ISA_SCRIPT, tmp_path / "results.pt")
    ways = {way for _, way, _ in saved["results"]}
    assert ways == ({"gemm", "direct", "onednn"} if capability == "avx2" else {"gemm", "onednn"})
    for shape, _, got in saved["results"]:
        (x, g, weight), _ = _grads(shape, "channels_last", "channels_last")
        _check(got, x, g, weight, shape[6], shape[7])
