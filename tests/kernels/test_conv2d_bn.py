"""The Triton conv kernels (resfast/kernels/conv2d_bn.py) against float64 torch composites.

The reference is conv2d(relu(x * s + t)) (+ bias, + relu) and its batch statistics,
built in float64 from the same inputs; its gradients come from torch.autograd with the
loss sum(grad_y * y) + sum(grad_mean * mean(y)) + sum(grad_var * var(y)). Tolerances
follow tests/support/helpers.py: relative-norm error at most max(floor, 2 x the error of torch's
own composite in the kernel's dtype) for y and the statistics, and the project's looser
gradient rule (GRAD_FACTOR, GRAD_FLOOR: ReLU mask flips near zero make low-precision
gradient errors noisy). Without a GPU the kernels run on CPU tensors under the Triton
interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are tiny; there the
half-precision dots get float32 operands, so the bf16/fp16 operand rounding is only
exercised on a GPU.
"""
import pytest
import torch
import torch.nn.functional as F

from resfast.kernels.conv2d_bn import triton_conv2d_bn_backward, triton_conv2d_bn_forward
from tests.support.helpers import (
    GRAD_FACTOR,
    GRAD_FLOOR,
    assert_close,
    rel_err,
    triton_interpreter_problem,
)

CL = torch.channels_last
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(triton_interpreter_problem() is not None,
                                                 reason=str(triton_interpreter_problem()))),
    pytest.param("cuda", marks=pytest.mark.gpu),
]

# Each case: K, stride, padding, N, Ci, Co, H, W, bias, prologue (scale/shift), in_relu,
# out_relu, stats, layout[, dilation (1 when left out)]. W != H in some to catch swapped
# axes; Ci=3/13 and Co=5 leave channel blocks partly masked, N*OH*OW=162 spans several row
# tiles so the statistics merge runs.
CASES = {
    "3x3_s1_bn_relu_stats": (3, 1, 1, 2, 13, 16, 9, 9, False, True, True, False, True, "nhwc"),
    "3x3_s2_bn_stats_nchw": (3, 2, 1, 1, 13, 5, 9, 7, True, True, False, False, True, "nchw"),
    "3x3_s1_p0_out_relu": (3, 1, 0, 1, 3, 16, 7, 9, True, False, False, True, False, "nhwc"),
    "3x3_s2_p0_all_fusions": (3, 2, 0, 1, 3, 5, 9, 9, True, True, True, True, False, "nchw"),
    "1x1_s1_bn_relu_stats": (1, 1, 0, 2, 13, 16, 7, 7, False, True, True, False, True, "nhwc"),
    "1x1_s2_projection": (1, 2, 0, 1, 16, 5, 9, 9, False, False, False, False, True, "nchw"),
    # FCN / DeepLab's dilated 3x3s: the taps 2 (3) apart, padding = dilation; folded taps
    # (Ci=3) and tap by tap (Ci=16); a stride-2 one whose dgrad sees taps land between outputs
    "3x3_d2_bn_relu_stats": (3, 1, 2, 2, 3, 8, 9, 7, True, True, True, False, True, "nhwc", 2),
    "3x3_s2_d3_stats_nchw": (3, 2, 3, 1, 16, 5, 11, 10, False, True, False, False, True, "nchw",
                             3),
}
# Index logic only, the same for every dtype, so float32 alone (the interpreter's slowest
# cases): Ci=20 / Co=24 span two 16-channel blocks in every GEMM loop; a 5x5 stride-2
# kernel (any square K, like the 7x7 stem) with padding 2.
INDEX_CASES = {
    "3x3_two_channel_blocks": (3, 1, 1, 1, 20, 24, 7, 7, True, True, True, False, True, "nhwc"),
    "5x5_s2_p2": (5, 2, 2, 1, 3, 5, 7, 8, False, True, True, False, True, "nchw"),
}
PARAMS = ([pytest.param(case, dtype, id=f"{name}-{str(dtype)[6:]}") for name,
           case in CASES.items() for dtype in DTYPES]
          + [pytest.param(case, torch.float32, id=f"{name}-float32") for name,
             case in INDEX_CASES.items()])


