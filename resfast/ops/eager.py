"""The resfast ops called on the CPU in eager mode without torch.library's Python dispatch.

An op whose autograd formula is registered from Python is reached through Python twice per
call: the dispatcher calls torch.library's autograd wrapper (an ``autograd.Function`` built
for the call, the schema's defaults filled in, a redispatch), and ``resfast::conv2d_bn``'s
implementation is Python too. On the CPU that host time is a large part of a layer:
``benchmarks/cpu_host_time.py`` measured 650 us for one conv + BN + ReLU layer's forward and
backward against 150 us for torch.nn, about 27 ms of a ResNet-50 training step.

Where nothing needs to see the op (:func:`_unobserved`: eager mode, CPU tensors of plain type,
no tracer, dispatch or function mode, functorch transform or autocast; ``torch.device`` used
as a context manager or ``torch.set_default_device`` install a function mode, so they too
take the op), the functions below
run the same checks, implementations and autograd formulas (:mod:`resfast.ops.conv2d_bn`,
:mod:`resfast.ops.bn`) through a plain ``autograd.Function`` whose forward and backward call
the C++ kernels below autograd. The training layer's conv (statistics, no prologue or
epilogue) goes further: after the op's own checks it calls ``resfast::conv2d_stats``, whose
implementation and autograd formula are C++ (:mod:`resfast.ops.conv2d_stats`), as are
``resfast::bn_batch_act``'s on the CPU; and where the same conditions hold
(:func:`takes_one_call`), :func:`resfast.functional.conv_bn_pending` makes a whole training
layer's forward (the input's pending BN, that conv, the running statistics' update) one
``resfast::conv2d_bn_train`` call, which makes those op calls from C++. Likewise an eval
layer's forward that autograd does not record (:func:`takes_eval_call`) is one
``resfast::conv2d_bn_eval`` call, its folded weights cached in C++. Everything else calls
the op: torch.compile and export see the registered op, the GPU paths and the float64
reference are untouched. Both routes compute with the same kernels, so their results are
bitwise equal (tests/ops/test_eager_calls.py, tests/ops/test_conv2d_bn_train.py,
tests/ops/test_conv2d_bn_eval.py).

A profile names the op as the dispatcher would (``resfast::conv2d_bn``,
``resfast::conv2d_stats``, ...). The backward
works once: differentiating it again raises (``once_differentiable``), as it does through the
op (the backward ops have no derivative; csrc/ops.cpp makes them raise rather than return
zeros). Forward-mode AD raises here (no ``jvp``).
"""
import contextlib

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import bn as _bn
from . import conv2d_bn as _conv
from . import conv_cpu as _conv_cpu
from . import winograd as _winograd

ops = torch.ops.resfast
_below_autograd = torch._C._AutoDispatchBelowAutograd


def _unobserved(tensors) -> bool:
    """Whether a call on these tensors may skip the op's dispatch: eager, on the CPU, no
    autocast, and nothing that traces, transforms or intercepts it (a Parameter is a
    plain tensor here)."""
    return (not torch.compiler.is_compiling()
            and all((type(t) is Tensor or type(t) is torch.nn.Parameter) and t.is_cpu
                    for t in tensors)
            and not torch.is_autocast_enabled("cpu")
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and torch._C._functorch.peek_interpreter_stack() is None
            and not torch.jit.is_tracing())


