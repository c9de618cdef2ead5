"""``resfast::conv2d_winograd``: a CPU 3x3 convolution (stride 1, padding 1) by Winograd's
F(4x4, 3x3) algorithm, on weights transformed by ``resfast::winograd_weight``
(csrc/cpu/conv2d_winograd.cpp).

F(4x4, 3x3) makes 2.25 multiply-adds per output and input channel where a direct 3x3
convolution makes 9, at the price of two passes of additions (the transforms) and some
accuracy: its float32 results are up to ~50 epsilons of the size of the summed terms off
the exact ones where oneDNN's direct convolution's are ~5, and per layer 3-4x the direct
convolution's error in norm (tests/ops/test_conv2d_winograd.py); through a network the
output's error is 0.7-2.7x torch.nn's own (tests/models/test_winograd_inference.py).
cuDNN's Winograd kernels for float32 on GPUs make the same trade. Measured on ResNet-50's
and VGG's 3x3 layers on a 2-core AVX512 CPU: 1.7-2.9x faster than oneDNN (ResNet-20's:
1.1-1.7x) (``python3 benchmarks/cpu_winograd.py``).

Where it runs, ``RESFAST_CPU_WINOGRAD`` says:

* ``inference`` (the default): convolutions that no gradient will flow through and that
  compute no batch statistics, i.e. eval-mode layers called under ``torch.no_grad()`` or
  ``torch.inference_mode()`` (or on tensors that need no gradient). A training step keeps
  oneDNN's direct convolution, and with it resfast's accuracy promise for training: within
  2x torch.nn's own float32 error (tests/support/equivalence.py), which Winograd's 3-4x
  would break, and which keeps ReLU decisions near their kink going the way torch's go;
* ``all``: training's convolutions too, forward and input gradient (a convolution of the
  output's gradient with the kernel rotated by 180 degrees, its channels swapped; oneDNN
  computes the weight's gradient), in both of resfast's training routes alike;
* ``off``: every convolution runs oneDNN's direct algorithm.

And only where it pays (:func:`applies`): float32, channels_last (in inference NCHW too:
the op copies the activation to channels_last and the result back, which the saving pays
for; resfast.ops.conv_cpu, NCHW_EVAL), at least 16 input and output channels, an 8x8 map
(below that the 4x4 tiles are mostly padding) and 32 tiles in the batch (below that the
transformed weights, 4x the weights, cost more to read than the GEMMs save).
"""
import os
import threading
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.library import register_fake

from . import fold as _fold

ops = torch.ops.resfast
_CL = torch.channels_last

MIN_CHANNELS = 16
MIN_SIZE = 8
# Below 32 tiles (batch 1 at 14x14 has 16) each thread's GEMMs read the transformed weights,
# 4x the size of the weights, for too few rows: 0.76-0.86x oneDNN at 256-512 channels,
# 1.08-1.10x at 32 tiles (benchmarks/cpu_winograd.py --shapes, 2026-11-30).
MIN_TILES = 32


MODES = ("off", "inference", "all")
_local = threading.local()


def mode() -> str:
    value = os.environ.get("RESFAST_CPU_WINOGRAD", "inference")  # as the C++ route reads it
    if value not in MODES:
        raise ValueError(f"RESFAST_CPU_WINOGRAD must be off, inference or all, got {value!r}")
    return value


class inference_call:
    """Marks the convolutions called inside as inference (resfast.ops.eager's call that
    autograd does not record): no gradient will flow through them."""

    def __enter__(self):
        _local.depth = getattr(_local, "depth", 0) + 1

    def __exit__(self, *exc):
        _local.depth -= 1


def allowed(stats: bool, backward: bool = False) -> bool:
    """Whether RESFAST_CPU_WINOGRAD lets this convolution run by Winograd (module
    docstring): under ``all`` any; under ``inference`` a forward without statistics inside
    :class:`inference_call` or under ``torch.inference_mode``."""
    m = mode()
    if m != "inference":
        return m == "all"
    return (not stats and not backward
            and (getattr(_local, "depth", 0) > 0 or torch.is_inference_mode_enabled()))


def applies(a: Tensor, weight: Tensor, stride: int, padding: int, dilation: int,
            any_layout: bool = False) -> bool:
    """Whether conv2d_bn's CPU convolution of GEMM input ``a`` runs by Winograd (module
    docstring), forward and input gradient alike: float32 ``a`` and weight, ``a`` in
    channels_last (``any_layout``: either, for an inference forward, which copies an NCHW
    ``a`` to channels_last and its result back), a 3x3 kernel with stride 1, padding 1 and
    dilation 1, at least MIN_CHANNELS channels in and out, a map of at least MIN_SIZE x
    MIN_SIZE and at least MIN_TILES 4x4 tiles of output in the batch; whether the mode
    allows it is :func:`allowed`'s to say. The C++ training conv applies the same rule
    (csrc/cpu/winograd.h)."""
    if (weight.dtype != torch.float32 or a.dtype != torch.float32 or a.dim() != 4
            or tuple(weight.shape[2:]) != (3, 3) or (stride, padding, dilation) != (1, 1, 1)):
        return False
    n, _, h, w = a.shape
    return (min(weight.shape[0], weight.shape[1]) >= MIN_CHANNELS and min(h, w) >= MIN_SIZE
            and n * ((h + 3) // 4) * ((w + 3) // 4) >= MIN_TILES
            and (any_layout or (a.is_contiguous(memory_format=_CL) and not a.is_contiguous())))


def _epilogue(bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
              centre: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(scale, shift) of y = conv * scale + shift for z = conv + bias followed by
    (z - centre) * scale + shift, the shift computed in float64 and rounded once."""
    if scale is None:
        return None, None if bias is None else bias.to(torch.float32)
    return (scale.to(torch.float32),
            _fold.folded_bias(bias, scale, shift, centre, torch.float64).to(torch.float32))


def conv(a: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
         shift: Optional[Tensor], centre: Optional[Tensor], residual: Optional[Tensor],
         relu: bool) -> Tensor:
    """[relu]((conv(a, weight) + bias - centre) * scale + shift [+ residual]) by Winograd,
    the transformed weight and the epilogue cached per weight version (resfast.ops.fold)."""
    v, s, b = _fold.cached(
        weight, (bias, scale, shift, centre), ("winograd",),
        lambda: (ops.winograd_weight(weight, False),) + _epilogue(bias, scale, shift, centre))
    return ops.conv2d_winograd(a, v, s, b, None if residual is None else residual.float(), relu)


def input_gradient(grad_y: Tensor, weight: Tensor) -> Tensor:
    """The gradient of conv(a, weight) with respect to a, by Winograd: the convolution of
    grad_y (channels_last) with the kernel rotated by 180 degrees, its channels swapped."""
    return ops.conv2d_winograd(grad_y, ops.winograd_weight(weight, True), None, None, None,
                               False)


@register_fake("resfast::winograd_weight")
def _(weight, transposed):
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be (C_out, C_in, 3, 3), got {tuple(weight.shape)}")
    c_out, c_in = weight.shape[:2]
    return weight.new_empty((36, c_out, c_in) if transposed else (36, c_in, c_out))


@register_fake("resfast::conv2d_winograd")
def _(x, weight, scale, shift, residual, relu):
    if x.dim() != 4 or weight.dim() != 3 or weight.shape[0] != 36:
        raise ValueError(f"x must be (N, C, H, W) and weight (36, C_in, C_out), got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    return x.new_empty((x.shape[0], weight.shape[2], x.shape[2], x.shape[3])).contiguous(
        memory_format=_CL)