@pytest.fixture(autouse=True)
def _nan_filled_empty():
    """torch.empty hands out NaN-filled memory, so any output or partial-sum element the
    kernels fail to write turns into a non-finite result (rel_err rejects those)."""
    was_on, was_warn = (torch.are_deterministic_algorithms_enabled(),
                        torch.is_deterministic_algorithms_warn_only_enabled())
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = was_fill
    torch.use_deterministic_algorithms(was_on, warn_only=was_warn)


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _make_inputs(case, dtype, device):
    k, stride, padding, n, ci, co, h, w, bias, prologue, in_relu, out_relu, stats, layout = (
        case[:14])
    sdt = _stats_dtype(dtype)
    x = torch.randn(n, ci, h, w, device=device).to(dtype)
    x = x.contiguous(memory_format=CL) if layout == "nhwc" else x.contiguous()
    return dict(
        x=x,
        weight=(torch.randn(co, ci, k, k, device=device) / (ci * k * k) ** 0.5).to(dtype),
        bias=torch.randn(co, device=device).to(dtype) if bias else None,
        in_scale=torch.empty(ci, device=device).uniform_(0.5, 1.5).to(sdt) if prologue else None,
        in_shift=torch.empty(ci, device=device).uniform_(-0.5, 0.5).to(sdt) if prologue else None,
        in_relu=in_relu, stride=stride, padding=padding, stats=stats, out_relu=out_relu,
        dilation=case[14] if len(case) > 14 else 1)


def _composite(inputs, dtype, grad_y=None, grad_mean=None, grad_var=None):
    """torch's own (y, mean, var) and gradients w.r.t. (a, weight, bias), computed in `dtype`.

    a = [relu](x * s + t) is formed in float32 (float64) and rounded to `dtype`, as the
    kernels' prologue feeds the GEMM; statistics and the loss are in float32/64.
    """
    sdt = _stats_dtype(dtype)
    x = inputs["x"].to(sdt)
    if inputs["in_scale"] is not None:
        x = (x * inputs["in_scale"].to(sdt).view(1, -1, 1, 1)
             + inputs["in_shift"].to(sdt).view(1, -1, 1, 1))
    if inputs["in_relu"]:
        x = torch.relu(x)
    a = x.to(dtype).requires_grad_()
    weight = inputs["weight"].to(dtype).requires_grad_()
    bias = None if inputs["bias"] is None else inputs["bias"].to(dtype).requires_grad_()
    y = F.conv2d(a, weight, bias, stride=inputs["stride"], padding=inputs["padding"],
                 dilation=inputs["dilation"])
    if inputs["out_relu"]:
        y = torch.relu(y)
    var, mean = torch.var_mean(y.to(sdt), dim=(0, 2, 3), correction=0)
    loss = sum((g.to(sdt) * v).sum() for g,
               v in ((grad_y, y.to(sdt)), (grad_mean, mean), (grad_var, var))
               if g is not None)
    leaves = [t for t in (a, weight, bias) if t is not None]
    grads = (torch.autograd.grad(loss, leaves, allow_unused=True) if isinstance(loss, torch.Tensor)
             else [None] * len(leaves))
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)] + [None]
    return (y.detach(), mean.detach(), var.detach()), tuple(grads[:3])


def _reference(inputs, dtype, **grads):
    """The float64 reference, and torch's same-dtype composite for the half types (float32
    and float64 are held to fixed floors: torch's float32 conv may use tf32 on a GPU)."""
    ref = _composite({k: v.double() if isinstance(v, torch.Tensor) else v for k,
                      v in inputs.items()},
                     torch.float64,
                     **{k: None if v is None else v.double() for k, v in grads.items()})
    same = _composite(inputs, dtype, **grads) if dtype in (torch.bfloat16, torch.float16) else None
    return ref, same


