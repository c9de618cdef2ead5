"""``resfast::conv2d_bn``: convolution with the BatchNorm fusions around it.

    a = [relu]((x - in_centre) * in_scale + in_shift)   prologue (BN-apply + ReLU of the
                                                        previous layer), padding applied to a
    z = conv2d(a, weight, stride, padding, dilation) + bias
    y = [relu]((z - out_centre) * out_scale + out_shift [+ residual])
                                                        epilogue (eval-mode BN, the residual
                                                        add and ReLU of a block's last conv)
    mean, var = batch statistics of y per channel (only with stats)

Every term is optional (centres default to 0; the ReLU of y is ``out_relu``).
BatchNorm passes its mean as the centre and gamma / std as the scale, so the
gradients of scale are reduced as ``sum(g * (v - mean))``, as BN's own backward
does: ``sum(g * v) - mean * sum(g)`` would cancel every digit when |mean| >> std.

The GEMM runs in the weight's dtype (y has it too); x may be float32 with
bfloat16/float16 weights (mixed precision), and the prologue then reads x at
full precision. The gradient of a is returned in x's dtype. The arguments are
checked here, once (:func:`check_conv_inputs`, in the op and its fake).

The epilogue is folded into the weights (``weight * out_scale``) once per weight
version (:mod:`resfast.ops.fold`), so the forward is one convolution. Its
backward reduces the gradients of out_scale from the normalized activation z,
which it recomputes (one convolution more, only when out_scale needs a gradient).

y is channels_last on the GPU; on the CPU it is in x's layout (NCHW for an NCHW x,
as torch.nn's convolution gives it; :func:`output_format`). On CUDA the op runs one
of two paths, chosen per problem by measurement (:mod:`resfast.ops.conv_path`): the
Triton implicit GEMM in :mod:`resfast.kernels.conv2d_bn` (prologue, bias, ReLU and
statistics inside the GEMM), or cuDNN's GEMM with the prologue written out by ``bn_act`` and the
statistics by ``bn_stats`` (CUDA C++); a residual is added after the GEMM by
``bn_act``. On the CPU it runs oneDNN (:mod:`resfast.ops.conv_cpu`); float64
stays on ATen on every device (the reference below, float32 accumulation
otherwise). Setting ``RESFAST_TRITON_ON_CPU=1`` together with
``TRITON_INTERPRET=1`` sends CPU tensors through the GPU paths (the Triton
kernels under the interpreter), which is how the tests check the GPU code on a
machine without one.

``resfast::conv2d_bn_backward`` takes the gradients of y (of z, when there is an
epilogue: the autograd formula applies its backward first), mean and var and
returns those of a (not x: the prologue's backward is ``resfast::bn_act_backward``),
weight and bias.
"""
import os
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.library import custom_op, register_autograd, register_fake

from ..dtypes import stats_dtype
from . import conv_cpu, conv_path
from . import fold as _fold
from .layout import to_memory_format, with_strides_of

ops = torch.ops.resfast
_CL = torch.channels_last


def _triton_on_cpu() -> bool:
    return os.environ.get("RESFAST_TRITON_ON_CPU", "0") == "1"


def _check_channel_vector(name: str, t: Optional[Tensor], n: int, x: Tensor,
                          dtype: Optional[torch.dtype] = None) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor of shape ({n},), got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} for x of dtype {x.dtype}, got {t.dtype}")


