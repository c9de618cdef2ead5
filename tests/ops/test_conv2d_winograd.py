"""``resfast::conv2d_winograd`` (csrc/cpu/conv2d_winograd.cpp, resfast/ops/winograd.py):
inference's 3x3 convolution on the CPU by Winograd's F(4x4, 3x3).

Against the exact result (the convolution in float64), element by element: its error
must stay below 256 float32 epsilons of ``conv(|x|, |w|) * |scale|``, the size of the
terms summed into that output. Measured over 16-512 channels and maps of 8x8 to 57x31, the
worst element is 50 epsilons (oneDNN's direct convolution: 5); a wrong transform
coefficient or a misplaced tile is off by the size of those terms, ~10^7 epsilons.
The transform matrices themselves are checked in float64, where Winograd is exact to
rounding. Then: the routes (which calls take it and which keep oneDNN's direct
convolution), its cache, odd sizes, an expanded input, an empty batch and bad input.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import resfast
from resfast.ops import winograd
from tests.support.helpers import assert_conv_bn_step_close

ops = torch.ops.resfast
_CL = torch.channels_last
EPS32 = 2.0 ** -24
# G of F(4x4, 3x3), as csrc/cpu/conv2d_winograd.cpp spells it
G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
     (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
BOUND = 256 * EPS32

# (N, C_in, C_out, H, W): multiples of the vector width and not (below it too), maps not
# multiples of 4
SHAPES = [(2, 16, 16, 8, 8), (1, 17, 33, 9, 11), (3, 64, 48, 13, 8), (1, 40, 24, 31, 17),
          (2, 16, 20, 1, 5), (1, 24, 16, 4, 4), (2, 3, 5, 9, 10), (1, 8, 8, 8, 8)]


def _exact(x, w, scale, shift, residual, relu):
    y = F.conv2d(x.double(), w.double(), padding=1)
    if scale is not None:
        y = y * scale.double().view(1, -1, 1, 1)
    if shift is not None:
        y = y + shift.double().view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


def _magnitude(x, w, scale, residual):
    m = F.conv2d(x.double().abs(), w.double().abs(), padding=1)
    if scale is not None:
        m = m * scale.double().abs().view(1, -1, 1, 1)
    if residual is not None:
        m = m + residual.double().abs()
    return m


def _check(y, x, w, scale=None, shift=None, residual=None, relu=False):
    exact = _exact(x, w, scale, shift, residual, relu)
    assert y.shape == exact.shape and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=_CL)
    err = (y.double() - exact).abs() / (_magnitude(x, w, scale, residual) + 1e-30)
    assert err.max().item() <= BOUND, f"{err.max().item() / EPS32:.1f} epsilons"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("epilogue", ["none", "bias", "bn", "bn+residual"])
@pytest.mark.parametrize("relu", [False, True])
def test_against_the_exact_convolution(shape, epilogue, relu):
    torch.manual_seed(sum(shape))
    n, cin, cout, h, w = shape
    x = torch.randn(n, cin, h, w).to(memory_format=_CL) * 2 + 0.5
    weight = torch.randn(cout, cin, 3, 3) / (9 * cin) ** 0.5
    scale = torch.empty(cout).uniform_(-1.5, 1.5) if epilogue.startswith("bn") else None
    shift = torch.randn(cout) if epilogue != "none" else None
    residual = (torch.randn(n, cout, h, w).to(memory_format=_CL)
                if epilogue == "bn+residual" else None)
    y = ops.conv2d_winograd(x, ops.winograd_weight(weight, False), scale, shift, residual, relu)
    _check(y, x, weight, scale, shift, residual, relu)


def test_transform_matrices_are_exact_in_float64():
    """Winograd's F(4x4, 3x3) with this G and with B^T and A^T as the C++ loops spell them,
    in float64: one 6x6 input tile gives the direct convolution's 4x4 outputs to rounding;
    transform_weight is G w G^T rounded once to float32."""
    g = torch.tensor(G, dtype=torch.float64)
    bt = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
                      dtype=torch.float64)
    at = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                       [0, 1, -1, 8, -8, 1]], dtype=torch.float64)
    torch.manual_seed(0)
    d, w = torch.randn(5, 6, 6, dtype=torch.float64), torch.randn(7, 5, 3, 3, dtype=torch.float64)
    u = torch.einsum("ij,cjk,lk->cil", bt, d, bt)
    v = torch.einsum("ij,ocjk,lk->ocil", g, w, g)
    y = torch.einsum("ai,oil,bl->oab", at, torch.einsum("cil,ocil->oil", u, v), at)
    assert torch.allclose(y, F.conv2d(d.unsqueeze(0), w)[0], rtol=0, atol=1e-12)
    w32 = w.float()
    v32 = torch.einsum("ij,ocjk,lk->ocil", g, w32.double(), g)  # the float64 transform
    stored = ops.winograd_weight(w32, False)  # (36, C_in, C_out), rounded once
    assert stored.dtype == torch.float32 and stored.shape == (36, 5, 7)
    want = v32.permute(2, 3, 1, 0).reshape(36, 5, 7)
    assert ((stored.double() - want).abs() <= EPS32 * want.abs()).all()
    # transposed: the kernel rotated by 180 degrees with its channels swapped, (36, C_out, C_in)
    turned = torch.einsum("ij,ocjk,lk->ocil", g, w32.double().flip(2, 3), g)
    want = turned.permute(2, 3, 0, 1).reshape(36, 7, 5)
    stored = ops.winograd_weight(w32, True)
    assert stored.shape == (36, 7, 5)
    assert ((stored.double() - want).abs() <= EPS32 * want.abs()).all()


@pytest.mark.parametrize("shape", SHAPES[:4])
def test_input_gradient_against_the_exact_one(shape):
    """conv2d_winograd with the transposed weight is the convolution's input gradient."""
    torch.manual_seed(sum(shape))
    n, cin, cout, h, w = shape
    weight = torch.randn(cout, cin, 3, 3) / (9 * cin) ** 0.5
    g = torch.randn(n, cout, h, w).to(memory_format=_CL)
    got = winograd.input_gradient(g, weight)
    exact = torch.nn.grad.conv2d_input((n, cin, h, w), weight.double(), g.double(), padding=1)
    mag = torch.nn.grad.conv2d_input((n, cin, h, w), weight.double().abs(), g.double().abs(),
                                     padding=1)
    assert got.shape == exact.shape
    assert ((got.double() - exact).abs() / (mag + 1e-30)).max().item() <= BOUND


