"""The CPU BatchNorm ops against their torch composites, side by side.

    python3 benchmarks/cpu_bn_ops.py              # every case, float32 and bf16, both layouts
    python3 benchmarks/cpu_bn_ops.py --compile    # also torch.compile of the composites
    python3 benchmarks/cpu_bn_ops.py --shapes 128x16x32x32 --dtypes float32 --reps 50
    python3 benchmarks/cpu_bn_ops.py --shapes r20 r50-224 r50-112 --dtypes float32

Each row times resfast's ops and torch's composite of the same computation on
the same inputs, interleaved call by call in one process (so load from other
processes hits both alike), and prints the medians and their ratio torch /
resfast (above 1: resfast is faster). It prints measurements only.

Shapes are N x C x H x W, or the name of a network's set (r20: ResNet-20 at
batch 128 on 32x32; r50-224 and r50-112: ResNet-50's BN shapes at batch 8 on
224x224 and 112x112 inputs).

Cases (BN in training mode unless said), resfast's ops chained as
resfast.functional and resfast/ops/conv_cpu.py chain them (centre = mean):
  bn_train_fwd   bn_stats + bn_finalize + bn_update_running_stats_ + bn_act(relu)
                 vs F.batch_norm(training=True) + relu_
  bn_add_relu    the same with the residual in bn_act, vs batch_norm + add_ + relu_
  bn_relu_bwd    bn_act_backward + bn_finalize_backward + bn_act (the statistics'
                 gradient added to grad_y, conv_cpu.stats_gradient)
                 vs threshold_backward + native_batch_norm_backward
  bn_eval        bn_act(y, scale, shift, relu) vs F.batch_norm(training=False) + relu_
  bn_stats       bn_stats vs torch.var_mean
  bn_act_bwd     bn_act_backward (grad_y, grad_scale, grad_shift) vs its composite
                 (threshold_backward, mul, two sums)
  relayout       y copied into the other layout (the layout column is y's):
                 resfast::relayout vs y.contiguous(memory_format=...)
  bn_batch_bwd   the backward of a training BN + ReLU through autograd (grad of y,
                 weight, bias): bn_batch_act vs batch_norm + relu, and a third column,
                 the chain bn_batch_act replaces (bn_stats -> bn_finalize -> bn_act(centre):
                 bn_act_backward, bn_finalize_backward, bn_stats_backward)
  bn_batch_add_bwd  the same with a residual added before the ReLU (its gradient too)
"""

import argparse
import itertools
import math
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # this checkout's resfast
import resfast  # noqa: E402, F401  (registers the ops)
from resfast.bench.measure import time_interleaved  # noqa: E402
from resfast.ops.conv_cpu import stats_gradient  # noqa: E402

CPU = torch.device("cpu")

ops = torch.ops.resfast
aten = torch.ops.aten

# ResNet-20 at batch 128 (32x32 input), ResNet-50 at batch 8 (224x224 input).
SHAPES = ["128x16x32x32", "128x32x16x16", "128x64x8x8", "8x64x56x56", "8x256x56x56", "8x512x28x28"]
R50_CHANNELS = [(64, 1), (256, 1), (128, 2), (512, 2), (256, 4), (1024, 4), (512, 8), (2048, 8)]
SHAPE_SETS = {
    "r20": ["128x16x32x32", "128x32x16x16", "128x64x8x8"],
    "r50-224": [f"8x{c}x{56 // d}x{56 // d}" for c, d in R50_CHANNELS],
    "r50-112": [f"8x{c}x{-(-28 // d)}x{-(-28 // d)}" for c, d in R50_CHANNELS],
}
EPS, MOMENTUM = 1e-5, 0.1


