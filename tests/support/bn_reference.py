"""Slow, obviously correct references of resfast's seven BatchNorm ops: float64
ATen arithmetic straight from each op's formula (csrc/ops.cpp), for checking
the fast CPU kernels (csrc/cpu/) and, through them, the GPU ones.

Every function takes the op's arguments and returns float64 results (the
running statistics: their new values), whatever the inputs' dtypes.
"""

import torch


def _channel(v):
    return v.double().view(1, -1, 1, 1)


def bn_stats(y):
    """Per-channel mean and biased variance: the corrected two-pass algorithm
    (Chan, Golub and LeVeque), whose second pass also removes the first pass's
    rounding of the mean, so that even float64 input is matched to rounding."""
    y = y.double()
    mean = y.mean((0, 2, 3))
    d = y - _channel(mean)
    d_mean = d.mean((0, 2, 3))
    return mean + d_mean, (d**2).mean((0, 2, 3)) - d_mean**2


def bn_stats_backward(grad_mean, grad_var, y, mean):
    count = y.shape[0] * y.shape[2] * y.shape[3]
    return (_channel(grad_mean) + 2 * (y.double() - _channel(mean)) * _channel(grad_var)) / count


def pre_activation(y, scale, shift, residual, centre=None):
    """(y - centre) * scale + shift + residual, each term present or not."""
    z = y.double()
    if scale is not None:
        if centre is not None:
            z = z - _channel(centre)
        z = z * _channel(scale) + _channel(shift)
    if residual is not None:
        z = z + residual.double()
    return z


def bn_act(y, scale, shift, residual, relu, centre=None):
    z = pre_activation(y, scale, shift, residual, centre)
    return torch.where(z < 0, torch.zeros_like(z), z) if relu else z  # NaN stays NaN, as in relu


def bn_act_backward(grad_out, y, scale, shift, residual, relu, centre=None):
    """(grad_y, grad_scale, grad_shift, grad_residual); grad_scale (the sum of
    g * (y - centre)) and grad_shift None without scale. The ReLU mask
    multiplies (NaN/Inf in grad_out survive)."""
    g = grad_out.double()
    if relu:
        g = g * (pre_activation(y, scale, shift, residual, centre) > 0)
    grad_y = g * _channel(scale) if scale is not None else g
    if scale is None:
        return grad_y, None, None, g
    d = y.double() - (_channel(centre) if centre is not None else 0)
    return grad_y, (g * d).sum((0, 2, 3)), g.sum((0, 2, 3)), g


def bn_finalize(mean, var, weight, bias, eps):
    scale = 1 / torch.sqrt(var.double() + eps)
    if weight is not None:
        scale = scale * weight.double()
    shift = -mean.double() * scale
    if bias is not None:
        shift = shift + bias.double()
    return scale, shift


def bn_finalize_backward(grad_scale, grad_shift, mean, var, weight, eps):
    """Gradients of bn_finalize's mean, var, weight and bias."""
    invstd = 1 / torch.sqrt(var.double() + eps)
    w = weight.double() if weight is not None else torch.ones_like(invstd)
    gs, gsh = grad_scale.double(), grad_shift.double()
    gs_total = gs - gsh * mean.double()  # shift = bias - mean * scale
    return -gsh * w * invstd, gs_total * w * -0.5 * invstd**3, gs_total * invstd, gsh


def bn_update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """The new running mean and variance (unbiased batch variance), as nn.BatchNorm2d."""
    unbias = count / (count - 1)
    return (
        (1 - momentum) * running_mean.double() + momentum * mean.double(),
        (1 - momentum) * running_var.double() + momentum * unbias * var.double(),
    )
