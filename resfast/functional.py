"""Fused layers as plain functions over tensors.

Every function here is built from the ``resfast`` ops and is differentiable in
all its tensor inputs. BatchNorm arguments follow ``torch.nn.functional.batch_norm``:
``running_mean``/``running_var`` may be None (batch statistics always), and in
training mode they are updated in place exactly as ``nn.BatchNorm2d`` does
(momentum, ``momentum=None`` for a cumulative average, unbiased running variance,
``num_batches_tracked``).

Training mode needs the statistics of a conv's output before it can normalize
it, so the building block is a *pending* activation
``relu((y - centre) * scale + shift)`` (:class:`Pending`): the next conv applies
it while loading its input, or :func:`finish` applies it together with the
residual add. BatchNorm's pending activation has centre = mean, scale =
gamma / std and shift = beta: its backward then reduces the gradient of gamma
as sum(g * (y - mean)) / std, as torch.nn does, where the uncentred
sum(g * y) - mean * sum(g) would lose every digit when |mean| >> std.

On the CPU, where the pending activation is applied as a pass of its own, a
training BN (unless synchronised: global statistics are not y's own) stays as its
batch statistics (:class:`BatchStatistics`) and is applied
by ``resfast::bn_batch_act``: one node whose backward is BatchNorm's own in two
passes over y, the gradient through the statistics included (scale and shift would
add a bn_finalize node and one more pass over y in the conv's backward).

The ops are called through :mod:`resfast.ops.eager`, which skips torch.library's
Python dispatch for eager CPU calls.

In eval mode BN is folded into the conv (once per weight version,
:mod:`resfast.ops.fold`) with the ReLU, and a residual where one is added, in
the same call; the gradients of gamma and beta are still reduced from the
normalized activation (``resfast::conv2d_bn``'s epilogue).
"""
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import ops as _ops  # noqa: F401  (registers the Python ops)
from .dtypes import stats_dtype
from .ops import conv2d_bn as _conv_ops
from .ops import eager as _eager
from .ops import fold as _fold
from .ops.layout import to_memory_format, with_strides_of

ops = torch.ops.resfast


