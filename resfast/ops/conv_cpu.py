"""The CPU kernel of ``resfast::conv2d_bn`` and of its backward: oneDNN's
convolution (the ``torch.ops.mkldnn`` ops Inductor's CPU backend emits) with
resfast's one-pass BatchNorm kernels around it.

Forward:
  * the prologue ``[relu]((x - centre) * scale + shift)`` is one pass of
    ``resfast::bn_act`` (oneDNN has no input-side elementwise fusion);
  * the convolution runs in x's layout (:func:`layout_of`): channels_last, the
    layout oneDNN's direct convolutions read without reordering (measured on
    ResNet-20/50 layers: 1.1-1.9x faster than NCHW, forward + backward; README,
    Performance), or NCHW for an NCHW x, as torch.nn's convolution does. Copying
    an NCHW x to channels_last and the result back (the op's layout until
    2026-11-30) cost more than the faster convolution saves for a single op or
    block: 0.54-0.98x torch.nn in NCHW. resfast's networks make their input
    channels_last once, at their entry, and run channels_last throughout. An
    NCHW convolution gets an unpacked weight: with a packed one,
    ``_convolution_pointwise`` makes the input channels_last itself;
  * with an epilogue (eval-mode BN) on a channels_last activation the conv, BN, residual
    add and ReLU are one oneDNN call, its weight prepacked into oneDNN's blocked format
    once per weight version (:mod:`resfast.ops.fold`). In float32 without a residual,
    the scale stays out of the weights: ``(conv(a, w) + b') * scale`` with
    ``b' = bias - centre + shift / scale`` as oneDNN's bias and a per-channel
    ``mul`` post-op (then ``relu``), which rounds as little as torch.nn's
    conv-then-BN (folding ``w * scale`` adds a rounding per weight: measured,
    1.5-2x torch's forward error through ResNet-50). With a residual (a
    ``binary add`` post-op: one binary post-op per call) or in bfloat16 the
    scale is folded into the weights;
  * NCHW_EVAL, the same epilogue on an NCHW activation: ATen fuses no binary post-op into an
    NCHW oneDNN convolution (``_convolution_pointwise.binary`` falls back to the convolution
    and separate ``mul_`` and ``relu_`` passes: 0.96-0.99x torch.nn's conv, BN and ReLU on
    issue 11's NCHW cases). So in float32 the op runs torch.nn's own convolution
    (``aten::convolution``, which also costs ~100 us less per call than
    ``_convolution_pointwise`` on an unpacked weight), then BN, the residual and ReLU as one
    ``bn_act`` pass: torch.nn's order of rounding, no folded weight, one pass fewer than
    torch.nn. A 1x1 stride-1 layer on a map of at least 16x16 and a batch of at least 8 runs
    its convolution as one GEMM per image instead (``matmul`` of the weight and the image's
    C_in x HW matrix, which an NCHW image is): oneDNN's NCHW convolution reorders its input
    and output to a blocked layout and back, the GEMM reads them in place, 0.99-2.36x as
    fast at 28x28-56x56 maps and batch 8 or more (``NCHW_GEMM_MIN_PIXELS``,
    ``NCHW_GEMM_MIN_BATCH``); in channels_last oneDNN's convolution stays faster than the
    GEMM. A 3x3 layer that Winograd takes copies the activation (and residual) to
    channels_last and the result back by ``resfast::relayout``, which Winograd's saving pays
    for. (Measured: README, Performance on the CPU, the eighth set.)
  * the statistics of y are one pass of ``resfast::bn_stats``.
Backward: the gradient of the statistics ``(grad_mean + 2 (y - mean)
grad_var) / count`` is added to grad_y in one pass of ``resfast::bn_act``
(centred on the mean, so no digits cancel), then ``aten::convolution_backward``
(oneDNN) gives the input's gradient and ``resfast::conv2d_weight_grad`` the weight's
(oneDNN's, or one GEMM where oneDNN's is slow: :mod:`resfast.ops.weight_grad`).

3x3 stride-1 convolutions on channels_last float32 activations of at least 16 channels
(in inference NCHW ones too, copied: NCHW_EVAL) run by Winograd's F(4x4, 3x3) instead: in
inference, and with ``RESFAST_CPU_WINOGRAD=all`` in training too, forward and input
gradient (:mod:`resfast.ops.winograd`, which says where and why; oneDNN then computes the
weight's gradient alone).

float64 (no oneDNN kernel) and float16 (no oneDNN kernel on CPUs without
AVX512-FP16) run the ATen reference of :mod:`resfast.ops.conv2d_bn`.
"""
from typing import Optional

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from . import fold as _fold
from . import winograd as _winograd
from .layout import to_memory_format

