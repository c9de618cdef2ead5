"""``resfast::conv2d_weight_grad``: the gradient of a CPU convolution's weight
(csrc/cpu/conv2d_weight_grad.cpp), which both CPU training routes use
(:func:`resfast.ops.conv_cpu.backward` and the C++ ``conv2d_stats_backward``).

oneDNN's weight gradient is slow where few output positions meet a large weight:
ResNet-50's last stage in training at 112x112 (batch 8, 4x4 maps) takes ~12 ms for
one 3x3 512->512 gradient, 0.6 GFLOP. From 4096 weight elements per output position
on, the op computes it as one GEMM over the input's gathered windows instead (0.88-2.66x
oneDNN on ResNet-50's layers, the whole backward 1.02-1.82x;
``python3 benchmarks/cpu_weight_grad.py``), elsewhere by oneDNN. The result has the
weight's dtype and strides.
"""
import torch
from torch.library import register_fake

ops = torch.ops.resfast

# Weight elements per output position from which the GEMM runs (kWeightPerPosition).
GEMM_FROM = 4096


def by_gemm(x: torch.Tensor, weight: torch.Tensor, positions: int, dilation: int) -> bool:
    """Whether the op computes this gradient by GEMM (for the tests and the benchmark; the
    C++ op decides by the same rule)."""
    dense = weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last)
    return (x.dtype == torch.float32 and dilation == 1 and dense and positions > 0
            and weight.numel() >= GEMM_FROM * positions)


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
