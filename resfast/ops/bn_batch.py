"""``resfast::bn_batch_act`` and its backward: a training BatchNorm on the batch
statistics (+ residual) (+ ReLU) as one op pair.

The contract: ``mean`` and ``var`` are y's own biased batch statistics (``bn_stats(y)``
or ``conv2d_bn``'s), so their gradient is part of y's and the autograd formula gives them
none. Statistics that are not y's own (synchronised BN's global ones) must go through
bn_finalize and bn_act instead, as :func:`resfast.functional._batch_pending` does.

The CPU kernels are C++ (csrc/cpu/bn_batch_act.cpp). On CUDA there is no kernel
of its own yet: the ops run as the composite of the existing ones
(:func:`batch_act_composite`, :func:`batch_act_backward_composite`), which is
correct but makes the passes the chain made.
"""
import torch
from torch.library import register_autograd, register_fake

from ..dtypes import stats_dtype

ops = torch.ops.resfast


def _scale_shift(var, weight, bias, eps):
    # bn_finalize with a zero mean: scale = weight / sqrt(var + eps), shift = bias.
    return ops.bn_finalize(torch.zeros_like(var), var, weight, bias, eps)


def batch_act_composite(y, mean, var, weight, bias, residual, relu, eps):
    """bn_batch_act as bn_finalize + bn_act(centre=mean), any device."""
    scale, shift = _scale_shift(var, weight, bias, eps)
    return ops.bn_act(y, scale, shift, residual, relu, mean)


def batch_act_backward_composite(grad_out, y, mean, var, weight, bias, residual, relu, eps,
                                 output_mask):
    """bn_batch_act_backward as bn_act_backward + bn_finalize_backward + bn_stats_backward
    (three passes over the activations where the CPU kernel makes two), any device."""
    dt = stats_dtype(y)
    empty = y.new_empty((0,))
    grad_weight = grad_bias = y.new_empty((0,), dtype=dt)
    want_weight = output_mask[1] and weight is not None
    want_bias = output_mask[2] and bias is not None
    sums = output_mask[0] or want_weight or want_bias
    scale, shift = _scale_shift(var, weight, bias, eps)
    grad_direct, sum_gy, sum_g, grad_residual = ops.bn_act_backward(
        grad_out, y, scale, shift, residual, relu,
        [output_mask[0], sums, sums, output_mask[3]], mean)
    if not output_mask[3]:
        grad_residual = empty
    if not sums:
        return empty, grad_weight, grad_bias, grad_residual
    _, grad_var, gw, gb = ops.bn_finalize_backward(sum_gy, sum_g, torch.zeros_like(var), var,
                                                   weight, eps)
    grad_weight = gw if want_weight else grad_weight
    grad_bias = gb if want_bias else grad_bias
    grad_y = empty
    if output_mask[0]:
        grad_y = grad_direct
        if y.numel() > 0:
            grad_y = grad_y + ops.bn_stats_backward(-scale * sum_g, grad_var, y, mean)
    return grad_y, grad_weight, grad_bias, grad_residual


torch.library.impl("resfast::bn_batch_act", "CUDA")(batch_act_composite)
torch.library.impl("resfast::bn_batch_act_backward", "CUDA")(batch_act_backward_composite)


@register_fake("resfast::bn_batch_act")
def _(y, mean, var, weight, bias, residual, relu, eps):
    return torch.empty_like(y)


@register_fake("resfast::bn_batch_act_backward")
def _(grad_out, y, mean, var, weight, bias, residual, relu, eps, output_mask):
    dt = stats_dtype(y)
    channels = (y.shape[1],)

    def vector(selected):
        return y.new_empty(channels if selected else (0,), dtype=dt)

    return (torch.empty_like(y) if output_mask[0] else y.new_empty((0,)),
            vector(output_mask[1] and weight is not None),
            vector(output_mask[2] and bias is not None),
            torch.empty_like(y) if output_mask[3] else y.new_empty((0,)))


def setup(ctx, inputs, output):
    y, mean, var, weight, bias, residual, relu, eps = inputs
    ctx.relu, ctx.eps = relu, eps
    ctx.save_for_backward(y, mean, var, weight, bias, residual)


def backward(ctx, grad_out):
    y, mean, var, weight, bias, residual = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_y, grad_weight, grad_bias, grad_residual = ops.bn_batch_act_backward(
        grad_out, y, mean, var, weight, bias, residual, ctx.relu, ctx.eps,
        [need[0], need[3] and weight is not None, need[4] and bias is not None,
         need[5] and residual is not None])
    # mean and var get None: their gradient is inside grad_y (they are y's own statistics).
    return (grad_y if need[0] else None, None, None,
            grad_weight if need[3] and weight is not None else None,
            grad_bias if need[4] and bias is not None else None,
            grad_residual if need[5] and residual is not None else None, None, None)


register_autograd("resfast::bn_batch_act", backward, setup_context=setup)
