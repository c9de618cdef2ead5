"""pytest-benchmark suite: resfast against torch.nn eager and torch.compile.

    # CPU CI: tiny shapes, runs each step once
    python -m pytest benchmarks --benchmark-disable
    # GPU: full size (the default with a GPU)
    python -m pytest benchmarks -k "resnet50 and train and bf16 and channels_last" \\
        --benchmark-json=out.json

Every test is one (case, dtype, layout, provider) of :mod:`resfast.bench.cases`
(ids like ``conv3x3_bn_relu-56x56x64-train-bf16-channels_last-resfast``),
timed twice: by pytest-benchmark (wall clock, ``torch.cuda.synchronize`` inside
the benchmarked callable) and by :class:`resfast.bench.Runner` (CUDA events),
whose numbers fill ``extra_info``: images/s, ms, ratio_vs_eager /
ratio_vs_compile (the references measured in the same session), TFLOP/s, GB/s,
% of the ceilings measured at the start of the session, peak memory and the
kernel path. ``pytest-benchmark``'s ``group`` is the case and configuration,
so its table compares the providers side by side. No timing is asserted: a
test fails only if its step raises.

Options (or environment variables):
  --bench-size    auto | cpu-tiny | full   (RESFAST_BENCH_SIZE; auto: full with a GPU)
  --bench-compile auto | on | off          (RESFAST_BENCH_COMPILE; auto: on with a GPU only)
  --bench-device  auto | cpu | cuda        (RESFAST_BENCH_DEVICE)
  --bench-dtypes  fp32,bf16                (RESFAST_BENCH_DTYPES)
  --bench-layouts nchw,channels_last       (RESFAST_BENCH_LAYOUTS)
  --bench-steps N                          steps per timed round (full 10, cpu-tiny 1)
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the checkout's resfast, also when run from elsewhere
    sys.path.insert(0, ROOT)

from resfast.bench import cases as C  # noqa: E402
from resfast.bench import report  # noqa: E402
from resfast.bench.measure import Runner, default_settings, sync  # noqa: E402


def _env(name, default):
    return os.environ.get(name, default)


def pytest_addoption(parser):
    g = parser.getgroup("resfast-bench", "resfast benchmarks")
    g.addoption("--bench-size", default=_env("RESFAST_BENCH_SIZE", "auto"),
                choices=("auto",) + C.SIZES,
                help="shapes: full (GPU) or cpu-tiny; auto picks by device")
    g.addoption("--bench-compile", default=_env("RESFAST_BENCH_COMPILE", "auto"),
                choices=("auto", "on", "off"),
                help="the torch.compile provider (auto: on a GPU only)")
    g.addoption("--bench-device", default=_env("RESFAST_BENCH_DEVICE", "auto"),
                help="auto, cpu, cuda")
    g.addoption("--bench-dtypes", default=_env("RESFAST_BENCH_DTYPES", "fp32,bf16"),
                help="fp32,bf16")
    g.addoption("--bench-layouts", default=_env("RESFAST_BENCH_LAYOUTS", "nchw,channels_last"),
                help="nchw,channels_last")
    g.addoption("--bench-steps", type=int, default=None, help="steps per timed round")


def _list(value, allowed, what):
    vals = [v for v in value.split(",") if v]
    for v in vals:
        if v not in allowed:
            raise pytest.UsageError(f"unknown {what} {v!r}: choose from {', '.join(allowed)}")
    return vals


def pytest_configure(config):
    settings = default_settings(config.getoption("--bench-device"),
                                config.getoption("--bench-size"),
                                config.getoption("--bench-compile"),
                                steps=config.getoption("--bench-steps"))
    config._resfast_runner = Runner(settings)
    # cpu-tiny: one intra-op thread (see resfast.bench.measure.default_settings)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    dtypes = _list(config.getoption("--bench-dtypes"), tuple(C.DTYPES), "dtype")
    layouts = _list(config.getoption("--bench-layouts"), C.LAYOUTS, "layout")
    config._resfast_configs = [(d, layout) for d in dtypes for layout in layouts]


def pytest_report_header(config):
    s = config._resfast_runner.s
    return (f"resfast bench: device {s.device}, size {s.size}, compile "
            f"{'on' if s.compile else 'off'}, {s.warmup} warm-up + {s.rounds} x {s.steps} steps, "
            "configs " + ", ".join(f"{d}/{layout}" for d, layout in config._resfast_configs))


def pytest_generate_tests(metafunc):
    if "bench_param" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("bench")
    if marker is None:
        raise pytest.UsageError(f"{metafunc.function.__name__} needs @pytest.mark.bench(group=..., "
                                "kind=..., mode=...)")
    want = marker.kwargs
    runner = metafunc.config._resfast_runner
    params = []
    for case in C.all_cases(runner.s.size):
        if case.group != want["group"] or want.get("kind") not in (None, case.kind) \
                or want.get("mode") not in (None, case.mode):
            continue
        for dtype, layout in metafunc.config._resfast_configs:
            for provider in ("eager", "compile", "conv_alone", "resfast"):  # references first
                if provider not in case.providers():
                    continue
                reason = runner.skip_reason(case, provider, dtype, layout)
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                params.append(pytest.param((case, dtype, layout, provider), marks=marks,
                                           id=f"{case.name}-{case.mode}-{dtype}-{layout}-{provider}"))
    metafunc.parametrize("bench_param", params)


@pytest.fixture(scope="session")
def bench_runner(request):
    return request.config._resfast_runner


@pytest.fixture
def run_bench(bench_runner):
    """``run_bench(benchmark, bench_param)``: measure one provider of one case
    and configuration, fill ``benchmark.extra_info`` with the result row."""

    def run(benchmark, param):
        case, dtype, layout, provider = param
        s = bench_runner.s
        row = bench_runner.measure(case, dtype, layout, provider)
        if row.status == "skipped":
            pytest.skip(row.reason)
        if row.status == "error":
            pytest.fail(f"{case.id} {dtype} {layout} {provider}: {row.reason}", pytrace=False)
        bench_runner.complete(row, case)
        step = bench_runner.workload(case, dtype, layout, provider).step

        def synced_step():
            step()
            sync(s.device)

        benchmark.group = f"{case.id} {dtype} {layout}"
        benchmark.extra_info.update(row.as_dict())
        benchmark.pedantic(synced_step, rounds=max(1, s.rounds), iterations=max(1, s.steps),
                           warmup_rounds=1 if s.size == "full" else 0)
        return row

    return run


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """The results file carries what a resfast results file does: versions,
    device, settings, the ceilings measured in this session and the command."""
    runner = getattr(config, "_resfast_runner", None)
    if runner is None:
        return
    s = runner.s
    output_json["resfast"] = {
        "format": "resfast-bench-pytest/1",
        "command": " ".join(["python", "-m", "pytest", *config.invocation_params.args]),
        "environment": report.environment(s.device),
        "settings": {"size": s.size, "warmup": s.warmup, "steps": s.steps, "rounds": s.rounds,
                     "compile": s.compile, "compile_reason": s.compile_reason,
                     "cpu_threads": s.threads, "cudnn_benchmark": s.cudnn_benchmark,
                     "configs": [list(c) for c in config._resfast_configs]},
        "ceilings": runner._ceilings,
    }
