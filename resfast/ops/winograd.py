"""``resfast::conv2d_winograd``: a CPU 3x3 convolution (stride 1, padding 1) by Winograd's
F(4x4, 3x3) algorithm, which inference's conv + BN [+ residual] [+ ReLU] layers take on
channels_last float32 activations (csrc/cpu/conv2d_winograd.cpp).

F(4x4, 3x3) makes 2.25 multiply-adds per output and input channel where a direct 3x3
convolution makes 9, at the price of two passes of additions (the transforms) and a
little accuracy: its float32 results are ~1e-5 of the output's range off the exact ones
where oneDNN's direct convolution's are ~1e-6, as with the Winograd kernels cuDNN picks for
float32 on GPUs (and far closer than the TF32 those use by default). Measured on ResNet-50's
and VGG's 3x3 layers on a 2-core AVX512 CPU: 1.3-2.3x faster than oneDNN
(``python3 benchmarks/cpu_winograd.py``).

It runs where it pays and where nothing needs the exact rounding of the direct
convolution (:func:`applies`): eval-mode BN (no batch statistics to compute from the
output), float32, channels_last, at least 16 input and output channels, an 8x8 map
(below that the 4x4 tiles are mostly padding) and 32 tiles in the batch (below that the
transformed weights, 4x the weights, cost more to read than the GEMMs save).
``RESFAST_CPU_WINOGRAD=0`` turns it off: every convolution then runs oneDNN's direct
algorithm.
"""
import os
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.library import register_fake

from . import fold as _fold

ops = torch.ops.resfast
_CL = torch.channels_last

# G of F(4x4, 3x3): the weight transform, G w G^T per (output, input) channel pair.
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
MIN_CHANNELS = 16
MIN_SIZE = 8
# Below 32 tiles (batch 1 at 14x14 has 16) each thread's GEMMs read the transformed weights,
# 4x the size of the weights, for too few rows: 0.76-0.86x oneDNN at 256-512 channels,
# 1.08-1.10x at 32 tiles (benchmarks/cpu_winograd.py --shapes, 2026-11-30).
MIN_TILES = 32


def enabled() -> bool:
    flag = os.environ.get("RESFAST_CPU_WINOGRAD", "1").strip()
    if flag not in ("0", "1"):
        raise ValueError(f"RESFAST_CPU_WINOGRAD must be 0 or 1, got {flag!r}")
    return flag == "1"


def applies(a: Tensor, weight: Tensor, stride: int, padding: int, dilation: int,
            stats: bool) -> bool:
    """Whether conv2d_bn's CPU forward of GEMM input ``a`` runs by Winograd (module
    docstring): no statistics of the output wanted, float32 ``a`` and weight in
    channels_last, a 3x3 kernel with stride 1, padding 1 and dilation 1, at least
    MIN_CHANNELS channels in and out, a map of at least MIN_SIZE x MIN_SIZE and at least
    MIN_TILES 4x4 tiles of output in the batch."""
    if (stats or weight.dtype != torch.float32 or a.dtype != torch.float32 or a.dim() != 4
            or tuple(weight.shape[2:]) != (3, 3) or (stride, padding, dilation) != (1, 1, 1)):
        return False
    n, _, h, w = a.shape
    return (min(weight.shape[0], weight.shape[1]) >= MIN_CHANNELS and min(h, w) >= MIN_SIZE
            and n * ((h + 3) // 4) * ((w + 3) // 4) >= MIN_TILES
            and a.is_contiguous(memory_format=_CL) and not a.is_contiguous() and enabled())


def transform_weight(weight: Tensor) -> Tensor:
    """G w G^T for each of the 36 positions of a 6x6 tile, as (36, C_in, C_out) float32,
    computed in float64 and rounded once."""
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    v = torch.einsum("ij,ocjk,lk->ilco", g, weight.detach().to(torch.float64), g)
    return v.reshape(36, weight.shape[1], weight.shape[0]).to(torch.float32).contiguous()


def _epilogue(bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
              centre: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(scale, shift) of y = conv * scale + shift for z = conv + bias followed by
    (z - centre) * scale + shift, the shift computed in float64 and rounded once."""
    if scale is None:
        return None, None if bias is None else bias.to(torch.float32)
    dt = torch.float64
    base = torch.zeros_like(scale, dtype=dt) if bias is None else bias.to(dt)
    if centre is not None:
        base = base - centre.to(dt)
    return scale.to(torch.float32), (base * scale.to(dt) + shift.to(dt)).to(torch.float32)


def conv(a: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
         shift: Optional[Tensor], centre: Optional[Tensor], residual: Optional[Tensor],
         relu: bool) -> Tensor:
    """[relu]((conv(a, weight) + bias - centre) * scale + shift [+ residual]) by Winograd,
    the transformed weight and the epilogue cached per weight version (resfast.ops.fold)."""
    v, s, b = _fold.cached(
        weight, (bias, scale, shift, centre), ("winograd",),
        lambda: (transform_weight(weight),) + _epilogue(bias, scale, shift, centre))
    return ops.conv2d_winograd(a, v, s, b, None if residual is None else residual.float(), relu)


@register_fake("resfast::conv2d_winograd")
def _(x, weight, scale, shift, residual, relu):
    if x.dim() != 4 or weight.dim() != 3 or weight.shape[0] != 36:
        raise ValueError(f"x must be (N, C, H, W) and weight (36, C_in, C_out), got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    return x.new_empty((x.shape[0], weight.shape[2], x.shape[2], x.shape[3])).contiguous(
        memory_format=_CL)