class BatchNormArgs(NamedTuple):
    """The tensors and settings of one ``nn.BatchNorm2d``."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    training: bool
    momentum: Optional[float] = 0.1
    eps: float = 1e-5
    # (mean, var, count) -> (mean, var, count): turns this process's batch
    # statistics into global ones (synchronised BN, resfast.train.sync_bn);
    # taken from the module's ``stats_reducer`` attribute when it has one
    stats_reducer: Optional[Callable[[Tensor, Tensor, int], Tuple[Tensor, Tensor, int]]] = None

    @classmethod
    def of(cls, bn: torch.nn.BatchNorm2d) -> "BatchNormArgs":
        d = None if torch.compiler.is_compiling() else bn.__dict__  # (dynamo: the attributes)
        if d is not None and _plain_module(type(bn)) and d.keys().isdisjoint(_BN_FIELDS):
            # read from nn.Module's registries, as its __getattr__ would (7 us -> 2 us a layer)
            p, b = d["_parameters"], d["_buffers"]
            try:
                tensors = (p["weight"], p["bias"], b["running_mean"], b["running_var"],
                           b["num_batches_tracked"])
            except KeyError:  # a tensor kept elsewhere (torch.func.functional_call, ...)
                tensors = None
            if tensors is not None:
                # attribute lookup's order: the instance, then the module registry, then the
                # class (which _plain_module allows only a None there)
                if "stats_reducer" in d:
                    reducer = d["stats_reducer"]
                else:
                    reducer = d["_modules"].get("stats_reducer")
                return cls(*tensors, d["training"] or tensors[2] is None, d["momentum"],
                           d["eps"], reducer)
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                   bn.training or bn.running_mean is None, bn.momentum, bn.eps,
                   getattr(bn, "stats_reducer", None))


_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_plain_modules: Dict[type, bool] = {}


def _plain_module(cls: type) -> bool:
    """Whether a BatchNorm class leaves its tensors and settings to nn.Module's registries and
    its instance dict: no class of its MRO defines one of those names (a property, as
    torch.nn.utils.parametrize makes, or a class attribute would take precedence), nor a
    ``stats_reducer`` other than None (resfast.train.sync_bn's class default), nor attribute
    access of its own."""
    plain = _plain_modules.get(cls)
    if plain is None:
        names = _BN_FIELDS + ("training", "momentum", "eps")
        plain = (not any(name in vars(k) for k in cls.__mro__ for name in names)
                 and getattr(cls, "stats_reducer", None) is None
                 and cls.__getattr__ is torch.nn.Module.__getattr__
                 and cls.__getattribute__ is torch.nn.Module.__getattribute__)
        _plain_modules[cls] = plain
    return plain


def constant_batch_norm(weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor,
                        eps: float) -> BatchNormArgs:
    """A BatchNorm whose statistics and affine are constants, in training mode too
    (torchvision's ``FrozenBatchNorm2d``): ``(x - mean) / sqrt(var + eps) * weight
    + bias``. It folds into the conv like eval-mode BN and updates nothing;
    gradients reach the tensors that require them (usually none of these)."""
    return BatchNormArgs(weight, bias, mean, var, None, training=False, momentum=None, eps=eps)


class BatchStatistics(NamedTuple):
    """A training-mode BatchNorm of a tensor on that tensor's own batch statistics
    (``mean``, biased ``var``), not yet turned into a scale and shift."""

    mean: Tensor
    var: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    eps: float


class Pending(NamedTuple):
    """The activation ``relu((y - centre) * scale + shift)`` (``relu`` optional;
    centre 0 when None), not yet computed; or, with ``batch`` (scale, shift and
    centre None), ``relu(batch_norm(y))`` on y's own batch statistics."""

    y: Tensor
    scale: Optional[Tensor]
    shift: Optional[Tensor]
    relu: bool
    centre: Optional[Tensor] = None
    batch: Optional[BatchStatistics] = None


# ---- autocast and checks ------------------------------------------------------

def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    # shape-only runs (resfast.models.summary); autocast has no meta backend
    if device_type == "meta":
        return None
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


def _cast_param(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """A parameter in autocast's dtype; where no gradient flows, the same cast
    tensor while the parameter is unchanged, so that the eval-mode fold cache
    (keyed by the weight it is given) keeps hitting under autocast."""
    if (t is None or dtype is None or t.dtype == dtype or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and t.requires_grad)):
        return _cast(t, dtype)
    return _fold.cast(t, dtype)


def _check_input(x, name="x"):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {x.dtype}")


def _check_bn(bn: BatchNormArgs, channels: int, device, name="bn"):
    for field in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(bn, field)
        if t is None:
            continue
        if t.shape != (channels,):
            raise ValueError(f"{name}.{field} must have shape ({channels},), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name}.{field} is on {t.device} but the input is on {device}")
    if (bn.running_mean is None) != (bn.running_var is None):
        raise ValueError(f"{name}.running_mean and {name}.running_var must be given together")


def _conv_dtype(x: Tensor, weight: Tensor):
    """The dtype the conv runs in: autocast's if active, else x's (weight must agree)."""
    dtype = _autocast_dtype(x.device.type)
    if dtype is None:
        if weight.dtype != x.dtype:
            raise ValueError(f"conv weight dtype {weight.dtype} differs from input dtype {x.dtype}")
        return x.dtype
    return dtype


# ---- BatchNorm pieces -----------------------------------------------------------

def _centred(mean: Tensor, var: Tensor, bn: BatchNormArgs):
    """(scale, shift, centre) = (gamma / sqrt(var + eps), beta, mean): BN as
    (v - centre) * scale + shift. bn_finalize with a zero mean gives exactly that
    scale and shift, and its backward the gradients of var, gamma and beta; that
    of the mean comes from the centre."""
    scale, shift = _eager.bn_finalize(torch.zeros_like(var), var, bn.weight, bn.bias, bn.eps)
    return scale, shift, mean


def _batch_pending(y: Tensor, mean: Tensor, var: Tensor, bn: BatchNormArgs,
                   relu: bool) -> Pending:
    """BN (-> ReLU) of y on its batch statistics, left pending; updates the running
    statistics. Where the consumer applies it as a pass of its own (the CPU), it stays
    a :class:`BatchStatistics`: ``resfast::bn_batch_act`` applies it in one call and
    its backward is BN's own in two passes over y, the statistics' gradient included
    (a bn_finalize node and one pass fewer than scale and shift)."""
    count = y.numel() // max(y.shape[1], 1)
    if bn.stats_reducer is not None:  # global statistics: no longer y's own
        mean, var, count = bn.stats_reducer(mean, var, count)
    _update_running_stats(mean, var, count, bn)
    if bn.stats_reducer is None and _conv_ops.writes_prologue_apart(y):
        return Pending(y, None, None, relu,
                       batch=BatchStatistics(mean, var, bn.weight, bn.bias, bn.eps))
    scale, shift, centre = _centred(mean, var, bn)
    return Pending(y, scale, shift, relu, centre)


def _update_running_stats(mean: Tensor, var: Tensor, count: int, bn: BatchNormArgs) -> None:
    if bn.running_mean is not None and bn.training:
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {count}")
        momentum = bn.momentum
        if bn.num_batches_tracked is not None:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        ops.bn_update_running_stats_(bn.running_mean, bn.running_var, mean.detach(), var.detach(),
                                     count, momentum)


def _running_scale_shift(bn: BatchNormArgs, dtype):
    """(scale, shift, centre) from the running statistics."""
    return _centred(bn.running_mean.to(dtype), bn.running_var.to(dtype), bn)


def _uses_batch_stats(bn: BatchNormArgs) -> bool:
    return bn.training or bn.running_mean is None


# ---- convs ------------------------------------------------------------------------

def _conv_input(src: Tensor, pending: Optional[Pending]):
    """(x, in_scale, in_shift, in_relu, in_centre) for ``resfast::conv2d_bn`` reading
    ``src`` with ``pending``'s activation (if any) as its prologue. Where the op writes
    the prologue out as a pass of its own anyway (the CPU: oneDNN has no input-side
    fusion), it is applied here instead, as its own autograd node: autograd then keeps
    its output for the convolution's backward, where the op would recompute it (one pass
    less per conv; torch.nn keeps the same tensor, its ReLU's output)."""
    if pending is None or (pending.scale is None and pending.batch is None
                           and not pending.relu):
        return src, None, None, False, None  # nothing pending (an eval conv's output): no pass
    if _conv_ops.writes_prologue_apart(src):
        return _apply(pending._replace(y=src), None, pending.relu), None, None, False, None
    if pending.batch is not None:  # defensive: batch is made only where the prologue is apart
        pending = _scale_shift(pending)
    return src, pending.scale, pending.shift, pending.relu, pending.centre


def conv_bn_pending(x, weight: Tensor, bias: Optional[Tensor], bn: BatchNormArgs, *,
                    stride: int = 1, padding: int = 0, relu: bool = True,
                    residual: Optional[Tensor] = None, dilation: int = 1) -> Pending:
    """conv -> BN (-> ReLU), left pending in training mode; in eval mode BN is
    folded into the conv and the result is complete (scale/shift None, the ReLU
    in the conv's epilogue). ``residual`` (eval mode only: training mode gives it
    to :func:`finish`) is added before the ReLU in the same call.
    ``x`` may itself be a :class:`Pending`, applied in this conv's prologue."""
    pending_in = x if isinstance(x, Pending) else None
    src = pending_in.y if pending_in else x
    _check_input(src)
    if weight.dim() != 4 or weight.shape[1] != src.shape[1]:
        raise ValueError(f"conv weight of shape {tuple(weight.shape)} does not take {src.shape[1]} "
                         "input channels")
    if weight.device != src.device:
        raise ValueError(f"conv weight is on {weight.device} but the input is on {src.device}")
    _check_bn(bn, weight.shape[0], src.device)
    dtype = _conv_dtype(src, weight)
    if _uses_batch_stats(bn) and residual is None:
        layer = _train_in_one_call(src, pending_in, weight, bias, bn, stride, padding, dilation,
                                   relu)
        if layer is not None:
            return layer
    src, in_scale, in_shift, in_relu, in_centre = _conv_input(_cast(src, dtype), pending_in)
    if _uses_batch_stats(bn):
        if residual is not None:
            raise ValueError("in training mode the residual is added by finish(), after the "
                             "batch statistics")
        y, mean, var = _eager.conv2d_bn(src, _cast(weight, dtype), _cast(bias, dtype), in_scale,
                                     in_shift, in_relu, stride, padding, True, False, in_centre,
                                     dilation=dilation)
        return _batch_pending(y, mean, var, bn, relu)
    # eval: BN is the conv's epilogue, folded into its weights (cached), with the residual
    # and the ReLU: one oneDNN call on the CPU.
    if residual is not None:
        _check_residual(residual, src.device)
    y = _eval_in_one_call(src, pending_in, weight, _cast_param(bias, dtype), bn, stride, padding,
                          dilation, relu, _cast(residual, dtype))
    if y is not None:
        return Pending(y, None, None, False)
    scale, shift, centre = _running_scale_shift(bn, stats_dtype(src))
    if residual is not None:
        residual = _cast(residual, dtype)
    y, _, _ = _eager.conv2d_bn(src, _cast_param(weight, dtype), _cast_param(bias, dtype), in_scale,
                            in_shift, in_relu, stride, padding, False, relu, in_centre, scale,
                            shift, centre, residual, dilation)
    return Pending(y, None, None, False)


def _train_in_one_call(src: Tensor, pending_in: Optional[Pending], weight: Tensor,
                       bias: Optional[Tensor], bn: BatchNormArgs, stride: int, padding: int,
                       dilation: int, relu: bool) -> Optional[Pending]:
    """A training layer's forward as one ``resfast::conv2d_bn_train`` call where its ops take
    it (eager CPU calls that nothing observes, a oneDNN dtype: :func:`resfast.ops.eager.
    takes_one_call`), else None. It makes the calls the route in :func:`conv_bn_pending`
    makes (the input's pending BN, the conv with its statistics, the running statistics'
    update), from C++: ~35 us of host time less per layer, the same results bitwise."""
    stats = pending_in.batch if pending_in is not None else None
    if bn.stats_reducer is not None or (stats is None and pending_in is not None
                                        and (pending_in.scale is not None or pending_in.relu)):
        return None
    if not type(stride) is type(padding) is type(dilation) is int:
        return None  # the op route's checks name a bool, a float, a numpy integer
    tensors = [t for t in (src, weight, bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                           bn.num_batches_tracked) if t is not None]
    if stats is not None:
        tensors += [t for t in stats[:4] if t is not None]
    if not _eager.takes_one_call(src, weight, tensors):
        return None
    in_bn = ((stats.mean, stats.var, stats.weight, stats.bias, pending_in.relu, stats.eps)
             if stats is not None else (None, None, None, None, False, 0.0))
    running = ((bn.running_mean, bn.running_var, bn.num_batches_tracked)
               if bn.training and bn.running_mean is not None else (None, None, None))
    y, mean, var = ops.conv2d_bn_train.default(src, *in_bn, weight, bias, stride, padding,
                                               dilation, *running, bn.momentum)
    return Pending(y, None, None, relu,
                   batch=BatchStatistics(mean, var, bn.weight, bn.bias, bn.eps))


def _eval_in_one_call(src: Tensor, pending_in: Optional[Pending], weight: Tensor,
                      bias: Optional[Tensor], bn: BatchNormArgs, stride: int, padding: int,
                      dilation: int, relu: bool, residual: Optional[Tensor]) -> Optional[Tensor]:
    """An eval layer's forward as one ``resfast::conv2d_bn_eval`` call where its ops take it
    (eager CPU inference calls that nothing observes, a oneDNN dtype, nothing pending on the
    input: :func:`resfast.ops.eager.takes_eval_call`), else None. It makes the calls the
    route below makes, from C++, its folded weights cached there: ~150-200 us of host time
    less per layer, the same results bitwise."""
    if pending_in is not None and (pending_in.scale is not None or pending_in.batch is not None
                                   or pending_in.relu):
        return None
    if not type(stride) is type(padding) is type(dilation) is int:
        return None  # the op route's checks name a bool, a float, a numpy integer
    tensors = [t for t in (src, weight, bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                           residual) if t is not None]
    if not _eager.takes_eval_call(src, weight, tensors):
        return None
    _conv_ops._took("conv2d_bn", "onednn")
    return ops.conv2d_bn_eval.default(src, weight, bias, bn.running_mean, bn.running_var,
                                      bn.weight, bn.bias, bn.eps, residual, relu, stride, padding,
                                      dilation)


def _check_residual(residual, device):
    _check_input(residual, "residual")
    if residual.device != device:
        raise ValueError(f"residual is on {residual.device} but the branch output is on {device}")


def conv_bn_add_relu(x, weight: Tensor, bias: Optional[Tensor], bn: BatchNormArgs,
                     residual: Tensor, *, stride: int = 1, padding: int = 0,
                     relu: bool = True, dilation: int = 1) -> Tensor:
    """``relu(bn(conv2d(x)) + residual)``, a residual block's last conv: in
    training mode the BN, the add and the ReLU are one pass after the conv's
    statistics; in eval mode all of it is one folded conv."""
    if _uses_batch_stats(bn):
        return finish(conv_bn_pending(x, weight, bias, bn, stride=stride, padding=padding,
                                      relu=False, dilation=dilation), residual, relu=relu)
    src = x.y if isinstance(x, Pending) else x
    _check_input(src)
    _check_residual(residual, src.device)
    span = dilation * (weight.shape[2] - 1) + 1  # the kernel's extent in the input
    out_shape = (src.shape[0], weight.shape[0], (src.shape[2] + 2 * padding - span) // stride + 1,
                 (src.shape[3] + 2 * padding - span) // stride + 1)
    if tuple(residual.shape) != out_shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from the branch "
                         f"output {out_shape}")
    return conv_bn_pending(x, weight, bias, bn, stride=stride, padding=padding, relu=relu,
                           residual=residual, dilation=dilation).y


def finish(p: Pending, residual: Optional[Tensor] = None, relu: Optional[bool] = None) -> Tensor:
    """Apply a pending activation, optionally with a residual added before the
    ReLU: ``relu(y * scale + shift + residual)``."""
    relu = p.relu if relu is None else relu
    if residual is not None:
        _check_input(residual, "residual")
        if residual.shape != p.y.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from the branch "
                             f"output {tuple(p.y.shape)}")
        if residual.device != p.y.device:
            raise ValueError(f"residual is on {residual.device} but the branch output is on "
                             f"{p.y.device}")
        residual = _cast(residual, p.y.dtype)
    if p.scale is None and p.batch is None and residual is None and not relu:
        return p.y
    return _apply(p, residual, relu)


def _apply(p: Pending, residual: Optional[Tensor], relu: bool) -> Tensor:
    """``relu(p + residual)`` in one pass."""
    if p.batch is not None:
        b = p.batch
        return _eager.bn_batch_act(p.y, b.mean, b.var, b.weight, b.bias, residual, relu, b.eps)
    return _eager.bn_act(p.y, p.scale, p.shift, residual, relu, p.centre)


def _scale_shift(p: Pending) -> Pending:
    """p with its batch statistics turned into (scale, shift, centre)."""
    scale, shift, centre = _centred(p.batch.mean, p.batch.var, p.batch)
    return Pending(p.y, scale, shift, p.relu, centre)


def materialize(h) -> Tensor:
    """``h`` as a Tensor: a :class:`Pending` is finished, a Tensor returned as it is."""
    return finish(h) if isinstance(h, Pending) else h


def channels_last_input(x: Tensor) -> Tensor:
    """A network's input made channels_last, where a network starts: the ops compute in
    their input's layout (an NCHW op stays NCHW, as torch.nn's does), and channels_last is
    the faster one for a whole network (one copy of the few-channel input, then none)."""
    if isinstance(x, Tensor) and x.dim() == 4:
        # (a tensor dense in both layouts, a grayscale image, may have NCHW strides, which the
        # convolutions would read as NCHW: it is viewed with channels_last ones)
        return with_strides_of(to_memory_format(x, torch.channels_last), torch.channels_last)
    return x


def _like_input(out: Tensor, x: Tensor) -> Tensor:
    # On the GPU the kernels write channels_last; hand NCHW callers NCHW back.
    if x.is_contiguous(memory_format=torch.channels_last) or out.dim() != 4:
        return out
    return to_memory_format(out, torch.contiguous_format)


def conv_bn_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn: BatchNormArgs, *,
                 stride: int = 1, padding: int = 0, relu: bool = True,
                 dilation: int = 1) -> Tensor:
    """``relu(bn(conv2d(x)))`` (``relu=False``: ``bn(conv2d(x))``)."""
    return _like_input(finish(conv_bn_pending(x, weight, bias, bn, stride=stride, padding=padding,
                                              relu=relu, dilation=dilation)), x)


