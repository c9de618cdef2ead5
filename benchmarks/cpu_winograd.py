"""Inference's 3x3 conv + BN + ReLU layers on the CPU, one layer at a time: resfast with
Winograd's F(4x4, 3x3) (``resfast::conv2d_winograd``, the default), resfast with oneDNN's
direct convolution (``RESFAST_CPU_WINOGRAD=off``), torch.nn eager (Conv2d, BatchNorm2d, ReLU
in eval mode) and torch.compile of the same, float32, channels_last, every provider timed
in turn round after round, on the 3x3 stride-1 layers of ResNet-50 and VGG-11 (batch 8,
224x224) and ResNet-20 (batch 128, 32x32).

    python3 benchmarks/cpu_winograd.py [--layers r50 vgg r20] [--rounds 7]

Prints, per layer, whether resfast's default takes Winograd there (a 7x7 map does not:
both resfast columns then run the same direct convolution), each provider's median time
in ms and resfast's ratio (its default) against the others: the median of the rounds' own
ratios. Measurements only.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # this checkout's resfast
import resfast  # noqa: E402

CL = torch.channels_last
# name: [(N, C_in, C_out, H)] of the networks' 3x3 stride-1 convolutions, one per shape
LAYERS = {
    "r50": [(8, 64, 64, 56), (8, 128, 128, 28), (8, 256, 256, 14), (8, 512, 512, 7)],
    "vgg": [(8, 64, 128, 112), (8, 128, 256, 56), (8, 256, 256, 56), (8, 256, 512, 28),
            (8, 512, 512, 28), (8, 512, 512, 14)],
    "r20": [(128, 16, 16, 32), (128, 32, 32, 16), (128, 64, 64, 8)],
}


def _layer(cin, cout):
    layer = resfast.nn.Conv2dBNReLU(cin, cout, 3).eval()
    bn = layer.bn
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    ref = torch.nn.Sequential(layer.conv, layer.bn, torch.nn.ReLU()).eval()
    return layer, ref


def _winograd(flag):
    def run(f):
        def call():
            old = os.environ.get("RESFAST_CPU_WINOGRAD")
            os.environ["RESFAST_CPU_WINOGRAD"] = flag
            try:
                return f()
            finally:
                if old is None:
                    del os.environ["RESFAST_CPU_WINOGRAD"]
                else:
                    os.environ["RESFAST_CPU_WINOGRAD"] = old
        return call
    return run


def measure(shape, rounds):
    n, cin, cout, h = shape
    torch.manual_seed(0)
    layer, ref = _layer(cin, cout)
    x = torch.randn(n, cin, h, h).contiguous(memory_format=CL)
    compiled = torch.compile(ref)
    # a copy of its own: resfast caches one folded weight per weight tensor, and the two
    # algorithms' forms alternating on one tensor would refold it on every call
    twin = copy.deepcopy(layer)
    providers = {
        "winograd": _winograd("inference")(lambda: layer(x)),
        "direct": _winograd("off")(lambda: twin(x)),
        "eager": lambda: ref(x),
        "compile": lambda: compiled(x),
    }
    times = {name: [] for name in providers}
    with torch.no_grad():
        for f in providers.values():  # warm-up: compile, fold, pack
            f()
            f()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            providers["winograd"]()
        takes = any(e.key == "resfast::conv2d_winograd" for e in prof.key_averages())
        for _ in range(rounds):
            for name, f in providers.items():
                start = time.perf_counter()
                f()
                times[name].append((time.perf_counter() - start) * 1e3)
    return times, takes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="+", choices=sorted(LAYERS),
                        default=["r50", "vgg", "r20"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="NxCINxCOUTxH shapes instead of --layers (tests)")
    args = parser.parse_args(argv)
    shapes = ([("custom", tuple(int(v) for v in s.split("x"))) for s in args.shapes]
              if args.shapes else [(k, s) for k in args.layers for s in LAYERS[k]])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"resfast CPU kernels {torch.ops.resfast.cpu_isa()}, {args.rounds} rounds")
    print(f"{'net':6} {'layer':>20} {'takes it':>8} {'winograd':>9} {'direct':>9} {'eager':>9} "
          f"{'compile':>9} {'vs direct':>9} {'vs eager':>9} {'vs compile':>10}")
    for net, shape in shapes:
        times, takes = measure(shape, args.rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = {k: statistics.median(o / w for o, w in zip(times[k], times["winograd"]))
                 for k in ("direct", "eager", "compile")}
        label = "{}x{}->{}@{}".format(*shape)
        print(f"{net:6} {label:>20} {'yes' if takes else 'no':>8} {med['winograd']:9.2f} "
              f"{med['direct']:9.2f} {med['eager']:9.2f} {med['compile']:9.2f} "
              f"{ratio['direct']:8.2f}x {ratio['eager']:8.2f}x {ratio['compile']:9.2f}x")


if __name__ == "__main__":
    main()
