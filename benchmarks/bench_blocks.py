"""Per-block benchmarks: torchvision's BasicBlock (3x3-3x3) and Bottleneck
(1x1-3x3-1x1, 256 -> 64 -> 256), training forward + backward and inference."""
import pytest


@pytest.mark.bench(group="blocks", kind="basic_block", mode="train")
def bench_basic_block_train(benchmark, bench_param, run_bench):
    run_bench(benchmark, bench_param)


@pytest.mark.bench(group="blocks", kind="basic_block", mode="eval")
def bench_basic_block_eval(benchmark, bench_param, run_bench):
    run_bench(benchmark, bench_param)


@pytest.mark.bench(group="blocks", kind="bottleneck", mode="train")
def bench_bottleneck_train(benchmark, bench_param, run_bench):
    run_bench(benchmark, bench_param)


@pytest.mark.bench(group="blocks", kind="bottleneck", mode="eval")
def bench_bottleneck_eval(benchmark, bench_param, run_bench):
    run_bench(benchmark, bench_param)
