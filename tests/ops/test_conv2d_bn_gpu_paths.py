"""The conv op's two GPU paths, each forced, on CPU tensors (the Triton kernels under the
interpreter, cuDNN's path as its ATen calls): what they return for every output mask,
per-channel vectors of any stride, the layouts the fake promises (and opcheck in
float32, which the float64 opcheck of tests/ops/test_opcheck.py never sends down these
paths), float32 precision as torch's settings say, NaN and Inf as torch's ReLU, and
what the path choice is keyed on.
"""
import contextlib
import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from resfast.ops import conv2d_bn_backward_reference, conv2d_bn_forward_reference, conv_path
from tests.support import gpu_style_kernels
from tests.support.helpers import triton_interpreter_problem

ops = torch.ops.resfast
CL = torch.channels_last
MASKS = list(itertools.product([False, True], repeat=3))


@pytest.fixture(params=conv_path.PATHS)
def path(request, monkeypatch):
    if request.param == "triton" and triton_interpreter_problem() is not None:
        pytest.skip(str(triton_interpreter_problem()))
    monkeypatch.setenv("RESFAST_TRITON_ON_CPU", "1")
    monkeypatch.setenv("RESFAST_CONV_PATH", request.param)
    return request.param


@pytest.fixture
def triton_path(monkeypatch):
    if triton_interpreter_problem() is not None:
        pytest.skip(str(triton_interpreter_problem()))
    monkeypatch.setenv("RESFAST_TRITON_ON_CPU", "1")
    monkeypatch.setenv("RESFAST_CONV_PATH", "triton")


def _inputs(weight_layout="nchw", c=6, co=5, k=3, dtype=torch.float32):
    x = torch.randn(2, c, 7, 6).contiguous(memory_format=CL)
    w = torch.randn(co, c, k, k) / (c * k * k) ** 0.5
    w = w.contiguous(memory_format=CL) if weight_layout == "nhwc" else w
    return x.to(dtype), w.to(dtype)


def _vectors(c, co):
    return (torch.randn(co), torch.empty(c).uniform_(0.5, 1.5), torch.empty(c).uniform_(-.5, .5))


def _close(got, want, name):
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


# ---- output masks ------------------------------------------------------------------------

@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if b else "0" for b in m))
def test_backward_output_masks(path, mask):
    """Every output mask: the selected gradients as the reference path computes them, each
    unselected one an empty tensor of its own (one tensor returned twice makes custom_op
    raise: outputs may not alias)."""
    x, w = _inputs()
    bias, scale, shift = _vectors(6, 5)
    y, mean, _ = conv2d_bn_forward_reference(x, w, bias, scale, shift, True, 1, 1, True, False)
    gy, gm, gv = torch.randn_like(y), torch.randn(5), torch.randn(5)
    args = (gy, gm, gv, x, w, y, mean, scale, shift, True, 1, 1, False, list(mask))
    got = ops.conv2d_bn_backward(*args)
    want = conv2d_bn_backward_reference(*args)
    for name, selected, g, r in zip(("grad_a", "grad_weight", "grad_bias"), mask, got, want):
        if selected:
            _close(g, r, name)
        else:
            assert g.shape == (0,), name


def test_stem_backward(path):
    """The ResNet stem's backward: the image needs no gradient and the conv has no bias, so
    only grad_weight is asked for (mask [False, True, False])."""
    x, w = _inputs(c=3, co=8, k=7)
    w.requires_grad_()
    y, mean, var = ops.conv2d_bn(x, w, None, None, None, False, 2, 3, True, False)
    (y.sum() + mean.sum() + var.sum()).backward()
    w_ref = w.detach().clone().requires_grad_()
    y_r, mean_r, var_r = conv2d_bn_forward_reference(x, w_ref, None, None, None, False, 2, 3, True,
                                                     False)
    (y_r.sum() + mean_r.sum() + var_r.sum()).backward()
    _close(w.grad, w_ref.grad, "grad_weight")


# ---- per-channel vectors of any stride ----------------------------------------------------

def _poisoned(v, stride):
    """v as a view with the given stride (0: one element repeated) into memory that is NaN
    wherever the view does not look: a kernel that assumes unit stride reads NaN."""
    if stride == 0:
        buf = torch.full((v.numel(),), float("nan"))
        buf[0] = v[0]
        return buf[:1].expand(v.numel())
    buf = torch.full((v.numel() * stride,), float("nan"))
    buf[::stride] = v
    return buf[::stride]


