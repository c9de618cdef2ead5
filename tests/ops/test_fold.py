"""The eval-mode fold cache (resfast/ops/fold.py): BN folded into the conv once
per weight version, reused while nothing it depends on changes, and never
stale after an optimizer step, load_state_dict, .to(), a changed BN statistic,
torch.compile, inference_mode or autocast; on every device."""
import copy

import pytest
import torch

import resfast
from resfast.ops import fold
from resfast.twin import torch_twin
from tests.nn.test_conv_bn_relu import _randomize_bn
from tests.support.helpers import DEVICES, no_resfast_ops

CL = torch.channels_last


def _module(device, seed=0):
    torch.manual_seed(seed)
    ours = resfast.nn.Conv2dBNReLU(6, 8, 3, bias=True).to(device)
    _randomize_bn(ours.bn)
    return ours.eval()


def _x(device, n=2):
    return torch.randn(n, 6, 9, 9, device=device).contiguous(memory_format=CL)


def _check(ours, x):
    """ours(x) equals torch.nn's on ours' current state; returns ours(x)."""
    with torch.no_grad():
        got, want = ours(x), _reference(ours, x)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    return got


def _reference(ours, x):
    """torch.nn on a copy of ours' current state (the fold cache is not involved)."""
    ref = torch_twin(copy.deepcopy(ours)).eval()
    ref.load_state_dict(ours.state_dict())
    with no_resfast_ops():
        return ref(x)


@pytest.mark.parametrize("device", DEVICES)
def test_second_call_reuses_the_fold(device):
    ours = _module(device)
    x = _x(device)
    first = _check(ours, x)
    hits = fold.cache_stats()["hit"]
    with torch.no_grad():
        second = ours(x)
    assert fold.cache_stats()["hit"] == hits + 1
    assert torch.equal(first, second)


@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_step_refolds(device):
    ours = _module(device)
    x = _x(device)
    _check(ours, x)
    # only the conv weight moves (the BN vectors and the bias, compared by value, stay): its
    # version counter is what tells the cache
    opt = torch.optim.SGD([ours.conv.weight], lr=0.5)
    ours(x).sum().backward()  # eval-mode gradients flow to conv and BN parameters alike
    opt.step()
    _check(ours, x)
    opt.zero_grad()
    ours(x).sum().backward()
    opt.step()
    _check(ours, x)


@pytest.mark.parametrize("device", DEVICES)
def test_load_state_dict_and_changed_statistics_refold(device):
    ours = _module(device)
    x = _x(device)
    _check(ours, x)
    other = _module(device, seed=1)
    ours.load_state_dict(other.state_dict())
    _check(ours, x)
    # in place, also where the version counter does not see it: BN vectors are compared by value
    ours.bn.running_var.data.mul_(3.0)
    ours.bn.eps = 1e-2
    _check(ours, x)


def test_to_other_dtypes_and_back():
    ours = _module("cpu")
    x = _x("cpu")
    _check(ours, x)
    ours.double()
    _check(ours, x.double())
    ours.float()
    _check(ours, x)
    with torch.no_grad():
        ours.conv.weight.mul_(-1)
    _check(ours, x)


def test_batch_size_and_layout_changes():
    ours = _module("cpu")
    for x in (_x("cpu", 2), _x("cpu", 5), _x("cpu", 1).contiguous(), _x("cpu", 2)):
        _check(ours, x)


def test_dilation_change_refolds():
    """oneDNN packs the weight for a dilation: the same weight run dilated is packed anew."""
    ours = _module("cpu")
    x = _x("cpu")
    _check(ours, x)
    misses = fold.cache_stats()["miss"]
    ours.conv.dilation, ours.conv.padding = (2, 2), (2, 2)
    _check(ours, x)
    assert fold.cache_stats()["miss"] == misses + 1


def test_changes_through_data_need_clear_cache():
    """The documented limit: .data bypasses the version counter (as it bypasses
    autograd), so the fold is stale until clear_cache()."""
    ours = _module("cpu")
    x = _x("cpu")
    before = _check(ours, x)
    ours.conv.weight.data.mul_(2.0)
    with torch.no_grad():
        assert torch.equal(ours(x), before)  # stale, as documented
    fold.clear_cache()
    _check(ours, x)


def test_inference_mode():
    """Parameters created under inference_mode have no version counter: folded
    on every call, so in-place changes there are always seen."""
    with torch.inference_mode():
        ours = _module("cpu")
        x = _x("cpu")
        y1 = ours(x)
        ours.conv.weight.mul_(0.5)
        y2 = ours(x)
        torch.testing.assert_close(y2, _reference(ours, x), rtol=2e-5, atol=2e-5)
        assert not torch.allclose(y1, y2)
    ours = _module("cpu")  # normal parameters under inference_mode: cached, refolded on change
    with torch.inference_mode():
        _check(ours, x)
        _check(ours, x)
    with torch.no_grad():
        ours.conv.weight.add_(0.1)
    with torch.inference_mode():
        _check(ours, x)


def test_torch_compile_sees_in_place_updates():
    ours = _module("cpu")
    x = _x("cpu")
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), _reference(ours, x), rtol=2e-5, atol=2e-5)
        ours.conv.weight.mul_(-0.5)
        ours.bn.running_mean.add_(1.0)
        torch.testing.assert_close(compiled(x), _reference(ours, x), rtol=2e-5, atol=2e-5)


def test_autocast_keeps_one_cast_and_one_fold():
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bfloat16 convolution on this CPU")
    ours = _module("cpu")
    x = _x("cpu")
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        first = ours(x)
        hits = fold.cache_stats()["hit"]
        second = ours(x)
        assert fold.cache_stats()["hit"] == hits + 1
        assert torch.equal(first, second)
        ours.conv.weight.mul_(-1.0)
        third = ours(x)
    torch.testing.assert_close(third.float(), _reference(ours, x), rtol=3e-2, atol=3e-2)


def test_entries_die_with_their_weights():
    """In both caches: resfast.ops.fold's (an eval layer whose call autograd records) and the
    C++ eval layer's (the same layer under no_grad)."""
    import gc
    ours = _module("cpu")
    x = _x("cpu")
    _check(ours, x)
    ours(x)  # its parameters need gradients: the autograd route, whose cache is fold's
    key = id(ours.conv.weight)
    assert key in fold._entries
    other = _module("cpu", seed=1)
    with torch.no_grad():
        other(x)
    gc.collect()
    entries = fold.cache_stats()["cpp_entries"]
    del ours
    gc.collect()
    assert key not in fold._entries
    with torch.no_grad():
        for _ in range(64):  # the C++ cache drops dead weights' entries every 64th call
            other(x)
    assert fold.cache_stats()["cpp_entries"] == entries - 1


def test_results_do_not_depend_on_earlier_calls():
    """A fold packed for another batch size is not reused: oneDNN picks its kernel
    (its summation order) by shape, so the same input gives the same bits however
    the weight was used before (fuse() probes blocks at batch 2; a pickled model
    must compute in a fresh process what it computed here)."""
    ours = _module("cpu")
    fresh = copy.deepcopy(ours)
    x1 = _x("cpu", 1)
    with torch.no_grad():
        ours(_x("cpu", 2))
        assert torch.equal(ours(x1), fresh(x1))
