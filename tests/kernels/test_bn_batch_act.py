"""bn_batch_act / bn_batch_act_backward (csrc/cpu/bn_batch_act.cpp) against
torch.nn.functional.batch_norm(training=True) [+ residual] [+ relu] with autograd,
in float64, on the statistics resfast's bn_stats gives.

Tolerances. With u the unit roundoff of the accumulation type (float32, float64
for float64) and u_out that of the activations, every result is held to
  u_out |ref| + STATS_TERMS u (its terms' total magnitude):
the per-channel sums round as 80 terms (SUM_TERMS of test_bn_ops_cpu.py), the
variance from bn_stats to 2 * 80 u relative and the mean to 80 u of the spread,
and each enters the result a few times (1/std, the centred value, the two
coefficients of the statistics' gradient): STATS_TERMS = 4 * 80. The magnitude
of a result is that of the terms it is made from:
  out:    |y - mean| |scale| + |bias| + |residual|
  grad_y: |scale| (|g| + (S|g| + |x^| (S|g x^| + S|g|)) / count), S a channel's sum
  grad_weight: S|g x^| + S|g| (the mean's rounding times sum g), grad_bias: S|g|.
In float64 that is ~4e-14 relative: a dropped or doubled element fails.
The mean's own error (bn_stats: 80 u of the spread plus its rounding, taken as
2 u |mean|), relative to the std, r, moves every result by its share on top:
  out: |weight| r, grad_y: |scale| r (|x^| S|g| + S|g x^|) / count,
  grad_weight: S|g| r.
torch.nn's float64 mean errs by a few units of |mean| as well (REF_UNIT |mean|).
With a large |mean| that is the floor (torch's float32 has it too); sums of
g * y instead of g * (y - mean) would lose SUM_TERMS times more in float32.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import resfast  # noqa: F401  (registers the ops)
from resfast.ops.bn_batch import batch_act_backward_composite, batch_act_composite
from tests.kernels.test_bn_ops_cpu import (
    DTYPES,
    REF_UNIT,
    SUM_TERMS,
    UNIT,
    acc_dtype,
    assert_layout,
    assert_within,
    make,
    vector,
)
from tests.support.helpers import CAPABILITIES, run_with_capability

ops = torch.ops.resfast

STATS_TERMS = 4 * SUM_TERMS
EPS = 1e-5
ALL = [True, True, True, True]
# odd C (1, 3, 63) and H*W; both sides of the loops' splits (see ACT_SHAPES in
# test_bn_ops_cpu.py): channels_last rows in a register tile or wider (150),
# NCHW planes summed channel by channel (40, 3, 7, 7) or in memory order, whole
# or in parts (H*W > 1024)
SHAPES = [(2, 63, 5, 5), (3, 3, 13, 13), (2, 1, 9, 9), (3, 150, 5, 9), (40, 3, 7, 7),
          (2, 5, 33, 35)]
# (weight and bias given, residual, relu)
FLAGS = list(itertools.product([False, True], [False, True], [False, True]))


def _channel(v):
    return v.double().view(1, -1, 1, 1)


def inputs(shape, dtype, layout, affine, use_res, res_layout=None, mean=0.0, std=1.0):
    adt = acc_dtype(dtype)
    y = make(shape, dtype, layout, mean=mean, std=std)
    weight = vector(shape[1], adt, 0.5, 1.5) if affine else None
    bias = vector(shape[1], adt) if affine else None
    res = make(shape, dtype, res_layout or layout) if use_res else None
    return y, weight, bias, res


def torch_reference(grad_out, y, weight, bias, res, relu, eps=EPS):
    """out, grad_y, grad_weight, grad_bias, grad_residual by batch_norm(training=True)
    and autograd, in float64."""
    leaves = [t.double().detach().requires_grad_() if t is not None else None
              for t in (y, weight, bias, res)]
    y64, w64, b64, r64 = leaves
    out = F.batch_norm(y64, None, None, w64, b64, training=True, eps=eps)
    if r64 is not None:
        out = out + r64
    if relu:
        out = out.relu()
    given = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, given, grad_out.double()))
    return (out.detach(),) + tuple(next(grads) if t is not None else None for t in leaves)


def mean_error(y, eps=EPS):
    """r: the error of bn_stats' mean relative to the std, per channel (shaped (1, C, 1, 1))."""
    var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    u = UNIT[acc_dtype(y.dtype)]
    # batch_norm's float64 mean errs too: a few units of |mean| (measured: 2 at 1e6)
    ours, ref = 2 * u * mean.abs() + SUM_TERMS * u * var.sqrt(), REF_UNIT * mean.abs()
    return _channel((ours + ref) / torch.sqrt(var + eps))


