"""resfast.fuse() on other people's models, on the CPU: torchvision's and timm's ResNets
(built with pretrained=False), fused, against themselves in torch eager.

    python3 benchmarks/cpu_fuse.py [--models tv:resnet50 timm:resnet50d ...] [--keep-freed-memory]

For each model and step (training: batch 8, 112x112, SGD step included; inference: batch 8,
224x224) four providers are timed round by round in turn (2 warm-up steps, then --rounds
rounds, median): the model as built (NCHW parameters) on an NCHW input, eager and fused, and
the same after ``model.to(memory_format=torch.channels_last)`` on a channels_last input. The
ratios are the median of the rounds' own ratios: fused over eager in each layout, and each
provider over eager NCHW (what a user has before doing anything). It prints measurements only.
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
from resfast.cpu_memory import keep_freed_memory  # noqa: E402

CL = torch.channels_last
STEPS = {"train": (8, 112), "eval": (8, 224)}


def build(name: str) -> torch.nn.Module:
    source, arch = name.split(":")
    if source == "tv":
        import torchvision

        return getattr(torchvision.models, arch)(weights=None)
    import timm

    return timm.create_model(arch, pretrained=False)


def workload(model: torch.nn.Module, mode: str, x: torch.Tensor, target: torch.Tensor):
    if mode == "eval":
        model.eval()

        def step():
            with torch.no_grad():
                model(x)
        return step
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(name: str, mode: str, rounds: int):
    torch.manual_seed(0)
    batch, size = STEPS[mode]
    base = build(name)
    fused = resfast.fuse(base)
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 1000, (batch,))
    steps = {
        "eager": workload(copy.deepcopy(base), mode, x, target),
        "fused": workload(copy.deepcopy(fused), mode, x, target),
        "eager_cl": workload(copy.deepcopy(base).to(memory_format=CL), mode,
                             x.contiguous(memory_format=CL), target),
        "fused_cl": workload(copy.deepcopy(fused).to(memory_format=CL), mode,
                             x.contiguous(memory_format=CL), target),
    }
    for step in steps.values():
        step()
        step()
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, step in steps.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)

    def ratio(num, den):  # the median of the rounds' own ratios: den time / num time
        return statistics.median(d / n for n, d in zip(times[num], times[den]))

    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return ms, {"fused/eager": ratio("fused", "eager"),
                "fused_cl/eager_cl": ratio("fused_cl", "eager_cl"),
                "eager_cl/eager": ratio("eager_cl", "eager"),
                "fused_cl/eager": ratio("fused_cl", "eager")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=["tv:resnet18", "tv:resnet50", "timm:resnet50", "timm:resnet50d"])
    parser.add_argument("--modes", nargs="+", default=["train", "eval"], choices=list(STEPS))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="raise glibc's mmap/trim thresholds (resfast.cpu_memory)")
    args = parser.parse_args()
    kept = keep_freed_memory() if args.keep_freed_memory else False
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}, freed memory kept: "
          f"{kept}; median ms per step over {args.rounds} interleaved rounds; ratios > 1: the "
          "first is faster")
    print(f"{'model':<16} {'step':<6} {'eager':>8} {'fused':>8} {'eager_cl':>9} {'fused_cl':>9}"
          f"  {'fused/eager':>11} {'fused_cl/eager_cl':>17} {'eager_cl/eager':>14} "
          f"{'fused_cl/eager':>14}", flush=True)
    for name in args.models:
        for mode in args.modes:
            ms, r = measure(name, mode, args.rounds)
            print(f"{name:<16} {mode:<6} {ms['eager']:8.1f} {ms['fused']:8.1f} "
                  f"{ms['eager_cl']:9.1f} {ms['fused_cl']:9.1f}  {r['fused/eager']:10.2f}x "
                  f"{r['fused_cl/eager_cl']:16.2f}x {r['eager_cl/eager']:13.2f}x "
                  f"{r['fused_cl/eager']:13.2f}x", flush=True)


if __name__ == "__main__":
    main()
