"""``resfast reproduce``: the papers' experiments, end to end.

``resfast reproduce degradation`` trains plain-20, plain-56, ResNet-20 and
ResNet-56 (the CIFAR networks of the ResNet paper, sec. 4.2) on the same data
with the same recipe and seed, and draws their training and test error per
epoch in one figure (the paper's Fig. 6: the deeper plain net is worse than the
shallower one, the deeper residual net is better), plus a markdown table of the
final errors. Every ``resfast train`` option is accepted and passed on (data,
epochs, schedule, backend ...); each network's run is a normal training run in
``OUT/<model>`` and ``--resume`` continues unfinished ones and reuses finished ones.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional

EXPERIMENTS = {
    "degradation": ["plain20", "plain56", "resnet20", "resnet56"],
}


def build_parser(prog: str = "resfast reproduce") -> argparse.ArgumentParser:
    # allow_abbrev=False: otherwise '--model X' would be taken as '--models X'
    p = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Reproduce a paper experiment. 'degradation': plain-20/56 vs ResNet-20/56 "
                    "training and test error curves in one figure, and a table of the final "
                    "errors.\n\nAny other option is a 'resfast train' option and applies to every "
                    "network (see resfast train --help), e.g. --data, --epochs, --schedule, --lr, "
                    "--batch-size, --backend, --amp, --device.",
        epilog="example:\n  resfast reproduce degradation --epochs 12 --schedule cosine --out "
               "runs/degradation")
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--models", default=None,
                   help="comma-separated networks to compare instead of the experiment's "
                        "(default for degradation: plain20,plain56,resnet20,resnet56)")
    p.add_argument("--out", default=None, help="output folder (default runs/<experiment>)")
    return p


def _label(name: str) -> str:
    return name.rsplit(":", 1)[-1]


def _layers(name: str) -> Optional[int]:
    digits = "".join(c for c in _label(name) if c.isdigit())
    return int(digits) if digits else None


def plot_comparison(runs: Dict[str, List[Dict]], path: str, title: str = "") -> None:
    """Training (dashed) and test (solid) top-1 error per epoch of several runs,
    plain nets and residual nets side by side as in the ResNet paper's Fig. 6."""
    from resfast.train.metrics import _pyplot, integer_epochs, save_figure

    plt = _pyplot()
    plain = [n for n in runs if "plain" in _label(n)]
    other = [n for n in runs if n not in plain]
    groups = [("plain", plain), ("residual", other)] if plain and other else [("", list(runs))]
    all_err = [r[k] for h in runs.values() for r in h for k in ("train_top1_err", "test_top1_err")]
    ymax = min(100.0, max(all_err) * 1.05) if all_err else 100.0
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (gname, names) in zip(axes[0], groups):
        for i, name in enumerate(sorted(names, key=lambda n: (_layers(n) or 0, n))):
            h = runs[name]
            c = colors[i % len(colors)]
            ep = [r["epoch"] for r in h]
            ax.plot(ep, [r["train_top1_err"] for r in h], "--", color=c, lw=1,
                    label=f"{_label(name)} train")
            ax.plot(ep, [r["test_top1_err"] for r in h], "-", color=c, lw=2,
                    label=f"{_label(name)} test")
        ax.set_xlabel("epoch")
        integer_epochs(ax)
        ax.set_ylabel("top-1 error (%)")
        ax.set_ylim(0, ymax)
        ax.grid(alpha=0.3)
        ax.legend()
        if gname:
            ax.set_title(f"{gname} networks")
    save_figure(plt, fig, path, title, dpi=110)


def results_table(results: Dict[str, Dict]) -> str:
    """Markdown table of the final (and best) errors of each run."""
    lines = ["| network | layers | final train error (%) | final test error (%) | best test error "
             "(%) | epochs | time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        f = r["final"]
        layers = _layers(name)
        lines.append(f"| {_label(name)} | {layers if layers is not None else ''} | "
                     f"{f['train_top1_err']:.2f} | {f['test_top1_err']:.2f} | "
                     f"{r['best_test_top1_err']:.2f} | {f['epoch']} | {f['time_s']:.0f} |")
    return "\n".join(lines)


def reproduce_main(argv: Optional[List[str]] = None, prog: str = "resfast reproduce") -> int:
    """Entry point of ``resfast reproduce``: returns the exit status."""
    from resfast.data import DataError
    from resfast.train.checkpoint import CheckpointError, atomic_write_text
    from resfast.train.trainer import UsageError, train
    from resfast.train.trainer import build_parser as train_parser

    argv = list(argv) if argv is not None else sys.argv[1:]
    parser = build_parser(prog)
    args, rest = parser.parse_known_args(argv)
    models = args.models.split(",") if args.models else EXPERIMENTS[args.experiment]
    out = args.out or os.path.join("runs", args.experiment)
    tparser = train_parser(f"{prog} {args.experiment}")
    for opt in ("--model", "--out"):
        if any(a == opt or a.startswith(opt + "=") for a in rest):
            parser.error(f"{opt} is set by the experiment (use --models / --out)")
    results: Dict[str, Dict] = {}
    try:
        for name in models:
            run_dir = os.path.join(out, _label(name))
            targs = tparser.parse_args(rest + ["--model", name, "--out", run_dir])
            if targs.resume is not None:
                targs.resume = "auto"
                final_path = os.path.join(run_dir, "final.json")
                if os.path.exists(final_path):
                    from resfast.train.checkpoint import load_checkpoint

                    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
                    if ckpt["epoch"] >= targs.epochs:
                        hist = ckpt["history"]
                        best = min(r["test_top1_err"] for r in hist)
                        results[name] = {"history": hist, "final": hist[-1],
                                         "best_test_top1_err": best}
                        print(f"{_label(name)}: finished run found in {run_dir}, reused",
                              flush=True)
                        continue
            elif os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
                targs.overwrite = True
            r = train(targs)
            if not r["finished"]:
                print(f"{prog}: {_label(name)} stopped early (--stop-after); rerun with --resume",
                      file=sys.stderr)
                return 1
            results[name] = r
    except (UsageError, CheckpointError, DataError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    os.makedirs(out, exist_ok=True)
    fig_path = os.path.join(out, f"{args.experiment}.png")
    data_name = "embedded digits" if targs.data in ("embedded", "digits") else os.path.basename(
        os.path.normpath(targs.data))
    plot_comparison({n: r["history"] for n, r in results.items()}, fig_path,
                    f"{args.experiment}: plain vs residual on {data_name} (thin dashed: train, "
                    "bold: test)")
    table = results_table(results)
    cmd = " ".join([prog] + argv)
    md = (f"## {args.experiment}\n\nCommand: "
          f"`{cmd}`\n\n![{args.experiment}]({args.experiment}.png)\n\n{table}\n")
    atomic_write_text(md, os.path.join(out, f"{args.experiment}.md"))
    atomic_write_text(json.dumps({_label(n): {"final": r["final"],
                                              "best_test_top1_err": r["best_test_top1_err"]}
                                  for n, r in results.items()}, indent=2) + "\n",
                      os.path.join(out, f"{args.experiment}.json"))
    print(table)
    print(f"figure: {fig_path}\ntable: {os.path.join(out, args.experiment + '.md')}")
    return 0