def terms(y, weight, bias, res, eps=EPS):
    """Float64 x^ = (y - mean) / std, |scale|, the pre-activation and its magnitude."""
    var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    invstd = 1 / torch.sqrt(var + eps)
    xhat = (y.double() - _channel(mean)) * _channel(invstd)
    w = _channel(weight) if weight is not None else 1.0
    b = _channel(bias) if bias is not None else 0.0
    z = xhat * w + b
    mag = xhat.abs() * abs(w) + abs(b)
    if res is not None:
        z = z + res.double()
        mag = mag + res.double().abs()
    return xhat, _channel(invstd) * abs(w), z, mag


def grad_for(y, weight, bias, res, relu, layout):
    """grad_out with zeros where the pre-activation is within rounding of 0 (the
    kernel's ReLU mask and the float64 one may differ there)."""
    grad_out = make(tuple(y.shape), y.dtype, layout)
    if not relu:
        return grad_out
    _, _, z, mag = terms(y, weight, bias, res)
    return grad_out.masked_fill(z.abs() <= STATS_TERMS * UNIT[acc_dtype(y.dtype)] * mag, 0)


def bound(ref, mag, dtype, out_dtype):
    return UNIT[out_dtype] * ref.abs() + STATS_TERMS * UNIT[acc_dtype(dtype)] * mag + 1e-300


def check(grad_out, y, weight, bias, res, relu, out, grads, mask=ALL):
    """ours (out, and the backward's 4 results under `mask`) against torch."""
    dt, adt = y.dtype, acc_dtype(y.dtype)
    ref_out, ref_gy, ref_gw, ref_gb, ref_gr = torch_reference(grad_out, y, weight, bias, res, relu)
    xhat, scale, z, mag = terms(y, weight, bias, res)
    r = mean_error(y)
    w = _channel(weight).abs() if weight is not None else 1.0
    assert_layout("out", out, y)
    assert_within("out", out, ref_out, bound(ref_out, mag, dt, dt) + w * r)
    g = grad_out.double() * (z > 0) if relu else grad_out.double()
    count = y.shape[0] * y.shape[2] * y.shape[3]
    s_g = g.abs().sum((0, 2, 3), keepdim=True)
    s_gx = (g * xhat).abs().sum((0, 2, 3), keepdim=True)
    grad_y, grad_weight, grad_bias, grad_res = grads
    if mask[0]:
        assert_layout("grad_y", grad_y, y)
        mag_gy = scale * (g.abs() + (s_g + xhat.abs() * (s_gx + s_g)) / count)
        from_mean = scale * r * (xhat.abs() * s_g + s_gx) / count
        assert_within("grad_y", grad_y, ref_gy, bound(ref_gy, mag_gy, dt, dt) + from_mean)
    else:
        assert grad_y.shape == (0,) and grad_y.dtype == dt
    for i, name, ref, mag_sum, from_mean, given in (
            (1, "grad_weight", ref_gw, s_gx + s_g, s_g * r, weight),
            (2, "grad_bias", ref_gb, s_g, 0 * s_g, bias)):
        ours = grads[i]
        assert ours.dtype == adt, name
        if mask[i] and given is not None:
            assert_within(name, ours, ref,
                          bound(ref, mag_sum.flatten(), dt, adt) + from_mean.flatten())
        else:
            assert ours.shape == (0,), name
    if mask[3]:
        assert_layout("grad_residual", grad_res, y)
        # g itself: grad_out or 0 (its own rounding only where it is the residual's)
        expected = ref_gr if ref_gr is not None else g
        assert_within("grad_residual", grad_res, expected, bound(expected, 0, dt, dt))
    else:
        assert grad_res.shape == (0,) and grad_res.dtype == dt