ops = torch.ops.resfast
_CL = torch.channels_last
# An NCHW 1x1 eval convolution by one GEMM per image (NCHW_EVAL) from this map size and
# batch on (python3 benchmarks/cpu_nchw_1x1.py, results/2026-12-01-cpu-2core-avx2-nchw-1x1.txt):
# 0.99-2.36x oneDNN's at 28x28-56x56, batch 8 (2.36x where oneDNN's 25 MB output page-faults
# in every call), 1.53x at 32x32, batch 128; 0.91-0.92x at 14x14 and 0.74-0.79x at 7x7 (each
# image's GEMM too narrow) and 0.93-1.28x at batch 1-2, where oneDNN's convolution stays.
# The C++ eval layer has the same two (csrc/cpu/conv2d_bn_eval.cpp).
NCHW_GEMM_MIN_PIXELS = 256
NCHW_GEMM_MIN_BATCH = 8


def runs_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether this problem has a oneDNN kernel here (else: the ATen reference)."""
    if x.numel() == 0:
        return False  # oneDNN rejects empty tensors
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def layout_of(x: Tensor) -> torch.memory_format:
    """The layout the op computes in for input x: NCHW for an x dense in NCHW only; for an
    x dense in both (C == 1 or H*W == 1) the one its strides suggest, which is what
    oneDNN reads it as and writes y in; else channels_last."""
    nchw, cl = x.is_contiguous(), x.is_contiguous(memory_format=_CL)
    if nchw and cl:
        return suggest_memory_format(x)
    return torch.contiguous_format if nchw else _CL


def convolution_backward(g: Tensor, a: Tensor, weight: Tensor, stride: int, padding: int,
                         dilation: int, output_mask) -> tuple:
    """``aten::convolution_backward`` (no bias, no groups), except that the weight gradient of
    a strided 1x1 CPU convolution over under 8 channels is taken at stride 1 over every
    stride-th pixel of ``a``, the same sum: oneDNN's AVX2 kernel for it returns wrong sums,
    hangs or corrupts the heap over channels_last input (torch 2.14.1,
    uxlfoundation/oneDNN#6035; the C++ twin is in conv2d_weight_grad_cpu)."""
    args = ([weight.shape[0]], [stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], 1)
    if not (a.device.type == "cpu" and output_mask[1] and tuple(weight.shape[2:]) == (1, 1)
            and stride > 1 and padding == 0 and a.shape[1] < 8):
        return torch.ops.aten.convolution_backward(g, a, weight, *args, list(output_mask))
    grad_a = grad_b = None
    if output_mask[0] or output_mask[2]:
        grad_a, _, grad_b = torch.ops.aten.convolution_backward(
            g, a, weight, *args, [output_mask[0], False, output_mask[2]])
    sub = a[:, :, ::stride, ::stride].contiguous(memory_format=layout_of(a))
    grad_w = torch.ops.aten.convolution_backward(
        g, sub, weight, [weight.shape[0]], [1, 1], [0, 0], [dilation] * 2, False, [0, 0], 1,
        [False, True, False])[1]
    return grad_a, grad_w, grad_b


def prologue(x: Tensor, in_scale, in_shift, in_centre, in_relu: bool, dtype) -> Tensor:
    """a = [relu]((x - in_centre) * in_scale + in_shift) in x's precision, then in
    the GEMM's dtype and layout: one pass of bn_act when there is a prologue; the
    dtype cast happens only under mixed precision (a float32 network input with
    bfloat16 weights)."""
    fmt = layout_of(x)
    if in_scale is not None or in_relu:
        x = ops.bn_act(x, in_scale, in_shift, None, in_relu, in_centre)
    return to_memory_format(x.to(dtype), fmt)


def _gemm_weight(weight: Tensor, fmt: torch.memory_format) -> Tensor:
    # an NCHW convolution with a channels_last weight would compute channels_last (ATen's rule)
    return weight if fmt == _CL else weight.contiguous()


def _pack(stride: int, padding: int, dilation: int, input_shape, fmt):
    def pack(w: Tensor) -> Tensor:
        if fmt != _CL:  # unpacked: see the module docstring
            return _gemm_weight(w, fmt)
        return torch.ops.mkldnn._reorder_convolution_weight(
            w.contiguous(), [padding, padding], [stride, stride], [dilation, dilation], 1,
            list(input_shape))
    return pack


def _conv(a: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
          relu: bool, stride: int, padding: int, dilation: int) -> Tensor:
    """[relu](conv(a, weight) + bias [+ residual]) in one oneDNN call."""
    args = ([padding, padding], [stride, stride], [dilation, dilation], 1)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(a, weight, bias, *args,
                                                       "relu" if relu else "none", [], "")
    if layout_of(a) != _CL and a.dtype != torch.float32:
        # NCHW bfloat16 has no fused add in ATen (its fallback's add_relu rejects bfloat16):
        # the add and ReLU as one pass of their own
        y = torch.ops.mkldnn._convolution_pointwise(a, weight, bias, *args, "none", [], "")
        return ops.bn_act(y, None, None, residual.to(y.dtype), relu)
    return torch.ops.mkldnn._convolution_pointwise.binary(
        a, to_memory_format(residual, layout_of(a)), weight, bias, *args, "add", 1.0,
        "relu" if relu else None, [], None)


def _scaled_epilogue(weight, bias, scale, shift, centre, pack):
    """(packed weight, b', scale as a (1, C, 1, 1) channels_last tensor) for
    ``(conv(a, w) + b') * scale``. Channels whose b' = bias - centre + shift / scale
    is not finite (scale 0: gamma = 0, as zero_init_residual sets it) take the
    folded form instead: weight * scale, the folded bias and a multiplier of 1."""
    dt = torch.float64  # b' in float64, rounded once
    s = scale.to(dt)
    base = -centre.to(dt) if centre is not None else torch.zeros_like(s)
    if bias is not None:
        base = base + bias.to(dt)
    b1 = base + shift.to(dt) / s
    keep = torch.isfinite(b1) & (s != 0)
    w = weight
    if not bool(keep.all()):
        folded = (weight.to(dt) * s.view(-1, 1, 1, 1)).to(weight.dtype)
        w = torch.where(keep.view(-1, 1, 1, 1), weight, folded)
        b1 = torch.where(keep, b1, base * s + shift.to(dt))
        s = torch.where(keep, s, torch.ones_like(s))
    mul = s.to(weight.dtype).view(1, -1, 1, 1).contiguous(memory_format=_CL)
    return pack(w), b1.to(weight.dtype), mul


def _nchw_1x1(a: Tensor, weight: Tensor) -> Tensor:
    """A 1x1 stride-1 convolution of an NCHW ``a`` as one GEMM per image,
    ``weight (C_out x C_in) @ a[n] (C_in x HW)``: NCHW_EVAL in the module docstring."""
    n, c, h, w = a.shape
    # detached: matmul picks its kernel by requires_grad too (below autograd it would
    # otherwise expand the weight per image into a batched GEMM)
    y = torch.matmul(weight.detach().reshape(weight.shape[0], c), a.detach().reshape(n, c, h * w))
    return y.view(n, weight.shape[0], h, w)


def forward(x, weight, bias, in_scale, in_shift, in_relu, stride, padding, stats, out_relu,
            in_centre, out_scale, out_shift, out_centre, residual, dilation):
    a = prologue(x, in_scale, in_shift, in_centre, in_relu, weight.dtype)
    fmt = layout_of(a)
    # packed for the full input shape, batch included: oneDNN picks its kernel (and so its
    # summation order) by shape, and a weight packed for another batch would give results
    # that depend on the calls before this one
    target = ("onednn", stride, padding, dilation, tuple(a.shape), fmt)
    pack = _pack(stride, padding, dilation, a.shape, fmt)
    if residual is not None:
        residual = residual.to(weight.dtype)
    if _winograd.allowed(stats) and _winograd.applies(a, weight, stride, padding, dilation,
                                                      any_layout=True):
        # an NCHW activation and residual are copied to channels_last and y back: Winograd's
        # saving pays for the copies (NCHW_EVAL in the module docstring)
        if residual is not None:
            residual = to_memory_format(residual, _CL)
        y = _winograd.conv(to_memory_format(a, _CL), weight, bias, out_scale, out_shift,
                           out_centre, residual, out_relu)
        y = to_memory_format(y, fmt)
    elif out_scale is not None and weight.dtype == torch.float32 and fmt != _CL:
        # NCHW_EVAL (module docstring): the convolution, then BN [+ residual] + ReLU in one
        # pass
        centre = out_centre
        if (tuple(weight.shape[2:]) == (1, 1) and stride == 1 and padding == 0
                and a.shape[0] >= NCHW_GEMM_MIN_BATCH
                and a.shape[2] * a.shape[3] >= NCHW_GEMM_MIN_PIXELS):
            y = _nchw_1x1(a, weight)
            if bias is not None:  # conv + bias - centre = conv - (centre - bias)
                centre = -bias if centre is None else centre - bias
        else:
            y = torch.ops.aten.convolution.default(
                a, _gemm_weight(weight, fmt), bias, [stride] * 2, [padding] * 2, [dilation] * 2,
                False, [0, 0], 1)
        if residual is not None:
            residual = to_memory_format(residual, layout_of(y))
        y = ops.bn_act(y, out_scale, out_shift, residual, out_relu, centre)
    elif out_scale is not None and residual is None and weight.dtype == torch.float32:
        w, b, mul = _fold.cached(
            weight, (bias, out_scale, out_shift, out_centre), ("scaled",) + target,
            lambda: _scaled_epilogue(weight, bias, out_scale, out_shift, out_centre, pack))
        y = torch.ops.mkldnn._convolution_pointwise.binary(
            a, mul, w, b, [padding, padding], [stride, stride], [dilation, dilation], 1, "mul",
            None, "relu" if out_relu else None, [], None)
    else:
        if out_scale is not None:
            w, b = _fold.fold(weight, bias, out_scale, out_shift, out_centre, target, pack)
        else:
            w, b = _gemm_weight(weight, fmt), bias
        y = _conv(a, w, None if b is None else b.to(weight.dtype), residual, out_relu, stride,
                  padding, dilation)
    if stats:
        mean, var = ops.bn_stats(y)
    else:
        mean, var = y.new_empty((0,), dtype=torch.float32), y.new_empty((0,), dtype=torch.float32)
    return y, mean, var


def stats_gradient(g: Optional[Tensor], grad_mean, grad_var, y: Tensor, mean: Tensor) -> Tensor:
    """g + (grad_mean + 2 (y - mean) grad_var) / count in one pass:
    bn_act(y, scale = 2 grad_var / count, shift = grad_mean / count, residual = g,
    centre = mean)."""
    count = y.numel() // y.shape[1]
    gm = torch.zeros_like(mean) if grad_mean is None else grad_mean
    gv = torch.zeros_like(mean) if grad_var is None else grad_var
    return ops.bn_act(y, gv * (2.0 / count), gm / count, g, False, mean)


def backward(grad_y, grad_mean, grad_var, x, weight, y, mean, in_scale, in_shift, in_relu,
             stride, padding, out_relu, output_mask, in_centre, dilation):
    g = grad_y
    if g is not None and out_relu:
        g = ops.bn_act_backward(g, y, None, None, None, True, [True, False, False, False])[0]
    if grad_mean is not None or grad_var is not None:
        g = stats_gradient(g, grad_mean, grad_var, y, mean)
    if g is None:
        g = torch.zeros_like(y)
    need_a = output_mask[0]
    # a is recomputed (one bn_act pass when there is a prologue): the op keeps only x. resfast's
    # layers do not pass a prologue on the CPU: they apply it as its own autograd node, which
    # keeps a (functional._conv_input), as torch.nn keeps its ReLU's output.
    a = prologue(x, in_scale, in_shift, in_centre, in_relu, weight.dtype)
    fmt = layout_of(a)
    g = to_memory_format(g.to(weight.dtype), fmt)
    # by Winograd the input's gradient is a convolution of its own; the weight's is
    # conv2d_weight_grad's (oneDNN's, or one GEMM where oneDNN's is slow)
    winograd = (_winograd.allowed(True, backward=True)
                and _winograd.applies(a, weight, stride, padding, dilation))
    mask = [need_a and not winograd, False, output_mask[2]]
    grad_a = grad_w = grad_b = None
    if any(mask):
        grad_a, _, grad_b = torch.ops.aten.convolution_backward(
            g, a, _gemm_weight(weight, fmt), [weight.shape[0]], [stride, stride],
            [padding, padding], [dilation, dilation], False, [0, 0], 1, mask)
    if winograd and need_a:
        grad_a = _winograd.input_gradient(g, weight)
    if output_mask[1]:
        grad_w = ops.conv2d_weight_grad(g, a, weight, stride, padding, dilation)
    return (grad_a.to(x.dtype) if need_a else x.new_empty((0,)),
            grad_w if output_mask[1] else x.new_empty((0,)),
            grad_b.to(weight.dtype) if output_mask[2] else x.new_empty((0,)))
