"""torch.library ops in the ``resfast`` namespace.

BatchNorm ops (schemas, CPU and CUDA kernels in csrc/): fake implementations
and autograd formulas are registered in :mod:`resfast.ops.bn` (those of the
training BatchNorm pair ``bn_batch_act``/``bn_batch_act_backward`` in
:mod:`resfast.ops.bn_batch`). The conv op is defined in Python
(:mod:`resfast.ops.conv2d_bn`): oneDNN on the CPU
(:mod:`resfast.ops.conv_cpu`), Triton or cuDNN on CUDA, ATen for float64; its training
case on the CPU is also the C++ op ``conv2d_stats`` (:mod:`resfast.ops.conv2d_stats`), and
a whole training layer's forward the C++ op ``conv2d_bn_train`` (csrc/cpu/conv2d_bn_train.cpp),
and an eval layer's the C++ op ``conv2d_bn_eval`` (:mod:`resfast.ops.conv2d_bn_eval`).
The CPU's 3x3 stride-1 convolutions run ``conv2d_winograd`` on weights transformed by
``winograd_weight`` (:mod:`resfast.ops.winograd`); the CPU's training convolutions take
their weight's gradient from ``conv2d_weight_grad`` (:mod:`resfast.ops.weight_grad`).
``relayout`` (:mod:`resfast.ops.layout`) copies activations between NCHW and
channels_last. resfast's layers call the ops through :mod:`resfast.ops.eager`, which
skips torch.library's Python dispatch for eager calls on the CPU.
"""
from . import bn, bn_batch, conv2d_bn, conv2d_bn_eval, conv2d_stats, layout, weight_grad, winograd  # noqa: F401  (registration side effects)
from .conv2d_bn import conv2d_bn_backward_reference, conv2d_bn_forward_reference  # noqa: F401

OPS = (
    "bn_stats",
    "bn_stats_backward",
    "bn_finalize",
    "bn_finalize_backward",
    "bn_update_running_stats_",
    "bn_act",
    "bn_act_backward",
    "bn_batch_act",
    "bn_batch_act_backward",
    "conv2d_bn",
    "conv2d_bn_backward",
    "conv2d_stats",
    "conv2d_stats_backward",
    "conv2d_bn_train",
    "conv2d_bn_eval",
    "conv2d_weight_grad",
    "conv2d_winograd",
    "winograd_weight",
    "relayout",
)