def run(grad_out, y, weight, bias, res, relu, mask=ALL):
    mean, var = ops.bn_stats(y)
    out = ops.bn_batch_act(y, mean, var, weight, bias, res, relu, EPS)
    grads = ops.bn_batch_act_backward(grad_out, y, mean, var, weight, bias, res, relu, EPS, mask)
    return out, grads


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine,use_res,relu", FLAGS)
def test_against_batch_norm(shape, layout, dtype, affine, use_res, relu):
    torch.manual_seed(0)
    y, weight, bias, res = inputs(shape, dtype, layout, affine, use_res)
    grad_out = grad_for(y, weight, bias, res, relu, layout)
    check(grad_out, y, weight, bias, res, relu, *run(grad_out, y, weight, bias, res, relu))


@pytest.mark.parametrize("dtype", DTYPES)
def test_statistics_are_torch_var_mean(dtype):
    """The mean and var the ops are given here (bn_stats) are torch's."""
    y = make((3, 7, 5, 5), dtype, "nhwc", mean=3.0)
    mean, var = ops.bn_stats(y)
    ref_var, ref_mean = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    u = UNIT[acc_dtype(dtype)]
    assert_within("mean", mean, ref_mean, SUM_TERMS * u * (ref_mean.abs() + ref_var.sqrt()))
    assert_within("var", var, ref_var, 2 * SUM_TERMS * u * ref_var)


@pytest.mark.parametrize("layout,res_layout", [("nchw", "nhwc"), ("nhwc", "nchw"),
                                               ("nhwc", "sliced"), ("permuted", "nchw")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_and_y_in_other_layouts(layout, res_layout, dtype):
    torch.manual_seed(1)
    y, weight, bias, res = inputs((2, 19, 6, 7), dtype, layout, True, True, res_layout)
    grad_out = grad_for(y, weight, bias, res, True, res_layout)
    check(grad_out, y, weight, bias, res, True, *run(grad_out, y, weight, bias, res, True))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype,mean,std", [(torch.float32, 1000.0, 0.1),
                                            (torch.float64, 1e6, 1e-3),
                                            (torch.bfloat16, 300.0, 4.0)])
def test_large_mean_small_variance(layout, dtype, mean, std):
    """The sums are centred on the mean: uncentred ones (sum g y - mean sum g) would
    lose every digit here and fail the bounds, which scale with |y - mean|."""
    torch.manual_seed(2)
    y, weight, bias, res = inputs((4, 24, 9, 9), dtype, layout, True, True, mean=mean, std=std)
    grad_out = grad_for(y, weight, bias, res, True, layout)
    check(grad_out, y, weight, bias, res, True, *run(grad_out, y, weight, bias, res, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_res", [False, True])
def test_channels_last_past_the_row_group_threshold(dtype, use_res):
    """Pass 2 walks channels_last rows one after another beyond 2^20 elements (the
    other shapes: 4 at a time), reading g back from grad_residual when there is one."""
    torch.manual_seed(9)
    shape = (4, 40, 81, 81)
    y, weight, bias, res = inputs(shape, dtype, "nhwc", True, use_res, mean=5.0)
    grad_out = grad_for(y, weight, bias, res, True, "nhwc")
    check(grad_out, y, weight, bias, res, True, *run(grad_out, y, weight, bias, res, True))


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=4)))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("affine", [False, True])
def test_every_output_mask(mask, layout, affine):
    """A selection changes nothing in the selected results (bit for bit) and leaves the
    others empty; grad_weight and grad_bias are empty without a weight and bias."""
    torch.manual_seed(3)
    y, weight, bias, res = inputs((2, 21, 5, 6), torch.float32, layout, affine, True)
    grad_out = grad_for(y, weight, bias, res, True, layout)
    mean, var = ops.bn_stats(y)
    full = ops.bn_batch_act_backward(grad_out, y, mean, var, weight, bias, res, True, EPS, ALL)
    ours = ops.bn_batch_act_backward(grad_out, y, mean, var, weight, bias, res, True, EPS,
                                     list(mask))
    check(grad_out, y, weight, bias, res, True,
          ops.bn_batch_act(y, mean, var, weight, bias, res, True, EPS), ours, mask)
    for selected, given, a, b in zip(mask, (True, affine, affine, True), ours, full):
        if selected and given:
            assert torch.equal(a, b)


