"""A training convolution's backward on the CPU, one layer at a time: torch.nn's (one
``aten::convolution_backward`` call, oneDNN, for the input's and the weight's gradient)
against resfast's (``aten::convolution_backward`` for the input's alone, then
``resfast::conv2d_weight_grad``: one GEMM over the input's windows where the weight is
large for the output positions, a direct loop at few channels, else oneDNN), float32,
channels_last, the two timed in turn round after round on fresh inputs, and the weight
gradient alone (oneDNN's against the op's).

    python3 benchmarks/cpu_weight_grad.py [--layers r20 r50-112 r50-224] [--rounds 9]
    python3 benchmarks/cpu_weight_grad.py --network resnet20 resnet50 [--rounds 9]

Layers: ResNet-20's 3x3 convolutions at batch 128, 32x32 (the training benchmark's), and
ResNet-50's at batch 8, 112x112 (the training benchmark's: its first two stages take the
direct loop, the later ones the GEMM) and 224x224, one per shape. Prints, per layer, the
op's path there, each median time in ms and the median of the rounds' own ratios
(oneDNN's time over resfast's). With --network: resfast's training step of the
benchmark's network (``resfast bench``'s case, channels_last) with the op as it is,
against the same step with every weight gradient by oneDNN (the op's CPU kernel
replaced, for those steps, by one calling ``aten::convolution_backward``), the two
alternating in one process; prints each median step time and the median of the rounds'
ratios. Measurements only.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # this checkout's resfast
import resfast  # noqa: E402,F401  (registers the ops)
from resfast.ops.weight_grad import path  # noqa: E402

CL = torch.channels_last
# name: [(N, C_in, C_out, H, kernel, stride)]: ResNet-20's 3x3 convolutions; ResNet-50's
# 3x3 convolutions of its first two stages at 112x112 and its convolutions from the third
# stage on (the 1x1 convolutions of the first two stages take oneDNN's)
LAYERS = {
    "r20": [(128, 3, 16, 32, 3, 1), (128, 16, 16, 32, 3, 1), (128, 16, 32, 32, 3, 2),
            (128, 32, 32, 16, 3, 1), (128, 32, 64, 16, 3, 2), (128, 64, 64, 8, 3, 1)],
    "r50-112": [(8, 64, 64, 28, 3, 1), (8, 128, 128, 28, 3, 2), (8, 128, 128, 14, 3, 1),
                (8, 1024, 512, 7, 1, 1), (8, 512, 512, 7, 3, 2), (8, 512, 512, 4, 3, 1),
                (8, 2048, 512, 4, 1, 1), (8, 512, 2048, 4, 1, 1), (8, 1024, 2048, 7, 1, 2),
                (8, 256, 256, 7, 3, 1)],
    "r50-224": [(8, 512, 512, 14, 3, 2), (8, 512, 512, 7, 3, 1), (8, 2048, 512, 7, 1, 1),
                (8, 512, 2048, 7, 1, 1), (8, 1024, 2048, 14, 1, 2), (8, 256, 256, 14, 3, 1)],
}


def _inputs(n, cin, cout, h, k, s):
    p = k // 2
    ho = (h + 2 * p - k) // s + 1
    x = torch.randn(n, cin, h, h).contiguous(memory_format=CL)
    w = torch.randn(cout, cin, k, k).contiguous(memory_format=CL)
    g = torch.randn(n, cout, ho, ho).contiguous(memory_format=CL)
    return x, w, g, p, n * ho * ho


def _providers(s, p):
    args = ([s, s], [p, p], [1, 1], False, [0, 0], 1)

    def torch_both(x, w, g):
        return torch.ops.aten.convolution_backward(g, x, w, None, *args, [True, True, False])

    def resfast_both(x, w, g):
        gx = torch.ops.aten.convolution_backward(g, x, w, None, *args, [True, False, False])[0]
        return gx, torch.ops.resfast.conv2d_weight_grad(g, x, w, s, p, 1)

    def onednn_weight(x, w, g):
        return torch.ops.aten.convolution_backward(g, x, w, None, *args, [False, True, False])

    def resfast_weight(x, w, g):
        return torch.ops.resfast.conv2d_weight_grad(g, x, w, s, p, 1)

    return {"torch backward": torch_both, "resfast backward": resfast_both,
            "oneDNN weight": onednn_weight, "resfast weight": resfast_weight}


def measure(shape, rounds):
    n, cin, cout, h, k, s = shape
    x, w, g, p, positions = _inputs(*shape)
    providers = _providers(s, p)
    times = {name: [] for name in providers}
    for r in range(rounds + 1):
        x, w, g, _, _ = _inputs(*shape)  # fresh tensors each round, as a training step has
        for name, fn in providers.items():
            t = time.perf_counter()
            fn(x, w, g)
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    return path(g, x, w, s, p, 1), positions, times


_calls = [0]  # weight gradients the replacement computed: that it took effect


def _onednn_weight_grad(g, x, w, stride, padding, dilation):
    _calls[0] += 1
    args = ([stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], 1, [False, True, False])
    gw = torch.ops.aten.convolution_backward(g, x, w, None, *args)[1]
    return gw if gw.stride() == w.stride() else torch.empty_like(w).copy_(gw)


def measure_network(model, rounds, steps=2):
    from resfast.bench import cases as C

    case = next(c for c in C.all_cases("cpu") if c.get("model") == model and c.mode == "train")
    step = C.make_workload(case, C.build_resfast(case, "cpu"), "cpu", torch.float32,
                           "channels_last").step
    times = {"op": [], "oneDNN": []}
    for r in range(rounds + 1):
        for name in times:
            lib = None
            if name == "oneDNN":
                lib = torch.library.Library("resfast", "IMPL")
                lib.impl("conv2d_weight_grad", _onednn_weight_grad, "CPU")
            t = time.perf_counter()
            for _ in range(steps):
                step()
            if r:  # the first round warms up
                times[name].append((time.perf_counter() - t) / steps)
            if lib is not None:
                lib._destroy()  # the op's own kernel again
    return times


def main_network(models, rounds):
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"channels_last training steps, median of {rounds} rounds of 2 steps (ms); ratio: "
          f"the median of the rounds' oneDNN/op ratios")
    for model in models:
        t = measure_network(model, rounds)
        ratio = statistics.median(a / b for a, b in zip(t["oneDNN"], t["op"]))
        print(f"{model:10s} op {statistics.median(t['op']) * 1e3:8.1f}  every weight gradient "
              f"by oneDNN {statistics.median(t['oneDNN']) * 1e3:8.1f}  ratio {ratio:5.2f}x  "
              f"(replaced calls {_calls[0]})", flush=True)
        _calls[0] = 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="+", choices=sorted(LAYERS), default=sorted(LAYERS))
    parser.add_argument("--shapes", nargs="+", metavar="NxCINxCOUTxHxKxS",
                        help="these shapes instead of --layers, e.g. 8x512x512x4x3x1")
    parser.add_argument("--network", nargs="+", metavar="MODEL",
                        help="training steps of these networks instead (resnet20, resnet50)")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    if args.network:
        return main_network(args.network, args.rounds)
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes
              else [sh for name in args.layers for sh in LAYERS[name]])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"channels_last, median of {args.rounds} rounds (ms); ratio: the median of the "
          f"rounds' oneDNN/resfast ratios")
    print(f"{'N x Cin x Cout x H, KxK /s':30s} {'positions':>9s} {'path':>6s} "
          f"{'torch bwd':>9s} {'resfast':>8s} {'ratio':>6s} {'oneDNN w':>9s} {'op w':>8s} "
          f"{'ratio':>6s}")
    for shape in shapes:
        way, positions, t = measure(shape, args.rounds)
        n, cin, cout, h, k, s = shape

        def ms(name):
            return statistics.median(t[name]) * 1e3

        def ratio(a, b):
            return statistics.median(x / y for x, y in zip(t[a], t[b]))
        print(f"{f'{n}x{cin}x{cout}x{h}, {k}x{k} /{s}':30s} {positions:9d} "
              f"{way:>6s} {ms('torch backward'):9.2f} "
              f"{ms('resfast backward'):8.2f} "
              f"{ratio('torch backward', 'resfast backward'):5.2f}x "
              f"{ms('oneDNN weight'):9.2f} {ms('resfast weight'):8.2f} "
              f"{ratio('oneDNN weight', 'resfast weight'):5.2f}x", flush=True)


if __name__ == "__main__":
    main()
