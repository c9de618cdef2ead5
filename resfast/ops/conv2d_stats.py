"""``resfast::conv2d_stats``: the CPU training layer's convolution, in C++.

``conv2d_stats(x, weight, bias, stride, padding, dilation) -> (y, mean, var)`` is
``conv2d_bn(x, weight, bias, stats=True)`` without prologue or epilogue: oneDNN's
convolution (in x's layout, as conv2d_bn on the CPU) and the batch statistics of its
output, computed by the same calls as :mod:`resfast.ops.conv_cpu` (so bitwise equal to
``conv2d_bn``). Its CPU kernel,
its backward op ``conv2d_stats_backward`` and its autograd formula are C++
(csrc/cpu/conv2d_stats.cpp): ``resfast.ops.eager`` calls it for every training conv on the
CPU, where the Python formula of ``conv2d_bn`` cost ~0.27 ms of host time per layer. CPU
only, float32 or bfloat16 weights; the fakes below let torch.compile and opcheck trace it.
"""
import torch
from torch.library import register_fake

from ..dtypes import stats_dtype
from .conv2d_bn import _out_shape, check_conv_inputs
from .conv_cpu import layout_of


@register_fake("resfast::conv2d_stats")
def _(x, weight, bias, stride, padding, dilation):
    check_conv_inputs(x, weight, bias, None, None, stride, padding, True, False,
                      dilation=dilation)
    shape = _out_shape(x, weight, stride, padding, dilation)
    y = torch.empty(shape, dtype=weight.dtype, device=x.device, memory_format=layout_of(x))
    channels = (weight.shape[0],)
    dt = stats_dtype(y)
    return y, x.new_empty(channels, dtype=dt), x.new_empty(channels, dtype=dt)


@register_fake("resfast::conv2d_stats_backward")
def _(grad_y, grad_mean, grad_var, x, weight, y, mean, stride, padding, dilation, output_mask):
    return (torch.empty_like(x, memory_format=layout_of(x)) if output_mask[0]
            else x.new_empty((0,)),
            torch.empty_like(weight) if output_mask[1] else x.new_empty((0,)),
            weight.new_empty((weight.shape[0],)) if output_mask[2] else x.new_empty((0,)))
