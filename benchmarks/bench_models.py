"""Per-network benchmarks: VGG-11/16/19, ResNet-18/50/101/152 (224x224, batch
256) and the CIFAR ResNet-56 (32x32): a training step (forward, cross-entropy,
backward, SGD with momentum) and inference. The torch.nn baseline is
torchvision's network where it exists, with the same weights."""
import pytest


@pytest.mark.bench(group="models", mode="train")
def bench_model_train(benchmark, bench_param, run_bench):
    run_bench(benchmark, bench_param)


@pytest.mark.bench(group="models", mode="eval")
def bench_model_eval(benchmark, bench_param, run_bench):
    run_bench(benchmark, bench_param)
