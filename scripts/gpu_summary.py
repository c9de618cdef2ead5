"""The summary of a scripts/gpu_run.sh run, short enough to read in the call's
printed output: each step's status and time, the headline targets, resfast's
rows with their ratios, the cold first calls (compilation) apart from the timed
steps, the tests' counts and failures, the training runs.

    python scripts/gpu_summary.py --work WORK --results RESULTS [--budget S] [--elapsed S] [--print]

Plain Python, no torch (gpu_run.sh rewrites the summary after every step);
resfast/bench/headline.py is loaded by its path for the same reason.
"""

import argparse
import glob
import importlib.util
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
COUNTS = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def _headline():
    path = os.path.join(HERE, "..", "resfast", "bench", "headline.py")
    spec = importlib.util.spec_from_file_location("resfast_headline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses looks the module up by name
    spec.loader.exec_module(mod)
    return mod


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def steps_table(work):
    lines = ["| step | status | s | limit s | note |", "|---|---|---:|---:|---|"]
    rows = []
    try:
        with open(os.path.join(work, "steps.tsv")) as f:
            rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    except OSError:
        pass
    for r in rows:
        r += [""] * (6 - len(r))
        name, status, rc, secs, limit, note = r[:6]
        lines.append(
            f"| {name} | {status}{'' if rc in ('0', '-', '') else f' (rc {rc})'} | "
            f"{secs} | {limit} | {note} |"
        )
    return "\n".join(lines), {r[0]: r[1] for r in rows}


def pytest_results(work, names):
    """(name, counts line, failed test ids) of each pytest step's log."""
    out = []
    for name in names:
        path = os.path.join(work, f"{name}.log")
        if not os.path.exists(path):
            continue
        with open(path, errors="replace") as f:
            text = f.read()
        tail = [
            ln
            for ln in text.splitlines()
            if COUNTS.search(ln) and (" in " in ln or ln.startswith("="))
        ]
        counts = (
            ", ".join(f"{n} {w}" for n, w in COUNTS.findall(tail[-1]))
            if tail
            else "no summary (killed?)"
        )
        failed = re.findall(r"^=== FAILED (\S+)", text, re.MULTILINE)
        out.append((name, counts, failed))
    return out


def bench_rows(doc):
    lines = [
        "| benchmark | resfast ms | images/s | vs eager | vs compile | vs conv | peak MB (eager) "
        "| path |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    eager = {
        (r["name"], r["mode"], r["dtype"], r["layout"]): r
        for r in doc.get("results", [])
        if r["provider"] == "eager" and r["status"] == "ok"
    }

    def x(v):
        return "-" if v is None else f"{v:.2f}x"

    for r in doc.get("results", []):
        if r["provider"] != "resfast":
            continue
        bench = f"{r['name']}/{r['mode']}"
        if r["status"] != "ok":
            lines.append(f"| {bench} | {r['status']}: {(r.get('reason') or '')[:70]} | | | | | | |")
            continue
        e = eager.get((r["name"], r["mode"], r["dtype"], r["layout"]), {})
        peak = (
            f"{r['peak_mem_mb']:.0f} ({e['peak_mem_mb']:.0f})"
            if r.get("peak_mem_mb") is not None and e.get("peak_mem_mb") is not None
            else "-"
        )
        lines.append(
            f"| {bench} | {r['ms']:.3f} | {r['images_per_s']:.0f} | {x(r.get('ratio_vs_eager'))} | "
            f"{x(r.get('ratio_vs_compile'))} | {x(r.get('ratio_vs_conv_alone'))} | {peak} | "
            f"{r.get('kernel_path', '')} |"
        )
    return "\n".join(lines)


def first_calls(work, doc):
    """Cold first calls (the warm-up processes: compilation into empty caches) and
    warm ones (the timed run), per case and provider."""
    cold = {}
    for path in sorted(glob.glob(os.path.join(work, "warm-*.json"))):
        for r in (_load(path) or {}).get("results", []):
            if r.get("status") == "ok":
                cold[(f"{r['name']}/{r['mode']}", r["provider"])] = r.get("first_call_s")
    warm = {
        (f"{r['name']}/{r['mode']}", r["provider"]): r.get("first_call_s")
        for r in (doc or {}).get("results", [])
        if r.get("status") == "ok"
    }
    keys = sorted(set(cold) | set(warm))
    if not keys:
        return ""
    lines = [
        "| benchmark | provider | first call, cold caches (s) | first call, timed run (s) |",
        "|---|---|---:|---:|",
    ]
    for k in keys:
        c, w = cold.get(k), warm.get(k)
        if k[1] in ("resfast", "compile"):
            lines.append(
                f"| {k[0]} | {k[1]} | {'-' if c is None else f'{c:.1f}'} | "
                f"{'-' if w is None else f'{w:.1f}'} |"
            )
    return "\n".join(lines)


def training(work):
    lines = []
    for path in sorted(glob.glob(os.path.join(work, "train-*", "final.json"))):
        f = _load(path) or {}
        backend = os.path.basename(os.path.dirname(path)).split("-", 1)[1]
        lines.append(
            f"- {backend}: test top-1 error {f.get('test_top1_err', float('nan')):.2f}% after "
            f"{f.get('epoch')} epochs, {f.get('time_s', float('nan')):.0f} s"
        )
    return "\n".join(lines)


def _ceilings(doc):
    c = doc.get("ceilings")
    if not c:
        return "no ceilings measured"
    mm = ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in c["matmul_tflops"].items())
    return f"measured ceilings: copy {c['copy_gbs']:.0f} GB/s, matmul {mm}"