def check_conv_inputs(x, weight, bias, in_scale, in_shift, stride, padding, stats, out_relu,
                      in_centre=None, out_scale=None, out_shift=None, out_centre=None,
                      residual=None, dilation=1):
    """The arguments of ``resfast::conv2d_bn``, checked once, here, by the op and
    its fake (the Triton kernels check only what they themselves need). A
    ValueError names the argument. Per-channel vectors of the prologue are in the
    statistics dtype of x (:func:`resfast.dtypes.stats_dtype`), those of the
    epilogue in the statistics dtype of the weight."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError("x must be a 4-D tensor (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be (C_out, C_in, K, K), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} input channels but x has {x.shape[1]}")
    if weight.dtype != x.dtype and not (x.dtype == torch.float32
                                        and weight.dtype in (torch.bfloat16, torch.float16)):
        raise ValueError(f"weight dtype {weight.dtype} does not go with x dtype {x.dtype} (they "
                         "must match, or x may be float32 with bfloat16/float16 weights under "
                         "mixed precision)")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    _check_channel_vector("bias", bias, weight.shape[0], x)
    _check_channel_vector("in_scale", in_scale, x.shape[1], x, stats_dtype(x))
    _check_channel_vector("in_shift", in_shift, x.shape[1], x, stats_dtype(x))
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must be given together")
    _check_channel_vector("in_centre", in_centre, x.shape[1], x, stats_dtype(x))
    if in_centre is not None and in_scale is None:
        raise ValueError("in_centre needs in_scale and in_shift")
    cout = weight.shape[0]
    for name, t in (("out_scale", out_scale), ("out_shift", out_shift),
                    ("out_centre", out_centre)):
        _check_channel_vector(name, t, cout, x, stats_dtype(weight))
    if (out_scale is None) != (out_shift is None):
        raise ValueError("out_scale and out_shift must be given together")
    if out_centre is not None and out_scale is None:
        raise ValueError("out_centre needs out_scale and out_shift")
    if stats and (out_scale is not None or residual is not None):
        raise ValueError("stats cannot be combined with out_scale or residual (the statistics "
                         "are of the convolution's own output)")
    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if isinstance(v, bool) or not hasattr(type(v), "__index__"):  # int, SymInt, numpy ints
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if stride not in (1, 2) or padding < 0:
        raise ValueError(f"stride must be 1 or 2 and padding >= 0, got stride={stride}, "
                         f"padding={padding}")
    if stats and out_relu:
        raise ValueError("out_relu cannot be combined with stats (the statistics are of the "
                         "pre-ReLU output)")
    if dilation < 1:
        raise ValueError(f"dilation must be an integer >= 1, got {dilation!r}")
    span = dilation * (weight.shape[2] - 1) + 1  # the kernel's extent in x
    if x.shape[2] + 2 * padding < span or x.shape[3] + 2 * padding < span:
        k = weight.shape[2]
        kernel = f"{k}x{k}" + (f", dilation {dilation}: {span}x{span}" if dilation > 1 else "")
        raise ValueError(f"x spatial size {tuple(x.shape[2:])} is smaller than the kernel "
                         f"({kernel}) with padding {padding}")
    if residual is not None:
        out_shape = _out_shape(x, weight, stride, padding, dilation)
        if not isinstance(residual, Tensor) or tuple(residual.shape) != out_shape:
            got = tuple(residual.shape) if isinstance(residual, Tensor) else type(residual)
            raise ValueError(f"residual must have the output's shape {out_shape}, got {got}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
        if residual.dtype != weight.dtype:
            raise ValueError(f"residual must have the output's dtype {weight.dtype}, got "
                             f"{residual.dtype}")


def check_conv_backward_inputs(grad_y, grad_mean, grad_var, x, weight, y, mean, in_scale, in_shift,
                               stride, padding, out_relu, output_mask, in_centre=None,
                               dilation=1):
    """The arguments of ``resfast::conv2d_bn_backward``: those of the forward,
    then the gradients of (y, mean, var) and the saved y and mean."""
    check_conv_inputs(x, weight, None, in_scale, in_shift, stride, padding, False, out_relu,
                      in_centre, dilation=dilation)
    if len(output_mask) != 3:
        raise ValueError("output_mask must have 3 entries (grad_a, grad_weight, grad_bias), got "
                         f"{output_mask!r}")
    out_shape = _out_shape(x, weight, stride, padding, dilation)
    for name, t in (("grad_y", grad_y), ("y", y)):
        if t is None:
            continue
        if tuple(t.shape) != out_shape:
            raise ValueError(f"{name} must have shape {out_shape}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    # mean is read only with grad_var (the variance's gradient); without statistics it is empty
    for name, t in (("grad_mean", grad_mean), ("grad_var", grad_var),
                    ("mean", mean if grad_var is not None else None)):
        _check_channel_vector(name, t, weight.shape[0], x, stats_dtype(x))


def _out_shape(x, weight, stride, padding, dilation=1) -> tuple:
    span = dilation * (weight.shape[2] - 1) + 1
    oh = (x.shape[2] + 2 * padding - span) // stride + 1
    ow = (x.shape[3] + 2 * padding - span) // stride + 1
    return (x.shape[0], weight.shape[0], oh, ow)


def _prologue(x, in_scale, in_shift, in_relu, dtype, in_centre=None):
    """a = [relu]((x - in_centre) * in_scale + in_shift) in x's precision, rounded
    to the weight's dtype as the GEMM sees it."""
    if in_scale is None and not in_relu:
        return x.to(dtype)
    dt = stats_dtype(x)
    a = x.to(dt)
    if in_centre is not None:
        a = a - in_centre.to(dt).view(1, -1, 1, 1)
    if in_scale is not None:
        a = a * in_scale.to(dt).view(1, -1, 1, 1) + in_shift.to(dt).view(1, -1, 1, 1)
    if in_relu:
        a = torch.relu(a)
    return a.to(dtype)