def test_bias_without_weight_and_weight_without_bias():
    torch.manual_seed(4)
    y, weight, bias, res = inputs((3, 10, 6, 6), torch.float64, "nhwc", True, False)
    for w, b in ((weight, None), (None, bias)):
        grad_out = grad_for(y, w, b, None, True, "nhwc")
        check(grad_out, y, w, b, None, True, *run(grad_out, y, w, b, None, True))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(layout, dtype):
    """N = 0: empty activations; grad_weight and grad_bias are sums of nothing."""
    adt = acc_dtype(dtype)
    y = make((0, 3, 4, 4), dtype, layout)
    mean, var = torch.zeros(3, dtype=adt), torch.ones(3, dtype=adt)
    weight, bias = vector(3, adt), vector(3, adt)
    out = ops.bn_batch_act(y, mean, var, weight, bias, y.clone(), True, EPS)
    assert out.shape == y.shape
    grads = ops.bn_batch_act_backward(torch.empty_like(y), y, mean, var, weight, bias, y.clone(),
                                      True, EPS, ALL)
    assert grads[0].shape == grads[3].shape == y.shape
    assert torch.equal(grads[1], torch.zeros(3, dtype=adt))
    assert torch.equal(grads[2], torch.zeros(3, dtype=adt))


def test_autograd_formula():
    """Through autograd: the gradients of y (with the path through its statistics),
    weight, bias and residual; none for mean and var."""
    torch.manual_seed(5)
    y, weight, bias, res = inputs((3, 6, 5, 7), torch.float64, "nhwc", True, True)
    grad_out = grad_for(y, weight, bias, res, True, "nhwc")
    leaves = [t.clone().requires_grad_() for t in (y, weight, bias, res)]
    mean, var = (t.clone().requires_grad_() for t in ops.bn_stats(y))
    out = ops.bn_batch_act(leaves[0], mean, var, *leaves[1:], True, EPS)
    out.backward(grad_out)
    assert mean.grad is None and var.grad is None
    expected = torch_reference(grad_out, y, weight, bias, res, True)
    for name, leaf, ref in zip(("y", "weight", "bias", "residual"), leaves, expected[1:]):
        torch.testing.assert_close(leaf.grad, ref, rtol=1e-12, atol=1e-12, msg=name)


def test_gradcheck_with_its_own_statistics():
    """float64 finite differences of y -> bn_batch_act(y, *bn_stats(y)) (mean and var
    recomputed from each perturbed y; detached, their path is inside grad_y)."""
    torch.manual_seed(6)
    y, weight, bias, res = inputs((2, 3, 4, 5), torch.float64, "nhwc", True, True)
    y = y + 0.5  # away from the ReLU's kink at the finite differences' scale

    def f(y, weight, bias, res):
        mean, var = (t.detach() for t in ops.bn_stats(y))
        return ops.bn_batch_act(y, mean, var, weight, bias, res, True, EPS)

    args = [t.requires_grad_() for t in (y, weight, bias, res)]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)


def old_chain(grad_out, y, weight, bias, res, relu):
    """What a training BN + act is before these ops: bn_stats -> bn_finalize (zero mean)
    -> bn_act(centre=mean), differentiated by autograd (bn_act_backward,
    bn_finalize_backward, bn_stats_backward)."""
    leaves = [t.clone().requires_grad_() if t is not None else None
              for t in (y, weight, bias, res)]
    y_, w_, b_, r_ = leaves
    mean, var = ops.bn_stats(y_)
    scale, shift = ops.bn_finalize(torch.zeros_like(var), var, w_, b_, EPS)
    out = ops.bn_act(y_, scale, shift, r_, relu, mean)
    out.backward(grad_out)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("use_res,relu", [(False, True), (True, True), (False, False)])
def test_matches_the_old_chain(layout, dtype, use_res, relu):
    """The forward is the chain's bit for bit (same scale, same loop), grad_weight and
    grad_bias too (same sums, same formulas); grad_y differs by the chain's extra
    rounding (its direct part rounded to y's dtype before the statistics' part is
    added, and their sum rounded again): a few roundings of its terms."""
    torch.manual_seed(7)
    y, weight, bias, res = inputs((4, 40, 7, 9), dtype, layout, True, use_res)
    grad_out = grad_for(y, weight, bias, res, relu, layout)
    out, grads = run(grad_out, y, weight, bias, res, relu)
    chain_out, (gy, gw, gb, gr) = old_chain(grad_out, y, weight, bias, res, relu)
    assert torch.equal(out, chain_out)
    assert torch.equal(grads[1], gw) and torch.equal(grads[2], gb)
    if use_res:
        assert torch.equal(grads[3], gr)
    assert_within("grad_y", grads[0], gy, chain_bound(grad_out, y, weight, bias, res, relu, gy))


