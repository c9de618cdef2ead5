"""Host time of one layer on the CPU: conv + BN + ReLU, a training step's forward
and backward and an eval forward, on an input so small (2x8x4x4, 3x3 conv, 1
thread) that the kernels take a few microseconds and what is timed is the framework around them:
dispatch, autograd, Python. The kernel is 3x3 so that torch.nn runs oneDNN's
convolution too, as it does in a network (for a 1x1 kernel on one thread and a
batch under 16 it takes ATen's own, whose host time is ~30 us less).

    python3 benchmarks/cpu_host_time.py

Prints the medians of interleaved calls for torch.nn (Conv2d, BatchNorm2d,
ReLU) and for resfast.functional.conv_bn_relu, and for the pieces of resfast's
forward: the conv2d_bn op with and without autograd, the conv2d_bn_train op the
layer calls (C++, autograd included) and the conv2d_stats op it calls, and the
bare oneDNN call they make; and
torch.library's own fill_defaults, which the autograd wrapper of every op with a
Python autograd formula calls on each call (a private torch function: skipped
where this torch has none). Then the eval layer's forward under no_grad, the
conv2d_bn_eval op it calls and that op's oneDNN call, and what that host time
amounts to in a network of small layers: ResNet-20's inference at batch 1 (32x32),
resfast's against its torch.nn twin (one call per ``calls // 10``).
It prints measurements only.
"""
import os
import sys

import torch

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # this checkout's resfast
from resfast import functional as F  # noqa: E402
from resfast import models  # noqa: E402
from resfast.bench.measure import time_interleaved  # noqa: E402
from resfast.twin import torch_twin  # noqa: E402

ops = torch.ops.resfast
CL = torch.channels_last


def main(rounds: int = 15, calls: int = 50) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=CL).requires_grad_()
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False).to(memory_format=CL)
    bn = torch.nn.BatchNorm2d(8)
    bn_args = F.BatchNormArgs.of(bn)
    w = conv.weight

    def torch_step():
        torch.relu(bn(conv(x))).sum().backward()

    def resfast_step():
        F.conv_bn_relu(x, w, None, bn_args, padding=1).sum().backward()

    def op_with_autograd():
        ops.conv2d_bn(x, w, None, None, None, False, 1, 1, True, False)

    def op_no_grad():
        with torch.no_grad():
            ops.conv2d_bn(x, w, None, None, None, False, 1, 1, True, False)

    def train_op_with_autograd():
        ops.conv2d_bn_train(x, None, None, None, None, False, 0.0, w, None, 1, 1, 1,
                            bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum)

    def stats_op_with_autograd():
        ops.conv2d_stats(x, w, None, 1, 1, 1)

    def onednn_conv():
        with torch.no_grad():
            torch.ops.mkldnn._convolution_pointwise(x, w, None, [1, 1], [1, 1], [1, 1], 1, "none",
                                                    [], "")

    try:  # what torch.library's autograd wrapper does to conv2d_bn's arguments on every call
        from torch._library.utils import fill_defaults

        schema = ops.conv2d_bn.default._schema
        args = (x, w, None, None, None, False, 1, 1, True, False)

        def defaults():
            fill_defaults(schema, args, {})
    except ImportError:
        defaults = None

    cases = {"torch.nn conv+BN+ReLU, forward + backward": torch_step,
             "resfast conv_bn_relu, forward + backward": resfast_step,
             "  conv2d_bn op (with autograd)": op_with_autograd,
             "  conv2d_bn op (no grad)": op_no_grad,
             "  conv2d_bn_train op (with autograd; the layer's forward)": train_op_with_autograd,
             "  conv2d_stats op (with autograd; what that calls)": stats_op_with_autograd,
             "  its oneDNN call alone": onednn_conv}
    if defaults is not None:
        cases["  torch.library's fill_defaults of its arguments"] = defaults

    bn_eval = torch.nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn_eval.running_var.uniform_(0.5, 2.0)
    eval_args = F.BatchNormArgs.of(bn_eval)
    x_eval = x.detach()

    def torch_eval():
        with torch.no_grad():
            torch.relu(bn_eval(conv(x_eval)))

    def resfast_eval():
        with torch.no_grad():
            F.conv_bn_relu(x_eval, w, None, eval_args, padding=1)

    def eval_op():
        with torch.no_grad():
            ops.conv2d_bn_eval(x_eval, w, None, bn_eval.running_mean, bn_eval.running_var,
                               bn_eval.weight, bn_eval.bias, bn_eval.eps, None, True, 1, 1, 1)

    # the call that makes: the weight packed for oneDNN, BN's scale as a post-op
    packed = torch.ops.mkldnn._reorder_convolution_weight(w.detach().contiguous(), [1, 1],
                                                          [1, 1], [1, 1], 1, list(x.shape))
    scale = torch.ones(1, 8, 1, 1).contiguous(memory_format=CL)
    shift = torch.zeros(8)

    def eval_onednn():
        with torch.no_grad():
            torch.ops.mkldnn._convolution_pointwise.binary(
                x_eval, scale, packed, shift, [1, 1], [1, 1], [1, 1], 1, "mul", None, "relu", [],
                None)

    cases["torch.nn conv+BN+ReLU, eval forward (no grad)"] = torch_eval
    cases["resfast conv_bn_relu, eval forward (no grad)"] = resfast_eval
    cases["  conv2d_bn_eval op (what that calls)"] = eval_op
    cases["  its oneDNN call alone (packed weight, scale post-op)"] = eval_onednn

    ours = models.resnet20().eval()
    theirs = torch_twin(ours).eval()
    image = torch.randn(1, 3, 32, 32)

    def network(model):
        def run():
            with torch.no_grad():
                model(image)
        return run

    net_cases = {"torch.nn ResNet-20 inference, batch 1": network(theirs),
                 "resfast ResNet-20 inference, batch 1": network(ours)}
    net_calls = max(1, calls // 10)
    cpu = torch.device("cpu")
    # each group warmed up by as many calls as a round makes, then its rounds interleaved
    times = time_interleaved(cases, cpu, calls, calls, rounds)
    times.update(time_interleaved(net_cases, cpu, net_calls, net_calls, rounds))
    print(f"# 1 thread, torch {torch.__version__}; median us per call over {rounds} interleaved "
          f"rounds of {calls} ({net_calls} for the networks)")
    for name, t in times.items():
        print(f"{name:<58} {t.ms * 1e3:8.1f} us")


if __name__ == "__main__":
    main()