def conv2d_bn_forward_reference(x, weight, bias, in_scale, in_shift, in_relu, stride, padding,
                                stats, out_relu, in_centre=None, out_scale=None, out_shift=None,
                                out_centre=None, residual=None, dilation=1):
    """The ATen implementation, straight from the formula (no folding): float64
    on every device, float16 on the CPU, and what the tests hold the fast paths to."""
    dt = stats_dtype(weight)
    a = _prologue(x, in_scale, in_shift, in_relu, weight.dtype, in_centre)
    y = torch.nn.functional.conv2d(a.to(dt), weight.to(dt), None if bias is None else bias.to(dt),
                                   stride=stride, padding=padding, dilation=dilation)
    if out_centre is not None:
        y = y - out_centre.to(dt).view(1, -1, 1, 1)
    if out_scale is not None:
        y = y * out_scale.to(dt).view(1, -1, 1, 1) + out_shift.to(dt).view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.to(weight.dtype).to(dt)
    if out_relu:
        y = torch.relu(y)
    y = y.to(weight.dtype)
    if stats:  # an empty batch gives NaN statistics, as torch.var_mean does
        # statistics of y as stored (rounded to its dtype), so that BN normalizes
        # exactly the values it reads back: mean(y - mean) = 0 holds in bf16 too.
        var, mean = torch.var_mean(y.to(dt), dim=(0, 2, 3), correction=0)
    else:
        mean, var = y.new_empty((0,), dtype=dt), y.new_empty((0,), dtype=dt)
    return _in_format(y, output_format(x)), mean, var


def conv2d_bn_backward_reference(grad_y, grad_mean, grad_var, x, weight, y, mean, in_scale,
                                 in_shift, in_relu, stride, padding, out_relu, output_mask,
                                 in_centre=None, dilation=1):
    dt = stats_dtype(weight)
    g = torch.zeros(y.shape, dtype=dt, device=y.device) if grad_y is None else grad_y.to(dt)
    if out_relu:
        g = g * (y > 0)
    if grad_mean is not None or grad_var is not None:
        count = y.numel() // y.shape[1]
        gm = torch.zeros_like(mean) if grad_mean is None else grad_mean
        gv = torch.zeros_like(mean) if grad_var is None else grad_var
        g = g + (gm.to(dt).view(1, -1, 1, 1)
                 + 2 * (y.to(dt) - mean.to(dt).view(1, -1, 1, 1))
                 * gv.to(dt).view(1, -1, 1, 1)) / count
    a = _prologue(x, in_scale, in_shift, in_relu, weight.dtype, in_centre)
    grad_a, grad_w, grad_b = conv_cpu.convolution_backward(
        g.to(weight.dtype).to(dt), a.to(dt), weight.to(dt), stride, padding, dilation,
        output_mask)
    return (_in_format(grad_a.to(x.dtype), output_format(x)) if output_mask[0]
            else x.new_empty((0,)),
            grad_w if output_mask[1] else x.new_empty((0,)),
            grad_b.to(weight.dtype) if output_mask[2] else x.new_empty((0,)))


# ---- the ops ------------------------------------------------------------------

