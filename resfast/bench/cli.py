"""``resfast bench`` / ``python -m resfast bench``."""
import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

from ..cpu_memory import keep_freed_memory
from . import cases as C
from . import report
from .measure import Runner, cpu_threads, default_settings, measure_ceilings

EPILOG = """\
examples:
  resfast bench --size cpu-tiny --sets ops --no-compile            # seconds, on a CPU
  resfast bench --sets ops blocks --names resnet50 vgg16 --out benchmarks/results
  resfast bench --names 'conv3x3*' --dtype bf16 fp32 --layout all --steps 20
  resfast bench --list                                             # what would run
  resfast bench --headline --sets ops blocks --out DIR --name run  # the headline ops, then:
  resfast bench --headline --names resnet50 --out DIR --name run --append

A case runs if its set (ops, blocks, models) is in --sets or its name matches
a --names glob (name, name/mode, kind or set); everything when neither is given.
For each case and each (dtype, layout), the providers run in the same process:
resfast, torch.nn eager, torch.compile of the torch.nn module (and, for the
eval conv + BN + ReLU, the bare conv). "vs eager" = eager ms / this ms (> 1 is
faster; at --size cpu, where the providers take turns round by round, each round
gives a ratio of its own: the ratio shown is their median, and "[a-b]" after it
their lower and upper quartile); providers run
eager, resfast, then the other references, torch.compile
last (its compilation is the slowest first call; "1st call s" reports each
provider's first call, compilation included, apart from the timed steps).
TFLOP/s counts conv/GEMM FLOPs (torch.utils.flop_counter); GB/s counts
the bytes model of each op (see the JSON's bytes_model); "% ceiling" is against
the matmul TFLOP/s or copy GB/s measured at the start of the run. peak MB (CUDA)
is the peak allocated during the timed steps above what was allocated before.
"""


def _split(values: Optional[Sequence[str]]) -> List[str]:
    out: List[str] = []
    for v in values or ():
        out += [p for p in v.split(",") if p]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resfast bench",
                                description="Throughput of resfast against torch.nn eager "
                                "and torch.compile, measured in one run.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sel = p.add_argument_group("what to run")
    sel.add_argument("--sets", nargs="+", metavar="SET",
                     help="ops, blocks, models (comma or space separated)")
    sel.add_argument("--names", nargs="+", metavar="GLOB",
                     help="benchmarks by name glob: resnet50, 'conv3x3*', "
                     "'bn_add_relu-*/train', bottleneck ...")
    sel.add_argument("--modes", nargs="+", metavar="MODE", help="train, eval (default both)")
    sel.add_argument("--priority", nargs="+", metavar="GLOB", default=[],
                     help="run the cases matching these globs first, in this order (useful with "
                          "--time-budget)")
    sel.add_argument("--headline", action="store_true",
                     help="only the headline cases (resfast.bench.headline), in their order; "
                     "--sets and --names narrow them further")
    sel.add_argument("--providers", nargs="+", metavar="P",
                     help=f"subset of {', '.join(C.PROVIDERS)}")
    sel.add_argument("--list", action="store_true", help="list the selected cases and exit")
    cfg = p.add_argument_group("configuration")
    cfg.add_argument("--dtype", nargs="+", metavar="DT",
                     help="fp32, bf16 (autocast) or all; default bf16 on a "
                     "GPU, fp32 on the CPU")
    cfg.add_argument("--layout", nargs="+", metavar="L",
                     help="nchw, channels_last or all; default channels_last")
    cfg.add_argument("--batch", type=int,
                     help="batch size for every case (default: the size's own)")
    cfg.add_argument("--size", choices=("auto",) + C.SIZES, default="auto",
                     help="shapes: full (ResNet-50 layers at batch 128, networks at 256, 224x224) "
                          "on a GPU, cpu-tiny otherwise (auto)")
    cfg.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    tim = p.add_argument_group("timing")
    tim.add_argument("--steps", type=int, help="steps per timed round (full: 10, cpu-tiny: 1)")
    tim.add_argument("--warmup", type=int,
                     help="warm-up steps, the first (compiling) one included (full: 3)")
    tim.add_argument("--rounds", type=int, help="timed rounds; ms is their median (full: 3)")
    tim.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                     help="the torch.compile provider: auto = on a GPU only")
    tim.add_argument("--no-compile", dest="compile", action="store_const", const="off",
                     help="skip torch.compile (recorded as skipped, with the reason)")
    tim.add_argument("--no-cudnn-benchmark", action="store_true",
                     help="leave torch.backends.cudnn.benchmark off (default: on while measuring, "
                          "so the eager baseline gets cuDNN's fastest algorithms)")
    tim.add_argument("--keep-freed-memory", action="store_true",
                     help="raise glibc's mmap/trim thresholds for this process, so that the "
                          "providers timed in turn stop faulting freed pages back in "
                          "(resfast.cpu_memory; all providers alike)")
    tim.add_argument("--time-budget", type=float, metavar="S",
                     help="stop starting new measurements after S seconds (the rest are "
                     "recorded as skipped)")
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR",
                     help="write <stem>.json, <stem>.png and <stem>.md here")
    out.add_argument("--name", metavar="STEM", help="file stem (default YYYY-MM-DD-<device-slug>, "
                     "-2, -3 ... appended rather than overwrite)")
    out.add_argument("--append", action="store_true",
                     help="add to the results file --out/--name if it exists (its ceilings are "
                     "reused): several runs, e.g. one process per network, into one file")
    out.add_argument("--no-plot", action="store_true", help="no PNG")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    out.add_argument("--report", metavar="JSON",
                     help="measure nothing: print the table of a results file and "
                     "(re)write its .md and .png next to it")
    return p