def batch_norm_pending(x: Tensor, bn: BatchNormArgs, *, relu: bool) -> Pending:
    """BN (-> ReLU) of an arbitrary tensor, left pending."""
    _check_input(x)
    _check_bn(bn, x.shape[1], x.device)
    if _uses_batch_stats(bn):
        return _batch_pending(x, *_eager.bn_stats(x), bn, relu)
    scale, shift, centre = _running_scale_shift(bn, stats_dtype(x))
    return Pending(x, scale, shift, relu, centre)


def bn_add_relu(y: Tensor, residual: Tensor, bn: BatchNormArgs, *, relu: bool = True) -> Tensor:
    """``relu(bn(y) + residual)`` in one pass over y (after its statistics)."""
    return _like_input(finish(batch_norm_pending(y, bn, relu=relu), residual), y)


def add_relu(y: Tensor, residual: Tensor) -> Tensor:
    """``relu(y + residual)``."""
    _check_input(y, "y")
    return _like_input(finish(Pending(y, None, None, True), residual), y)


def bn_relu_conv(x: Tensor, bn: BatchNormArgs, weight: Tensor, bias: Optional[Tensor] = None, *,
                 stride: int = 1, padding: int = 0, dilation: int = 1) -> Tensor:
    """Pre-activation ``conv2d(relu(bn(x)))``: BN-apply and ReLU happen while the
    conv loads its input (on the GPU; on the CPU they are one pass before it,
    :func:`_conv_input`)."""
    pending = batch_norm_pending(x, bn, relu=True)
    _check_input(x)
    dtype = _conv_dtype(x, weight)
    if weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv weight of shape {tuple(weight.shape)} does not take {x.shape[1]} "
                         "input channels")
    # x stays in its own precision: the prologue normalizes it before rounding.
    a, in_scale, in_shift, in_relu, in_centre = _conv_input(x, pending)
    y, _, _ = _eager.conv2d_bn(a, _cast(weight, dtype), _cast(bias, dtype), in_scale, in_shift,
                            in_relu, stride, padding, False, False, in_centre, dilation=dilation)
    return _like_input(y, x)