def _records(tensors) -> bool:
    """Whether autograd would record a call on these tensors (else the call needs no node):
    a tensor that needs a gradient, or forward-mode AD under way (its tangents)."""
    return ((torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            or _forward_ad._current_level >= 0)


def _named(op: str):
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(op)
    return contextlib.nullcontext()


def _direct_backward(formula):
    """``formula(ctx, *grads)`` below autograd (the kernels straight away), once: under
    ``create_graph`` the results carry an error for a second backward instead of a
    silently wrong graph."""
    @once_differentiable
    def backward(ctx, *grads):
        with _below_autograd():
            return formula(ctx, *grads)
    return staticmethod(backward)


def _forward(impl, name: str, setup):
    """The forward of a direct call: ``impl`` below autograd, then the op's own
    ``setup_context``. (Called from ``forward`` rather than given as the Function's
    ``setup_context``: with one, ``Function.apply`` binds the arguments to the forward's
    signature through ``inspect`` on every call, ~25 us.)"""
    def forward(ctx, *args):
        with _below_autograd(), _named(name):
            output = impl(*args)
        setup(ctx, args, output)
        return output
    return staticmethod(forward)


class _Conv2dBN(torch.autograd.Function):
    forward = _forward(_conv.forward_impl, "resfast::conv2d_bn", _conv.setup)
    backward = _direct_backward(
        lambda ctx, gy, gm, gv: _conv.backward_formula(ctx, gy, gm, gv, _conv_backward))


def _conv_backward(*args):
    with _named("resfast::conv2d_bn_backward"):
        return _conv.backward_impl(*args)


def _conv_direct(x: Tensor, weight: Tensor, tensors) -> bool:
    """Whether a conv on these tensors may skip the op's dispatch: nothing observes it and
    it runs oneDNN (not the Triton paths on the CPU, not the ATen reference)."""
    # (_conv._on_reference's test for CPU tensors, the environment read once)
    return (_unobserved(tensors) and not _conv._triton_on_cpu() and x.dtype != torch.float64
            and _conv_cpu.runs_onednn(x, weight))


def takes_one_call(x: Tensor, weight: Tensor, tensors) -> bool:
    """Whether a training layer's forward on these tensors may be one
    ``resfast::conv2d_bn_train`` call (:func:`resfast.functional._train_in_one_call`): where
    :func:`conv2d_bn` would call ``resfast::conv2d_stats`` directly."""
    return _conv_direct(x, weight, tensors)


def takes_eval_call(x: Tensor, weight: Tensor, tensors) -> bool:
    """Whether an eval layer's forward on these tensors may be one ``resfast::conv2d_bn_eval``
    call (:func:`resfast.functional._eval_in_one_call`): where :func:`conv2d_bn` would run the
    implementation itself, below autograd (an inference call)."""
    return _conv_direct(x, weight, tensors) and not _records(tensors)


def conv2d_bn(x, weight, bias, in_scale, in_shift, in_relu, stride, padding, stats, out_relu,
              in_centre=None, out_scale=None, out_shift=None, out_centre=None, residual=None,
              dilation=1):
    """``torch.ops.resfast.conv2d_bn`` with the same arguments."""
    args = (x, weight, bias, in_scale, in_shift, in_relu, stride, padding, stats, out_relu,
            in_centre, out_scale, out_shift, out_centre, residual, dilation)
    tensors = [a for a in args if isinstance(a, Tensor)]
    if isinstance(x, Tensor) and isinstance(weight, Tensor) and _conv_direct(x, weight, tensors):
        if not _records(tensors):  # inference: the implementation itself, no node
            with _below_autograd(), _named("resfast::conv2d_bn"), _winograd.inference_call():
                return _conv.forward_impl(*args)
        if (stats and in_scale is None and not in_relu and out_scale is None
                and residual is None):
            # the training layer: checked as the op checks it, then C++ all the way
            # (resfast::conv2d_stats, its autograd formula included)
            _conv.check_conv_inputs(*args[:2], bias, in_scale, in_shift, stride, padding, stats,
                                    out_relu, in_centre, out_scale, out_shift, out_centre,
                                    residual, dilation)
            return ops.conv2d_stats.default(x, weight, bias, stride, padding, dilation)
        return _Conv2dBN.apply(*args)
    return ops.conv2d_bn(*args)


class _BnAct(torch.autograd.Function):
    forward = _forward(ops.bn_act.default, "resfast::bn_act", _bn.act_setup)
    backward = _direct_backward(_bn.act_backward)


class _BnFinalize(torch.autograd.Function):
    forward = _forward(ops.bn_finalize.default, "resfast::bn_finalize", _bn.finalize_setup)
    backward = _direct_backward(_bn.finalize_backward)


class _BnStats(torch.autograd.Function):
    forward = _forward(ops.bn_stats.default, "resfast::bn_stats", _bn.stats_setup)
    backward = _direct_backward(_bn.stats_backward)


def _call(function, op, *args):
    """``function.apply(*args)`` where nothing observes the call (the op's kernel itself
    where autograd records nothing), else the op; a first argument that is no tensor goes
    to the op, for its error."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if isinstance(args[0], Tensor) and _unobserved(tensors):
        if not _records(tensors):
            with _below_autograd(), _named(op.default.name()):
                return op.default(*args)
        return function.apply(*args)
    return op(*args)


def bn_act(y, scale, shift, residual, relu, centre=None):
    """``torch.ops.resfast.bn_act`` with the same arguments."""
    return _call(_BnAct, ops.bn_act, y, scale, shift, residual, relu, centre)


def bn_batch_act(y, mean, var, weight, bias, residual, relu, eps):
    """``torch.ops.resfast.bn_batch_act`` itself: on the CPU its autograd formula is
    C++ already (csrc/cpu/conv2d_stats.cpp), so there is no dispatch to skip."""
    return ops.bn_batch_act(y, mean, var, weight, bias, residual, relu, eps)


def bn_finalize(mean, var, weight, bias, eps):
    """``torch.ops.resfast.bn_finalize`` with the same arguments."""
    return _call(_BnFinalize, ops.bn_finalize, mean, var, weight, bias, eps)


def bn_stats(y):
    """``torch.ops.resfast.bn_stats``."""
    return _call(_BnStats, ops.bn_stats, y)