def _calls(fn):
    """(result, number of conv2d_winograd calls) of fn()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, sum(e.count for e in prof.key_averages() if e.key == "resfast::conv2d_winograd")


def _layer(cin=16, cout=24, kernel=3, stride=1, dilation=1, bias=False, seed=0):
    torch.manual_seed(seed)
    layer = resfast.nn.Conv2dBNReLU(cin, cout, kernel, stride, bias=bias, dilation=dilation)
    bn = layer.bn
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    ref = torch.nn.Sequential(layer.conv, layer.bn, torch.nn.ReLU()).eval()
    return layer.eval(), ref


@pytest.mark.parametrize("layout", [_CL, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("bias", [False, True])
def test_eval_layers_take_it_and_match_torch_nn(bias, layout):
    """An NCHW activation too: copied to channels_last and the result back (conv_cpu's
    NCHW_EVAL)."""
    layer, ref = _layer(bias=bias)
    x = torch.randn(2, 16, 16, 13).to(memory_format=layout)  # 2 x 4 x 4 tiles
    with torch.no_grad():
        y, calls = _calls(lambda: layer(x))
        expected = ref.double()(x.double())
    assert calls == 1
    assert y.is_contiguous(memory_format=layout)
    conv = layer.conv
    scale = (layer.bn.weight / (layer.bn.running_var + layer.bn.eps).sqrt()).double()
    mag = F.conv2d(x.double().abs(), conv.weight.double().abs(), padding=1) * scale.abs().view(
        1, -1, 1, 1)
    assert ((y.double() - expected).abs() / (mag + 1e-30)).max().item() <= BOUND


@pytest.mark.parametrize("layout", [_CL, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_eval_blocks_take_it_with_the_residual(layout):
    torch.manual_seed(0)
    block = resfast.nn.BasicBlock(16, 16).eval()
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 16, 17, 15).to(memory_format=layout)  # 2 x 5 x 4 tiles
    with torch.no_grad():
        y, calls = _calls(lambda: block(x))
        with winograd_off():
            direct = block(x)
    assert calls == 2  # both 3x3 convs, the second with its residual add
    assert y.is_contiguous(memory_format=layout)
    assert torch.allclose(y, direct, rtol=1e-4, atol=1e-4 * direct.abs().max().item())


class winograd_off:
    def __enter__(self):
        self.mp = pytest.MonkeyPatch()
        self.mp.setenv("RESFAST_CPU_WINOGRAD", "off")

    def __exit__(self, *exc):
        self.mp.undo()


@pytest.mark.parametrize("case", ["winograd", "inference_mode", "training, all", "nchw",
                                  "nchw, training, all", "train", "eval with a gradient",
                                  "stride 2", "dilated", "1x1", "7x7 map", "8 channels",
                                  "few tiles", "float64", "bfloat16", "switched off"])
def test_which_convolutions_take_it(case, monkeypatch):
    """The eval layer of the first case, under no_grad, runs Winograd; so does it under
    inference_mode, on an NCHW input (copied to channels_last), and in training with
    RESFAST_CPU_WINOGRAD=all. A training layer, an eval layer whose gradient autograd
    records, NCHW training, other geometries, small maps, channel counts or batches, other
    dtypes and RESFAST_CPU_WINOGRAD=off keep oneDNN's direct convolution. Each case changes
    one thing from the first (2 x 16 x 16 x 16: 32 tiles)."""
    kw = dict(kernel=1) if case == "1x1" else dict(stride=2) if case == "stride 2" else (
        dict(dilation=2) if case == "dilated" else dict(cin=8) if case == "8 channels" else {})
    layer, _ = _layer(**kw)
    x = torch.randn(1 if case == "few tiles" else 2, layer.conv.in_channels,
                    *((7, 16) if case == "7x7 map" else (16, 16)))
    if not case.startswith("nchw"):
        x = x.to(memory_format=_CL)
    if case in ("float64", "bfloat16"):
        layer, x = layer.to(getattr(torch, case)), x.to(getattr(torch, case))
    if case in ("train", "training, all", "nchw, training, all"):
        layer.train()
    if case.endswith("training, all"):
        monkeypatch.setenv("RESFAST_CPU_WINOGRAD", "all")
    if case == "switched off":
        monkeypatch.setenv("RESFAST_CPU_WINOGRAD", "off")
    if case in ("train", "training, all", "nchw, training, all", "eval with a gradient"):
        mode = torch.enable_grad()
        x.requires_grad_()
    else:
        mode = torch.inference_mode() if case == "inference_mode" else torch.no_grad()
    with mode:
        _, calls = _calls(lambda: layer(x))
    assert calls == (1 if case in ("winograd", "inference_mode", "nchw", "training, all")
                     else 0)


@pytest.mark.parametrize("route", ["one call", "op by op"])
def test_training_step_takes_it_forward_and_backward(route, monkeypatch):
    """With RESFAST_CPU_WINOGRAD=all, a training conv + BN + ReLU: the forward and the
    input's gradient run Winograd (the weight's gradient stays oneDNN's), both through the
    C++ one-call route and through the conv2d_bn op; output, every gradient and the running
    statistics match torch.nn in float64 to float32 rounding."""
    monkeypatch.setenv("RESFAST_CPU_WINOGRAD", "all")
    if route == "op by op":
        monkeypatch.setattr(resfast.ops.eager, "takes_one_call", lambda *a: False)
        monkeypatch.setattr(resfast.ops.eager, "_conv_direct", lambda *a: False)
    layer, ref = _layer(cin=24, cout=16)
    layer.train()
    ref = copy.deepcopy(ref).double().train()
    x = torch.randn(2, 24, 16, 16).to(memory_format=_CL)
    xr = x.double().requires_grad_()
    x.requires_grad_()
    y, calls = _calls(lambda: layer(x))
    assert calls == 1
    g = torch.randn_like(y)
    _, calls = _calls(lambda: y.backward(g))
    assert calls == 1
    yr = ref(xr)
    yr.backward(g.double())
    assert_conv_bn_step_close(layer, ref, x, xr, y, yr, 1e-5, 1e-4)


def test_bad_switch_value_is_named(monkeypatch):
    monkeypatch.setenv("RESFAST_CPU_WINOGRAD", "1")
    layer, _ = _layer()
    x = torch.randn(2, 16, 16, 16).to(memory_format=_CL)
    with pytest.raises(ValueError, match="RESFAST_CPU_WINOGRAD must be off, inference or all"):
        with torch.no_grad():
            layer(x)
    with pytest.raises(ValueError, match="RESFAST_CPU_WINOGRAD must be off, inference or all"):
        layer.train()(x.requires_grad_())  # the C++ training conv reads it too


def test_transformed_weight_follows_weight_and_bn_changes():
    """The cached transform is redone after an in-place weight update and a new running
    statistic (resfast.ops.fold's cache key), never served stale."""
    layer, ref = _layer()
    x = torch.randn(2, 16, 16, 16).to(memory_format=_CL)
    with torch.no_grad():
        _, calls = _calls(lambda: layer(x))
        assert calls == 1
        layer.conv.weight.mul_(-2.0)
        layer.bn.running_mean.add_(0.25)
        y = layer(x)
        expected = ref(x)
    assert torch.allclose(y, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_expanded_input_and_empty_batch():
    torch.manual_seed(0)
    w = torch.randn(16, 16, 3, 3)
    v = ops.winograd_weight(w, False)
    x = torch.randn(1, 16, 1, 1).expand(2, 16, 9, 9)  # stride-0 dimensions
    _check(ops.conv2d_winograd(x, v, None, None, None, True), x, w, relu=True)
    empty = ops.conv2d_winograd(torch.empty(0, 16, 8, 8), v, None, None, None, False)
    assert empty.shape == (0, 16, 8, 8)


def test_one_thread_and_repeated_calls():
    """One thread (a single chunk sequence) is as exact as two, and a call repeated gives
    the same bits."""
    torch.manual_seed(0)
    x = torch.randn(3, 32, 21, 19).to(memory_format=_CL)
    w = torch.randn(32, 32, 3, 3)
    v = ops.winograd_weight(w, False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _check(ops.conv2d_winograd(x, v, None, None, None, False), x, w)
    finally:
        torch.set_num_threads(threads)
    first = ops.conv2d_winograd(x, v, None, None, None, False)
    assert torch.equal(first, ops.conv2d_winograd(x, v, None, None, None, False))


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(1, 16, 8, 8, dtype=torch.float64)), "x must be float32"),
    (dict(x=torch.randn(16, 8, 8)), "x must be 4-D"),
    (dict(x=torch.randn(1, 0, 8, 8), weight=torch.randn(36, 0, 16)),
     "x must have at least one channel"),
    (dict(weight=torch.randn(16, 16, 3, 3)), "weight must be a float32 \\(36"),
    (dict(weight=torch.randn(36, 8, 16)), "weight has 8 input channels but x has 16"),
    (dict(scale=torch.randn(15)), "scale must have shape \\(16\\)"),
    (dict(shift=torch.randn(16, dtype=torch.float64)), "shift must be float32"),
    (dict(residual=torch.randn(1, 16, 8, 7)), "residual must have the shape of the output"),
    (dict(residual=torch.randn(1, 16, 8, 8, dtype=torch.float64)),
     "residual must have the dtype of the output"),
])
def test_bad_input_is_named(change, match):
    args = dict(x=torch.randn(1, 16, 8, 8), weight=torch.randn(36, 16, 16), scale=None,
                shift=None, residual=None)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ops.conv2d_winograd(args["x"], args["weight"], args["scale"], args["shift"],
                            args["residual"], False)