@pytest.mark.parametrize("stride", [0, 2])
def test_vectors_of_any_stride(path, stride):
    """bias, in_scale, in_shift, grad_mean, grad_var and mean as strided views (the reference
    path gets contiguous copies of them)."""
    x, w = _inputs()
    bias, scale, shift = (_poisoned(v, stride) for v in _vectors(6, 5))

    def fwd(b, s, t):
        return (x, w, b, s, t, True, 1, 1, True, False)

    want = conv2d_bn_forward_reference(*fwd(bias.contiguous(), scale.contiguous(),
                                            shift.contiguous()))
    for name, g, r in zip(("y", "mean", "var"), ops.conv2d_bn(*fwd(bias, scale, shift)), want):
        _close(g, r, name)
    y, mean = want[0], _poisoned(want[1], stride)
    gy = torch.randn_like(y)
    gm, gv = _poisoned(torch.randn(5), stride), _poisoned(torch.randn(5), stride)

    def bwd(*vectors):
        gm, gv, mean, s, t = vectors
        return (gy, gm, gv, x, w, y, mean, s, t, True, 1, 1, False, [True, True, True])

    vectors = (gm, gv, mean, scale, shift)
    for name, g, r in zip(("grad_a", "grad_weight", "grad_bias"),
                          ops.conv2d_bn_backward(*bwd(*vectors)),
                          conv2d_bn_backward_reference(*bwd(*(v.contiguous() for v in vectors)))):
        _close(g, r, name)


def test_gradients_of_summed_statistics(path):
    """mean.sum() and var.sum() hand the backward stride-0 gradients (one element each)."""
    x, w = _inputs()
    w.requires_grad_()
    y, mean, var = ops.conv2d_bn(x, w, None, None, None, False, 1, 1, True, False)
    (mean.sum() + 2 * var.sum()).backward()
    w_ref = w.detach().clone().requires_grad_()
    _, mean_r, var_r = conv2d_bn_forward_reference(x, w_ref, None, None, None, False, 1, 1, True,
                                                   False)
    (mean_r.sum() + 2 * var_r.sum()).backward()
    _close(w.grad, w_ref.grad, "grad_weight")


# ---- layouts: the fake's promise, opcheck in float32 -------------------------------------

def _forward_args(weight_layout):
    x, w = _inputs(weight_layout)
    bias, scale, shift = _vectors(6, 5)
    return (x, w, bias, scale, shift, True, 2, 1, True, False)


def _backward_args(weight_layout, grad_layout="nhwc"):
    fwd = _forward_args(weight_layout)
    y, mean, _ = conv2d_bn_forward_reference(*fwd)
    gy = torch.randn_like(y)
    gy = gy.contiguous(memory_format=CL) if grad_layout == "nhwc" else gy.contiguous()
    x, w, _, scale, shift = fwd[:5]
    return (gy, torch.randn(5), torch.randn(5), x, w, y, mean, scale, shift, True, 2, 1, False,
            [True, True, True])


@pytest.mark.parametrize("weight_layout", ["nchw", "nhwc"])
def test_outputs_as_the_fake_says(path, weight_layout):
    """Every output of both ops has the dtype, shape and strides of the fake's (what
    torch.compile asserts): grad_weight like empty_like(weight), in either weight layout."""
    for op, args in ((ops.conv2d_bn, _forward_args(weight_layout)),
                     (ops.conv2d_bn_backward, _backward_args(weight_layout))):
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        for i, (r, f) in enumerate(zip(real, fake)):
            assert (r.dtype, r.shape, r.stride()) == (f.dtype, f.shape, f.stride()), (
                f"{op} output {i}: real {r.dtype} {tuple(r.shape)} {r.stride()}, "
                f"fake {f.dtype} {tuple(f.shape)} {f.stride()}")


@pytest.mark.parametrize("weight_layout", ["nchw", "nhwc"])
def test_opcheck_float32(path, weight_layout):
    torch.library.opcheck(ops.conv2d_bn.default, _forward_args(weight_layout))
    torch.library.opcheck(ops.conv2d_bn_backward.default, _backward_args(weight_layout))


# ---- float32 precision: torch's setting for its own convolutions -------------------------

@contextlib.contextmanager
def _conv_precision(**settings):
    """Sets torch's float32 precision knobs (legacy=bool for cudnn.allow_tf32, or the
    fp32_precision of conv / cudnn / generic) and restores them all afterwards."""
    cudnn = torch.backends.cudnn
    saved = (torch._C._get_cudnn_allow_tf32(), cudnn.conv.fp32_precision,
             cudnn.rnn.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision)
    try:
        if "legacy" in settings:
            cudnn.allow_tf32 = settings["legacy"]
        for name, target in (("generic", torch.backends), ("cudnn", cudnn),
                             ("conv", cudnn.conv)):
            if name in settings:
                target.fp32_precision = settings[name]
        yield
    finally:
        cudnn.allow_tf32 = saved[0]
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved[1], saved[2]
        cudnn.fp32_precision, torch.backends.fp32_precision = saved[3], saved[4]