def chain_bound(grad_out, y, weight, bias, res, relu, gy):
    """How far the chain's grad_y (gy) may be from ours: it rounds its direct part and
    the statistics' part to y's dtype and their sum again, we round once."""
    xhat, scale, z, _ = terms(y, weight, bias, res)
    g = grad_out.double() * (z > 0) if relu else grad_out.double()
    count = y.shape[0] * y.shape[2] * y.shape[3]
    mag = scale * (g.abs() + (g.abs().sum((0, 2, 3), keepdim=True)
                              + xhat.abs() * (g * xhat).abs().sum((0, 2, 3), keepdim=True))
                   / count)
    u_out, u = UNIT[y.dtype], UNIT[acc_dtype(y.dtype)]
    return u_out * gy.double().abs() + (3 * u_out + 8 * u) * mag


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("affine,use_res,relu", FLAGS)
def test_cuda_composite_on_the_cpu(layout, dtype, affine, use_res, relu):
    """The composite registered for CUDA, run on CPU tensors, against the CPU kernel:
    the same forward, grad_weight, grad_bias and grad_residual bit for bit, grad_y
    within the composite's extra rounding (that of the old chain: chain_bound)."""
    torch.manual_seed(8)
    y, weight, bias, res = inputs((3, 17, 6, 5), dtype, layout, affine, use_res)
    grad_out = grad_for(y, weight, bias, res, relu, layout)
    mean, var = ops.bn_stats(y)
    assert torch.equal(batch_act_composite(y, mean, var, weight, bias, res, relu, EPS),
                       ops.bn_batch_act(y, mean, var, weight, bias, res, relu, EPS))
    for mask in (ALL, [False, True, True, False], [False, False, False, True]):
        theirs = batch_act_backward_composite(grad_out, y, mean, var, weight, bias, res, relu,
                                              EPS, mask)
        ours = ops.bn_batch_act_backward(grad_out, y, mean, var, weight, bias, res, relu, EPS,
                                         mask)
        for i in (1, 2, 3):
            assert theirs[i].shape == ours[i].shape and theirs[i].dtype == ours[i].dtype
            assert torch.equal(theirs[i], ours[i])
        assert theirs[0].shape == ours[0].shape and theirs[0].dtype == ours[0].dtype
        if mask[0]:
            assert_layout("grad_y", theirs[0], y)
            assert_within("grad_y", theirs[0], ours[0],
                          chain_bound(grad_out, y, weight, bias, res, relu, ours[0]))


def test_cuda_composite_empty_batch():
    y = torch.empty(0, 3, 4, 4)
    mean, var, bias = torch.zeros(3), torch.ones(3), torch.zeros(3)
    grads = batch_act_backward_composite(y, y, mean, var, None, bias, None, True, EPS, ALL)
    assert grads[0].shape == grads[3].shape == y.shape
    assert grads[1].shape == (0,) and torch.equal(grads[2], torch.zeros(3))