def _triton_forward(x, weight, bias, in_scale, in_shift, in_relu, stride, padding, stats, out_relu,
                    dilation):
    from ..kernels.conv2d_bn import triton_conv2d_bn_forward

    if x.dtype != weight.dtype:
        # Mixed precision (float32 x, 16-bit weights) only meets a network's input, once: apply the
        # prologue at x's precision here rather than carry a second dtype through the kernels.
        x = _prologue(x, in_scale, in_shift, in_relu, weight.dtype)
        in_scale, in_shift, in_relu = None, None, False
    return triton_conv2d_bn_forward(x, weight, bias, in_scale, in_shift, in_relu, stride, padding,
                                    stats, out_relu, allow_tf32=_tf32(weight), dilation=dilation)


def _triton_backward(grad_y, grad_mean, grad_var, x, weight, y, mean, in_scale, in_shift, in_relu,
                     stride, padding, out_relu, output_mask, dilation):
    from ..kernels.conv2d_bn import triton_conv2d_bn_backward

    x_dtype = x.dtype
    if x.dtype != weight.dtype:  # see _triton_forward
        x = _prologue(x, in_scale, in_shift, in_relu, weight.dtype)
        in_scale, in_shift, in_relu = None, None, False
    grad_a, grad_w, grad_b = triton_conv2d_bn_backward(grad_y, grad_mean, grad_var, x, weight, y,
                                                       mean, in_scale, in_shift, in_relu, stride,
                                                       padding, out_relu, output_mask,
                                                       allow_tf32=_tf32(weight),
                                                       dilation=dilation)
    return grad_a.to(x_dtype), grad_w, grad_b


def _apply_prologue(x, in_scale, in_shift, in_relu, dtype):
    """a = [relu](x * in_scale + in_shift) written out (one pass of the CUDA
    BN-apply kernel), in the GEMM's dtype and channels_last."""
    if in_scale is not None or in_relu:
        x = ops.bn_act(x, in_scale, in_shift, None, in_relu)
    return x.to(dtype).contiguous(memory_format=_CL)


def _cudnn_forward(x, weight, bias, in_scale, in_shift, in_relu, stride, padding, stats, out_relu,
                   dilation):
    """The GEMM in cuDNN, the fusions around it as separate passes: the
    prologue written out, the statistics by ``resfast::bn_stats``."""
    a = _apply_prologue(x, in_scale, in_shift, in_relu, weight.dtype)
    y = torch.nn.functional.conv2d(a, weight, bias, stride=stride, padding=padding,
                                   dilation=dilation)
    del a
    if out_relu:
        y = torch.relu_(y)
    y = y.contiguous(memory_format=_CL)
    if stats:
        mean, var = ops.bn_stats(y)
    else:
        mean, var = y.new_empty((0,), dtype=stats_dtype(y)), y.new_empty((0,), dtype=stats_dtype(y))
    return y, mean, var


def _cudnn_backward(grad_y, grad_mean, grad_var, x, weight, y, mean, in_scale, in_shift, in_relu,
                    stride, padding, out_relu, output_mask, dilation):
    g = torch.zeros_like(y) if grad_y is None else grad_y.to(y.dtype)
    if out_relu:  # relu's own backward: 0 where y <= 0, the gradient elsewhere (NaN y too)
        g = torch.ops.aten.threshold_backward(g, y, 0)
    if grad_mean is not None or grad_var is not None:
        gm = torch.zeros_like(mean) if grad_mean is None else grad_mean
        gv = torch.zeros_like(mean) if grad_var is None else grad_var
        g = g + ops.bn_stats_backward(gm, gv, y, mean)
    a = _apply_prologue(x, in_scale, in_shift, in_relu, weight.dtype)  # recomputed, never stored
    grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
        g.contiguous(memory_format=_CL), a, weight, [weight.shape[0]], [stride, stride],
        [padding, padding], [dilation, dilation], False, [0, 0], 1, list(output_mask))
    return (grad_a.to(x.dtype).contiguous(memory_format=_CL) if output_mask[0]
            else x.new_empty((0,)),
            grad_w if output_mask[1] else x.new_empty((0,)),
            grad_b.to(weight.dtype) if output_mask[2] else x.new_empty((0,)))


