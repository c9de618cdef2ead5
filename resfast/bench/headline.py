"""The headline benchmarks and the targets they are held to.

``resfast bench --headline`` runs these cases, in this order (bf16 autocast,
channels_last on a GPU); :func:`check_targets` reads a results file and says,
for each target, what was measured and whether it is met. The targets
(issue 10, for an H100/H200): conv3x3 + BN + ReLU training >= 1.25x torch eager
and >= 1.0x torch.compile; BN + add + ReLU at >= 85% of the copy bandwidth
measured in the same run; eval conv + folded BN + ReLU within 10% of the bare
cuDNN conv; ResNet-50 training >= 1.3x eager and >= 1.1x compile; VGG-16
training >= 1.15x eager; peak memory no more than eager's.

``python -m resfast.bench.headline RESULTS.json`` prints the check.
"""

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

# ids (name/mode) at --size full, cheapest first: a run that is stopped early
# still has the op ratios; each network is one more torch.compile.
CASES = (
    "conv3x3_bn_relu-56x56x64/train",
    "bn_add_relu-56x56x256/train",
    "conv3x3_bn_relu-56x56x64/eval",
    "bottleneck-56x56x256/train",
    "resnet50/train",
    "vgg16/train",
)
DTYPE, LAYOUT = "bf16", "channels_last"


def kind(case_id: str) -> str:
    """What a case is, without its shape: "conv3x3_bn_relu-56x56x64/train" ->
    "conv3x3_bn_relu/train". At sizes other than full (a CPU dry run at tiny
    shapes) the first case of the same kind stands in for each headline case."""
    name, _, mode = case_id.partition("/")
    return name.split("-")[0] + "/" + mode


@dataclass(frozen=True)
class Target:
    case: str
    what: str  # the row field compared
    at_least: float
    label: str


TARGETS = (
    Target(
        "conv3x3_bn_relu-56x56x64/train", "ratio_vs_eager", 1.25, "conv3x3+BN+ReLU train vs eager"
    ),
    Target(
        "conv3x3_bn_relu-56x56x64/train",
        "ratio_vs_compile",
        1.0,
        "conv3x3+BN+ReLU train vs compile",
    ),
    Target(
        "bn_add_relu-56x56x256/train", "pct_of_ceiling", 85.0, "BN+add+ReLU % of copy bandwidth"
    ),
    Target(
        "conv3x3_bn_relu-56x56x64/eval",
        "ratio_vs_conv_alone",
        1 / 1.1,
        "eval conv+BN+ReLU vs the bare conv",
    ),
    Target("resnet50/train", "ratio_vs_eager", 1.3, "ResNet-50 train vs eager"),
    Target("resnet50/train", "ratio_vs_compile", 1.1, "ResNet-50 train vs compile"),
    Target("vgg16/train", "ratio_vs_eager", 1.15, "VGG-16 train vs eager"),
)


@dataclass
class Check:
    label: str
    measured: float | None
    target: str
    status: str  # met | missed | not measured
    note: str = ""


def _rows(doc: dict[str, object]) -> dict[tuple, dict[str, object]]:
    """(headline case id, provider) -> row; at other sizes, by kind (first row wins)."""
    full = (doc.get("settings") or {}).get("size", "full") == "full"
    by_kind = {kind(c): c for c in CASES}
    out: dict[tuple, dict[str, object]] = {}
    for r in doc.get("results", []):
        if r.get("dtype") != DTYPE or r.get("layout") != LAYOUT:
            continue
        case_id = f"{r['name']}/{r['mode']}"
        case_id = case_id if full else by_kind.get(kind(case_id), case_id)
        out.setdefault((case_id, r["provider"]), r)
    return out


def _why_missing(rows, case: str) -> str:
    for prov in ("resfast", "eager", "compile", "conv_alone"):
        r = rows.get((case, prov))
        if r is not None and r.get("status") != "ok":
            return f"{prov}: {r.get('status')}: {(r.get('reason') or '')[:80]}"
    return "not in the results"


def check_targets(doc: dict[str, object]) -> list[Check]:
    """Every target, and peak memory against eager for each headline training case."""
    rows = _rows(doc)
    out: list[Check] = []
    for t in TARGETS:
        r = rows.get((t.case, "resfast"))
        value = r.get(t.what) if r and r.get("status") == "ok" else None
        if t.what == "pct_of_ceiling":
            shown = f">= {t.at_least:.0f}%"
        else:
            shown = f">= {t.at_least:.2f}x"
        if value is None:
            out.append(Check(t.label, None, shown, "not measured", _why_missing(rows, t.case)))
        else:
            out.append(Check(t.label, value, shown, "met" if value >= t.at_least else "missed"))
    for case in CASES:
        ours, eager = rows.get((case, "resfast")), rows.get((case, "eager"))
        if not case.endswith("/train") or not ours or not eager:
            continue
        a, b = ours.get("peak_mem_mb"), eager.get("peak_mem_mb")
        if a is None or b is None:
            continue
        out.append(
            Check(f"{case} peak MB vs eager", a, f"<= {b:.0f} MB", "met" if a <= b else "missed")
        )
    return out


def format_checks(checks: Sequence[Check]) -> str:
    lines = ["| target | measured | wanted | |", "|---|---:|---:|---|"]
    for c in checks:
        if c.measured is None:
            value = "-"
        elif "%" in c.target:
            value = f"{c.measured:.0f}%"
        elif "MB" in c.target:
            value = f"{c.measured:.0f} MB"
        else:
            value = f"{c.measured:.2f}x"
        lines.append(
            f"| {c.label} | {value} | {c.target} | {c.status}"
            + (f" ({c.note}) |" if c.note else " |")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m resfast.bench.headline RESULTS.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        doc = json.load(f)
    print(format_checks(check_targets(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
