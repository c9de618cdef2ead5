"""End-to-end training: ``resfast train`` (:func:`train_main`).

Modules: :mod:`.trainer` (options and the loop), :mod:`.schedule` (lr
schedules), :mod:`.checkpoint` (atomic checkpoints, RNG states),
:mod:`.metrics` (top-k, metrics files, plots), :mod:`.evaluate` (single-crop,
dense and multi-scale evaluation), :mod:`.sync_bn` (BatchNorm statistics across
processes with one all-reduce). ``--backend torch`` runs the network's plain
torch.nn twin, :mod:`resfast.twin`.
"""
from .trainer import build_parser, create_model, train, train_main

__all__ = ["build_parser", "create_model", "train", "train_main"]