def _like(weight, t):
    """t as ``torch.empty_like(weight)`` would hold it (dtype and strides: what the fake
    promises for grad_weight); cuDNN and oneDNN return it in the layout they chose for
    the GEMM, the reference in its computing dtype."""
    if t.dtype == weight.dtype and t.stride() == weight.stride():
        return t
    return torch.empty_like(weight).copy_(t)


def _tf32(weight) -> bool:
    """Whether a float32 GEMM may use TF32 (torch's setting for its own convolutions)."""
    return weight.dtype == torch.float32 and conv_path.allow_tf32()


# Told which implementation each call of the two ops took ("aten", "onednn", "triton",
# "cudnn"), while resfast bench records a step's kernel path; None otherwise.
path_recorder: Optional[Callable[[str, str], None]] = None


def _took(op: str, path: str) -> None:
    if path_recorder is not None:
        path_recorder(op, path)


def _on_reference(x, weight) -> bool:
    # float64 stays on ATen: tensor cores have no float64 path worth a kernel, and ATen keeps
    # float64 exact for gradcheck. On the CPU, oneDNN where it has a kernel for the dtype.
    if x.dtype == torch.float64:
        return True
    if x.device.type == "cpu" and not _triton_on_cpu():
        return not conv_cpu.runs_onednn(x, weight)
    return False


def _on_cpu(x) -> bool:
    return x.device.type == "cpu" and not _triton_on_cpu()


def output_format(x: Tensor) -> torch.memory_format:
    """The memory format of y (and of the gradient of x): x's own layout on the CPU
    (:func:`resfast.ops.conv_cpu.layout_of`: NCHW for an NCHW x, as torch.nn's
    convolution gives), channels_last on the GPU, where the kernels write nothing else."""
    return conv_cpu.layout_of(x) if _on_cpu(x) else _CL


def _in_format(t: Tensor, fmt: torch.memory_format) -> Tensor:
    """t dense in fmt with fmt's own strides, as the fakes promise (``contiguous`` leaves a
    tensor dense in both layouts with the strides it has)."""
    return with_strides_of(to_memory_format(t, fmt), fmt)


def writes_prologue_apart(x: Tensor) -> bool:
    """Whether the op applies its prologue to x as a pass of its own, before the GEMM
    (oneDNN and the ATen reference on the CPU), rather than inside it: callers that
    want the prologue's output kept for the backward can then apply it themselves."""
    return _on_cpu(x)


def _problem(x, weight, bias, in_scale, in_relu, stride, padding, stats, out_relu, dilation):
    """What decides which path is faster (and what it computes: TF32 or IEEE float32)."""
    return (x.device, tuple(x.shape), x.stride(), x.dtype, weight.dtype, tuple(weight.shape),
            weight.stride(), _tf32(weight),
            bias is not None, in_scale is not None, in_relu, stride, padding, stats, out_relu,
            dilation)


_FORWARD = {"triton": _triton_forward, "cudnn": _cudnn_forward}
_BACKWARD = {"triton": _triton_backward, "cudnn": _cudnn_backward}


def _gpu_shift(in_scale, in_shift, in_centre):
    """The GPU kernels' prologue is x * in_scale + in_shift: the centre goes into the shift
    (per channel, in the statistics dtype; its gradient is the autograd formula's, exact)."""
    return in_shift if in_centre is None else in_shift - in_centre * in_scale


def _gpu_forward(x, weight, bias, in_scale, in_shift, in_relu, stride, padding, stats, out_relu,
                 in_centre, out_scale, out_shift, out_centre, residual, dilation):
    """The Triton or cuDNN path (chosen per problem by measurement) on the folded
    weights; a residual is added, before the ReLU, by bn_act after the GEMM."""
    in_shift = _gpu_shift(in_scale, in_shift, in_centre)
    if out_scale is not None:
        weight, bias = _fold.fold(weight, bias, out_scale, out_shift, out_centre)
    relu_in_gemm = out_relu and residual is None
    args = (x, weight, bias, in_scale, in_shift, in_relu, stride, padding, stats, relu_in_gemm,
            dilation)
    key = ("forward",) + _problem(x, weight, bias, in_scale, in_relu, stride, padding, stats,
                                  relu_in_gemm, dilation)
    path = conv_path.choose(key, _FORWARD, args, x.device)
    _took("conv2d_bn", path)
    y, mean, var = _FORWARD[path](*args)
    if residual is not None:
        y = ops.bn_act(y, None, None, residual, out_relu)
    return y, mean, var


