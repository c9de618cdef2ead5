"""An NCHW 1x1 stride-1 convolution on the CPU two ways: oneDNN's (``F.conv2d``, which
reorders the NCHW input and output to a blocked layout and back) and one GEMM per image
(``weight (C_out x C_in) @ x[n] (C_in x HW)``, reading NCHW in place), the way
resfast's NCHW eval layers take it from ``resfast.ops.conv_cpu.NCHW_GEMM_MIN_PIXELS``
pixels per map and ``NCHW_GEMM_MIN_BATCH`` images on. float32, eval (no autograd), the
machine's threads.

    python3 benchmarks/cpu_nchw_1x1.py    # ResNet-50's 1x1 layers (batch 8), small maps

Prints, per shape, the medians of interleaved calls and conv / GEMM (above 1: the GEMM is
faster), and the GEMM's largest difference from the convolution relative to its largest
element. Measurements only.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's
from resfast.bench.measure import time_interleaved  # noqa: E402
from resfast.ops.conv_cpu import NCHW_GEMM_MIN_BATCH, NCHW_GEMM_MIN_PIXELS, _nchw_1x1  # noqa: E402

# (N, C_in, H=W, C_out)
SHAPES = [(8, 256, 56, 64), (8, 64, 56, 256), (8, 512, 28, 128), (8, 128, 28, 512),
          (8, 1024, 14, 256), (8, 256, 14, 1024), (8, 2048, 7, 512), (8, 512, 7, 2048),
          (1, 256, 56, 64), (2, 256, 56, 64), (1, 128, 28, 512), (1, 1024, 14, 256),
          (128, 16, 32, 32), (128, 64, 8, 64)]


def main(shapes=SHAPES, rounds: int = 15, steps: int = 3) -> None:
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}; ms, median of "
          f"{rounds} interleaved rounds of {steps}; resfast's GEMM from {NCHW_GEMM_MIN_PIXELS} "
          f"pixels and {NCHW_GEMM_MIN_BATCH} images on")
    print(f"{'N x C_in x H x W -> C_out':<28} {'conv':>8} {'gemm':>8} {'conv/gemm':>10} "
          f"{'diff':>9}")
    for n, c, hw, co in shapes:
        torch.manual_seed(0)
        x = torch.randn(n, c, hw, hw)
        w = torch.randn(co, c, 1, 1) / c ** 0.5
        with torch.no_grad():
            t = time_interleaved({"conv": lambda: F.conv2d(x, w), "gemm": lambda: _nchw_1x1(x, w)},
                                 torch.device("cpu"), 2, steps, rounds)
            ref = F.conv2d(x, w)
            diff = ((_nchw_1x1(x, w) - ref).abs().max() / ref.abs().max()).item()
        conv, gemm = t["conv"].ms, t["gemm"].ms
        print(f"{f'{n}x{c}x{hw}x{hw} -> {co}':<28} {conv:8.3f} {gemm:8.3f} {conv / gemm:9.2f}x "
              f"{diff:9.1e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    main(rounds=parser.parse_args().rounds)