def conv2d(x, weight: Tensor, bias: Optional[Tensor] = None, *, stride: int = 1, padding: int = 0,
           relu: bool = False, dilation: int = 1) -> Tensor:
    """A convolution through resfast's conv kernel, where no BN follows:
    ``[relu](conv2d(x) + bias)``, the bias and ReLU in the conv's epilogue.
    ``x`` may be a :class:`Pending`, applied in this conv's prologue."""
    pending_in = x if isinstance(x, Pending) else None
    src = pending_in.y if pending_in else x
    _check_input(src)
    if weight.dim() != 4 or weight.shape[1] != src.shape[1]:
        raise ValueError(f"conv weight of shape {tuple(weight.shape)} does not take {src.shape[1]} "
                         "input channels")
    dtype = _conv_dtype(src, weight)
    a, in_scale, in_shift, in_relu, in_centre = _conv_input(_cast(src, dtype), pending_in)
    y, _, _ = _eager.conv2d_bn(a, _cast(weight, dtype), _cast(bias, dtype), in_scale, in_shift,
                            in_relu, stride, padding, False, relu, in_centre, dilation=dilation)
    return _like_input(y, src)


# ---- residual blocks -------------------------------------------------------------

def shortcut_a(x: Tensor, out_channels: int, stride: int) -> Tensor:
    """Option A shortcut: strided identity, zero-padded to out_channels."""
    y = x[:, :, ::stride, ::stride] if stride > 1 else x
    extra = out_channels - x.shape[1]
    if extra < 0:
        raise ValueError(f"option A shortcut cannot reduce channels ({x.shape[1]} -> "
                         f"{out_channels})")
    if extra:
        y = torch.nn.functional.pad(y, (0, 0, 0, 0, extra // 2, extra - extra // 2))
    return y


def basic_block(x: Tensor, w1: Tensor, bn1: BatchNormArgs, w2: Tensor, bn2: BatchNormArgs, *,
                stride: int = 1, shortcut: Optional[Tensor] = None) -> Tensor:
    """torchvision's BasicBlock: ``relu(bn2(conv3x3(relu(bn1(conv3x3(x))))) + shortcut)``.
    The first BN + ReLU is applied in the second conv's prologue and the second
    BN in the add + ReLU. ``shortcut`` defaults to x (identity)."""
    h = conv_bn_pending(x, w1, None, bn1, stride=stride, padding=1, relu=True)
    out = conv_bn_add_relu(h, w2, None, bn2, x if shortcut is None else shortcut, stride=1,
                           padding=1)
    return _like_input(out, x)


def bottleneck(x: Tensor, w1: Tensor, bn1: BatchNormArgs, w2: Tensor, bn2: BatchNormArgs,
               w3: Tensor,
               bn3: BatchNormArgs, *, stride: int = 1, shortcut: Optional[Tensor] = None) -> Tensor:
    """torchvision's Bottleneck (stride in the 3x3, "v1.5"): 1x1 -> 3x3 -> 1x1, each
    BN + ReLU applied in the next conv's prologue, the last BN in the add + ReLU."""
    h = conv_bn_pending(x, w1, None, bn1, stride=1, padding=0, relu=True)
    h = conv_bn_pending(h, w2, None, bn2, stride=stride, padding=1, relu=True)
    out = conv_bn_add_relu(h, w3, None, bn3, x if shortcut is None else shortcut, stride=1,
                           padding=0)
    return _like_input(out, x)


def projection(x: Tensor, weight: Tensor, bn: BatchNormArgs, *, stride: int) -> Tensor:
    """Option B/C shortcut: 1x1 conv + BN."""
    return finish(conv_bn_pending(x, weight, None, bn, stride=stride, padding=0, relu=False))
