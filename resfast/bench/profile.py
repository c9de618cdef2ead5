"""Where one training step's time goes: a torch.profiler kernel table.

    python -m resfast.bench.profile resnet50/train --out profile.txt

Builds the case as ``resfast bench`` does (the resfast provider; bf16 autocast,
channels_last by default), runs ``--warmup`` steps, then profiles ``--steps``
steps and writes the ``key_averages`` table sorted by self device time (self CPU
time on the CPU), with the step's median time measured outside the profiler.
"""

import argparse
import copy
import sys
from collections.abc import Sequence

import torch

from . import cases as C
from .measure import default_settings, sync, time_steps


def profile_case(
    case_id: str,
    size: str = "auto",
    dtype: str = "bf16",
    layout: str = "channels_last",
    batch: int | None = None,
    warmup: int = 3,
    steps: int = 2,
    rows: int = 30,
) -> str:
    settings = default_settings(size=size, compile="off")
    name, _, mode = case_id.partition("/")
    found = [
        c
        for c in C.select_cases(settings.size, names=[name], modes=[mode or "train"], batch=batch)
        if c.name == name or settings.size != "full"
    ]
    if not found:
        raise ValueError(
            f"no {settings.size} benchmark case {case_id!r}; `resfast bench --list` shows them"
        )
    case, device = found[0], settings.device
    mods = C.build_modules(case, device)
    wl = C.make_workload(case, copy.deepcopy(mods.resfast), device, C.DTYPES[dtype], layout)
    timing = time_steps(wl.step, device, warmup, max(1, steps), 3)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            wl.step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    head = (
        f"{case.id} batch {case.batch} input {'x'.join(map(str, case.in_shape))} "
        f"{dtype} {layout} on "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}: "
        f"{timing.ms:.3f} ms/step (median of 3 rounds of {steps}, outside the profiler); "
        f"first call {timing.first_call_s:.1f} s\nprofiled: {steps} steps, sorted by {key}\n"
    )
    return head + table


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m resfast.bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("case", help="a benchmark id, e.g. resnet50/train (at cpu-tiny: its tiny twin)")
    p.add_argument("--size", default="auto", choices=("auto",) + C.SIZES)
    p.add_argument("--dtype", default="bf16", choices=tuple(C.DTYPES))
    p.add_argument("--layout", default="channels_last", choices=C.LAYOUTS)
    p.add_argument("--batch", type=int)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--out", help="write the table here too")
    args = p.parse_args(argv)
    try:
        text = profile_case(
            args.case,
            args.size,
            args.dtype,
            args.layout,
            args.batch,
            args.warmup,
            args.steps,
            args.rows,
        )
    except ValueError as e:
        print(f"resfast.bench.profile: {e}", file=sys.stderr)
        return 2
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
