"""The CPU kernels of the seven BatchNorm ops (csrc/cpu/) against the float64
reference of tests/support/bn_reference.py.

Tolerances are rounding bounds, not fitted numbers. With u the unit roundoff
(2^-24 float32, 2^-53 float64, 2^-8 bfloat16, 2^-11 float16), the kernels
compute in float32 (float64 for float64) and round the result once to the
output's dtype:
  * elementwise outputs: at most 3 roundings in the accumulation type on terms
    of total magnitude `mag`, then one to the output: u_out |ref| + 4 u_acc mag;
  * per-channel sums: blocks of at most 64 terms per chain in the accumulation
    type, merged in double: SUM_TERMS * u_acc * (sum of |terms|);
  * statistics: the mean to SUM_TERMS u_acc of the spread (plus its own
    rounding), the variance to 2 SUM_TERMS u_acc relative.
The float64 reference rounds too (REF_TERMS u_64 of the same magnitudes: a
few roundings per element, a pairwise sum), which each bound adds. So float64
is checked to rounding (about 1e-14 relative) and a kernel that dropped or
doubled a single element of a 1000-element channel fails.
"""

import itertools
import math

import pytest
import torch

import resfast  # noqa: F401  (registers the ops)
from tests.support import bn_reference as ref
from tests.support.helpers import CAPABILITIES, run_with_capability

ops = torch.ops.resfast

UNIT = {
    torch.float32: 2.0**-24,
    torch.float64: 2.0**-53,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SUM_TERMS = 80  # 64 terms per chain, a 16-lane horizontal sum
REF_TERMS = 32  # the float64 reference's own rounding
REF_UNIT = REF_TERMS * 2.0**-53
SHAPES = [
    (2, 64, 7, 7),
    (3, 3, 13, 13),
    (2, 63, 5, 5),
    (1, 1, 9, 9),
    (5, 16, 1, 1),
    (4, 32, 16, 16),
]
LAYOUTS = ["nchw", "nhwc", "permuted", "sliced"]
# bn_act(_backward) run every flag combination: fewer shapes, still odd C, odd H*W and C = 1;
# and both sides of the loops' splits: channels_last rows held in a register tile (C <= 16,
# 32 or 64 by instruction set and dtype) or wider (3, 150, 5, 9: sums through accumulators in
# cache, 4 rows at a time plus the remaining rows, several row blocks); NCHW planes of at
# most 4 vectors summed channel by channel, several planes to a sum (40, 3, 7, 7; with 8
# lanes H*W = 49 is more than 4 vectors: the other side), larger ones in memory order, whole
# (3, 3, 13, 13) or in parts (2, 5, 33, 35: H*W > 1024).
ACT_SHAPES = [
    (2, 63, 5, 5),
    (3, 3, 13, 13),
    (1, 1, 9, 9),
    (5, 16, 1, 1),
    (3, 150, 5, 9),
    (40, 3, 7, 7),
    (2, 5, 33, 35),
]


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make(shape, dtype, layout="nchw", mean=0.0, std=1.0):
    """Random activation in `layout`: NCHW, channels_last, dense but neither
    (dims permuted as N, H, C, W), or a non-dense slice. ``mean`` is a number
    or a per-channel vector."""
    N, C, H, W = shape
    if isinstance(mean, torch.Tensor):
        mean = mean.double().view(1, -1, 1, 1)
    x = torch.randn(shape, dtype=torch.float64) * std + mean
    if layout == "nchw":
        return x.to(dtype)
    if layout == "nhwc":
        return x.to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "permuted":
        return x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3).to(dtype)
    wide = torch.randn(N, C, H, 2 * W, dtype=torch.float64) * std + mean
    wide[..., ::2] = x
    return wide.to(dtype)[..., ::2]


def vector(c, dtype, lo=-1.0, hi=1.0):
    return torch.empty(c, dtype=torch.float64).uniform_(lo, hi).to(dtype)