def test_no_gradient_through_it():
    """An inference op: a call that would need its gradient raises, never a silent zero."""
    x = torch.randn(1, 16, 8, 8, requires_grad=True)
    y = ops.conv2d_winograd(x, torch.randn(36, 16, 16), None, None, None, False)
    with pytest.raises(RuntimeError):
        y.sum().backward()


def test_a_non_finite_input_stays_in_the_tiles_that_read_it():
    """An Inf or NaN input makes the 4x4 output tiles whose 6x6 input window holds it NaN
    (the transforms add it with both signs), a wider patch than the direct convolution's
    3x3 neighbourhood; every output outside those tiles is finite and within the bound."""
    torch.manual_seed(0)
    w = torch.randn(16, 16, 3, 3)
    for bad in (float("inf"), float("nan")):
        x = torch.randn(2, 16, 16, 16)
        x[1, 3, 9, 6] = bad  # in the window of one tile only: outputs 8-11 x 4-7
        x = x.to(memory_format=_CL)
        y = ops.conv2d_winograd(x, ops.winograd_weight(w, False), None, None, None, False)
        reached = torch.zeros_like(y, dtype=torch.bool)
        reached[1, :, 8:12, 4:8] = True
        assert torch.isnan(y[reached]).all()
        assert torch.isfinite(y[~reached]).all()
        clean = x.clone()
        clean[1, 3, 9, 6] = 0
        exact = _exact(clean, w, None, None, None, False)
        mag = _magnitude(clean, w, None, None) + 1e-30
        assert ((y.double() - exact).abs() / mag)[~reached].max().item() <= BOUND


