"""The CPU implementation of ``resfast::conv2d_bn`` (oneDNN, resfast/ops/conv_cpu.py)
against the op's slow ATen reference (``conv2d_bn_forward_reference``, straight
from the formula, no folding) in float64: the forward outputs and, through the
op's autograd, the gradient of every tensor argument, for each combination of
prologue (with and without a centre), epilogue (eval-mode BN, with and without
a centre), residual, output ReLU, statistics and bias; odd shapes, stride 2,
1x1 and 3x3, dilated 3x3s, both input layouts, float32 and bfloat16.

float32 is held to 2e-5 relative (different summation orders give ~1e-6);
bfloat16 to 2x the error of the reference computed in bfloat16 (the ATen
path: bf16 operands, float32 accumulation), with a floor for ReLU flips.
"""
import itertools

import pytest
import torch

from resfast.ops import conv_cpu
from resfast.ops.conv2d_bn import conv2d_bn_forward_reference
from tests.support.helpers import rel_err, to_layout

ops = torch.ops.resfast

# (N, C_in, C_out, H, W, K, stride[, dilation]); padding dilation * (K // 2)
SHAPES = [(2, 5, 4, 7, 9, 3, 1), (3, 16, 8, 8, 8, 1, 2), (1, 3, 8, 13, 13, 3, 2),
          (4, 1, 1, 5, 5, 3, 1), (2, 5, 4, 11, 9, 3, 1, 2), (1, 13, 8, 13, 12, 3, 2, 3)]
# (prologue, in_relu, epilogue, residual, out_relu, stats); prologue/epilogue: None, "scale"
# (scale and shift) or "centre" (scale, shift and centre)
FLAGS = [
    (None, False, None, False, False, True),        # a training conv (statistics)
    ("centre", True, None, False, False, True),     # ... after a pending BN + ReLU
    ("scale", False, None, False, True, False),     # prologue without centre, ReLU out
    (None, False, "centre", False, True, False),    # eval conv + BN + ReLU
    (None, False, "scale", False, False, False),    # eval conv + BN
    (None, False, "centre", True, True, False),     # eval: a block's last conv (+ residual)
    ("centre", True, "centre", True, True, False),  # every term at once
    (None, False, None, True, True, False),         # conv + residual + ReLU
]
LOW_FLOOR = 2e-2  # bfloat16: a few ReLU flips (see tests/support/helpers.py)


def _vec(c, lo=-1.0, hi=1.0):
    return torch.empty(c, dtype=torch.float64).uniform_(lo, hi)


