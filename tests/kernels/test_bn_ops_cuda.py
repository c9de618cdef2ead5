"""The CUDA implementations of the seven BatchNorm ops (csrc/cuda/*.cu) against
the CPU implementations (csrc/cpu/bn_ops.cpp) on copies of the same inputs.

Covers every op, both memory formats, float32/float64/bfloat16/float16, the
shapes of the model zoo plus awkward ones (C=3, C=63: the scalar path), every
output_mask of bn_act_backward, misaligned and non-dense inputs, empty batches,
and a batch large enough for the kernels' grid-stride loops.
"""
import itertools

import pytest
import torch

try:
    import resfast  # noqa: F401  (registers the ops)
except ImportError:  # the package above the ops may be mid-edit; the ops alone suffice
    import glob
    import os

    _here = os.path.dirname(os.path.abspath(__file__))
    torch.ops.load_library(glob.glob(os.path.join(_here, "..", "..", "resfast", "_C*.so"))[0])

pytestmark = pytest.mark.gpu

ops = torch.ops.resfast

SHAPES = [(2, 64, 7, 7), (1, 3, 13, 13), (3, 63, 5, 5), (4, 256, 14, 14)]
LAYOUTS = ["nchw", "nhwc"]
# (dtype, atol, rtol) of elementwise outputs stored in dtype: CPU and CUDA may
# round the last bit differently (an fma on the GPU, two roundings on the CPU).
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float64, 1e-12, 1e-10),
    (torch.bfloat16, 1e-2, 1.6e-2),
    (torch.float16, 1e-3, 2e-3),
]
# Relative tolerance of per-channel float32 (float64) reductions, measured
# against the sum of the absolute values of the terms (summation order differs).
SUM_RTOL = {torch.float32: 2e-5, torch.float64: 1e-12}
MASKS = list(itertools.product([False, True], repeat=4))


def stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def layout(x, fmt):
    return x.contiguous(memory_format=torch.channels_last if fmt == "nhwc"
                        else torch.contiguous_format)


def make(shape, dtype, fmt, lo=None, hi=None, device="cuda"):
    x = torch.randn(shape, dtype=torch.float64)
    if lo is not None:
        x = x.uniform_(lo, hi)
    return layout(x.to(dtype), fmt).to(device)


def cpu(x):
    return None if x is None else x.cpu()


def assert_same(name, ours, ref, atol, rtol):
    """CUDA output `ours` equals the CPU output `ref`: shape, dtype, strides, values."""
    assert ours.device.type == "cuda", f"{name}: on {ours.device}"
    assert ours.dtype == ref.dtype, f"{name}: dtype {ours.dtype} != {ref.dtype}"
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if ref.dim() == 4 and ref.numel() > 0:
        assert ours.stride() == ref.stride(), f"{name}: strides {ours.stride()} != {ref.stride()}"
    torch.testing.assert_close(ours.cpu(), ref, atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{name}: {m}")


def assert_sums(name, ours, ref, abs_sum, dtype):
    """Per-channel sums: |ours - ref| <= rtol * (sum of |terms| + 1)."""
    assert ours.device.type == "cuda" and ours.dtype == ref.dtype and ours.shape == ref.shape, (
        f"{name}: {ours.device} {ours.dtype} {tuple(ours.shape)} vs {ref.dtype} {tuple(ref.shape)}")
    if ref.numel() == 0:
        return
    err = (ours.cpu().double() - ref.double()).abs()
    bound = SUM_RTOL[stats_dtype(dtype)] * (abs_sum.double() + 1)
    bad = torch.nonzero(err > bound).flatten()
    assert bad.numel() == 0, (
        f"{name}: {bad.numel()} channels differ, first c={int(bad[0])}: cuda "
        f"{ours[bad[0]].item()!r} cpu {ref[bad[0]].item()!r} bound {bound[bad[0]].item():.3g}")


def channel_vectors(c, dtype, device="cuda"):
    sdt = stats_dtype(dtype)
    scale = torch.empty(c, dtype=sdt).uniform_(0.5, 1.5).to(device)
    shift = torch.empty(c, dtype=sdt).uniform_(-1, 1).to(device)
    return scale, shift


# bn_act(_backward)'s scale: none, scale and shift, or those with a centre
SCALE_KINDS = [None, "scale", "centre"]


def act_inputs(shape, dtype, fmt, scale_kind):
    """y, scale, shift, centre: with a centre, one in [-50, 50] per channel that y
    is spread around with std 1 (BatchNorm's large-mean case)."""
    y = make(shape, dtype, fmt)
    if scale_kind is None:
        return y, None, None, None
    scale, shift = channel_vectors(shape[1], dtype)
    if scale_kind == "scale":
        return y, scale, shift, None
    centre = torch.empty(shape[1], dtype=stats_dtype(dtype)).uniform_(-50, 50).to("cuda")
    y = layout((y.double() + centre.double().view(1, -1, 1, 1)).to(dtype), fmt)
    return y, scale, shift, centre


# ---- bn_act ------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("scale_kind,use_res,relu",
                         list(itertools.product(SCALE_KINDS, [False, True], [False, True])))