PRECISIONS = {
    "conv_tf32": (dict(conv="tf32"), "tf32"),
    "conv_ieee": (dict(conv="ieee"), "ieee"),
    "legacy_off": (dict(legacy=False), "ieee"),
    "legacy_on": (dict(legacy=True), "tf32"),
    "inherited_from_generic": (dict(conv="none", cudnn="none", generic="tf32"), "tf32"),
    "inherited_from_cudnn": (dict(conv="none", cudnn="ieee", generic="tf32"), "ieee"),
}


@pytest.mark.parametrize("settings,expected", PRECISIONS.values(), ids=list(PRECISIONS))
def test_float32_precision_follows_torch(triton_path, monkeypatch, settings, expected):
    """What torch's own float32 convolutions may use, the Triton kernels' dots use: TF32
    where torch allows it (cuDNN's path follows torch by itself), IEEE float32 where not."""
    log = gpu_style_kernels.install(monkeypatch)
    args = _backward_args("nchw")
    with _conv_precision(**settings):
        assert conv_path.allow_tf32() == (expected == "tf32")
        ops.conv2d_bn(*_forward_args("nchw"))
        ops.conv2d_bn_backward(*args)
    gemms = [launch for launch in log if launch.kernel.startswith("_conv2d_bn")]
    assert len(gemms) == 3
    assert {launch.kwargs["DOT_PRECISION"] for launch in gemms} == {expected}


def test_half_precision_has_no_tf32_switch(triton_path, monkeypatch):
    log = gpu_style_kernels.install(monkeypatch)
    x, w = _inputs(dtype=torch.bfloat16)
    with _conv_precision(conv="tf32"):
        ops.conv2d_bn(x, w, None, None, None, False, 1, 1, True, False)
    assert log[0].kwargs["DOT_PRECISION"] is None


# ---- NaN and Inf, as torch's ReLU ---------------------------------------------------------

SPECIALS = torch.tensor([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 2.0])


def _one_channel(values):
    """A (2, 1, 3, 3) float32 tensor cycling through values: with one channel and a 1x1
    weight of 1 the conv is the identity, so each pixel's NaN or Inf stays its own."""
    return values.repeat(18 // values.numel() + 1)[:18].view(2, 1, 3, 3).contiguous(
        memory_format=CL)


def test_relu_forward_keeps_nan(path):
    x, w = _one_channel(SPECIALS), torch.ones(1, 1, 1, 1)
    one, zero = torch.ones(1), torch.zeros(1)
    prologue, _, _ = ops.conv2d_bn(x, w, None, one, zero, True, 1, 0, False, False)
    epilogue, _, _ = ops.conv2d_bn(x, w, None, None, None, False, 1, 0, False, True)
    torch.testing.assert_close(prologue, torch.relu(x), equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(epilogue, torch.relu(x), equal_nan=True, rtol=0, atol=0)


def test_relu_backward_as_threshold_backward(path):
    """The output ReLU's backward is torch's threshold_backward(grad, y, 0): 0 where y <= 0
    whatever the gradient (NaN or Inf too), the gradient where y is NaN."""
    w = torch.ones(1, 1, 1, 1)
    y = torch.relu(_one_channel(SPECIALS))
    grad_y = _one_channel(torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 3.0]))
    grad_a, _, _ = ops.conv2d_bn_backward(grad_y, None, None, y.clone(), w, y, torch.empty(0),
                                          None, None, False, 1, 0, True, [True, False, False])
    want = torch.ops.aten.threshold_backward(grad_y, y, 0)
    torch.testing.assert_close(grad_a, want, equal_nan=True, rtol=0, atol=0)


# ---- what the path choice is keyed on -----------------------------------------------------

@pytest.fixture
def keys(monkeypatch):
    """The problem keys the op asks conv_path.choose about (the Triton path always runs)."""
    seen = []

    def choose(key, impls, args, device):
        seen.append(key)
        return "triton"

    if triton_interpreter_problem() is not None:
        pytest.skip(str(triton_interpreter_problem()))
    monkeypatch.setenv("RESFAST_TRITON_ON_CPU", "1")
    monkeypatch.setattr(conv_path, "choose", choose)
    return seen


def test_key_has_the_layouts_and_the_precision(keys):
    """Problems that differ only in a layout (of x, the weight, grad_y) or in whether float32
    may use TF32 get keys of their own: each may have another fastest path."""
    ops.conv2d_bn(*_forward_args("nchw"))
    ops.conv2d_bn(*_forward_args("nhwc"))
    fwd = list(_forward_args("nchw"))
    fwd[0] = fwd[0].contiguous()
    ops.conv2d_bn(*fwd)
    with _conv_precision(conv="tf32"):
        ops.conv2d_bn(*_forward_args("nchw"))
    ops.conv2d_bn_backward(*_backward_args("nchw", "nhwc"))
    ops.conv2d_bn_backward(*_backward_args("nchw", "nchw"))
    ops.conv2d_bn_backward(*_backward_args("nhwc", "nhwc"))
    assert len(keys) == 7 and len(set(keys)) == 7
    for key in keys:
        hash(key)
