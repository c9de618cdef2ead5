"""BatchNorm statistics synchronised across processes with ONE all-reduce.

Each process computes its local per-channel ``mean`` and biased ``var`` over
``count`` values (the fused ops get them from the conv epilogue's sum and sum of
squares). :func:`global_batch_stats` packs ``[count*mean, count*(var+mean^2),
count]`` into one vector, all-reduces it (sum) and turns the totals back into
the global mean and biased variance: no second pass over the activations. The
all-reduce is differentiable: its backward all-reduces the gradients of the
global statistics, which is exactly the chain rule through the sum over
processes, so a DDP run with synchronised BN computes the gradients of a single
process run on the whole global batch.

Hooking it in:

* torch backend: :func:`convert_sync_bn` gives every ``nn.BatchNorm2d`` a
  ``stats_reducer`` attribute and swaps its class to :class:`SyncBatchNorm2d`
  (same parameters, buffers and state_dict keys), whose forward uses it
  (:func:`resfast.twin.batch_norm`, as the twin of ``BatchNormAddReLU`` does).
  ``torch.nn.SyncBatchNorm`` is not usable here: it refuses CPU tensors.
* resfast backend: the fused layers read their BatchNorm arguments through
  ``resfast.functional.BatchNormArgs.of(bn)``; with a ``stats_reducer`` field
  there (taken from the module attribute) the functional layer calls
  ``mean, var, count = stats_reducer(mean, var, count)`` right after the
  per-channel statistics are computed and before scale/shift and the running
  statistics update.
"""
import functools
from typing import Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..twin import batch_norm, has_fused_layers


class _AllReduceSum(torch.autograd.Function):
    """Differentiable ``all_reduce(SUM)``: the backward all-reduces the gradient."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group):
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    return _AllReduceSum.apply(tensor, group)


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def global_batch_stats(mean: Tensor, var: Tensor, count: int, group=None, *,
                       equal_counts: bool = False) -> Tuple[Tensor, Tensor, int]:
    """Local per-channel (mean, biased var) over ``count`` values -> the global
    (mean, biased var, total count) over all processes of ``group``.

    One all-reduce of 2C+1 numbers (in float64, so that E[x^2] - mean^2 does not
    cancel). Differentiable in ``mean`` and ``var``. ``equal_counts=True``
    promises every process has the same ``count`` (DDP training with equal
    per-process batches): the total is then ``count * world_size`` and no
    device-to-host copy is needed; otherwise the total is read back."""
    world = _world_size(group)
    if world == 1:
        return mean, var, int(count)
    if mean.shape != var.shape or mean.dim() != 1:
        raise ValueError(f"mean and var must be 1-D of equal shape, got {tuple(mean.shape)} and "
                         f"{tuple(var.shape)}")
    c = mean.shape[0]
    n = float(count)
    m = mean.to(torch.float64)
    v = var.to(torch.float64)
    packed = torch.cat([m * n, (v + m * m) * n, m.new_full((1,), n)])
    total = all_reduce_sum(packed, group)
    total_n = total[2 * c]
    g_mean = total[:c] / total_n
    g_var = (total[c:2 * c] / total_n - g_mean * g_mean).clamp_min(0.0)
    total_count = int(count) * world if equal_counts else int(round(total_n.item()))
    return g_mean.to(mean.dtype), g_var.to(var.dtype), total_count


def make_stats_reducer(group=None, *, equal_counts: bool = False):
    """A picklable ``(mean, var, count) -> (mean, var, count)`` for ``group``."""
    return functools.partial(global_batch_stats, group=group, equal_counts=equal_counts)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics go through
    ``self.stats_reducer`` (set by :func:`convert_sync_bn`); same tensors and names."""

    stats_reducer = None

    def forward(self, x: Tensor) -> Tensor:
        return batch_norm(self, x)


def convert_sync_bn(model: nn.Module, group=None, *, equal_counts: bool = False) -> nn.Module:
    """Synchronise every BatchNorm2d of ``model`` across ``group`` (in place; returns model).

    Every BatchNorm2d gets a ``stats_reducer``. In a model of plain torch layers
    (``--backend torch``) the ``nn.BatchNorm2d`` modules also become
    :class:`SyncBatchNorm2d`, whose forward uses it; in a model of fused resfast
    layers the fused ops read it through ``BatchNormArgs.of`` (the modules keep
    their class: the fusion plans recognise plain ``nn.BatchNorm2d`` only)."""
    fused = has_fused_layers(model)
    reducer = make_stats_reducer(group, equal_counts=equal_counts)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            if not fused and type(m) is nn.BatchNorm2d:
                m.__class__ = SyncBatchNorm2d
            m.stats_reducer = reducer
    return model
