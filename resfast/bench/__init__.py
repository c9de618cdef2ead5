"""Benchmarks: resfast against torch.nn eager and torch.compile, measured in one run.

``resfast bench`` (:func:`bench_main`) prints a table and writes JSON, a
markdown table and a PNG chart; the pytest-benchmark suite in ``benchmarks/``
runs the same cases through the same :class:`Runner`.

Modules: :mod:`.cases` (what runs: cases, sizes, providers, steps, FLOP and
byte counts), :mod:`.baselines` (the torch.nn twins), :mod:`.measure` (timing,
ceilings, kernel paths, the runner), :mod:`.report` (table, files, chart),
:mod:`.cli`.
"""
from .cases import DTYPES, LAYOUTS, MODELS, PROVIDERS, SIZES, Case, all_cases, select_cases
from .cli import bench_main, build_parser
from .measure import Row, Runner, Settings, default_settings, measure_ceilings, time_steps

__all__ = ["bench_main", "build_parser", "Case", "all_cases", "select_cases", "Runner", "Row",
           "Settings", "default_settings", "measure_ceilings", "time_steps", "DTYPES", "LAYOUTS",
           "MODELS", "PROVIDERS", "SIZES"]
