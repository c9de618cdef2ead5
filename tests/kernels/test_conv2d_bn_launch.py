"""How the Triton conv kernels are launched (resfast/kernels/conv2d_bn.py, partials.py).

The kernels are swapped for the JITFunction objects a GPU process has, recorded
(tests/support/gpu_style_kernels.py). Checked: launches go straight to the kernel, grow no
global table and cost a bounded, constant amount of Python per op call (counted, never
timed); each launch happens with the tensors' GPU as the current device.
"""
import contextlib
import sys

import pytest
import torch
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode

from resfast.kernels.conv2d_bn import triton_conv2d_bn_backward, triton_conv2d_bn_forward
from tests.support import gpu_style_kernels
from tests.support.helpers import triton_interpreter_problem

pytestmark = pytest.mark.skipif(triton_interpreter_problem() is not None,
                                reason=str(triton_interpreter_problem()))

CL = torch.channels_last


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("RESFAST_TRITON_ON_CPU", "1")
    monkeypatch.setenv("RESFAST_CONV_PATH", "triton")


def _problem(device="cpu"):
    x = torch.randn(2, 16, 6, 6, device=device).contiguous(memory_format=CL)
    w = torch.randn(16, 16, 3, 3, device=device) / 12
    gy = torch.randn(2, 16, 6, 6, device=device).contiguous(memory_format=CL)
    gm, gv = torch.randn(16, device=device), torch.randn(16, device=device)
    return x, w, gy, gm, gv


def _step(x, w, gy, gm, gv):
    ops = torch.ops.resfast
    y, mean, _ = ops.conv2d_bn(x, w, None, None, None, False, 1, 1, True, False)
    grads = ops.conv2d_bn_backward(gy, gm, gv, x, w, y, mean, None, None, False, 1, 1, False,
                                   [True, True, False])
    return (y, mean) + tuple(grads)


STEP_LAUNCHES = ["_conv2d_bn_forward_kernel", "_merge_tile_stats_kernel",
                 "_conv2d_bn_dgrad_kernel", "_conv2d_bn_wgrad_kernel", "_sum_partials_kernel"]


def test_launches_reach_the_kernels_and_grow_no_table(monkeypatch, triton_path):
    """Each launch is one call of the kernel's own run (no wrap_triton: its dispatch records
    every launch's arguments in torch's kernel side table, which is never freed)."""
    log = gpu_style_kernels.install(monkeypatch)
    args = _problem()
    table = (len(kernel_side_table.id_to_kernel), len(kernel_side_table.constant_args))
    results = [_step(*args) for _ in range(4)]
    assert (len(kernel_side_table.id_to_kernel), len(kernel_side_table.constant_args)) == table
    assert [launch.kernel for launch in log] == STEP_LAUNCHES * 4
    for got in results[1:]:  # the kernels ran: same answer every time
        for a, b in zip(got, results[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _python_calls(fn) -> int:
    """Python function calls made while fn runs (C functions not counted)."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


# Python calls of one forward and one backward op call, launches excluded (measured with
# torch 2.14: about 350; through wrap_triton, each launch alone took thousands).
PYTHON_CALLS_PER_STEP = 700


def test_python_work_per_call_is_bounded(monkeypatch, triton_path):
    # the op's own work is counted, not the interpreter's
    gpu_style_kernels.install(monkeypatch, execute=False)
    args = _problem()
    counts = [_python_calls(lambda: _step(*args)) for _ in range(6)]
    assert counts[2:] == [counts[2]] * 4, f"Python work grows from call to call: {counts}"
    assert counts[-1] <= PYTHON_CALLS_PER_STEP, counts


def test_launches_run_on_the_tensors_gpu(monkeypatch):
    """Tensors on cuda:1 while cuda:0 is current: every launch happens with cuda:1 current
    (Triton launches on the current device). Fake tensors stand in for the GPU's; the
    current device is the only state of torch.cuda the launchers touch."""
    current = [0]

    @contextlib.contextmanager
    def device(d):
        before, current[0] = current[0], torch.device(d).index
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    log = gpu_style_kernels.install(monkeypatch, execute=False,
                                    current_device=lambda: current[0])
    with FakeTensorMode():
        x, w, gy, gm, gv = _problem("cuda:1")
        y, mean, _ = triton_conv2d_bn_forward(x, w, None, None, None, False, 1, 1, True, False)
        triton_conv2d_bn_backward(gy, gm, gv, x, w, y, mean, None, None, False, 1, 1, False,
                                  [True, True, True])
    assert [launch.kernel for launch in log] == STEP_LAUNCHES + ["_sum_partials_kernel"]
    assert [launch.device for launch in log] == [1] * len(log)
    assert current[0] == 0
