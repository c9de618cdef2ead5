"""Learning-rate schedules of the recipes.

* ``plateau``: divide by 10 when the validation top-1 accuracy stops improving
  for ``patience`` epochs (VGG and ResNet papers); stepped once per epoch.
* ``step``: divide by 10 at the given epochs (may be fractional), with an
  optional linear warm-up; stepped every iteration.
* ``cosine``: linear warm-up over ``warmup_epochs`` then a cosine decay to 0 at
  the last iteration; stepped every iteration.

All are torch schedulers, so ``state_dict`` / ``load_state_dict`` carry their
state through a checkpoint.
"""
import math
from typing import Sequence

import torch


class LRFactor:
    """Iteration -> lr multiplier (a picklable callable for LambdaLR)."""

    def __init__(self, kind: str, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0.0,
                 milestones: Sequence[float] = (), gamma: float = 0.1):
        self.kind, self.steps_per_epoch, self.epochs = kind, max(1, steps_per_epoch), epochs
        self.warmup = int(round(warmup_epochs * self.steps_per_epoch))
        self.total = max(1, epochs * self.steps_per_epoch)
        self.milestones = [int(round(m * self.steps_per_epoch)) for m in milestones]
        self.gamma = gamma

    def __call__(self, it: int) -> float:
        if it < self.warmup:
            return (it + 1) / self.warmup
        if self.kind == "cosine":
            t = (it - self.warmup) / max(1, self.total - self.warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        return self.gamma ** sum(it >= m for m in self.milestones)


def build_scheduler(optimizer, kind: str, *, epochs: int, steps_per_epoch: int,
                    warmup_epochs: float = 0.0,
                    milestones: Sequence[float] = (), patience: int = 5, min_lr: float = 0.0):
    """(scheduler, per_iteration)."""
    if kind == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1,
                                                          patience=patience,
                                                          threshold=1e-4, min_lr=min_lr), False
    if kind in ("step", "cosine"):
        if kind == "step" and not milestones:
            milestones = (epochs * 0.5, epochs * 0.75)
        factor = LRFactor(kind, steps_per_epoch, epochs, warmup_epochs, milestones)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True
    raise ValueError(f"unknown schedule {kind!r} (plateau, step, cosine)")
