"""Test-wide setup.

Without a GPU the Triton kernels run on the CPU under the Triton interpreter;
its switch is read when the kernels are defined, so it must be set before
anything imports resfast.kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     default=os.environ.get("RESFAST_RUN_SLOW") == "1",
                     help="also run the tests marked slow (the full model matrices; tens of "
                          "minutes on a CPU)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    # the default run must fit CI (2 cores); the slow ones repeat what the
    # default run checks on more networks and precisions
    skip_slow = pytest.mark.skip(reason="slow on a CPU: run with --run-slow "
                                        "(or RESFAST_RUN_SLOW=1)")
    run_slow = config.getoption("--run-slow")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        elif "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _ieee_float32_convolutions():
    """float32 results are held to float64 references at 2e-5, which TF32 does not meet;
    torch lets cuDNN's float32 convolutions use TF32 by default, and resfast's conv follows
    torch's setting on both its GPU paths. So TF32 is off in every test, unless the test
    turns it on (tests/ops/test_conv2d_bn_gpu_paths.py does, to check that it is followed)."""
    before = torch._C._get_cudnn_allow_tf32()
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before