def _gpu_backward(grad_y, grad_mean, grad_var, x, weight, y, mean, in_scale, in_shift, in_relu,
                  stride, padding, out_relu, output_mask, in_centre, dilation):
    args = (grad_y, grad_mean, grad_var, x, weight, y, mean, in_scale,
            _gpu_shift(in_scale, in_shift, in_centre), in_relu, stride, padding, out_relu,
            output_mask, dilation)
    key = ("backward", grad_mean is not None or grad_var is not None, tuple(output_mask),
           None if grad_y is None else (grad_y.dtype, grad_y.stride())) + _problem(
        x, weight, None, in_scale, in_relu, stride, padding, False, out_relu, dilation)
    path = conv_path.choose(key, _BACKWARD, args, x.device)
    _took("conv2d_bn_backward", path)
    return _BACKWARD[path](*args)


def _dispatch(op: str, x: Tensor, weight: Tensor, args, reference, onednn, gpu):
    """Run one of the op's implementations: the ATen reference (float64, or a CPU problem
    oneDNN has no kernel for), oneDNN on the CPU, else the GPU paths (which record their own
    choice)."""
    # The op fixes its own precision (the weight's dtype, float32 accumulation): autocast, still
    # active inside a custom op, must not recast the ATen calls of its implementations. (The
    # guard is entered only when needed: it costs ~10 us a call.)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return _dispatch(op, x, weight, args, reference, onednn, gpu)
    if _on_reference(x, weight):
        _took(op, "aten")
        return reference(*args)
    if _on_cpu(x):
        _took(op, "onednn")
        return onednn(*args)
    return gpu(*args)


def forward_impl(x, weight, bias, in_scale, in_shift, in_relu, stride, padding, stats, out_relu,
                 in_centre=None, out_scale=None, out_shift=None, out_centre=None, residual=None,
                 dilation=1):
    """What ``resfast::conv2d_bn`` computes, below autograd: its checks and implementation
    (also called directly by :mod:`resfast.ops.eager`)."""
    check_conv_inputs(x, weight, bias, in_scale, in_shift, stride, padding, stats, out_relu,
                      in_centre, out_scale, out_shift, out_centre, residual, dilation)
    args = (x, weight, bias, in_scale, in_shift, in_relu, stride, padding, stats, out_relu,
            in_centre, out_scale, out_shift, out_centre, residual, dilation)
    return _dispatch("conv2d_bn", x, weight, args, conv2d_bn_forward_reference, conv_cpu.forward,
                     _gpu_forward)


def backward_impl(grad_y, grad_mean, grad_var, x, weight, y, mean, in_scale, in_shift, in_relu,
                  stride, padding, out_relu, output_mask, in_centre=None, dilation=1):
    """What ``resfast::conv2d_bn_backward`` computes (see :func:`forward_impl`)."""
    check_conv_backward_inputs(grad_y, grad_mean, grad_var, x, weight, y, mean, in_scale, in_shift,
                               stride, padding, out_relu, output_mask, in_centre, dilation)
    args = (grad_y, grad_mean, grad_var, x, weight, y, mean, in_scale, in_shift, in_relu, stride,
            padding, out_relu, output_mask, in_centre, dilation)
    grad_a, grad_w, grad_b = _dispatch("conv2d_bn_backward", x, weight, args,
                                       conv2d_bn_backward_reference, conv_cpu.backward,
                                       _gpu_backward)
    return grad_a, _like(weight, grad_w) if output_mask[1] else grad_w, grad_b