def summary(work, results, budget=None, elapsed=None):
    steps, status = steps_table(work)
    doc = _load(os.path.join(results, "bench.json"))
    head = "# GPU run" + (f": {elapsed} s of a {budget} s budget" if elapsed is not None else "")
    parts = [head, "## Steps", steps]
    if doc:
        env = doc.get("environment", {})
        hl = _headline()
        parts += [
            "## Headline targets (bf16, channels_last)",
            f"{env.get('gpu') or env.get('device')}, torch {env.get('torch')}, "
            f"triton {env.get('triton')}; {_ceilings(doc)}",
            hl.format_checks(hl.check_targets(doc)),
            "## resfast rows (bench.md has every provider and the command of each)",
            bench_rows(doc),
        ]
    calls = first_calls(work, doc)
    if calls:
        parts += ["## First calls (compilation), apart from the timed steps", calls]
    names = [
        n
        for n in status
        if not n.startswith(("warm-", "bench-", "train-"))
        and n not in ("setup", "build", "profile", "suite")
    ]
    tests = pytest_results(work, names)
    if tests:
        lines = []
        for name, counts, failed in tests:
            lines.append(f"- {name} ({status.get(name)}): {counts}")
            lines += [f"  - FAILED {t}" for t in failed[:8]]
            if len(failed) > 8:
                lines.append(f"  - ... {len(failed) - 8} more (tests.txt)")
        parts += ["## Tests (-m gpu; details in tests.txt)", "\n".join(lines)]
    train = training(work)
    if train:
        parts += ["## Training (resnet20, embedded digits, bf16, channels_last)", train]
    if os.path.exists(os.path.join(results, "profile.txt")):
        parts += ["## Profile", "profile.txt: torch.profiler table of one ResNet-50 training step"]
    return "\n\n".join(parts) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--budget", type=int)
    p.add_argument("--elapsed", type=int)
    p.add_argument("--print", action="store_true")
    a = p.parse_args(argv)
    text = summary(a.work, a.results, a.budget, a.elapsed)
    tmp = os.path.join(a.results, ".summary.md")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(a.results, "summary.md"))
    if a.print:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
