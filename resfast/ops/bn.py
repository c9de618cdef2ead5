"""Fake implementations and autograd formulas of the C++ BatchNorm ops.

Each backward is itself a registered op, so autograd, torch.compile and AMP
only ever see opaque, registered pieces.
"""
import torch
from torch.library import register_autograd, register_fake

from ..dtypes import stats_dtype

ops = torch.ops.resfast


def _channel_vector(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((t.shape[1],), dtype=stats_dtype(t))


def _empty(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.new_empty((0,), dtype=dtype or t.dtype)


# ---- fake (meta) implementations: shapes, dtypes and strides only ----------

@register_fake("resfast::bn_stats")
def _(y):
    return _channel_vector(y), _channel_vector(y)


@register_fake("resfast::bn_stats_backward")
def _(grad_mean, grad_var, y, mean):
    return torch.empty_like(y)


@register_fake("resfast::bn_finalize")
def _(mean, var, weight, bias, eps):
    return torch.empty_like(mean), torch.empty_like(mean)


@register_fake("resfast::bn_finalize_backward")
def _(grad_scale, grad_shift, mean, var, weight, eps):
    return tuple(torch.empty_like(mean) for _ in range(4))


@register_fake("resfast::bn_update_running_stats_")
def _(running_mean, running_var, mean, var, count, momentum):
    return None


@register_fake("resfast::bn_act")
def _(y, scale, shift, residual, relu, centre=None):
    return torch.empty_like(y)


@register_fake("resfast::bn_act_backward")
def _(grad_out, y, scale, shift, residual, relu, output_mask, centre=None):
    dt = stats_dtype(y)
    grad_y = torch.empty_like(y) if output_mask[0] else _empty(y)
    has_scale = scale is not None
    grad_scale = _channel_vector(y) if output_mask[1] and has_scale else _empty(y, dt)
    grad_shift = _channel_vector(y) if output_mask[2] and has_scale else _empty(y, dt)
    grad_residual = torch.empty_like(y) if output_mask[3] else _empty(y)
    return grad_y, grad_scale, grad_shift, grad_residual


# ---- autograd ---------------------------------------------------------------

def stats_setup(ctx, inputs, output):
    (y,) = inputs
    mean, _ = output
    ctx.save_for_backward(y, mean)
    ctx.set_materialize_grads(False)  # unused statistics: None, not zeros (stats_backward)


def stats_backward(ctx, grad_mean, grad_var):
    if grad_mean is None and grad_var is None:
        return None  # statistics that reach no loss (bn_batch_act takes their path into y's)
    y, mean = ctx.saved_tensors
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
    grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
    return ops.bn_stats_backward(grad_mean, grad_var, y, mean)


register_autograd("resfast::bn_stats", stats_backward, setup_context=stats_setup)


def finalize_setup(ctx, inputs, output):
    mean, var, weight, bias, eps = inputs
    ctx.eps = eps
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None
    ctx.save_for_backward(mean, var, weight)


def finalize_backward(ctx, grad_scale, grad_shift):
    mean, var, weight = ctx.saved_tensors
    grad_scale = torch.zeros_like(mean) if grad_scale is None else grad_scale
    grad_shift = torch.zeros_like(mean) if grad_shift is None else grad_shift
    grad_mean, grad_var, grad_weight, grad_bias = ops.bn_finalize_backward(
        grad_scale, grad_shift, mean, var, weight, ctx.eps)
    return (grad_mean, grad_var, grad_weight if ctx.has_weight else None,
            grad_bias if ctx.has_bias else None, None)


register_autograd("resfast::bn_finalize", finalize_backward, setup_context=finalize_setup)


def act_setup(ctx, inputs, output):
    y, scale, shift, residual, relu, centre = inputs
    ctx.relu = relu
    ctx.save_for_backward(y, scale, shift, residual, centre)


def act_backward(ctx, grad_out):
    y, scale, shift, residual, centre = ctx.saved_tensors
    # one entry per argument passed: centre may not be
    need_y, need_scale, need_shift, need_residual = ctx.needs_input_grad[:4]
    need_centre = len(ctx.needs_input_grad) > 5 and ctx.needs_input_grad[5] and centre is not None
    # sum(g) is grad_shift, and -scale * sum(g) the centre's gradient
    grad_y, grad_scale, sum_g, grad_residual = ops.bn_act_backward(
        grad_out, y, scale, shift, residual, ctx.relu,
        [need_y, need_scale and scale is not None,
         (need_shift or need_centre) and shift is not None,
         need_residual and residual is not None], centre)
    return (grad_y if need_y else None,
            grad_scale if need_scale and scale is not None else None,
            sum_g if need_shift and shift is not None else None,
            grad_residual if need_residual and residual is not None else None,
            None,
            -scale * sum_g if need_centre else None)[:len(ctx.needs_input_grad)]


register_autograd("resfast::bn_act", act_backward, setup_context=act_setup)