def make_inputs(shape, dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    n, c, h, w = shape

    def act():
        return torch.randn(shape).to(dtype).contiguous(memory_format=fmt)

    return dict(
        y=act(),
        res=act(),
        grad=act(),
        weight=torch.rand(c) + 0.5,
        bias=torch.randn(c),
        running_mean=torch.zeros(c),
        running_var=torch.ones(c),
        count=n * h * w,
    )


# ---- resfast: the ops as resfast.functional chains them -------------------------


def ours_train(t, residual):
    def run():
        mean, var = ops.bn_stats(t["y"])
        scale, shift = ops.bn_finalize(torch.zeros_like(var), var, t["weight"], t["bias"], EPS)
        ops.bn_update_running_stats_(
            t["running_mean"], t["running_var"], mean, var, t["count"], MOMENTUM
        )
        return ops.bn_act(t["y"], scale, shift, t["res"] if residual else None, True, mean)

    return run


def ours_relu_bwd(t):
    y = t["y"]
    mean, var = ops.bn_stats(y)
    zero = torch.zeros_like(var)
    scale, shift = ops.bn_finalize(zero, var, t["weight"], t["bias"], EPS)

    def run():
        g_y, g_scale, g_shift, _ = ops.bn_act_backward(
            t["grad"], y, scale, shift, None, True, [True, True, True, False], mean
        )
        _, g_var, g_weight, g_bias = ops.bn_finalize_backward(
            g_scale, g_shift, zero, var, t["weight"], EPS
        )
        g_mean = -scale * g_shift  # through the centre
        g_x = stats_gradient(g_y, g_mean, g_var, y, mean)
        return g_x, g_weight, g_bias

    return run


def ours_eval(t):
    scale, shift = ops.bn_finalize(t["running_mean"], t["running_var"], t["weight"], t["bias"], EPS)
    return lambda: ops.bn_act(t["y"], scale, shift, None, True)


def ours_act_bwd(t):
    scale, shift = torch.rand(t["weight"].shape) + 0.5, torch.randn(t["weight"].shape)
    return lambda: ops.bn_act_backward(
        t["grad"], t["y"], scale, shift, None, True, [True, True, True, False]
    )


# ---- torch: what torch.nn / torchvision run -------------------------------------


def torch_train(t, residual):
    def run():
        out = F.batch_norm(
            t["y"], t["running_mean"], t["running_var"], t["weight"], t["bias"], True, MOMENTUM, EPS
        )
        if residual:
            out += t["res"]
        return F.relu(out, inplace=True)

    return run


def torch_relu_bwd(t):
    y, weight = t["y"], t["weight"]
    out, save_mean, save_invstd = aten.native_batch_norm(
        y,
        weight,
        t["bias"],
        t["running_mean"].clone(),
        t["running_var"].clone(),
        True,
        MOMENTUM,
        EPS,
    )
    out = out.relu()

    def run():
        g = aten.threshold_backward(t["grad"], out, 0)
        return aten.native_batch_norm_backward(
            g, y, weight, None, None, save_mean, save_invstd, True, EPS, [True, True, True]
        )

    return run


def torch_eval(t):
    def run():
        out = F.batch_norm(
            t["y"],
            t["running_mean"],
            t["running_var"],
            t["weight"],
            t["bias"],
            False,
            MOMENTUM,
            EPS,
        )
        return F.relu(out, inplace=True)

    return run


def torch_stats(t):
    return lambda: torch.var_mean(t["y"], (0, 2, 3), correction=0)


def torch_act_bwd(t):
    c = t["weight"].shape[0]
    scale, shift = torch.rand(c) + 0.5, torch.randn(c)
    out = (t["y"] * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).relu().to(t["y"].dtype)

    def run():
        g = aten.threshold_backward(t["grad"], out, 0)
        return (
            g * scale.view(1, -1, 1, 1),
            (g * t["y"]).sum((0, 2, 3), dtype=torch.float32),
            g.sum((0, 2, 3), dtype=torch.float32),
        )

    return run


def _is_channels_last(t):
    return t["y"].is_contiguous(memory_format=torch.channels_last)


def ours_relayout(t):
    return lambda: ops.relayout(t["y"], not _is_channels_last(t))


def torch_relayout(t):
    fmt = torch.contiguous_format if _is_channels_last(t) else torch.channels_last
    return lambda: t["y"].contiguous(memory_format=fmt)


def _graph(t, residual, build):
    """lambda: the gradients of y, weight, bias (and the residual) of build(y, weight,
    bias, res) through autograd, the graph built once and kept."""
    leaves = [t["y"].clone().requires_grad_(), t["weight"].clone().requires_grad_(),
              t["bias"].clone().requires_grad_()]
    if residual:
        leaves.append(t["res"].clone().requires_grad_())
    out = build(*leaves[:3], leaves[3] if residual else None)
    return lambda: torch.autograd.grad(out, leaves, t["grad"], retain_graph=True)


def ours_batch_bwd(t, residual):
    def build(y, weight, bias, res):
        mean, var = ops.bn_stats(y.detach())
        return ops.bn_batch_act(y, mean, var, weight, bias, res, True, EPS)

    return _graph(t, residual, build)


def chain_batch_bwd(t, residual):
    def build(y, weight, bias, res):
        mean, var = ops.bn_stats(y)
        scale, shift = ops.bn_finalize(torch.zeros_like(var), var, weight, bias, EPS)
        return ops.bn_act(y, scale, shift, res, True, mean)

    return _graph(t, residual, build)


def torch_batch_bwd(t, residual):
    def build(y, weight, bias, res):
        out = F.batch_norm(y, t["running_mean"].clone(), t["running_var"].clone(), weight, bias,
                           True, MOMENTUM, EPS)
        return F.relu(out + res if residual else out)

    return _graph(t, residual, build)


CASES = {
    "bn_train_fwd": (lambda t: ours_train(t, False), lambda t: torch_train(t, False)),
    "bn_add_relu": (lambda t: ours_train(t, True), lambda t: torch_train(t, True)),
    "bn_relu_bwd": (ours_relu_bwd, torch_relu_bwd),
    "bn_eval": (ours_eval, torch_eval),
    "bn_stats": (lambda t: lambda: ops.bn_stats(t["y"]), torch_stats),
    "bn_act_bwd": (ours_act_bwd, torch_act_bwd),
    "relayout": (ours_relayout, torch_relayout),
    "bn_batch_bwd": (lambda t: ours_batch_bwd(t, False), lambda t: torch_batch_bwd(t, False),
                     lambda t: chain_batch_bwd(t, False)),
    "bn_batch_add_bwd": (lambda t: ours_batch_bwd(t, True), lambda t: torch_batch_bwd(t, True),
                         lambda t: chain_batch_bwd(t, True)),
}
COMPILABLE = ("bn_train_fwd", "bn_add_relu", "bn_eval")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--layouts", nargs="+", default=["channels_last", "nchw"])
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=0, help="repetitions (default: by size, >= 15)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also torch.compile the composites of "
        + ", ".join(COMPILABLE)
        + " (a compile per row: minutes)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"resfast CPU kernels {ops.cpu_isa()}"
    )
    print("# medians of interleaved calls; ratio = torch / resfast (> 1: resfast faster); for"
          " bn_batch_*: chain ms, chain / bn_batch_act")
    header = (
        f"{'case':<16} {'shape':<13} {'dtype':<8} {'layout':<13} {'resfast ms':>10} "
        f"{'torch ms':>9} {'ratio':>6}"
    )
    print(header + ("  compile ms  ratio" if args.compile else ""))
    shapes = [s for name in args.shapes for s in SHAPE_SETS.get(name, [name])]
    for shape_text, dtype_name, layout in itertools.product(shapes, args.dtypes, args.layouts):
        shape = tuple(int(s) for s in shape_text.split("x"))
        reps = args.reps or max(15, min(200, int(3e8 / math.prod(shape))))
        t = make_inputs(shape, getattr(torch, dtype_name), layout == "channels_last")
        for case in args.cases:
            ours_of, torch_of, *chain_of = CASES[case]
            fns = [ours_of(t), torch_of(t)] + [f(t) for f in chain_of]
            if args.compile and case in COMPILABLE:
                fns.append(torch.compile(torch_of(t), dynamic=False))
            timings = time_interleaved(dict(enumerate(fns)), CPU, 3, 1, reps)
            ms = [timings[i].ms for i in range(len(fns))]
            row = (
                f"{case:<16} {shape_text:<13} {dtype_name:<8} {layout:<13} "
                f"{ms[0]:>10.3f} {ms[1]:>9.3f} {ms[1] / ms[0]:>6.2f}"
            )
            if len(ms) == 3:
                row += f"  {ms[2]:>10.3f} {ms[2] / ms[0]:>6.2f}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