def _choices(values, allowed, what, default):
    vals = _split(values) or list(default)
    if "all" in vals:
        return list(allowed)
    for v in vals:
        if v not in allowed:
            raise SystemExit(f"resfast bench: unknown {what} {v!r}; choose from "
                             f"{', '.join(allowed)} or all")
    return vals


def _order(cases: List[C.Case], priority: Sequence[str]) -> List[C.Case]:
    first: List[C.Case] = []
    for pat in priority:
        first += [c for c in cases if C.matches(c, pat) and c not in first]
    return first + [c for c in cases if c not in first]


def _headline(cases: List[C.Case], size: str) -> List[C.Case]:
    """The headline cases among ``cases``, in the headline order; at a size other
    than full, the first case of the same kind and mode stands in for each (a CPU
    dry run of the same steps at tiny shapes)."""
    from .headline import CASES, kind

    out = []
    for want in CASES:
        same = [c for c in cases if (c.id == want if size == "full" else kind(c.id) == kind(want))]
        out += same[:1]
    return out


def _out_stem(out_dir: str, name: Optional[str], device) -> str:
    if name:
        return name
    stem = report.default_stem(device)
    n = 1
    candidate = stem
    while os.path.exists(os.path.join(out_dir, candidate + ".json")):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def bench_main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.report:
        return _rerender(args.report, args.no_plot)
    try:
        settings = default_settings(args.device, args.size, args.compile, args.steps, args.warmup,
                                    args.rounds, _split(args.providers) or None)
        settings.cudnn_benchmark = not args.no_cudnn_benchmark
        if args.keep_freed_memory:
            settings.malloc_keeps_freed = keep_freed_memory()
            if not settings.malloc_keeps_freed:
                raise RuntimeError("--keep-freed-memory: glibc's mallopt is not available here")
        for prov in settings.providers:
            if prov not in C.PROVIDERS:
                raise ValueError(f"unknown provider {prov!r}; choose from {', '.join(C.PROVIDERS)}")
        if args.batch is not None and args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        cases = C.select_cases(settings.size, _split(args.sets), _split(args.names),
                               _split(args.modes), args.batch)
        if args.headline:
            cases = _headline(cases, settings.size)
        cases = _order(cases, _split(args.priority))
    except (ValueError, RuntimeError, AssertionError) as e:
        print(f"resfast bench: {e}", file=sys.stderr)
        return 2
    gpu = settings.device.type == "cuda"
    dtypes = _choices(args.dtype, tuple(C.DTYPES), "dtype", ["bf16"] if gpu else ["fp32"])
    layouts = _choices(args.layout, C.LAYOUTS, "layout", ["channels_last"])

    if args.list:
        for c in cases:
            shape = "x".join(map(str, c.in_shape))
            line = (f"{c.id:<42} {c.group:<6} batch {c.batch:<4} input {shape:<12} "
                    f"providers {','.join(c.providers())}")
            print(line + (f"  [skipped: {c.skip}]" if c.skip else ""))
        return 0

    log = ((lambda msg: None) if args.quiet
           else (lambda msg: print(msg, file=sys.stderr, flush=True)))
    paths = {}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = args.name or (report.default_stem(settings.device) if args.append
                             else _out_stem(args.out, args.name, settings.device))
        paths = {ext: os.path.join(args.out, f"{stem}.{ext}") for ext in ("json", "png", "md")}
    t_start = time.perf_counter()
    log(f"resfast bench: {len(cases)} cases x {len(dtypes) * len(layouts)} configs on "
        f"{settings.device} (size {settings.size}, {settings.warmup} warm-up, {settings.rounds} x "
        f"{settings.steps} steps"
        + (f", {settings.threads} CPU thread" if settings.threads else "")
        + (", glibc keeps freed memory" if settings.malloc_keeps_freed else "") + ")")
    previous = None
    if args.append and paths and os.path.exists(paths["json"]):
        previous = report.load_json(paths["json"])
    with cpu_threads(settings.threads):
        doc = _measure(argv, settings, cases, dtypes, layouts, paths, args.time_budget, log,
                       previous)
    return _finish(doc, paths, args, t_start)


