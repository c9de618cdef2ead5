"""resfast.ops.conv_path: the conv op's GPU path, chosen per problem by measurement."""
import pytest
import torch

from resfast.ops import conv_path

CUDA = torch.device("cuda")  # a device object only: the timer below is fake, nothing runs on it


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv("RESFAST_CONV_PATH", raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    conv_path.forget()
    yield
    conv_path.forget()


def _fake(ms):
    """Implementations that record their calls, and a timer reporting ``ms[name]``."""
    calls = []
    impls = {name: (lambda name: lambda *a: calls.append(name))(name) for name in conv_path.PATHS}

    def timer(fn):
        before = len(calls)
        fn()
        return ms[calls[before]]

    return impls, timer, calls


@pytest.mark.parametrize("faster", conv_path.PATHS)
def test_auto_measures_once_and_keeps_the_faster(faster):
    impls, timer, calls = _fake({p: 1.0 if p == faster else 3.0 for p in conv_path.PATHS})
    assert conv_path.choose("k", impls, (), CUDA, timer=timer) == faster
    assert sorted(calls) == sorted(conv_path.PATHS)  # each timed on the real arguments
    assert conv_path.choose("k", impls, (), CUDA, timer=timer) == faster
    assert len(calls) == len(conv_path.PATHS)  # remembered, not measured again
    assert conv_path.chosen_paths() == {"k": faster}


def test_each_problem_is_measured_separately():
    impls, timer, _ = _fake({"triton": 1.0, "cudnn": 2.0})
    conv_path.choose("a", impls, (), CUDA, timer=timer)
    impls, timer, _ = _fake({"triton": 2.0, "cudnn": 1.0})
    conv_path.choose("b", impls, (), CUDA, timer=timer)
    assert conv_path.chosen_paths() == {"a": "triton", "b": "cudnn"}


@pytest.mark.parametrize("forced", conv_path.PATHS)
def test_environment_forces_a_path(monkeypatch, forced):
    monkeypatch.setenv("RESFAST_CONV_PATH", forced.upper())
    impls, timer, calls = _fake({"triton": 1.0, "cudnn": 1.0})
    assert conv_path.choose("k", impls, (), CUDA, timer=timer) == forced and not calls


def test_bad_environment_value(monkeypatch):
    monkeypatch.setenv("RESFAST_CONV_PATH", "fastest")
    with pytest.raises(ValueError, match="RESFAST_CONV_PATH"):
        conv_path.choose("k", {}, (), CUDA)


def test_no_measuring_off_cuda_or_during_graph_capture(monkeypatch):
    impls, timer, calls = _fake({"triton": 2.0, "cudnn": 1.0})
    assert conv_path.choose("k", impls, (), torch.device("cpu"), timer=timer) == "triton"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert conv_path.choose("k", impls, (), CUDA, timer=timer) == "triton"
    assert not calls and not conv_path.chosen_paths()


@pytest.mark.gpu
def test_measures_real_paths_on_the_gpu():
    """On a GPU: the op's first call of a shape records a choice, later calls reuse it."""
    from resfast.ops.conv2d_bn import conv2d_bn

    x = torch.randn(8, 16, 14, 14, device="cuda",
                    dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    w = torch.randn(32, 16, 3, 3, device="cuda", dtype=torch.bfloat16)
    y1, *_ = conv2d_bn(x, w, None, None, None, False, 1, 1, True, False)
    assert len(conv_path.chosen_paths()) == 1
    y2, *_ = conv2d_bn(x, w, None, None, None, False, 1, 1, True, False)
    assert len(conv_path.chosen_paths()) == 1
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
