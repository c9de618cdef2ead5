"""Reports: the printed table, the JSON results file, a markdown table and the
PNG bar chart.

Results files are named ``YYYY-MM-DD-<device-slug>`` (``.json``, ``.png``,
``.md``): the UTC date of the run and the GPU name in lower case with dashes
("nvidia-h100-80gb-hbm3"), or "cpu".
"""
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

FORMAT = "resfast-bench/1"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return "cpu"


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def default_stem(device, now: Optional[_dt.datetime] = None) -> str:
    return f"{(now or utc_now()).strftime('%Y-%m-%d')}-{device_slug(device)}"


def _git_commit() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def environment(device) -> Dict[str, object]:
    """Versions and the device: what a results file must carry."""
    import torch

    import resfast

    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "resfast": getattr(resfast, "__version__", None),
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_slug": device_slug(device),
        "gpu": None,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device),
                   gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   gpu_sms=props.multi_processor_count)
    try:
        facts = resfast.info()
        keys = ("resfast_cuda_archs", "cuda_kernels_built", "kernels", "triton_kernels_available",
                "triton_interpreter")
        env["resfast_info"] = {k: facts[k] for k in keys if k in facts}
    except Exception as e:  # info must not cost the results
        env["resfast_info"] = f"unavailable: {type(e).__name__}: {e}"
    return env


# ---- the table ---------------------------------------------------------------------------

COLUMNS = ("benchmark", "provider", "images/s", "ms/step", "vs eager", "vs compile", "TFLOP/s",
           "GB/s", "% ceiling", "peak MB", "1st call s", "kernel path")