@custom_op("resfast::conv2d_bn", mutates_args=(), device_types=("cpu", "cuda"))
def conv2d_bn(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
              in_shift: Optional[Tensor], in_relu: bool, stride: int, padding: int, stats: bool,
              out_relu: bool, in_centre: Optional[Tensor] = None,
              out_scale: Optional[Tensor] = None, out_shift: Optional[Tensor] = None,
              out_centre: Optional[Tensor] = None,
              residual: Optional[Tensor] = None,
              dilation: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
    return forward_impl(x, weight, bias, in_scale, in_shift, in_relu, stride, padding, stats,
                        out_relu, in_centre, out_scale, out_shift, out_centre, residual, dilation)


@register_fake("resfast::conv2d_bn")
def _(x, weight, bias, in_scale, in_shift, in_relu, stride, padding, stats, out_relu,
      in_centre=None, out_scale=None, out_shift=None, out_centre=None, residual=None,
      dilation=1):
    check_conv_inputs(x, weight, bias, in_scale, in_shift, stride, padding, stats, out_relu,
                      in_centre, out_scale, out_shift, out_centre, residual, dilation)
    y = torch.empty(_out_shape(x, weight, stride, padding, dilation), dtype=weight.dtype,
                    device=x.device, memory_format=output_format(x))
    n = weight.shape[0] if stats else 0
    return (y, x.new_empty((n,), dtype=stats_dtype(weight)),
            x.new_empty((n,), dtype=stats_dtype(weight)))


@custom_op("resfast::conv2d_bn_backward", mutates_args=(), device_types=("cpu", "cuda"))
def conv2d_bn_backward(grad_y: Optional[Tensor], grad_mean: Optional[Tensor],
                       grad_var: Optional[Tensor], x: Tensor, weight: Tensor, y: Tensor,
                       mean: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                       in_relu: bool, stride: int, padding: int, out_relu: bool,
                       output_mask: List[bool],
                       in_centre: Optional[Tensor] = None,
                       dilation: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
    return backward_impl(grad_y, grad_mean, grad_var, x, weight, y, mean, in_scale, in_shift,
                         in_relu, stride, padding, out_relu, output_mask, in_centre, dilation)


@register_fake("resfast::conv2d_bn_backward")
def _(grad_y, grad_mean, grad_var, x, weight, y, mean, in_scale, in_shift, in_relu, stride, padding,
      out_relu, output_mask, in_centre=None, dilation=1):
    check_conv_backward_inputs(grad_y, grad_mean, grad_var, x, weight, y, mean, in_scale, in_shift,
                               stride, padding, out_relu, output_mask, in_centre, dilation)
    return (torch.empty_like(x, memory_format=output_format(x)) if output_mask[0]
            else x.new_empty((0,)),
            torch.empty_like(weight) if output_mask[1] else x.new_empty((0,)),
            weight.new_empty((weight.shape[0],)) if output_mask[2] else x.new_empty((0,)))


# ---- autograd -----------------------------------------------------------------

class _Conf(NamedTuple):
    in_relu: bool
    stride: int
    padding: int
    stats: bool
    out_relu: bool
    has_bias: bool
    has_residual: bool
    dilation: int
    x_nchw_leaf: bool  # an NCHW leaf on the CPU (see backward_formula)


def setup(ctx, inputs, output):
    (x, weight, bias, in_scale, in_shift, in_relu, stride, padding, stats, out_relu, in_centre,
     out_scale, out_shift, out_centre, residual, dilation) = inputs
    y, mean, _ = output
    x_nchw_leaf = (x.is_leaf and _on_cpu(x) and x.is_contiguous()
                   and not x.is_contiguous(memory_format=_CL))
    ctx.conf = _Conf(in_relu, stride, padding, stats, out_relu, bias is not None,
                     residual is not None, dilation, x_nchw_leaf)
    # Outputs nothing differentiates arrive as None, not zeros: statistics that reach no loss
    # (bn_batch_act takes their gradient into that of y) then cost no pass over y.
    ctx.set_materialize_grads(False)
    # bias and the prologue's vectors are kept for recomputing z (the epilogue's scale gradient)
    ctx.save_for_backward(x, weight, bias, y, mean, in_scale, in_shift, in_centre, out_scale,
                          out_shift, out_centre)


def _epilogue_backward(ctx, grad_y, needs):
    """The gradients of z (the conv's own output), out_scale, out_shift, out_centre
    and the residual, from that of y. The ReLU mask is the forward's (y > 0); the
    sums behind out_scale's gradient are reduced centred, from z recomputed."""
    x, weight, bias, y, _, in_scale, in_shift, in_centre, out_scale, out_shift, out_centre = (
        ctx.saved_tensors)
    conf = ctx.conf
    need_scale, need_shift, need_centre, need_res = needs
    g = grad_y
    if conf.out_relu:
        g = ops.bn_act_backward(g, y, None, None, None, True, [True, False, False, False])[0]
    grad_scale = grad_shift = grad_centre = None
    if out_scale is None:
        gz = g
    elif need_scale or need_shift or need_centre:
        z = ops.conv2d_bn(x, weight, bias, in_scale, in_shift, conf.in_relu, conf.stride,
                          conf.padding, False, False, in_centre, dilation=conf.dilation)[0]
        gz, grad_scale, sum_g, _ = ops.bn_act_backward(
            g, z, out_scale, out_shift, None, False,
            [True, need_scale, need_shift or need_centre, False], out_centre)
        grad_shift = sum_g if need_shift else None
        grad_centre = -out_scale * sum_g if need_centre else None
    else:  # g * out_scale: bn_act with a zero shift
        gz = ops.bn_act(g, out_scale, torch.zeros_like(out_scale), None, False)
    return gz, grad_scale, grad_shift, grad_centre, g if need_res else None


def _backward(ctx, grad_y, grad_mean, grad_var):
    return backward_formula(ctx, grad_y, grad_mean, grad_var, ops.conv2d_bn_backward)


def backward_formula(ctx, grad_y, grad_mean, grad_var, conv_backward):
    """The autograd formula of ``resfast::conv2d_bn``, with ``conv_backward`` the
    ``resfast::conv2d_bn_backward`` op or, in :mod:`resfast.ops.eager`, its
    implementation."""
    x, weight, bias, y, mean, in_scale, in_shift, in_centre, out_scale, _, _ = ctx.saved_tensors
    conf = ctx.conf
    # one entry per argument passed (the optional ones at the end may not be)
    needs = tuple(ctx.needs_input_grad) + (False,) * (16 - len(ctx.needs_input_grad))
    need_x, need_w, need_b, need_in_scale, need_in_shift = needs[:5]
    need_in_centre = needs[10]
    has_prologue = in_scale is not None or conf.in_relu
    epilogue = out_scale is not None or conf.has_residual
    grad_out = (None,) * 4
    if epilogue and grad_y is not None:
        grad_y, *grad_out = _epilogue_backward(ctx, grad_y, needs[11:15])
    need_a = need_x or (in_scale is not None and (need_in_scale or need_in_shift
                                                  or need_in_centre))
    if not conf.stats:
        grad_mean = grad_var = None
    grad_a, grad_w, grad_b = conv_backward(
        grad_y, grad_mean, grad_var, x, weight, y, mean, in_scale, in_shift, conf.in_relu,
        conf.stride, conf.padding, conf.out_relu and not epilogue,
        [need_a, need_w, need_b and conf.has_bias], in_centre, conf.dilation)
    grad_x = grad_scale = grad_shift = grad_centre = None
    if need_a and has_prologue:
        has_scale = in_scale is not None
        grad_x, grad_scale, grad_shift, _ = ops.bn_act_backward(
            grad_a, x, in_scale, in_shift, None, conf.in_relu,
            [need_x, need_in_scale and has_scale,
             (need_in_shift or need_in_centre) and has_scale, False], in_centre)
        if need_in_centre and in_centre is not None:
            grad_centre = -in_scale * grad_shift
    elif need_a:
        grad_x = grad_a
        if conf.x_nchw_leaf:
            # An NCHW leaf's gradient in NCHW, as torch.nn's convolution returns it: AccumulateGrad
            # would copy it there anyway, element by element (ATen's copy_, up to 5x slower than
            # relayout). On the CPU it is NCHW already (the op computed in x's layout).
            grad_x = to_memory_format(grad_a, torch.contiguous_format)
    return (grad_x if need_x else None, grad_w if need_w else None,
            grad_b if need_b and conf.has_bias else None,
            grad_scale if need_in_scale and in_scale is not None else None,
            grad_shift if need_in_shift and in_shift is not None else None,
            None, None, None, None, None,
            grad_centre, *grad_out, None)[:len(ctx.needs_input_grad)]


register_autograd("resfast::conv2d_bn", _backward, setup_context=setup)
