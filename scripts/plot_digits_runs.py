"""The README's figures of the main command's records (docs/runs/r20-*):

    python3 scripts/plot_digits_runs.py

writes docs/images/resnet20-digits-curves.png (seed 0's training and test error and loss)
and docs/images/resnet20-digits-backends.png (both backends and the three seeds).
"""
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from resfast.train.metrics import _pyplot, integer_epochs, plot_curves, save_figure  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = [("resfast", 0), ("torch", 0), ("resfast", 1), ("resfast", 2)]


def history(backend: str, seed: int):
    path = os.path.join(ROOT, "docs", "runs", f"r20-{backend}-s{seed}", "metrics.csv")
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def main() -> None:
    images = os.path.join(ROOT, "docs", "images")
    plot_curves(history("resfast", 0), os.path.join(images, "resnet20-digits-curves.png"),
                "resnet20 on digits (resfast)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for i, (backend, seed) in enumerate(RUNS):
        h = history(backend, seed)
        epochs = [r["epoch"] for r in h]
        color = f"C{i}"
        ax.plot(epochs, [r["train_top1_err"] for r in h], "--", color=color, lw=1,
                label=f"{backend} seed {seed} train")
        ax.plot(epochs, [r["test_top1_err"] for r in h], "-", color=color, lw=2,
                label=f"{backend} seed {seed} test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 error (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    integer_epochs(ax)
    save_figure(plt, fig, os.path.join(images, "resnet20-digits-backends.png"),
                "resnet20, digits: backends and seeds")


if __name__ == "__main__":
    main()