Y = torch.randn(2, 3, 4, 4)
V3 = torch.ones(3)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.bn_batch_act(Y.int(), V3, V3, None, None, None, True, EPS),
         "y must be floating point"),
        (lambda: ops.bn_batch_act(Y[0], V3, V3, None, None, None, True, EPS), "y must be 4-D"),
        (lambda: ops.bn_batch_act(Y, torch.ones(4), torch.ones(4), None, None, None, True, EPS),
         r"mean must have shape \(3\)"),
        (lambda: ops.bn_batch_act(Y, V3, torch.ones(4), None, None, None, True, EPS),
         "mean and var must be 1-D of equal size"),
        (lambda: ops.bn_batch_act(Y, V3, V3, torch.ones(2), None, None, True, EPS),
         "weight must have shape"),
        (lambda: ops.bn_batch_act(Y, V3, V3, None, V3.long(), None, True, EPS),
         "bias must be floating point"),
        (lambda: ops.bn_batch_act(Y, V3, V3, None, None, Y[:1], True, EPS),
         "residual must have the shape of y"),
        (lambda: ops.bn_batch_act_backward(Y.double(), Y, V3, V3, None, None, None, True, EPS,
                                           ALL),
         "grad_out must have the dtype of y"),
        (lambda: ops.bn_batch_act_backward(Y, Y, V3, V3, None, None, Y.double(), True, EPS, ALL),
         "residual must have the dtype of y"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- every instruction set the build contains ----------------------------------------------

_ISA_SCRIPT = r"""
import sys, torch, resfast
from tests.kernels.test_bn_batch_act import isa_cases, run
torch.manual_seed(0)
results = [(args, run(*args)) for args in isa_cases()]
torch.save({"isa": torch.ops.resfast.cpu_isa(), "results": results}, sys.argv[1])
"""


def isa_cases():
    """Both layouts, every dtype, tails (63 channels) and full vectors, residual and ReLU."""
    cases = []
    for dtype, layout, shape in itertools.product(DTYPES, ("nchw", "nhwc"),
                                                  [(2, 63, 5, 5), (3, 16, 8, 8)]):
        y, weight, bias, res = inputs(shape, dtype, layout, True, True, mean=20.0)
        cases.append((grad_for(y, weight, bias, res, True, layout), y, weight, bias, res, True))
    return cases


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_each_instruction_set(capability, tmp_path):
    """ATEN_CPU_CAPABILITY picks the loops: each set this build has, in a fresh process."""
    saved = run_with_capability(capability, _ISA_SCRIPT, tmp_path / "results.pt")
    for args, (out_, grads) in saved["results"]:
        check(*args, out_, grads)



def _through_autograd(layout, use_res, keep):
    """bn_batch_act's C++ autograd node (the CPU's) fed a gradient made inside the graph
    (out * r's, which nothing else holds), as a training step feeds it; keep: "nothing" or
    "hook" (a hook that keeps the gradient it sees). Returns the leaves, the node's
    gradient r and what was kept of it."""
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format

    def leaf(*size):
        t = torch.randn(*size, generator=gen)
        return (t.contiguous(memory_format=fmt) if t.dim() == 4 else t).requires_grad_()
    y = leaf(3, 20, 5, 7)
    res = leaf(3, 20, 5, 7) if use_res else None
    w, b = leaf(20), leaf(20)
    var, mean = torch.var_mean(y.detach(), dim=(0, 2, 3), correction=0)
    out = ops.bn_batch_act(y, mean, var, w, b, res, True, EPS)
    kept = []
    if keep == "hook":
        out.register_hook(kept.append)
    r = torch.randn(out.shape, generator=gen).contiguous(memory_format=fmt)  # y's layout
    (out * r).sum().backward()
    return (y, w, b, res), r, kept


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("use_res", [False, True])
def test_received_gradient_overwritten_only_when_nothing_else_holds_it(layout, use_res):
    """The CPU node hands the gradient it receives over to the kernel, which writes
    grad_residual (with a residual) or grad_y into it when nothing else holds it (one
    activation-sized buffer less per layer in a training step). The gradients are bitwise
    those of the op called on a gradient it may not overwrite, and a gradient kept by a
    hook keeps its value. (That the buffer is reused is not observable from Python: a
    gradient Python has touched has a second handle, and is never overwritten.)"""
    (y, w, b, res), r, _ = _through_autograd(layout, use_res, "nothing")
    g = r.clone()
    var, mean = torch.var_mean(y.detach(), dim=(0, 2, 3), correction=0)
    expected = ops.bn_batch_act_backward(g, y.detach(), mean, var, w.detach(), b.detach(),
                                         None if res is None else res.detach(), True, EPS,
                                         [True, True, True, use_res])
    assert torch.equal(g, r)  # the op, called here, keeps grad_out
    got = (y.grad, w.grad, b.grad, res.grad if use_res else None)
    for name, a, e in zip(("y", "weight", "bias", "residual"), got, expected):
        assert a is None if name == "residual" and not use_res else torch.equal(a, e), name
    leaves, r, kept = _through_autograd(layout, use_res, "hook")
    assert torch.equal(kept[0], r)
    for name, a, leaf in zip(("y", "weight", "bias", "residual"), got, leaves):
        assert (a is None and leaf is None) or torch.equal(a, leaf.grad), name