def test_bn_act(shape, fmt, dtype, atol, rtol, scale_kind, use_res, relu):
    y, scale, shift, centre = act_inputs(shape, dtype, fmt, scale_kind)
    res = make(shape, dtype, fmt) if use_res else None
    out = ops.bn_act(y, scale, shift, res, relu, centre)
    ref = ops.bn_act(cpu(y), cpu(scale), cpu(shift), cpu(res), relu, cpu(centre))
    assert_same("out", out, ref, atol, rtol)


# ---- bn_act_backward -----------------------------------------------------------

def _centred(y, centre):
    return y.double() - (0 if centre is None else centre.double().view(1, -1, 1, 1))


def _masked_grad_out(grad_out, y, scale, shift, res, centre=None):
    """grad_out with zeros where the pre-activation is within rounding of 0, so a
    ReLU mask that the two implementations round differently cannot matter."""
    z = _centred(y, centre)
    mag = z.abs()
    if scale is not None:
        s, b = scale.double().view(1, -1, 1, 1), shift.double().view(1, -1, 1, 1)
        z = z * s + b
        mag = mag * s.abs() + b.abs()
    if res is not None:
        z = z + res.double()
        mag = mag + res.double().abs()
    near = z.abs() <= 1e-5 * (mag + 1)
    return grad_out.masked_fill(near, 0)


