"""Per-op benchmarks: conv + BN + ReLU (training forward + backward, and eval
with BN folded, against the bare conv too), BN + add + ReLU (forward +
backward, memory bound: GB/s against the copy ceiling) and the pre-activation
BN + ReLU + conv. Shapes: ResNet-50's layers at batch 128 (full) or tiny
(cpu-tiny); see resfast.bench.cases."""
import pytest


@pytest.mark.bench(group="ops", kind="conv_bn_relu", mode="train")
def bench_conv_bn_relu_train(benchmark, bench_param, run_bench):
    run_bench(benchmark, bench_param)


@pytest.mark.bench(group="ops", kind="conv_bn_relu", mode="eval")
def bench_conv_bn_relu_eval(benchmark, bench_param, run_bench):
    run_bench(benchmark, bench_param)


@pytest.mark.bench(group="ops", kind="bn_add_relu", mode="train")
def bench_bn_add_relu_train(benchmark, bench_param, run_bench):
    run_bench(benchmark, bench_param)


@pytest.mark.bench(group="ops", kind="bn_relu_conv", mode="train")
def bench_bn_relu_conv_train(benchmark, bench_param, run_bench):
    run_bench(benchmark, bench_param)