def assert_within(name, ours, expected, bound):
    """|ours - expected| <= bound elementwise (NaN where expected is NaN)."""
    assert ours.shape == expected.shape, (
        f"{name}: shape {tuple(ours.shape)} != {tuple(expected.shape)}"
    )
    ours, expected = ours.double(), expected.double()
    nan = expected.isnan()
    assert torch.equal(ours.isnan(), nan), (
        f"{name}: NaN at {torch.nonzero(ours.isnan() != nan)[:5].tolist()}"
    )
    same_inf = (ours == expected) & expected.isinf()
    err = torch.where(nan | same_inf, torch.zeros_like(ours), (ours - expected).abs())
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    bad = err > bound
    if bad.any():
        i = tuple(torch.nonzero(bad)[0].tolist())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} differ; first at {i}: {ours[i].item()!r} "
            f"vs {expected[i].item()!r}, bound {bound[i].item():.3g}"
        )


def assert_layout(name, ours, y):
    """Activations come back with the strides of empty_like(y), as the fakes say."""
    assert ours.dtype == y.dtype, f"{name}: dtype {ours.dtype} != {y.dtype}"
    assert ours.stride() == torch.empty_like(y).stride(), (
        f"{name}: strides {ours.stride()} for y {y.stride()}"
    )


def elementwise_bound(expected, mag, out_dtype, dtype):
    subnormal = (
        torch.finfo(out_dtype).tiny * torch.finfo(out_dtype).eps / 2
    )  # half a subnormal step
    return (
        UNIT[out_dtype] * expected.abs() + (4 * UNIT[acc_dtype(dtype)] + REF_UNIT) * mag + subnormal
    )


def sum_bound(abs_sum, dtype):
    return (SUM_TERMS * UNIT[acc_dtype(dtype)] + REF_UNIT) * abs_sum + 1e-300


def magnitude(y, scale, shift, residual, centre=None):
    """Total magnitude of the terms of (y - centre) * scale + shift + residual
    (y - centre is exact or rounded once relative to itself)."""
    m = y.double()
    if centre is not None:
        m = m - centre.double().view(1, -1, 1, 1)
    m = m.abs()
    if scale is not None:
        m = m * scale.double().abs().view(1, -1, 1, 1) + shift.double().abs().view(1, -1, 1, 1)
    if residual is not None:
        m = m + residual.double().abs()
    return m


def check_stats(y, mean, var):
    ref_mean, ref_var = ref.bn_stats(y)
    u = UNIT[acc_dtype(y.dtype)]
    assert mean.dtype == var.dtype == acc_dtype(y.dtype)
    ref_err = REF_UNIT * y.double().abs().mean((0, 2, 3))
    assert_within(
        "mean",
        mean,
        ref_mean,
        u * ref_mean.abs() + SUM_TERMS * u * ref_var.sqrt() + ref_err + 1e-300,
    )
    assert_within("var", var, ref_var, 2 * SUM_TERMS * u * ref_var + 1e-300)


# ---- bn_stats ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_stats(shape, layout, dtype):
    y = make(shape, dtype, layout, mean=3.0, std=2.0)
    check_stats(y, *ops.bn_stats(y))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_stats_many_blocks(layout, dtype):
    # More rows than one block and one thread's share: block and thread merges.
    y = make((16, 24, 23, 21), dtype, layout, mean=-1.0, std=0.5)
    check_stats(y, *ops.bn_stats(y))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize(
    "dtype,mean,std",
    [
        (torch.float32, 1e3, 1e-2),
        (torch.float32, 1e4, 1.0),
        (torch.float64, 1e8, 1e-3),
        (torch.bfloat16, 256.0, 1.0),
    ],
)
def test_bn_stats_large_mean(layout, dtype, mean, std):
    """A mean far above the spread: the naive E[y^2] - E[y]^2 in the same
    precision fails the bound (checked, so the test can tell), the kernel does not."""
    y = make((8, 16, 20, 20), dtype, layout, mean=mean, std=std)
    m, v = ops.bn_stats(y)
    check_stats(y, m, v)
    _, ref_var = ref.bn_stats(y)
    a = y.to(acc_dtype(dtype))
    naive = (a * a).mean((0, 2, 3)) - a.mean((0, 2, 3)) ** 2
    assert (
        (naive.double() - ref_var).abs() > 2 * SUM_TERMS * UNIT[acc_dtype(dtype)] * ref_var
    ).any()