# eager first (the reference every ratio needs), resfast next, torch.compile last:
# its compilation is the slowest first call, so a time budget cuts it first
ORDER = ("eager", "resfast", "conv_alone", "cudnn_fe", "compile")
DISPLAY = ("resfast", "cudnn_fe", "conv_alone", "compile", "eager")  # the order of a case's rows


def _measure(argv, settings, cases, dtypes, layouts, paths, time_budget, log, previous=None):
    """Ceilings, then every case x (dtype, layout) x provider; the JSON is
    rewritten after each row so a killed run leaves what it measured. With
    ``previous`` (a results document) its rows are kept and its ceilings reused."""
    t_start = time.perf_counter()
    if previous is not None:
        ceilings = previous["ceilings"]
        log("appending to the results file; its " + report.format_ceilings(ceilings))
    else:
        ceilings = measure_ceilings(settings.device, dtypes)
        log(report.format_ceilings(ceilings))
    runner = Runner(settings, ceilings, log=log)
    doc = report.new_document(argv, settings, ceilings, settings.device)
    if previous is not None:
        doc["results"] = list(previous.get("results", []))
        doc["runs"] = previous.get("runs", [{"command": previous.get("command"),
                                             "timestamp": previous.get("timestamp")}])
    doc.setdefault("runs", []).append({"command": doc["command"], "timestamp": doc["timestamp"]})
    kept = len(doc["results"])
    total = len(cases) * len(dtypes) * len(layouts)
    done = 0
    for case in cases:
        for dtype in dtypes:
            for layout in layouts:
                done += 1
                rows = []
                for prov in (p for p in ORDER if p in case.providers()):
                    if time_budget is not None and time.perf_counter() - t_start > time_budget:
                        row = runner.blank_row(case, dtype, layout, prov)
                        row.status, row.reason = ("skipped",
                                                  f"time budget (--time-budget {time_budget:g} s) "
                                                  "spent")
                    else:
                        row = runner.measure(case, dtype, layout, prov)
                    rows.append(row)
                    if row.status == "ok":
                        log(f"[{done}/{total}] {case.id} {dtype} {layout} {prov}: "
                            f"{row.ms:.3f} ms/step ({row.images_per_s:.1f} images/s, "
                            f"first call {row.first_call_s:.1f} s) {row.kernel_path}")
                    elif row.status == "error":
                        log(f"[{done}/{total}] {case.id} {dtype} {layout} {prov}: {row.status}: "
                            f"{row.reason}")
                    for r in rows:  # ratios against what of this configuration is measured yet
                        runner.complete(r, case, measure_refs=False)
                    shown = sorted(rows, key=lambda r: DISPLAY.index(r.provider))
                    doc["results"][kept:] = [dict(r.as_dict(), command=doc["command"])
                                             for r in shown]
                    if paths:
                        report.write_json(paths["json"], doc)
                kept = len(doc["results"])
        runner.release()
    return doc