@pytest.mark.parametrize("gemm", ["brgemm", "aten"])
def test_each_gemm_path(gemm, monkeypatch):
    """The chunks' GEMMs run torch's cpublas::brgemm (oneDNN's kernel where it has one, torch's
    BLAS otherwise), or at::mm_out where brgemm raises: each is held to the same bound."""
    monkeypatch.setenv("RESFAST_CPU_WINOGRAD_GEMM", gemm)
    torch.manual_seed(0)
    x = torch.randn(2, 24, 13, 18).to(memory_format=_CL)
    w = torch.randn(40, 24, 3, 3)
    scale, shift = torch.rand(40) + 0.5, torch.randn(40)
    y = ops.conv2d_winograd(x, ops.winograd_weight(w, False), scale, shift, None, True)
    _check(y, x, w, scale, shift, None, True)


def test_bad_gemm_name_is_named(monkeypatch):
    monkeypatch.setenv("RESFAST_CPU_WINOGRAD_GEMM", "mkl")
    with pytest.raises(ValueError, match="RESFAST_CPU_WINOGRAD_GEMM must be brgemm or aten"):
        ops.conv2d_winograd(torch.randn(1, 16, 8, 8), torch.randn(36, 16, 16), None, None, None,
                            False)


def test_compiled_inference_takes_it_under_inference_mode_only():
    """A compiled model calls the registered op, which cannot see whether autograd records:
    under no_grad it keeps the direct convolution, under inference_mode it takes Winograd."""
    layer, _ = _layer()
    x = torch.randn(2, 16, 16, 16).to(memory_format=_CL)
    compiled = torch.compile(layer)
    with torch.no_grad():
        compiled(x)
        _, calls = _calls(lambda: compiled(x))
    assert calls == 0
    with torch.inference_mode():
        compiled(x)
        _, calls = _calls(lambda: compiled(x))
    assert calls == 1
