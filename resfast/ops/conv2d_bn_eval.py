"""``resfast::conv2d_bn_eval``: the CPU eval-mode layer's forward, in C++.

``conv2d_bn_eval(x, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps,
residual, relu, stride, padding, dilation) -> y`` is what ``conv2d_bn`` computes on the CPU
for conv -> eval-mode BN (on its running statistics) [-> + residual] [-> ReLU]: the same
calls (:mod:`resfast.ops.conv_cpu`, its branches for an epilogue), made from C++
(csrc/cpu/conv2d_bn_eval.cpp), so bitwise equal to the Python route, with the folded weights
cached there by :mod:`resfast.ops.fold`'s rules (:func:`resfast.ops.fold.cache_stats` and
:func:`resfast.ops.fold.clear_cache` cover both caches). A hit costs a few comparisons of C
numbers where the Python route spent ~250 us of host time per layer. :mod:`resfast.ops.eager`
calls it for eval layers whose call autograd does not record. Inference only (its backward
raises), CPU only, float32 or bfloat16 weights; the fake below lets torch.compile and opcheck
trace it.
"""
import torch
from torch.library import register_fake

from .conv2d_bn import _out_shape, check_conv_inputs
from .conv_cpu import layout_of


@register_fake("resfast::conv2d_bn_eval")
def _(x, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, residual, relu,
      stride, padding, dilation):
    check_conv_inputs(x, weight, bias, None, None, stride, padding, False, relu,
                      residual=residual, dilation=dilation)
    if weight.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"conv2d_bn_eval runs oneDNN in float32 or bfloat16, got weight of "
                         f"dtype {weight.dtype}")
    shape = _out_shape(x, weight, stride, padding, dilation)
    return torch.empty(shape, dtype=weight.dtype, device=x.device, memory_format=layout_of(x))