def _print_and_write(doc, paths, plot=True) -> None:
    ceilings = doc["ceilings"]
    env = doc["environment"]
    print(f"resfast bench  {doc['timestamp']}  {env.get('gpu') or env['device']}  torch "
          f"{env['torch']}  triton {env['triton']}  CUDA {env['cuda_runtime']}")
    for run in doc.get("runs") or [{"command": doc["command"]}]:
        print(f"command: {run['command']}")
    print(report.format_ceilings(ceilings))
    shown = [r for r in doc["results"] if r["status"] != "skipped"]
    print(report.format_table(shown) if shown else "(nothing measured)")
    if report.has_quartiles(shown):
        print(report.QUARTILES_NOTE)
    skipped = [r for r in doc["results"] if r["status"] == "skipped"]
    if skipped:
        reasons = {}
        for r in skipped:
            what = reasons.setdefault(r["reason"], [])
            if f"{r['name']}/{r['mode']} {r['provider']}" not in what:
                what.append(f"{r['name']}/{r['mode']} {r['provider']}")
        print("skipped:")
        for reason, what in reasons.items():
            print(f"  {len(what)} x: {reason}  "
                  f"({', '.join(what[:4])}{' ...' if len(what) > 4 else ''})")
    if not doc.get("complete", True):
        print("(the run did not finish: these are the results it wrote before it stopped)")
    if paths:
        report.write_json(paths["json"], doc)
        with open(paths["md"], "w") as f:
            f.write(f"{env.get('gpu') or env['device']}, {doc['date']} (torch {env['torch']}, "
                    f"triton {env['triton']}, git {env.get('git_commit')})\n\n"
                    f"{report.format_ceilings(ceilings)}"
                    + ("; glibc keeps freed memory (--keep-freed-memory)"
                       if doc["settings"].get("malloc_keeps_freed") else "")
                    + (f"\n\n{report.QUARTILES_NOTE}" if report.has_quartiles(shown) else "")
                    + f"\n\n{report.format_markdown_by_command(doc, shown)}\n")
        written = [paths["json"], paths["md"]]
        if plot and report.plot(doc, paths["png"]):
            written.append(paths["png"])
        print("wrote " + ", ".join(written))


def _finish(doc, paths, args, t_start) -> int:
    doc["complete"] = True
    doc["wall_s"] = round(time.perf_counter() - t_start, 1)
    _print_and_write(doc, paths, plot=not args.no_plot)
    errors = [r for r in doc["results"] if r["status"] == "error"]
    if errors:
        print(f"{len(errors)} benchmark(s) failed (see the table)", file=sys.stderr)
        return 1
    return 0


def _rerender(path: str, no_plot: bool) -> int:
    try:
        doc = report.load_json(path)
    except (OSError, ValueError) as e:
        print(f"resfast bench: cannot read {path}: {e}", file=sys.stderr)
        return 2
    if not str(doc.get("format", "")).startswith("resfast-bench/"):
        print(f"resfast bench: {path} is not a resfast bench results file", file=sys.stderr)
        return 2
    stem = path[:-5] if path.endswith(".json") else path
    _print_and_write(doc, {"json": path, "png": stem + ".png", "md": stem + ".md"},
                     plot=not no_plot)
    return 0


def main() -> int:  # pragma: no cover
    return bench_main()
