"""Top-k counts, the per-epoch metrics files and the error-curve plot."""
import csv
import io
import json
import os
from typing import Dict, List, Sequence

import torch

from .checkpoint import atomic_write_text

COLUMNS = ["epoch", "lr", "train_loss", "train_top1_err", "train_top5_err", "test_loss",
           "test_top1_err",
           "test_top5_err", "images_per_s", "epoch_time_s", "eval_time_s", "time_s"]


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> List[torch.Tensor]:
    """Number of samples whose target is among the top-k logits, for each k (tensors, no sync)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return [hit[:, :min(k, maxk)].any(dim=1).sum() for k in ks]


def write_metrics(history: Sequence[Dict], out_dir: str) -> None:
    """Rewrite metrics.jsonl and metrics.csv (atomically) from the history."""
    atomic_write_text("".join(json.dumps(r) + "\n" for r in history),
                      os.path.join(out_dir, "metrics.jsonl"))
    buf = io.StringIO()
    cols = COLUMNS + sorted({k for r in history for k in r} - set(COLUMNS))
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in history:
        w.writerow(r)
    atomic_write_text(buf.getvalue(), os.path.join(out_dir, "metrics.csv"))


def read_metrics(path: str) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def integer_epochs(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(history: Sequence[Dict], path: str, title: str = "") -> bool:
    """Training and test top-1 error (and loss) per epoch, as a PNG. False if
    matplotlib is missing."""
    try:
        plt = _pyplot()
    except ImportError:
        return False
    ep = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ep, [r["train_top1_err"] for r in history], "--o", label="train top-1 error", ms=3)
    ax1.plot(ep, [r["test_top1_err"] for r in history], "-o", label="test top-1 error", ms=3)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("error (%)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.plot(ep, [r["train_loss"] for r in history], "--o", label="train loss", ms=3)
    ax2.plot(ep, [r["test_loss"] for r in history], "-o", label="test loss", ms=3)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("cross-entropy")
    ax2.set_yscale("log")
    ax2.grid(alpha=0.3)
    ax2.legend()
    integer_epochs(ax1, ax2)
    save_figure(plt, fig, path, title, dpi=100)
    return True


def save_figure(plt, fig, path: str, title: str = "", dpi: int = 100) -> None:
    """Title, lay out and write ``fig`` as PNG atomically (a temporary file renamed
    over ``path``, so a reader never sees half a plot), then close it."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