def _check_bn_act_backward(y, scale, shift, res, relu, dtype, atol, rtol, masks=MASKS,
                           centre=None):
    grad_out = torch.randn(y.shape, dtype=torch.float64, device=y.device).to(dtype)
    grad_out = layout(grad_out,
                      "nhwc" if y.is_contiguous(memory_format=torch.channels_last) else "nchw")
    if relu:
        grad_out = _masked_grad_out(grad_out, y, scale, shift, res, centre)
    args_cpu = (cpu(grad_out), cpu(y), cpu(scale), cpu(shift), cpu(res), relu)
    for mask in masks:
        ours = ops.bn_act_backward(grad_out, y, scale, shift, res, relu, list(mask), centre)
        ref = ops.bn_act_backward(*args_cpu, list(mask), cpu(centre))
        tag = f"mask={mask}"
        assert_same(f"grad_y {tag}", ours[0], ref[0], atol, rtol)
        assert_same(f"grad_residual {tag}", ours[3], ref[3], atol, rtol)
        if scale is not None and (mask[1] or mask[2]):
            g = grad_out.cpu().double()
            if relu:
                z = (_centred(cpu(y), cpu(centre)) * scale.cpu().double().view(1, -1, 1, 1)
                     + shift.cpu().double().view(1, -1, 1, 1))
                if res is not None:
                    z = z + res.cpu().double()
                g = g * (z > 0)
            abs_gy = (g * _centred(cpu(y), cpu(centre))).abs().sum((0, 2, 3))
            abs_g = g.abs().sum((0, 2, 3))
        else:
            abs_gy = abs_g = None
        for i, name, abs_sum in ((1, "grad_scale", abs_gy), (2, "grad_shift", abs_g)):
            if ref[i].numel() == 0:
                empty = ours[i].shape == (0,) and ours[i].dtype == ref[i].dtype
                assert empty and ours[i].device.type == "cuda", (
                    f"{name} {tag}: expected an empty {ref[i].dtype} tensor, got {ours[i].dtype} "
                    f"{tuple(ours[i].shape)}")
            else:
                assert_sums(f"{name} {tag}", ours[i], ref[i], abs_sum, dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("scale_kind,use_res,relu",
                         list(itertools.product(SCALE_KINDS, [False, True], [False, True])))
def test_bn_act_backward(shape, fmt, dtype, atol, rtol, scale_kind, use_res, relu):
    y, scale, shift, centre = act_inputs(shape, dtype, fmt, scale_kind)
    res = make(shape, dtype, fmt) if use_res else None
    _check_bn_act_backward(y, scale, shift, res, relu, dtype, atol, rtol, centre=centre)


# ---- bn_stats / bn_stats_backward --------------------------------------------

def _check_stats(y, dtype, var_rtol=None):
    mean, var = ops.bn_stats(y)
    ref_mean, ref_var = ops.bn_stats(cpu(y))
    sdt = stats_dtype(dtype)
    tol = 1e-10 if sdt == torch.float64 else 1e-5
    spread = ref_var.sqrt() + 1e-30
    assert mean.dtype == ref_mean.dtype == sdt and var.dtype == ref_var.dtype == sdt
    assert mean.device.type == var.device.type == "cuda"
    # mean to within rounding of its magnitude and spread; var relative
    err_mean = (mean.cpu() - ref_mean).abs()
    bad = err_mean > tol * (ref_mean.abs() + spread)
    assert not bad.any(), (f"mean differs at c={torch.nonzero(bad).flatten().tolist()[:5]}: "
                           f"{mean.cpu()[bad][:5]} vs {ref_mean[bad][:5]}")
    torch.testing.assert_close(var.cpu(), ref_var, atol=1e-12, rtol=var_rtol or 10 * tol,
                               msg=lambda m: f"var: {m}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_bn_stats(shape, fmt, dtype, atol, rtol):
    y = (make(shape, dtype, fmt).double() * 2 + 3).to(dtype)
    _check_stats(y, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bn_stats_large_mean(dtype):
    # Welford: a mean 1000x the spread loses nothing (E[y^2]-E[y]^2 would lose all in float32).
    y = (torch.randn(8, 16, 20, 20, dtype=torch.float64) + 1000).to(dtype)
    y = layout(y, "nhwc").cuda()
    mean, var = ops.bn_stats(y)
    ref_var, ref_mean = torch.var_mean(y.cpu().double(), (0, 2, 3), correction=0)
    torch.testing.assert_close(mean.cpu().double(), ref_mean, atol=0,
                               rtol=1e-6 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(var.cpu().double(), ref_var, atol=0,
                               rtol=1e-3 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_bn_stats_backward(shape, fmt, dtype, atol, rtol):
    y = make(shape, dtype, fmt)
    sdt = stats_dtype(dtype)
    c = shape[1]
    grad_mean, grad_var, mean = (torch.randn(c, dtype=sdt, device="cuda") for _ in range(3))
    out = ops.bn_stats_backward(grad_mean, grad_var, y, mean)
    ref = ops.bn_stats_backward(cpu(grad_mean), cpu(grad_var), cpu(y), cpu(mean))
    # values are O(1 / count): scale atol accordingly
    count = shape[0] * shape[2] * shape[3]
    assert_same("grad_y", out, ref, atol / count * 10, rtol)


# ---- bn_finalize / bn_finalize_backward ----------------------------------------

@pytest.mark.parametrize("c", [64, 3, 63, 256])
@pytest.mark.parametrize("sdt", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_weight,use_bias", list(itertools.product([False, True], repeat=2)))
def test_bn_finalize(c, sdt, use_weight, use_bias):
    tol = dict(atol=1e-5, rtol=1e-5) if sdt == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    mean = torch.randn(c, dtype=sdt, device="cuda")
    var = torch.rand(c, dtype=sdt, device="cuda") + 0.1
    weight = torch.randn(c, dtype=sdt, device="cuda") if use_weight else None
    bias = torch.randn(c, dtype=sdt, device="cuda") if use_bias else None
    for eps in (1e-5, 1e-3):
        ours = ops.bn_finalize(mean, var, weight, bias, eps)
        ref = ops.bn_finalize(cpu(mean), cpu(var), cpu(weight), cpu(bias), eps)
        for name, a, b in zip(("scale", "shift"), ours, ref):
            assert_same(name, a, b, **tol)

    grad_scale, grad_shift = (torch.randn(c, dtype=sdt, device="cuda"),
                              torch.randn(c, dtype=sdt, device="cuda"))
    ours = ops.bn_finalize_backward(grad_scale, grad_shift, mean, var, weight, 1e-5)
    ref = ops.bn_finalize_backward(cpu(grad_scale), cpu(grad_shift), cpu(mean), cpu(var),
                                   cpu(weight), 1e-5)
    for name, a, b in zip(("grad_mean", "grad_var", "grad_weight", "grad_bias"), ours, ref):
        assert_same(name, a, b, **tol)


def test_bn_finalize_casts_parameters():
    # float64 weight/bias with float32 statistics: cast like the CPU code.
    c = 63
    mean, var = torch.randn(c, device="cuda"), torch.rand(c, device="cuda") + 0.1
    weight, bias = torch.randn(c, dtype=torch.float64, device="cuda"), torch.randn(c,
                                                                                   dtype=torch.float64,
                                                                                   device="cuda")
    ours = ops.bn_finalize(mean, var, weight, bias, 1e-5)
    ref = ops.bn_finalize(cpu(mean), cpu(var), cpu(weight), cpu(bias), 1e-5)
    for name, a, b in zip(("scale", "shift"), ours, ref):
        assert_same(name, a, b, atol=1e-5, rtol=1e-5)


# ---- bn_update_running_stats_ ----------------------------------------------------

@pytest.mark.parametrize("c", [64, 3, 63, 256])
@pytest.mark.parametrize("rdt,sdt", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                     (torch.float16, torch.float32),
                                     (torch.bfloat16, torch.float32),
                                     (torch.float32, torch.float64)])
@pytest.mark.parametrize("strided", [False, True])
def test_bn_update_running_stats(c, rdt, sdt, strided):
    tol = {torch.float32: 1e-6, torch.float64: 1e-13, torch.float16: 1e-3,
           torch.bfloat16: 8e-3}[rdt]

    def running():
        rm = torch.randn(2 * c if strided else c, dtype=rdt, device="cuda")
        rv = (torch.rand(2 * c if strided else c, dtype=torch.float64) + 0.5).to(rdt).cuda()
        return (rm[::2], rv[::2]) if strided else (rm, rv)

    rm, rv = running()
    rm_cpu, rv_cpu = rm.cpu(), rv.cpu()
    mean, var = (torch.randn(c, dtype=sdt, device="cuda"),
                 torch.rand(c, dtype=sdt, device="cuda") + 0.5)
    for count, momentum in ((98, 0.1), (2, 0.01), (100352, 1.0)):
        ops.bn_update_running_stats_(rm, rv, mean, var, count, momentum)
        ops.bn_update_running_stats_(rm_cpu, rv_cpu, cpu(mean), cpu(var), count, momentum)
        torch.testing.assert_close(rm.cpu(), rm_cpu, atol=tol, rtol=tol,
                                   msg=lambda m: f"running_mean: {m}")
        torch.testing.assert_close(rv.cpu(), rv_cpu, atol=tol, rtol=tol,
                                   msg=lambda m: f"running_var: {m}")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.bn_update_running_stats_(rm, rv, mean, var, 1, 0.1)


# ---- layouts and sizes the kernels treat specially ----------------------------

def _misaligned(shape, dtype, fmt):
    """A tensor whose data starts one element past a 16-byte boundary: the scalar path."""
    n = torch.Size(shape).numel()
    base = torch.randn(n + 1, dtype=torch.float64).to(dtype).cuda()
    if fmt == "nhwc":
        N, C, H, W = shape
        t = base[1:].view(N, H, W, C).permute(0, 3, 1, 2)
    else:
        t = base[1:].view(shape)
    assert t.data_ptr() % 16 != 0
    return t


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_misaligned_inputs(fmt, dtype, atol, rtol):
    shape = (2, 64, 7, 7)
    y, res = _misaligned(shape, dtype, fmt), _misaligned(shape, dtype, fmt)
    scale, shift = channel_vectors(64, dtype)
    out = ops.bn_act(y, scale, shift, res, True)
    assert_same("out", out, ops.bn_act(cpu(y), cpu(scale), cpu(shift), cpu(res), True), atol, rtol)
    _check_bn_act_backward(y, scale, shift, res, True, dtype, atol, rtol,
                           masks=[(True, True, True, True)])
    _check_stats(y, dtype)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_mixed_and_non_dense_layouts(dtype, atol, rtol):
    # y channels_last, residual NCHW, grad_out a non-dense slice.
    shape = (2, 63, 9, 9)
    y = make(shape, dtype, "nhwc")
    res = make(shape, dtype, "nchw")
    scale, shift = channel_vectors(63, dtype)
    out = ops.bn_act(y, scale, shift, res, True)
    assert_same("out", out, ops.bn_act(cpu(y), cpu(scale), cpu(shift), cpu(res), True), atol, rtol)
    wide = make((2, 63, 9, 18), dtype, "nhwc")
    y_slice = wide[..., ::2]
    _check_stats(y_slice, dtype)
    out = ops.bn_act(y_slice, scale, shift, None, False)
    assert_same("out (slice)", out, ops.bn_act(cpu(y_slice), cpu(scale), cpu(shift), None, False),
                atol, rtol)
    _check_bn_act_backward(y_slice, scale, shift, res, True, dtype, atol, rtol,
                           masks=[(True, True, True, True)])


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_large_batch_grid_stride(fmt, dtype, atol, rtol):
    # More rows than one wave of blocks covers: the grid-stride loops and many partials.
    shape = (16, 64, 56, 56)
    y = make(shape, dtype, fmt)
    scale, shift = channel_vectors(64, dtype)
    res = make(shape, dtype, fmt)
    _check_stats(y, dtype)
    out = ops.bn_act(y, scale, shift, res, True)
    assert_same("out", out, ops.bn_act(cpu(y), cpu(scale), cpu(shift), cpu(res), True), atol, rtol)
    _check_bn_act_backward(y, scale, shift, res, True, dtype, atol, rtol,
                           masks=[(True, True, True, True), (False, True, True, False)])


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_empty_batch(fmt, dtype, atol, rtol):
    shape = (0, 8, 5, 5)
    y = make(shape, dtype, fmt)
    scale, shift = channel_vectors(8, dtype)
    assert_same("out", ops.bn_act(y, scale, shift, y, True),
                ops.bn_act(cpu(y), cpu(scale), cpu(shift), cpu(y), True), atol, rtol)
    for mask in MASKS:
        ours = ops.bn_act_backward(y, y, scale, shift, None, True, list(mask))
        ref = ops.bn_act_backward(cpu(y), cpu(y), cpu(scale), cpu(shift), None, True, list(mask))
        for a, b in zip(ours, ref):
            assert a.device.type == "cuda" and a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a.cpu(), b)  # the sums over no rows are zeros
    with pytest.raises(ValueError, match="at least one element per channel"):
        ops.bn_stats(y)
    sdt = stats_dtype(dtype)
    v = torch.zeros(8, dtype=sdt, device="cuda")
    g = ops.bn_stats_backward(v, v, y, v)
    assert g.shape == y.shape and g.dtype == dtype and g.device.type == "cuda"


def test_bad_inputs_raise_like_cpu():
    y = torch.randn(2, 4, 3, 3, device="cuda")
    scale, shift = torch.ones(4, device="cuda"), torch.zeros(4, device="cuda")
    for dev_args, match in (
        ((y[0], scale, shift, None, True), "y must be 4-D"),
        ((y, scale, None, None, True), "scale and shift must be given together"),
        ((y, scale[:3], shift, None, True), "scale must have shape"),
        ((y, scale, shift, y.double(), True), "residual must have the dtype of y"),
        ((y, scale, shift, y[:1], True), "residual must have the shape of y"),
    ):
        cpu_args = tuple(cpu(a) if isinstance(a, torch.Tensor) else a for a in dev_args)
        with pytest.raises(ValueError, match=match):
            ops.bn_act(*cpu_args)
        with pytest.raises(ValueError, match=match):
            ops.bn_act(*dev_args)
    with pytest.raises(ValueError, match="grad_out must have the dtype of y"):
        ops.bn_act_backward(y.half(), y, scale, shift, None, True, [True, True, True, True])
    with pytest.raises(ValueError, match="must be on"):
        ops.bn_act(y, scale.cpu(), shift.cpu(), None, True)


# ---- NaN and Inf as torch's ReLU ----------------------------------------------------------

SPECIALS = torch.tensor([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 2.0])


def _cycled(values, shape):
    n = torch.Size(shape).numel()
    return values.repeat(n // values.numel() + 1)[:n].view(shape)


@pytest.mark.parametrize("kernels", ["cuda", "aten"])
def test_relu_nan_and_inf_as_torch(monkeypatch, kernels):
    """relu(NaN) is NaN; the backward is torch's threshold_backward: 0 where the activation is
    <= 0 whatever the gradient (NaN, Inf), the gradient where it is NaN. Scale 2, shift 0 and
    a zero residual keep every product exact."""
    if kernels == "aten":
        monkeypatch.setenv("RESFAST_CUDA_KERNELS", "aten")
    shape = (2, 8, 3, 3)
    y = layout(_cycled(SPECIALS, shape), "nhwc").cuda()
    grad_out = layout(_cycled(torch.tensor([1.0, float("nan"), float("inf"), -3.0, 0.5]), shape),
                      "nhwc").cuda()
    scale = torch.full((8,), 2.0, device="cuda")
    shift = torch.zeros(8, device="cuda")
    res = torch.zeros_like(y)
    out = ops.bn_act(y, scale, shift, res, True)
    act = torch.relu(y * 2)
    torch.testing.assert_close(out, act, equal_nan=True, rtol=0, atol=0)
    grad_y, _, _, grad_res = ops.bn_act_backward(grad_out, y, scale, shift, res, True,
                                                 [True, False, False, True])
    want = torch.ops.aten.threshold_backward(grad_out, act, 0)
    torch.testing.assert_close(grad_res, want, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(grad_y, want * 2, equal_nan=True, rtol=0, atol=0)


# ---- bn_stats_backward keeps y's layout -------------------------------------------------

def test_stats_backward_keeps_a_permuted_layout():
    """A dense y in neither NCHW nor NHWC order: grad_y gets y's strides (empty_like), as on
    the CPU and in the fake."""
    y = torch.randn(2, 7, 5, 3, device="cuda").permute(0, 2, 1, 3)  # memory order N, H, C, W
    mean, grad_mean, grad_var = (torch.randn(5, device="cuda") for _ in range(3))
    out = ops.bn_stats_backward(grad_mean, grad_var, y, mean)
    ref = ops.bn_stats_backward(cpu(grad_mean), cpu(grad_var), cpu(y), cpu(mean))
    assert out.stride() == y.stride() == ref.stride()
    torch.testing.assert_close(out.cpu(), ref, atol=1e-6, rtol=1e-5)


# ---- the ATen fallback (a GPU the build has no kernel image for) ------------------------

def _ran_ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype,atol,rtol", [DTYPES[0], DTYPES[2]])
def test_aten_fallback(monkeypatch, fmt, dtype, atol, rtol):
    """RESFAST_CUDA_KERNELS=aten runs the ops as the ATen compositions a GPU without a kernel
    image gets: checked against the CPU ops as the kernels are, every op and flag."""
    shape = (3, 63, 5, 5)
    y = make(shape, dtype, fmt)
    assert "aten::var_mean" not in _ran_ops(lambda: ops.bn_stats(y))
    monkeypatch.setenv("RESFAST_CUDA_KERNELS", "aten")
    assert "aten::var_mean" in _ran_ops(lambda: ops.bn_stats(y))
    for scale_kind, use_res, relu in itertools.product(SCALE_KINDS, [False, True], [False, True]):
        test_bn_act(shape, fmt, dtype, atol, rtol, scale_kind, use_res, relu)
        test_bn_act_backward(shape, fmt, dtype, atol, rtol, scale_kind, use_res, relu)
    test_bn_stats(shape, fmt, dtype, atol, rtol)
    test_bn_stats_backward(shape, fmt, dtype, atol, rtol)
    test_empty_batch(fmt, dtype, atol, rtol)
    sdt = stats_dtype(dtype)
    for use_weight, use_bias in itertools.product([False, True], repeat=2):
        test_bn_finalize(63, sdt, use_weight, use_bias)
    test_bn_update_running_stats(63, dtype, sdt, False)


def test_kernels_run_on_this_gpu():
    """This build has an image for the GPU at hand (its arch is among the default archs, or
    the build took the visible GPU's): no fallback, no warning."""
    import warnings

    y = make((2, 8, 4, 4), torch.float32, "nhwc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.bn_act(y, None, None, None, True)
    assert "aten::relu" not in _ran_ops(lambda: ops.bn_act(y, None, None, None, True))