def _backward(inputs, y, mean, grad_y, grad_mean, grad_var, mask):
    return triton_conv2d_bn_backward(grad_y, grad_mean, grad_var, inputs["x"], inputs["weight"], y,
                                     mean, inputs["in_scale"], inputs["in_shift"],
                                     inputs["in_relu"], inputs["stride"], inputs["padding"],
                                     inputs["out_relu"], list(mask),
                                     dilation=inputs["dilation"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,dtype", PARAMS)
def test_forward_backward(case, dtype, device):
    inputs = _make_inputs(case, dtype, device)
    stats = inputs["stats"]
    y, mean, var = triton_conv2d_bn_forward(**inputs)
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)

    grad_y = torch.randn(y.shape, device=device).to(dtype)
    if inputs["x"].is_contiguous(memory_format=CL):  # an NCHW case gets an NCHW gradient
        grad_y = grad_y.contiguous(memory_format=CL)
    # the op layer passes no statistics gradients when the forward had none
    grad_mean = torch.randn(y.shape[1], device=device, dtype=mean.dtype) if stats else None
    grad_var = torch.randn(y.shape[1], device=device, dtype=mean.dtype) if stats else None
    mask = (True, True, inputs["bias"] is not None)
    grad_a, grad_w, grad_b = _backward(inputs, y, mean, grad_y, grad_mean, grad_var, mask)

    (ref, ref_grads), same = _reference(inputs, dtype, grad_y=grad_y, grad_mean=grad_mean,
                                        grad_var=grad_var)
    same_out, same_grads = same or ((None,) * 3, (None,) * 3)
    assert_close("y", y, ref[0], same_out[0], dtype)
    if stats:
        assert (mean.dtype == var.dtype == _stats_dtype(dtype)
                and mean.shape == var.shape == (y.shape[1],))
        assert_close("mean", mean, ref[1], same_out[1], dtype)
        assert_close("var", var, ref[2], same_out[2], dtype)
    else:
        assert mean.shape == var.shape == (0,) and mean.dtype == _stats_dtype(dtype)

    assert grad_a.dtype == dtype and grad_a.shape == inputs["x"].shape
    assert grad_a.is_contiguous(memory_format=CL)
    tol = dict(dtype=dtype, factor=GRAD_FACTOR, floor=GRAD_FLOOR[dtype])
    assert_close("grad_a", grad_a, ref_grads[0], same_grads[0], **tol)
    assert grad_w.dtype == dtype and grad_w.shape == inputs["weight"].shape
    assert_close("grad_weight", grad_w, ref_grads[1], same_grads[1], **tol)
    if mask[2]:
        assert_close("grad_bias", grad_b, ref_grads[2], same_grads[2], **tol)
    else:
        assert grad_b.shape == (0,)


# (grad_y, grad_mean, grad_var) present, output_mask: every gradient-input subset, and
# the masks that skip dgrad, skip wgrad, or leave wgrad only the bias.
GRAD_SUBSETS = [
    ((True, False, False), (True, False, False)),
    ((False, True, False), (False, True, True)),
    ((False, False, True), (True, False, True)),
    ((True, True, False), (False, False, True)),
    ((False, False, False), (True, True, True)),
    ((True, True, True), (False, True, False)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("present,mask", GRAD_SUBSETS,
                         ids=lambda v: "".join("1" if b else "0" for b in v))
def test_backward_subsets(present, mask, device):
    inputs = _make_inputs(CASES["3x3_s2_bn_stats_nchw"], torch.float32, device)
    y, mean, _ = triton_conv2d_bn_forward(**inputs)
    co = y.shape[1]
    grad_y, grad_mean, grad_var = (
        torch.randn(shape, device=device) if want else None
        for want, shape in zip(present, (y.shape, (co,), (co,))))
    got = _backward(inputs, y, mean, grad_y, grad_mean, grad_var, mask)
    (_, ref_grads), _ = _reference(inputs, torch.float32, grad_y=grad_y, grad_mean=grad_mean,
                                   grad_var=grad_var)
    # grad_var alone sums to a zero grad_bias: measure that against the incoming gradient
    scale = sum(g.norm().item() for g in (grad_y, grad_mean, grad_var) if g is not None)
    for name, want, g, r in zip(("grad_a", "grad_weight", "grad_bias"), mask, got, ref_grads):
        if not want:
            assert g.shape == (0,), name
        elif not any(present):
            assert g.shape == r.shape and torch.count_nonzero(g) == 0, name
        else:
            assert_close(name, g, r, None, torch.float32, scale=scale)


@pytest.mark.parametrize("device", DEVICES)
def test_stats_robust_to_large_mean(device):
    """|mean| = 1e4 >> std ~ 1: E[y^2] - E[y]^2 in float32 loses the variance entirely."""
    inputs = _make_inputs(CASES["3x3_s1_bn_relu_stats"], torch.float32, device)
    inputs["bias"] = torch.full((inputs["weight"].shape[0],), 1e4, device=device)
    y, mean, var = triton_conv2d_bn_forward(**inputs)
    (ref, _), _ = _reference(inputs, torch.float32)
    y32 = y.float()
    naive = (y32 * y32).mean(dim=(0, 2, 3)) - y32.mean(dim=(0, 2, 3)) ** 2
    assert rel_err(naive, ref[2]) > 1e-2, "input too easy: the naive formula would pass"
    assert rel_err(mean, ref[1]) < 1e-6
    # y itself is rounded to float32 ulp(1e4) ~ 1e-3, which bounds what any method can do
    assert rel_err(var, ref[2]) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stats", [False, True])
def test_empty_batch(stats, device):
    inputs = _make_inputs(CASES["3x3_s2_bn_stats_nchw"], torch.float32, device)
    inputs["x"] = inputs["x"][:0]
    inputs["stats"] = stats
    inputs["out_relu"] = False
    y, mean, var = triton_conv2d_bn_forward(**inputs)
    assert y.shape == (0, 5, 5, 4) and y.is_contiguous(memory_format=CL)
    assert mean.shape == var.shape == ((5,) if stats else (0,))
    grad_a, grad_w, grad_b = _backward(inputs, y, mean, torch.zeros_like(y), None, None,
                                       (True, True, True))
    assert grad_a.shape == inputs["x"].shape
    assert torch.equal(grad_w, torch.zeros_like(inputs["weight"]))
    assert torch.equal(grad_b, torch.zeros_like(inputs["bias"]))


def _bad(**changes):
    return changes


# The launchers check only the kernels' own preconditions (a dtype they compile for, one
# dtype for x and weight, one device; the tensors their flags read): the arguments are
# validated once, by the op (tests/ops/test_bad_input.py).
BAD_FORWARD = {
    "x_int": (_bad(x=lambda i: i["x"].to(torch.int32)), "x must be float16"),
    "weight_dtype": (_bad(weight=lambda i: i["weight"].double()), "weight dtype"),
    "weight_device": (_bad(weight=lambda i: i["weight"].to("meta")), "weight is on meta"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change,match", BAD_FORWARD.values(), ids=list(BAD_FORWARD))
def test_bad_forward_inputs(change, match, device):
    inputs = _make_inputs(CASES["3x3_s2_bn_stats_nchw"], torch.float32, device)
    inputs.update({k: f(inputs) for k, f in change.items()})
    with pytest.raises(ValueError, match=match):
        triton_conv2d_bn_forward(**inputs)


BAD_BACKWARD = {
    "grad_var_without_mean": (_bad(mean=lambda g: None), "mean is needed"),
    "grad_var_without_y": (_bad(y=lambda g: None), "y is needed"),
    "grad_mean_device": (_bad(grad_mean=lambda g: g["grad_mean"].to("meta")),
                         "grad_mean is on meta"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change,match", BAD_BACKWARD.values(), ids=list(BAD_BACKWARD))
def test_bad_backward_inputs(change, match, device):
    inputs = _make_inputs(CASES["3x3_s2_bn_stats_nchw"], torch.float32, device)
    y, mean = torch.zeros(1, 5, 5, 4, device=device), torch.zeros(5, device=device)
    args = dict(grad_y=torch.ones_like(y), grad_mean=torch.ones_like(mean),
                grad_var=torch.ones_like(mean), y=y, mean=mean, mask=[True, True, True])
    args.update({k: f(args) for k, f in change.items()})
    with pytest.raises(ValueError, match=match):
        _backward(inputs, args["y"], args["mean"], args["grad_y"], args["grad_mean"],
                  args["grad_var"], args["mask"])