def _num(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _layout(layout: str) -> str:
    return {"channels_last": "NHWC", "nchw": "NCHW"}.get(layout, layout)


QUARTILES_NOTE = ("ratios are the median of the timed rounds' own ratios (each round ran every "
                  "provider in turn), [a-b] their lower and upper quartile")


def has_quartiles(rows: Sequence[Dict[str, object]]) -> bool:
    return any(r.get("ratio_vs_eager_quartiles") or r.get("ratio_vs_compile_quartiles")
               for r in rows)


def _ratio(r: Dict[str, object], key: str) -> str:
    """'0.95x', with the quartiles of the per-round ratios where the rounds were
    interleaved: '0.95x [0.91-0.99]'."""
    text = _num(r.get(key), "{:.2f}x")
    q = r.get(key + "_quartiles")
    return text if not q or r.get(key) is None else f"{text} [{q[0]:.2f}-{q[1]:.2f}]"


def row_cells(r: Dict[str, object]) -> List[str]:
    bench = f"{r['name']} {r['mode']} {r['dtype']} {_layout(r['layout'])}"
    if r["status"] != "ok":
        return [bench, r["provider"], r["status"]] + [""] * 8 + [(r.get("reason") or "")[:90]]
    vs_eager = _ratio(r, "ratio_vs_eager")
    if r.get("ratio_vs_conv_alone") is not None:
        vs_eager += f" ({r['ratio_vs_conv_alone']:.2f}x conv)"
    pct = "-" if r.get("pct_of_ceiling") is None else (
        f"{r['pct_of_ceiling']:.0f}% {'copy' if r.get('bound') == 'memory' else 'mm'}")
    ips = r.get("images_per_s")
    return [bench, r["provider"], _num(ips, "{:.0f}" if ips and ips >= 100 else "{:.1f}"),
            _num(r.get("ms"), "{:.3f}"), vs_eager, _ratio(r, "ratio_vs_compile"),
            _num(r.get("tflops"), "{:.3g}"), _num(r.get("gbs"), "{:.3g}"), pct,
            _num(r.get("peak_mem_mb"), "{:.0f}"), _num(r.get("first_call_s"), "{:.1f}"),
            r.get("kernel_path") or ""]


def format_table(rows: Sequence[Dict[str, object]]) -> str:
    cells = [list(COLUMNS)] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    right = {2, 3, 4, 5, 6, 7, 8, 9, 10}
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(v.rjust(w) if i in right else v.ljust(w) for i,
                               (v, w) in enumerate(zip(c, widths)))
                     .rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: Sequence[Dict[str, object]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def format_markdown_by_command(doc: Dict[str, object], rows: Sequence[Dict[str, object]]) -> str:
    """One markdown table per command that measured rows (``--append`` runs add
    theirs), each under the command that reproduces it."""
    groups: Dict[str, List[Dict[str, object]]] = {}
    for r in rows:
        groups.setdefault(r.get("command") or doc["command"], []).append(r)
    return "\n\n".join(f"`{cmd}`\n\n{format_markdown(rs)}" for cmd, rs in groups.items())


def format_ceilings(ceil: Dict[str, object]) -> str:
    mm = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in ceil["matmul_tflops"].items())
    return (f"ceilings (measured in this run): copy {ceil['copy_gbs']:.3g} GB/s (read + write); "
            f"matmul {mm}")


# ---- files -------------------------------------------------------------------------------

def write_json(path: str, doc: Dict[str, object]) -> None:
    """Write atomically (a killed run leaves the previous complete file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def load_json(path: str) -> Dict[str, object]:
    with open(path) as f:
        return json.load(f)


def plot(doc: Dict[str, object], path: str) -> Optional[str]:
    """Bar chart: resfast's speed-up over eager and over torch.compile per
    benchmark (left), and each provider's % of the measured ceiling (right).
    Returns the path, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in doc.get("results", []) if r.get("status") == "ok"]
    ours = [r for r in rows if r["provider"] == "resfast"]
    labels = [f"{r['name']} {r['mode']} {r['dtype']} {_layout(r['layout'])}" for r in ours]
    n = max(1, len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(15, 1.2 + 0.32 * n), squeeze=False)
    ax, ax2 = axes[0]
    env = doc.get("environment", {})
    title = f"resfast bench {doc.get('date', '')} on {env.get('gpu') or env.get('device', '?')}"
    fig.suptitle(title + f"  (torch {env.get('torch')}, triton {env.get('triton')})", fontsize=10)
    if not ours:
        ax.text(0.5, 0.5, "no resfast results", ha="center", va="center")
        ax2.axis("off")
    else:
        ys = list(range(len(ours)))
        h = 0.38
        for off, key, label, color in ((-h / 2, "ratio_vs_eager", "vs torch eager", "tab:blue"),
                                       (h / 2, "ratio_vs_compile", "vs torch.compile",
                                        "tab:orange")):
            vals = [r.get(key) for r in ours]
            if not any(vals):
                continue
            # bars grow from 1x (log scale): right of the line is faster, left slower
            ax.barh([y + off for y, v in zip(ys, vals) if v], [v - 1.0 for v in vals if v],
                    left=1.0, height=h, label=label, color=color)
            for y, v, r in zip(ys, vals, ours):
                if v:
                    ax.text(v, y + off, f" {v:.2f}x", va="center", ha="left" if v >= 1 else "right",
                            fontsize=6)
                q = r.get(key + "_quartiles")
                if v and q:  # the rounds' quartiles, around their median v
                    ax.errorbar(v, y + off, xerr=[[v - q[0]], [q[1] - v]], fmt="none",
                                ecolor="black", elinewidth=0.7, capsize=2)
        ax.set_xscale("log", base=2)
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.axvline(1.0, color="black", lw=0.8)
        lo = min([r.get(k) for r in ours for k in ("ratio_vs_eager", "ratio_vs_compile")
                  if r.get(k)] or [1.0])
        hi = max([r.get(k) for r in ours for k in ("ratio_vs_eager", "ratio_vs_compile")
                  if r.get(k)] or [1.0])
        ax.set_xlim(min(lo, 1.0) / 1.6, max(hi, 1.0) * 1.6)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_ylim(len(ys) - 0.5, -0.5)
        ax.set_xlabel("resfast speed-up, log scale (> 1x: faster than the baseline)")
        ax.legend(fontsize=7, loc="lower right")
        providers = [p for p in ("resfast", "eager", "compile", "conv_alone", "cudnn_fe")
                     if any(r["provider"] == p for r in rows)]
        by = {(r["name"], r["mode"], r["dtype"], r["layout"], r["provider"]): r for r in rows}
        hp = 0.8 / max(1, len(providers))
        for i, p in enumerate(providers):
            vals = [(by.get((r["name"], r["mode"], r["dtype"], r["layout"], p))
                     or {}).get("pct_of_ceiling") or 0.0
                    for r in ours]
            ax2.barh([y - 0.4 + hp * (i + 0.5) for y in ys], vals, height=hp, label=p)
        ax2.set_yticks(ys)
        ax2.set_yticklabels([])
        ax2.set_ylim(len(ys) - 0.5, -0.5)
        ax2.set_xlabel("% of measured ceiling (matmul TFLOP/s; copy GB/s for memory-bound ops)")
        ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def command_line(argv: Sequence[str]) -> str:
    import shlex

    return shlex.join(["resfast", "bench", *argv])


def new_document(argv: Sequence[str], settings, ceilings, device) -> Dict[str, object]:
    import torch

    now = utc_now()
    return {
        "format": FORMAT,
        "date": now.strftime("%Y-%m-%d"),
        "timestamp": now.isoformat(timespec="seconds"),
        "command": command_line(argv),
        "argv": list(argv),
        "sys_argv": list(sys.argv),
        "environment": environment(device),
        "settings": {"size": settings.size, "warmup": settings.warmup, "steps": settings.steps,
                     "rounds": settings.rounds, "compile": settings.compile,
                     "compile_reason": settings.compile_reason,
                     "providers": list(settings.providers),
                     "cpu_threads": settings.threads, "cudnn_benchmark": settings.cudnn_benchmark,
                     "malloc_keeps_freed": settings.malloc_keeps_freed,
                     "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                     "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32},
        "ceilings": ceilings,
        "results": [],
        "complete": False,
    }