def test_bn_stats_deterministic():
    y = make((8, 64, 28, 28), torch.float32, "nhwc")
    a, b = ops.bn_stats(y), ops.bn_stats(y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bn_stats_nan_and_inf():
    """A non-finite value poisons its own channel's statistics (as in torch), no other."""
    for layout in ("nchw", "nhwc"):
        y = make((2, 4, 5, 5), torch.float32, layout)
        y[1, 0, 2, 3] = float("nan")
        y[0, 1, 4, 4] = float("inf")
        y[1, 2, 0, 1] = float("-inf")
        mean, var = ops.bn_stats(y)
        assert mean[0].isnan() and var[0].isnan()
        assert not mean[1].isfinite() and var[1].isnan()
        assert not mean[2].isfinite() and var[2].isnan()
        torch_var, torch_mean = torch.var_mean(y, (0, 2, 3), correction=0)
        assert torch.equal(var.isnan(), torch_var.isnan()) and torch.equal(
            mean.isfinite(), torch_mean.isfinite()
        )
        check_stats(y[:, 3:], mean[3:], var[3:])


def test_bn_stats_rejects_an_empty_batch():
    with pytest.raises(ValueError, match="at least one element per channel"):
        ops.bn_stats(torch.randn(0, 3, 4, 4))


# ---- bn_stats_backward ------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_stats_backward(shape, layout, dtype):
    y = make(shape, dtype, layout, mean=100.0)
    c, adt = shape[1], acc_dtype(dtype)
    grad_mean, grad_var = vector(c, adt), vector(c, adt)
    mean = ref.bn_stats(y)[0].to(adt)
    out = ops.bn_stats_backward(grad_mean, grad_var, y, mean)
    assert_layout("grad_y", out, y)
    expected = ref.bn_stats_backward(grad_mean, grad_var, y, mean)
    count = shape[0] * shape[2] * shape[3]
    # terms: y - mean (rounded once, small for a large mean), times 2 grad_var, plus grad_mean
    mag = (
        (y.double() - mean.double().view(1, -1, 1, 1)).abs()
        * 2
        * grad_var.double().abs().view(1, -1, 1, 1)
        + grad_mean.double().abs().view(1, -1, 1, 1)
    ) / count
    assert_within("grad_y", out, expected, elementwise_bound(expected, mag, dtype, dtype))


def test_bn_stats_backward_expanded_vectors_and_empty_batch():
    y = make((3, 5, 4, 4), torch.float32, "nhwc")
    gm, gv, mean = (torch.tensor(v).expand(5) for v in (0.5, -2.0, 0.25))
    out = ops.bn_stats_backward(gm, gv, y, mean)
    expected = ref.bn_stats_backward(gm, gv, y, mean)
    assert_within("grad_y", out, expected, 8 * UNIT[torch.float32] * (expected.abs() + 1))
    empty = torch.randn(0, 5, 4, 4)
    assert ops.bn_stats_backward(gm, gv, empty, mean).shape == empty.shape


# ---- bn_act -------------------------------------------------------------------------

# scale: none, scale and shift, or those with a centre; residual; relu
FLAGS = list(itertools.product([None, "scale", "centre"], [False, True], [False, True]))


def act_inputs(shape, dtype, layout, use_scale, use_res, res_layout=None, centred=False):
    """y, scale, shift, residual and, when ``centred``, a centre in [-50, 50]
    that y is spread around with std 1 (BatchNorm's large-mean case: the centred
    sums keep their digits, sums of g * y would lose them)."""
    adt = acc_dtype(dtype)
    centre = vector(shape[1], adt, -50.0, 50.0) if centred else None
    y = make(shape, dtype, layout, mean=centre if centred else 0.0)
    scale, shift = (
        (vector(shape[1], adt, 0.5, 1.5), vector(shape[1], adt)) if use_scale else (None, None)
    )
    res = make(shape, dtype, res_layout or layout) if use_res else None
    return y, scale, shift, res, centre


@pytest.mark.parametrize("shape", ACT_SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_kind,use_res,relu", FLAGS)
def test_bn_act(shape, layout, dtype, scale_kind, use_res, relu):
    y, scale, shift, res, centre = act_inputs(
        shape, dtype, layout, scale_kind is not None, use_res, centred=scale_kind == "centre"
    )
    out = ops.bn_act(y, scale, shift, res, relu, centre)
    assert_layout("out", out, y)
    expected = ref.bn_act(y, scale, shift, res, relu, centre)
    assert_within(
        "out",
        out,
        expected,
        elementwise_bound(expected, magnitude(y, scale, shift, res, centre), dtype, dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_act_channels_last_past_the_row_group_threshold(dtype):
    """The channels_last forward walks rows 4 at a time up to 2^20 elements (ACT_SHAPES)
    and one after another beyond (this shape: 4 * 81 * 81 * 40 elements)."""
    shape = (4, 40, 81, 81)
    assert math.prod(shape) > 2**20
    y, scale, shift, res, centre = act_inputs(shape, dtype, "nhwc", True, True, centred=True)
    out = ops.bn_act(y, scale, shift, res, True, centre)
    assert_layout("out", out, y)
    expected = ref.bn_act(y, scale, shift, res, True, centre)
    mag = magnitude(y, scale, shift, res, centre)
    assert_within("out", out, expected, elementwise_bound(expected, mag, dtype, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_act_backward_without_sums_past_the_row_group_threshold(dtype):
    """grad_y alone (no sums) walks channels_last rows as the forward does, one after
    another beyond 2^20 elements."""
    shape = (4, 40, 81, 81)
    y, scale, shift, res, centre = act_inputs(shape, dtype, "nhwc", True, True, centred=True)
    grad_out = masked_grad_out(make(shape, dtype, "nhwc"), y, scale, shift, res, dtype, centre)
    check_act_backward(grad_out, y, scale, shift, res, True, [True, False, False, True],
                       centre=centre)


@pytest.mark.parametrize(
    "y_layout,res_layout", [("nhwc", "nchw"), ("nchw", "nhwc"), ("nhwc", "sliced")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_act_residual_in_another_layout(y_layout, res_layout, dtype):
    y, scale, shift, res, _ = act_inputs((2, 63, 9, 9), dtype, y_layout, True, True, res_layout)
    out = ops.bn_act(y, scale, shift, res, True)
    assert_layout("out", out, y)
    expected = ref.bn_act(y, scale, shift, res, True)
    assert_within(
        "out",
        out,
        expected,
        elementwise_bound(expected, magnitude(y, scale, shift, res), dtype, dtype),
    )


def test_bn_act_expanded_and_mixed_dtype_vectors():
    y = make((2, 8, 5, 5), torch.float32, "nhwc")
    scale, shift = torch.tensor(1.5).expand(8), torch.linspace(-1, 1, 8, dtype=torch.float64)
    out = ops.bn_act(y, scale, shift, None, True)
    expected = ref.bn_act(y, scale, shift.float(), None, True)  # vectors are cast to float32 first
    assert_within(
        "out",
        out,
        expected,
        elementwise_bound(expected, magnitude(y, scale, shift, None), y.dtype, y.dtype),
    )


def test_bn_act_nan_and_inf_like_torch():
    y = torch.tensor([float("nan"), float("inf"), -float("inf"), -1.0, 2.0]).view(1, 5, 1, 1)
    for relu in (False, True):
        out = ops.bn_act(y, None, None, None, relu)
        torch.testing.assert_close(out, torch.relu(y) if relu else y, equal_nan=True)
    out = ops.bn_act(
        y.expand(2, 5, 3, 3).contiguous(memory_format=torch.channels_last),
        torch.ones(5),
        torch.zeros(5),
        None,
        True,
    )
    torch.testing.assert_close(out, torch.relu(y).expand(2, 5, 3, 3), equal_nan=True)


def test_bn_act_empty_batch_and_one_channel():
    y = torch.randn(0, 4, 3, 3)
    assert ops.bn_act(y, torch.ones(4), torch.zeros(4), y, True).shape == y.shape
    y1 = make((3, 1, 7, 7), torch.float32, "nhwc")
    out = ops.bn_act(y1, torch.full((1,), 2.0), torch.zeros(1), None, True)
    assert_within(
        "out",
        out,
        ref.bn_act(y1, torch.full((1,), 2.0), torch.zeros(1), None, True),
        4 * UNIT[torch.float32] * (y1.double().abs() * 2),
    )


# ---- bn_act_backward -------------------------------------------------------------------


def masked_grad_out(grad_out, y, scale, shift, res, dtype, centre=None):
    """grad_out with zeros where the pre-activation is within rounding of 0, where
    the kernel's ReLU mask and the float64 reference's may differ."""
    z = ref.pre_activation(y, scale, shift, res, centre)
    near = z.abs() <= 8 * UNIT[acc_dtype(dtype)] * magnitude(y, scale, shift, res, centre)
    return grad_out.masked_fill(near, 0)


def check_act_backward(grad_out, y, scale, shift, res, relu, mask, ours=None, centre=None):
    """ours (by default this process's bn_act_backward) against the reference.
    grad_scale is held to the rounding of a sum of |g * (y - centre)|: with a
    large centre, the centred sums' own size, not that of g * y."""
    dtype = y.dtype
    if ours is None:
        ours = ops.bn_act_backward(grad_out, y, scale, shift, res, relu, list(mask), centre)
    grad_y, grad_scale, grad_shift, grad_res = ref.bn_act_backward(
        grad_out, y, scale, shift, res, relu, centre
    )
    d = y.double() - (centre.double().view(1, -1, 1, 1) if centre is not None else 0)
    g = grad_res
    adt = acc_dtype(dtype)
    if mask[0]:
        assert_layout("grad_y", ours[0], y)
        mag = g.abs() * (scale.double().abs().view(1, -1, 1, 1) if scale is not None else 1)
        assert_within("grad_y", ours[0], grad_y, elementwise_bound(grad_y, mag, dtype, dtype))
    else:
        assert ours[0].shape == (0,) and ours[0].dtype == dtype
    if mask[3]:
        assert_layout("grad_residual", ours[3], y)
        assert_within(
            "grad_residual", ours[3], grad_res, elementwise_bound(grad_res, g.abs(), dtype, dtype)
        )
    else:
        assert ours[3].shape == (0,) and ours[3].dtype == dtype
    for i, name, expected, terms in (
        (1, "grad_scale", grad_scale, (g * d).abs()),
        (2, "grad_shift", grad_shift, g.abs()),
    ):
        if mask[i] and scale is not None:
            assert ours[i].dtype == adt
            assert_within(name, ours[i], expected, sum_bound(terms.sum((0, 2, 3)), dtype))
        else:
            assert ours[i].shape == (0,) and ours[i].dtype == adt


@pytest.mark.parametrize("shape", ACT_SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_kind,use_res,relu", FLAGS)
def test_bn_act_backward(shape, layout, dtype, scale_kind, use_res, relu):
    y, scale, shift, res, centre = act_inputs(
        shape, dtype, layout, scale_kind is not None, use_res, centred=scale_kind == "centre"
    )
    grad_out = make(shape, dtype, layout)
    if relu:
        grad_out = masked_grad_out(grad_out, y, scale, shift, res, dtype, centre)
    check_act_backward(
        grad_out, y, scale, shift, res, relu, (True, True, True, True), centre=centre
    )


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=4)))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_bn_act_backward_output_mask(mask, layout):
    y, scale, shift, res, centre = act_inputs(
        (3, 16, 6, 6), torch.float32, layout, True, True, centred=True
    )
    grad_out = masked_grad_out(
        make(y.shape, y.dtype, layout), y, scale, shift, res, y.dtype, centre
    )
    check_act_backward(grad_out, y, scale, shift, res, True, mask, centre=centre)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_act_backward_many_blocks(layout, dtype):
    y, scale, shift, res, centre = act_inputs(
        (16, 24, 23, 21), dtype, layout, True, True, centred=True
    )
    grad_out = masked_grad_out(make(y.shape, dtype, layout), y, scale, shift, res, dtype, centre)
    check_act_backward(
        grad_out, y, scale, shift, res, True, (True, True, True, True), centre=centre
    )


def test_bn_act_backward_mixed_layouts():
    # y channels_last, residual NCHW, grad_out a non-dense slice.
    y, scale, shift, res, _ = act_inputs((2, 63, 9, 9), torch.float32, "nhwc", True, True, "nchw")
    grad_out = masked_grad_out(make(y.shape, y.dtype, "sliced"), y, scale, shift, res, y.dtype)
    check_act_backward(grad_out, y, scale, shift, res, True, (True, True, True, True))


def test_bn_act_backward_nan_in_grad_out_survives_the_mask():
    y = torch.tensor([-1.0, 1.0, -1.0, 1.0]).view(1, 4, 1, 1)
    grad_out = torch.tensor([float("nan"), float("nan"), float("inf"), 2.0]).view(1, 4, 1, 1)
    grad_y, grad_scale, grad_shift, _ = ops.bn_act_backward(
        grad_out, y, torch.ones(4), torch.zeros(4), None, True, [True, True, True, False]
    )
    expected = ref.bn_act_backward(grad_out, y, torch.ones(4), torch.zeros(4), None, True)
    torch.testing.assert_close(grad_y.double(), expected[0], equal_nan=True)
    torch.testing.assert_close(grad_scale.double(), expected[1], equal_nan=True)
    assert grad_y.flatten()[:3].isnan().all() and grad_y.flatten()[3] == 2.0


def test_bn_act_backward_empty_batch():
    y = torch.randn(0, 8, 5, 5)
    ours = ops.bn_act_backward(
        y, y, torch.ones(8), torch.zeros(8), None, True, [True, True, True, True]
    )
    assert ours[0].shape == ours[3].shape == y.shape
    assert torch.equal(ours[1], torch.zeros(8)) and torch.equal(ours[2], torch.zeros(8))


# ---- bn_finalize, bn_finalize_backward, bn_update_running_stats_ ------------------------


@pytest.mark.parametrize("c", [1, 3, 63, 256])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_weight,use_bias", list(itertools.product([False, True], repeat=2)))
def test_bn_finalize(c, dtype, use_weight, use_bias):
    mean, var = vector(c, dtype), vector(c, dtype, 0.1, 2.0)
    weight = vector(c, dtype) if use_weight else None
    bias = vector(c, dtype) if use_bias else None
    u, ua = UNIT[dtype], UNIT[acc_dtype(dtype)]
    for eps in (1e-5, 1e-3):
        scale, shift = ops.bn_finalize(mean, var, weight, bias, eps)
        assert scale.dtype == shift.dtype == dtype
        ref_scale, ref_shift = ref.bn_finalize(mean, var, weight, bias, eps)
        assert_within("scale", scale, ref_scale, u * ref_scale.abs() + 4 * ua * ref_scale.abs())
        mag = (mean.double() * ref_scale).abs() + (bias.double().abs() if use_bias else 0)
        assert_within("shift", shift, ref_shift, u * ref_shift.abs() + 6 * ua * mag)
    grad_scale, grad_shift = vector(c, dtype), vector(c, dtype)
    ours = ops.bn_finalize_backward(grad_scale, grad_shift, mean, var, weight, 1e-5)
    expected = ref.bn_finalize_backward(grad_scale, grad_shift, mean, var, weight, 1e-5)
    w = weight.double().abs() if use_weight else 1
    invstd = 1 / (var.double() + 1e-5).sqrt()
    gs_mag = grad_scale.double().abs() + (grad_shift.double() * mean.double()).abs()
    mags = (grad_shift.double().abs() * w * invstd, gs_mag * w * invstd**3 / 2, gs_mag * invstd, 0)
    for name, a, b, mag in zip(
        ("grad_mean", "grad_var", "grad_weight", "grad_bias"), ours, expected, mags
    ):
        assert a.dtype == dtype, f"{name}: {a.dtype}"
        assert_within(name, a, b, u * b.abs() + 8 * ua * mag)


def test_bn_finalize_casts_inputs_to_mean_dtype():
    """float64 weight/bias/var, float32 mean: computed and returned in float32, as on the GPU."""
    mean = vector(7, torch.float32)
    var, weight, bias = (
        vector(7, torch.float64, 0.1, 2),
        vector(7, torch.float64),
        vector(7, torch.float64),
    )
    scale, shift = ops.bn_finalize(mean, var, weight, bias, 1e-5)
    assert scale.dtype == shift.dtype == torch.float32
    expected = ops.bn_finalize(mean, var.float(), weight.float(), bias.float(), 1e-5)
    assert torch.equal(scale, expected[0]) and torch.equal(shift, expected[1])
    # strided and expanded vectors read in place
    wide = torch.stack([var.float(), var.float()], 1).flatten()
    again = ops.bn_finalize(mean, wide[::2], torch.tensor(2.0).expand(7), None, 1e-5)
    assert torch.equal(
        again[0], ops.bn_finalize(mean, var.float(), torch.full((7,), 2.0), None, 1e-5)[0]
    )


@pytest.mark.parametrize(
    "rdt,sdt",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float64),
    ],
)
@pytest.mark.parametrize("strided", [False, True])
def test_bn_update_running_stats(rdt, sdt, strided):
    c = 63
    rm = vector(2 * c if strided else c, rdt)
    rv = vector(2 * c if strided else c, rdt, 0.5, 1.5)
    rm, rv = (rm[::2], rv[::2]) if strided else (rm, rv)
    mean, var = vector(c, sdt), vector(c, sdt, 0.5, 1.5)
    for count, momentum in ((98, 0.1), (2, 0.01), (100352, 1.0)):
        old_m, old_v = rm.clone(), rv.clone()
        # the batch statistics are first rounded to the running dtype, as mean.to(rm.dtype)
        exp_m, exp_v = ref.bn_update_running_stats(
            old_m, old_v, mean.to(rdt), var.to(rdt), count, momentum
        )
        ops.bn_update_running_stats_(rm, rv, mean, var, count, momentum)
        u, ua = UNIT[rdt], UNIT[acc_dtype(rdt)]
        assert_within(
            "running_mean", rm, exp_m, 2 * u * (exp_m.abs() + old_m.double().abs()) + 2 * ua
        )
        assert_within(
            "running_var", rv, exp_v, 2 * u * (exp_v.abs() + old_v.double().abs()) + 2 * ua
        )


def test_bn_update_running_stats_follows_batch_norm():
    bn = torch.nn.BatchNorm2d(5, momentum=0.3)
    y = make((4, 5, 6, 6), torch.float32, "nhwc", mean=2.0)
    bn(y)
    rm, rv = torch.zeros(5), torch.ones(5)
    mean, var = ops.bn_stats(y)
    ops.bn_update_running_stats_(rm, rv, mean, var, 4 * 36, 0.3)
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-6, atol=1e-7)


# ---- bad input: the CPU ops check what their CUDA twins check (csrc/checks.h) ----------


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: ops.bn_stats(torch.randn(2, 3, 4, 4).to(torch.float8_e4m3fn)),
            "y must be floating point",
        ),
        (
            lambda: ops.bn_act(
                torch.randn(2, 3, 4, 4).to(torch.float8_e5m2), None, None, None, True
            ),
            "y must be floating point",
        ),
        (
            lambda: ops.bn_stats(torch.ones(2, 3, 4, 4, dtype=torch.int32)),
            "y must be floating point",
        ),
        (
            lambda: ops.bn_stats_backward(
                torch.zeros(3), torch.zeros(2), torch.randn(2, 3, 4, 4), torch.zeros(3)
            ),
            r"grad_var must have shape \(3\)",
        ),
        (
            lambda: ops.bn_finalize(torch.zeros(3), torch.ones(3), torch.ones(2), None, 1e-5),
            r"weight must have shape",
        ),
        (
            lambda: ops.bn_finalize(
                torch.zeros(3), torch.ones(3), None, torch.ones(3, dtype=torch.int64), 1e-5
            ),
            "bias must be floating point",
        ),
        (
            lambda: ops.bn_finalize(
                torch.zeros(3, dtype=torch.int64), torch.ones(3), None, None, 1e-5
            ),
            "mean must be floating point",
        ),
        (
            lambda: ops.bn_finalize(torch.zeros(3), torch.ones(4), None, None, 1e-5),
            "mean and var must be 1-D",
        ),
        (
            lambda: ops.bn_finalize_backward(
                torch.zeros(2), torch.zeros(3), torch.zeros(3), torch.ones(3), None, 1e-5
            ),
            r"grad_scale must have shape",
        ),
        (
            lambda: ops.bn_finalize_backward(
                torch.zeros(3), torch.zeros(3), torch.zeros(3, 1), torch.ones(3), None, 1e-5
            ),
            "mean must be 1-D",
        ),
        (
            lambda: ops.bn_finalize_backward(
                torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(3), torch.ones(4), 1e-5
            ),
            "weight must have shape",
        ),
        (
            lambda: ops.bn_update_running_stats_(
                torch.zeros(3), torch.ones(2), torch.zeros(3), torch.ones(3), 8, 0.1
            ),
            "running_var must have shape",
        ),
        (
            lambda: ops.bn_update_running_stats_(
                torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(4), 8, 0.1
            ),
            "var must have shape",
        ),
        (
            lambda: ops.bn_update_running_stats_(
                torch.zeros(1, 3), torch.ones(3), torch.zeros(3), torch.ones(3), 8, 0.1
            ),
            "running_mean must be 1-D",
        ),
        (
            lambda: ops.bn_update_running_stats_(
                torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3), 1, 0.1
            ),
            "more than 1 value per channel",
        ),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_running_stats_that_overlap_themselves_are_rejected():
    with pytest.raises(RuntimeError, match="single memory location"):
        ops.bn_update_running_stats_(
            torch.zeros(1).expand(3), torch.ones(3), torch.zeros(3), torch.ones(3), 8, 0.1
        )


# ---- every instruction set the build contains ---------------------------------------------

_ISA_SCRIPT = r"""
import sys, torch, resfast
from tests.kernels.test_bn_ops_cpu import isa_cases
torch.manual_seed(0)
ops = torch.ops.resfast
results = [(name, args, getattr(ops, name)(*args)) for name, args in isa_cases()]
torch.save({"isa": ops.cpu_isa(), "results": results}, sys.argv[1])
"""


def isa_cases():
    """Calls of the vectorized ops covering both layouts, every dtype, tails and sums."""
    cases = []
    for dtype, layout, shape in itertools.product(
        DTYPES, ("nchw", "nhwc"), [(2, 63, 5, 5), (3, 16, 8, 8)]
    ):
        y, scale, shift, res, centre = act_inputs(shape, dtype, layout, True, True, centred=True)
        grad_out = masked_grad_out(make(shape, dtype, layout), y, scale, shift, res, dtype, centre)
        adt = acc_dtype(dtype)
        mask = [True, True, True, True]
        cases += [
            ("bn_stats", (y,)),
            ("bn_act", (y, scale, shift, res, True, centre)),
            ("bn_act_backward", (grad_out, y, scale, shift, res, True, mask, centre)),
            (
                "bn_stats_backward",
                (vector(shape[1], adt), vector(shape[1], adt), y, vector(shape[1], adt)),
            ),
            # the copy into the other layout (tiles of 16 with partial ones at both edges)
            ("relayout", (y, layout == "nchw")),
        ]
    return cases


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_each_instruction_set(capability, tmp_path):
    """ATEN_CPU_CAPABILITY picks the loops (as it picks ATen's): each set this
    build has, run in a fresh process, against the reference."""
    saved = run_with_capability(capability, _ISA_SCRIPT, tmp_path / "results.pt")
    for name, args, result in saved["results"]:
        if name == "bn_stats":
            check_stats(args[0], *result)
        elif name == "bn_act":
            y, scale, shift, res, relu, centre = args
            expected = ref.bn_act(*args)
            mag = magnitude(y, scale, shift, res, centre)
            bound = elementwise_bound(expected, mag, y.dtype, y.dtype)
            assert_within("out", result, expected, bound)
        elif name == "bn_act_backward":
            check_act_backward(*args[:7], ours=result, centre=args[7])
        elif name == "relayout":
            x, channels_last = args
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert result.is_contiguous(memory_format=fmt)
            assert torch.equal(result, x), f"relayout {x.dtype} {tuple(x.shape)}"
        else:
            grad_mean, grad_var, y, mean = args
            expected = ref.bn_stats_backward(*args)
            count = y.shape[0] * y.shape[2] * y.shape[3]
            mag = (
                (y.double() - mean.double().view(1, -1, 1, 1)).abs()
                * 2
                * grad_var.double().abs().view(1, -1, 1, 1)
                + grad_mean.double().abs().view(1, -1, 1, 1)
            ) / count
            assert_within(
                "grad_y", result, expected, elementwise_bound(expected, mag, y.dtype, y.dtype)
            )
