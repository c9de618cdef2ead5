"""``resfast::conv2d_weight_grad``: the gradient of a CPU convolution's weight
(csrc/cpu/conv2d_weight_grad.cpp), which both CPU training routes use
(:func:`resfast.ops.conv_cpu.backward` and the C++ ``conv2d_stats_backward``), in the
weight's dtype and strides, computed one of three ways (:func:`path` says which):

* ``"gemm"``: oneDNN's weight gradient is slow where few output positions meet a large
  weight: ResNet-50's last stage in training at 112x112 (batch 8, 4x4 maps) takes ~12 ms
  for one 3x3 512->512 gradient, 0.6 GFLOP. From 4096 weight elements per output position
  on, the op computes it as one GEMM over the input's gathered windows (0.88-2.66x oneDNN
  on ResNet-50's layers, the whole backward 1.02-1.82x);
* ``"direct"``: oneDNN's is slow at few channels too (ResNet-20's 3x3 layers: 58-76
  GFLOP/s on a 2-core AVX2 CPU). On AVX2 CPUs, a float32 3x3 convolution over
  channels_last activations with at most 128 channels in and out and a multiple of 16
  out takes a vectorized loop of resfast's instead: 1.02-1.59x oneDNN on ResNet-20's
  layers and ResNet-50's first two stages, its sums 3-25x closer to the exact ones
  (AVX512 CPUs keep oneDNN's until the loop is measured there);
* ``"onednn"``: the rest, through ``aten::convolution_backward``; ``"zeros"`` for an
  empty input.

``python3 benchmarks/cpu_weight_grad.py`` measures each against oneDNN.
"""
import torch
from torch.library import register_fake

ops = torch.ops.resfast


def path(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int,
         padding: int, dilation: int) -> str:
    """How ``conv2d_weight_grad`` computes this gradient: ``"gemm"``, ``"direct"``,
    ``"onednn"`` or ``"zeros"`` (the C++ op's own rule; for the tests and the benchmark)."""
    return ops.conv2d_weight_grad_path(grad_y, x, weight, stride, padding, dilation)


@register_fake("resfast::conv2d_weight_grad")
def _(grad_y, x, weight, stride, padding, dilation):
    if x.dim() != 4 or grad_y.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"grad_y, x and weight must be 4-D, got {grad_y.dim()}-D, {x.dim()}-D "
                         f"and {weight.dim()}-D")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} input channels but x has {x.shape[1]}")
    if not x.dtype == grad_y.dtype == weight.dtype:
        raise ValueError(f"grad_y, x and weight must have one dtype, got {grad_y.dtype}, "
                         f"{x.dtype} and {weight.dtype}")
    return torch.empty_like(weight)
