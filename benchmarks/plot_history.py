#!/usr/bin/env python3
"""Draw the history of the results files in benchmarks/results/.

    python benchmarks/plot_history.py                      # -> benchmarks/results/history.png
    python benchmarks/plot_history.py --metric ratio_vs_compile --filter 'resnet50*'
    python benchmarks/plot_history.py --results DIR --out history.png

Reads every ``*.json`` there: ``resfast bench`` files (format "resfast-bench/1")
and pytest-benchmark files written by the suite (their rows are in each
benchmark's ``extra_info``). One panel per GPU; one line per benchmark
("name mode dtype layout"), the resfast provider's ``--metric`` (default
ratio_vs_eager: torch eager ms / resfast ms) over the runs, in time order. Prints the
latest value per benchmark too. Needs only matplotlib (no torch).
"""
import argparse
import fnmatch
import glob
import json
import os
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
METRICS = ("ratio_vs_eager", "ratio_vs_compile", "images_per_s", "ms", "pct_of_ceiling", "tflops",
           "gbs")


def _layout(layout):
    return {"channels_last": "NHWC", "nchw": "NCHW"}.get(layout, layout)


def load_rows(path):
    """(timestamp, device, rows) of one results file, or None if it is not one."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    if str(doc.get("format", "")).startswith("resfast-bench/"):
        env = doc.get("environment", {})
        return (doc.get("timestamp") or doc.get("date"), env.get("gpu") or env.get("device") or "?",
                doc.get("results", []))
    if "benchmarks" in doc and "resfast" in doc:  # pytest-benchmark --benchmark-json of benchmarks/
        env = doc["resfast"].get("environment", {})
        rows = [b.get("extra_info", {}) for b in doc["benchmarks"]
                if b.get("extra_info", {}).get("name")]
        return str(doc.get("datetime", "")), env.get("gpu") or env.get("device") or "?", rows
    return None


def collect(results_dir, metric, pattern=None, provider="resfast"):
    """{device: {benchmark label: [(timestamp, value, file)]}}"""
    series = defaultdict(lambda: defaultdict(list))
    paths = glob.glob(os.path.join(results_dir, "*.json"))
    paths += glob.glob(os.path.join(results_dir, "*", "bench.json"))  # gpu_run.sh run folders
    for path in sorted(paths):
        got = load_rows(path)
        if got is None:
            continue
        stamp, device, rows = got
        if not stamp:
            continue
        for r in rows:
            if (r.get("status", "ok") != "ok" or r.get("provider") != provider
                or r.get(metric) is None):
                continue
            label = (f"{r['name']} {r.get('mode', '')} {r.get('dtype', '')} "
                     f"{_layout(r.get('layout', ''))}".strip())
            if (pattern and not fnmatch.fnmatch(label, pattern)
                and not fnmatch.fnmatch(r["name"], pattern)):
                continue
            series[device][label].append((str(stamp)[:16], float(r[metric]),
                                          os.path.basename(path)))
    return series


def plot(series, metric, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = sorted(series)
    fig, axes = plt.subplots(len(devices), 1, figsize=(12, 4.5 * len(devices)), squeeze=False)
    for ax, device in zip(axes[:, 0], devices):
        # run times, in order
        dates = sorted({d for pts in series[device].values() for d, _, _ in pts})
        index = {d: i for i, d in enumerate(dates)}
        for label, pts in sorted(series[device].items()):
            pts = sorted(pts)
            ax.plot([index[d] for d, _, _ in pts], [v for _, v, _ in pts], marker="o", ms=3, lw=1,
                    label=label)
        ax.set_xticks(range(len(dates)))
        ax.set_xticklabels(dates, rotation=30, ha="right", fontsize=7)
        if metric.startswith("ratio"):
            ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylabel(metric)
        ax.set_title(f"resfast {metric} over time on {device}", fontsize=10)
        ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=os.path.join(HERE, "results"),
                   help="directory of results files")
    p.add_argument("--out", help="PNG path (default <results>/history.png)")
    p.add_argument("--metric", default="ratio_vs_eager", choices=METRICS)
    p.add_argument("--provider", default="resfast",
                   help="whose rows to draw (resfast, eager, compile)")
    p.add_argument("--filter", help="glob over 'name mode dtype layout' (or the name alone)")
    args = p.parse_args(argv)
    series = collect(args.results, args.metric, args.filter, args.provider)
    if not series:
        print(f"no results files with {args.provider} {args.metric} in {args.results}: nothing to "
              "draw")
        return 0
    for device in sorted(series):
        print(f"{device}: latest {args.metric}")
        for label, pts in sorted(series[device].items()):
            date, value, name = max(pts, key=lambda p: p[0])  # the latest run
            print(f"  {label:<50} {value:10.3f}  ({date}, {name}; {len(pts)} runs)")
    out = args.out or os.path.join(args.results, "history.png")
    plot(series, args.metric, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
