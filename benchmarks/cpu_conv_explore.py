"""Exploration for issue 11's CPU convolution path (measurements only; not used by resfast).

    python3 benchmarks/cpu_conv_explore.py                 # ResNet-20 b128 and ResNet-50 b8 layers
    python3 benchmarks/cpu_conv_explore.py --layers r20 --dtypes float32 --reps 20

Eval mode, per layer, each against torch eager's conv + BatchNorm + ReLU (+ add):
  eager         F.conv2d, F.batch_norm(training=False), relu_ (+ add_ first)
  folded        BN folded into the weights once: F.conv2d(bias) + relu_
  onednn        torch.ops.mkldnn._convolution_pointwise with the ReLU as a post-op
                (residual: the .binary overload, add then ReLU), folded weights
  onednn_packed the same with the weight prepacked once (_reorder_convolution_weight),
                as Inductor's CPU freezing pass emits it (fx_passes/mkldnn_fusion.py)
  compile       torch.compile of eager with inductor freezing (weights constant)
Training: aten.convolution_backward (input and weight gradients) per layout.
Times are medians of interleaved calls in one process; ratio = eager / variant.
"""

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's
from resfast.bench.measure import time_interleaved  # noqa: E402

# (name, N, Cin, Cout, H, kernel, stride, residual)
LAYERS = {
    "r20": [
        ("r20.s1.conv3x3", 128, 16, 16, 32, 3, 1, True),
        ("r20.s2.conv3x3", 128, 32, 32, 16, 3, 1, True),
        ("r20.s3.conv3x3", 128, 64, 64, 8, 3, 1, True),
    ],
    "r50": [
        ("r50.l1.reduce1x1", 8, 256, 64, 56, 1, 1, False),
        ("r50.l1.conv3x3", 8, 64, 64, 56, 3, 1, False),
        ("r50.l1.expand1x1", 8, 64, 256, 56, 1, 1, True),
        ("r50.l2.conv3x3", 8, 128, 128, 28, 3, 1, False),
        ("r50.l3.conv3x3", 8, 256, 256, 14, 3, 1, False),
    ],
}


def eval_variants(layer, dtype, channels_last, with_compile):
    _, n, cin, cout, h, k, stride, residual = layer
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    pad = k // 2
    x = torch.randn(n, cin, h, h).to(dtype).contiguous(memory_format=fmt)
    w = (torch.randn(cout, cin, k, k) * (2 / (cin * k * k)) ** 0.5).to(dtype)
    w = w.contiguous(memory_format=fmt)
    rm, rv = torch.randn(cout) * 0.1, torch.rand(cout) + 0.5
    gamma, beta = torch.rand(cout) + 0.5, torch.randn(cout) * 0.1
    ho = (h + 2 * pad - k) // stride + 1
    res = torch.randn(n, cout, ho, ho).to(dtype).contiguous(memory_format=fmt) if residual else None
    scale = gamma / (rv + 1e-5).sqrt()
    w_fold = (w.float() * scale.view(-1, 1, 1, 1)).to(dtype).contiguous(memory_format=fmt)
    b_fold = (beta - rm * scale).to(dtype)
    w_packed = torch.ops.mkldnn._reorder_convolution_weight(
        w_fold, [pad, pad], [stride, stride], [1, 1], 1, list(x.shape)
    )

    def eager():
        y = F.conv2d(x, w, None, stride, pad)
        y = F.batch_norm(y, rm, rv, gamma, beta, False, 0.1, 1e-5)
        if res is not None:
            y += res
        return F.relu(y, inplace=True)

    def folded():
        y = F.conv2d(x, w_fold, b_fold, stride, pad)
        if res is not None:
            y += res
        return F.relu(y, inplace=True)

    def onednn(weight):
        args = ([pad, pad], [stride, stride], [1, 1], 1)
        if res is None:
            return lambda: torch.ops.mkldnn._convolution_pointwise(
                x, weight, b_fold, *args, "relu", [], ""
            )
        return lambda: torch.ops.mkldnn._convolution_pointwise.binary(
            x, res, weight, b_fold, *args, "add", 1.0, "relu", [], ""
        )

    fns = {
        "eager": eager,
        "folded": folded,
        "onednn": onednn(w_fold),
        "onednn_packed": onednn(w_packed),
    }
    if with_compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        fns["compile"] = torch.compile(eager, dynamic=False)
    ref = eager().float()
    for name in list(fns):  # every variant computes the same thing, or is left out with why
        try:
            err = (fns[name]().float() - ref).abs().max().item()
        except RuntimeError as e:
            print(
                f"#   {layer[0]} {dtype} {'CL' if channels_last else 'NCHW'}: {name} fails: "
                f"{str(e).splitlines()[0][:100]}"
            )
            del fns[name]
            continue
        tol = 1e-3 if dtype == torch.float32 else 0.1
        assert err <= tol * (ref.abs().max().item() + 1), f"{name}: max error {err}"
    return fns


def backward_variant(layer, dtype, channels_last):
    _, n, cin, cout, h, k, stride, _ = layer
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    pad = k // 2
    x = torch.randn(n, cin, h, h).to(dtype).contiguous(memory_format=fmt)
    w = torch.randn(cout, cin, k, k).to(dtype).contiguous(memory_format=fmt)
    ho = (h + 2 * pad - k) // stride + 1
    g = torch.randn(n, cout, ho, ho).to(dtype).contiguous(memory_format=fmt)
    return lambda: torch.ops.aten.convolution_backward(
        g, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, [True, True, False]
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", nargs="+", default=list(LAYERS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--layouts", nargs="+", default=["channels_last", "nchw"])
    parser.add_argument("--reps", type=int, default=0)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    print(
        f"# {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{torch.backends.cpu.get_cpu_capability()}; ms, medians; (x) = eager / variant"
    )
    layers = [layer for group in args.layers for layer in LAYERS[group]]
    for layer, dtype_name, layout in itertools.product(layers, args.dtypes, args.layouts):
        dtype = getattr(torch, dtype_name)
        macs = layer[1] * layer[2] * layer[3] * layer[4] ** 2 * layer[5] ** 2
        reps = args.reps or max(10, min(100, int(2e10 / macs)))
        fns = eval_variants(layer, dtype, layout == "channels_last", args.compile)
        fns["train_bwd"] = backward_variant(layer, dtype, layout == "channels_last")
        timings = time_interleaved(fns, torch.device("cpu"), 3, 1, reps)
        ms = {name: timing.ms for name, timing in timings.items()}
        cells = "  ".join(
            f"{k} {v:.2f}"
            + (f" ({ms['eager'] / v:.2f}x)" if k not in ("eager", "train_bwd") else "")
            for k, v in ms.items()
        )
        print(f"{layer[0]:<18} {dtype_name:<8} {layout:<13} {cells}", flush=True)


if __name__ == "__main__":
    main()
