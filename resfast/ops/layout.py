"""``resfast::relayout``: an activation copied between NCHW and channels_last.

ATen's ``copy_`` between the two layouts writes element by element and is up to
5x slower than copying by tiles transposed in vector registers, which the CPU
kernel does (csrc/cpu/kernels/layout_kernel.cpp; measured with
``benchmarks/cpu_bn_ops.py --cases relayout``). It is called only where a copy
between the two layouts is due anyway: a network's NCHW input made channels_last
at its entry (:func:`resfast.functional.channels_last_input`), results handed
back to NCHW callers, and tensors that meet an op in the other layout.
"""
import torch
from torch import Tensor
from torch.library import register_autograd, register_fake

ops = torch.ops.resfast
_CL = torch.channels_last


def to_memory_format(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """x dense in ``memory_format`` (``torch.channels_last`` or
    ``torch.contiguous_format``): x itself when it already is; on the CPU, an
    activation dense in the other layout is copied by ``resfast::relayout``;
    anything else as ``x.contiguous(memory_format=...)``."""
    if x.is_contiguous(memory_format=memory_format):
        return x
    other = torch.contiguous_format if memory_format == _CL else _CL
    # compiled graphs leave layout copies to Inductor, which can fuse them with their neighbours
    if (x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=other)
            and not torch.compiler.is_compiling()):
        return ops.relayout(x, memory_format == _CL)
    return x.contiguous(memory_format=memory_format)


def with_strides_of(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """x, dense in ``memory_format``, viewed with that format's own strides (those of
    ``torch.empty(..., memory_format=...)``). Only a tensor dense in both layouts (C == 1 or
    H*W == 1) can have others; kernels and oneDNN read a tensor's layout from its strides."""
    want = torch.empty(x.shape, device="meta", memory_format=memory_format).stride()
    return x if x.stride() == want else x.as_strided(x.shape, want)


@register_fake("resfast::relayout")
def _(x, channels_last):
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got {x.dim()}-D")
    return torch.empty_like(x, memory_format=_CL if channels_last else torch.contiguous_format)


def _backward(ctx, grad):
    # The gradient as it comes, in whichever layout, as Tensor.contiguous's backward passes it:
    # relaying it here would make a chain of NCHW layers copy every gradient twice (the ops
    # below read either layout).
    return grad, None


register_autograd("resfast::relayout", _backward)