def _args(shape, flags, layout, bias):
    n, cin, cout, h, w, k, stride = shape[:7]
    dilation = shape[7] if len(shape) > 7 else 1
    prologue, in_relu, epilogue, residual, out_relu, stats = flags
    pad, span = dilation * (k // 2), dilation * (k - 1) + 1
    ho, wo = (h + 2 * pad - span) // stride + 1, (w + 2 * pad - span) // stride + 1
    x = to_layout(torch.randn(n, cin, h, w, dtype=torch.float64) * 2 + 0.5, layout)
    weight = torch.randn(cout, cin, k, k, dtype=torch.float64) / (cin * k * k) ** 0.5
    args = dict(x=x, weight=weight,
                bias=_vec(cout) if bias else None, in_scale=None, in_shift=None, in_relu=in_relu,
                stride=stride, padding=pad, stats=stats, out_relu=out_relu, in_centre=None,
                out_scale=None, out_shift=None, out_centre=None, residual=None,
                dilation=dilation)
    if prologue:
        args.update(in_scale=_vec(cin, 0.5, 1.5), in_shift=_vec(cin))
        if prologue == "centre":
            args["in_centre"] = _vec(cin, -1, 1)
        if in_relu:  # no pre-activation within rounding of the ReLU's kink
            c = 0 if args["in_centre"] is None else args["in_centre"].view(1, -1, 1, 1)
            pre = (x - c) * args["in_scale"].view(1, -1, 1, 1) + args["in_shift"].view(1, -1, 1, 1)
            args["x"] = torch.where(pre.abs() < 1e-3, x + 2e-3, x)
    if epilogue:
        args.update(out_scale=_vec(cout, -1.5, 1.5), out_shift=_vec(cout))
        if epilogue == "centre":
            args["out_centre"] = _vec(cout)
    if residual:
        args["residual"] = to_layout(torch.randn(n, cout, ho, wo, dtype=torch.float64), layout)
    return args


def _cast(args, dtype):
    """The arguments as a caller gives them in ``dtype``: activations and weights in
    dtype, per-channel vectors in its statistics dtype (float32), leaves needing grad."""
    out = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            dt = dtype if v.dim() == 4 else (torch.float64 if dtype == torch.float64
                                             else torch.float32)
            v = v.detach().to(dt).requires_grad_()
        out[k] = v
    return out


def _output_gradient(args):
    """A fixed random gradient of y, zero where the float64 pre-activation of the
    output ReLU is within rounding of 0 (a float32 ReLU may decide either way)."""
    ref = {k: v.detach().double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    z = conv2d_bn_forward_reference(**dict(ref, out_relu=False))[0]
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    if args["out_relu"]:
        g = g * (z.abs() > 1e-4 * z.pow(2).mean().sqrt())
    return g


def _run(args, fn=None):
    """Outputs and the gradients of every tensor argument for a fixed output gradient."""
    outs = (fn or ops.conv2d_bn)(**args)
    y = outs[0]
    g = _output_gradient(args).to(y.dtype)
    loss = (y.double() * g.double()).sum()
    if args["stats"]:  # the statistics' gradients too
        loss = loss + outs[1].double().sum() * 0.3 + outs[2].double().sum() * 0.7
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
    grads = torch.autograd.grad(loss, [args[k] for k in names], allow_unused=True)
    return outs, dict(zip(names, grads))


def _grad_err(ours, ref, args):
    """||ours - ref|| relative to ||ref||, or to 1% of the output gradient's norm
    where ref is smaller: a per-channel sum of random-signed terms can cancel to
    far below its terms, and its rounding is relative to the terms."""
    scale = 1e-2 * _output_gradient(args).norm().item()
    ours, ref = ours.detach().double(), ref.detach().double()
    return (ours - ref).norm().item() / max(ref.norm().item(), scale)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("flags", FLAGS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_against_the_reference(shape, flags, layout, bias):
    torch.manual_seed(0)
    if flags[-1] and shape[0] * shape[3] * shape[4] // shape[6] ** 2 < 2:
        pytest.skip("statistics need more than one value per channel")
    args = _args(shape, flags, layout, bias)
    ours_args = _cast(args, torch.float32)
    assert conv_cpu.runs_onednn(ours_args["x"], ours_args["weight"])
    outs, grads = _run(ours_args)
    ref_outs, ref_grads = _run(_cast(args, torch.float64))
    # y in x's layout, as torch.nn's convolution gives it
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    assert outs[0].is_contiguous(memory_format=fmt)
    for name, a, b in zip(("y", "mean", "var"), outs, ref_outs):
        assert a.shape == b.shape, name
        if b.numel():
            assert rel_err(a, b) <= 2e-5, f"{name}: {rel_err(a, b):.3g}"
    for name, g in ref_grads.items():
        if g is None:
            assert grads[name] is None, name
            continue
        err = _grad_err(grads[name], g, args)
        assert err <= 2e-5, f"grad of {name}: relative error {err:.3g}"


@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("flags", FLAGS, ids=str)
def test_bfloat16_like_the_reference(flags, layout, dilation):
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bfloat16 convolution on this CPU")
    torch.manual_seed(0)
    args = _args((8, 16, 8, 9, 9, 3, 1, dilation), flags, layout, True)
    outs, grads = _run(_cast(args, torch.bfloat16))
    same_outs, same_grads = _run(_cast(args, torch.bfloat16), conv2d_bn_forward_reference)
    ref_outs, ref_grads = _run(_cast(args, torch.float64))
    for name, a, s, r in zip(("y", "mean", "var"), outs, same_outs, ref_outs):
        if r.numel():
            assert rel_err(a, r) <= max(2 * rel_err(s, r), 1e-2), name
    for name, r in ref_grads.items():
        if r is not None:
            err, same = _grad_err(grads[name], r, args), _grad_err(same_grads[name], r, args)
            assert err <= max(2 * same, LOW_FLOOR), f"grad of {name}: {err:.3g} (ATen {same:.3g})"


def test_float64_and_empty_batch_run_the_reference():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert not conv_cpu.runs_onednn(x, torch.randn(4, 3, 3, 3, dtype=torch.float64))
    assert not conv_cpu.runs_onednn(torch.randn(0, 3, 5, 5), torch.randn(4, 3, 3, 3))
    y, _, _ = ops.conv2d_bn(torch.randn(0, 3, 5, 5), torch.randn(4, 3, 3, 3), None, None, None,
                            False, 1, 1, False, True, None, torch.ones(4), torch.zeros(4))
    assert y.shape == (0, 4, 5, 5)


@pytest.mark.parametrize("scale", [0.0, 1e-38])
def test_epilogue_with_a_zero_or_tiny_scale(scale):
    """gamma = 0 (zero_init_residual) or so small that shift / scale overflows:
    those channels are folded instead (see conv_cpu._scaled_epilogue)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 4, 3, 3)
    out_scale, out_shift = torch.tensor([1.0, scale, 0.5]), torch.tensor([0.1, 0.7, -0.2])
    y, _, _ = ops.conv2d_bn(x, w, None, None, None, False, 1, 1, False, False, None, out_scale,
                            out_shift)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    ref = ref * out_scale.double().view(1, -1, 1, 1) + out_shift.double().view(1, -1, 1, 1)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_every_flag_combination_is_listed():
    """FLAGS covers each term of the op, alone or with the others."""
    terms = [set(i for i, v in enumerate(f) if v) for f in FLAGS]
    assert set(itertools.chain(*terms)) == set(range(6))
