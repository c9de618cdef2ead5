"""resfast::conv2d_bn_train: a CPU training layer's forward in one call.

It makes the calls resfast.functional makes one by one (bn_batch_act on the input's
statistics, conv2d_stats, the running statistics' update), from C++, so it must give exactly
their results: outputs, every gradient, the running statistics and num_batches_tracked
bitwise equal. The op is also held to torch.nn computed in float64 (forward, every gradient,
the running statistics); whole blocks through resfast.functional are compared with the
op-by-op route in tests/ops/test_eager_calls.py, and held to torch.nn everywhere else.
"""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resfast
from resfast import functional as F
from tests.ops.test_conv2d_stats import _equal

ops = torch.ops.resfast
CL = torch.channels_last
DTYPES = [torch.float32] + ([torch.bfloat16] if torch.ops.mkldnn._is_mkldnn_bf16_supported()
                            else [])


def _step(one_call, x0, stats, in_affine, weight0, bias0, running, momentum, relu):
    """One forward and backward; returns the outputs and gradients, and updates
    ``running`` (running_mean, running_var, num_batches_tracked or None) in place."""
    x = x0.clone().requires_grad_()
    iw, ib = (t.clone().requires_grad_() for t in in_affine)
    w = weight0.clone().requires_grad_()
    b = None if bias0 is None else bias0.clone().requires_grad_()
    rm, rv, nbt = running
    mean_in, var_in = stats if stats is not None else (None, None)
    if one_call:
        y, mean, var = ops.conv2d_bn_train(x, mean_in, var_in, iw if stats else None,
                                           ib if stats else None, relu, 1e-3, w, b, 2, 1, 1, rm,
                                           rv, nbt, momentum)
    else:
        a = x if stats is None else ops.bn_batch_act(x, mean_in, var_in, iw, ib, None, relu, 1e-3)
        y, mean, var = ops.conv2d_stats(a, w, b, 2, 1, 1)
        if rm is not None:
            factor = momentum
            if nbt is not None:
                nbt.add_(1)
                factor = 1.0 / float(nbt) if momentum is None else momentum
            ops.bn_update_running_stats_(rm, rv, mean.detach(), var.detach(),
                                         y.numel() // y.shape[1], factor)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    ((y.float() * g.float()).sum() + mean.sum() * 0.3 + var.sum() * 0.7).backward()
    grads = [x.grad, w.grad, None if b is None else b.grad]
    if stats is not None:
        grads += [iw.grad, ib.grad]
    return [y, mean, var] + grads


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("running", [True, False], ids=["running", "no_running"])
@pytest.mark.parametrize("input_bn", ["none", "bn", "bn_relu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_equals_its_ops_bitwise(layout, dtype, bias, input_bn, running, momentum):
    torch.manual_seed(0)
    fmt = CL if layout == "nhwc" else torch.contiguous_format
    x0 = torch.randn(3, 6, 9, 7).to(dtype).contiguous(memory_format=fmt)
    stats = None if input_bn == "none" else [t.detach() for t in ops.bn_stats(x0)]
    in_affine = (torch.rand(6) + 0.5, torch.randn(6))
    w0 = torch.randn(5, 6, 3, 3).to(dtype)
    b0 = torch.randn(5).to(dtype) if bias else None
    relu = input_bn == "bn_relu"
    states = []
    for _ in range(2):  # two steps: the second updates running statistics already moved
        states.append([torch.zeros(5), torch.ones(5), torch.tensor(0)] if running
                      else [None, None, None])
    for step in range(2):
        ours = _step(True, x0, stats, in_affine, w0, b0, states[0], momentum, relu)
        ref = _step(False, x0, stats, in_affine, w0, b0, states[1], momentum, relu)
        names = ["y", "mean", "var", "grad x", "grad weight", "grad bias", "grad in_weight",
                 "grad in_bias"]
        for name, a, b in zip(names, ours, ref):
            _equal(a, b, f"step {step}: {name}")
        for name, a, b in zip(["running_mean", "running_var", "num_batches_tracked"], *states):
            _equal(a, b, f"step {step}: {name}")
    if running:
        assert int(states[0][2]) == 2


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_matches_torch_nn(layout):
    # forward, every gradient and the running statistics against torch.nn's BN + ReLU, conv
    # and BN statistics in float64 (oneDNN's float32 against it: float32 tolerances)
    torch.manual_seed(0)
    fmt = CL if layout == "nhwc" else torch.contiguous_format
    x0 = torch.randn(4, 6, 9, 7).contiguous(memory_format=fmt)
    in_bn, conv = nn.BatchNorm2d(6, eps=1e-3), nn.Conv2d(6, 5, 3, stride=2, padding=1)
    bn = nn.BatchNorm2d(5, momentum=0.3)
    with torch.no_grad():
        in_bn.weight.uniform_(0.5, 1.5), in_bn.bias.uniform_(-0.5, 0.5)
    g = torch.randn(4, 5, 5, 4, generator=torch.Generator().manual_seed(1))
    results = []
    for ours in (True, False):
        dtype = torch.float32 if ours else torch.float64
        leaves = [t.detach().to(dtype, copy=True).requires_grad_()
                  for t in (x0, in_bn.weight, in_bn.bias, conv.weight, conv.bias)]
        x, iw, ib, w, b = leaves
        running = [bn.running_mean.clone(), bn.running_var.clone()]
        if ours:
            mean_in, var_in = (t.detach() for t in ops.bn_stats(x))
            y, mean, var = ops.conv2d_bn_train(x, mean_in, var_in, iw, ib, True, 1e-3, w, b, 2,
                                               1, 1, *running, None, 0.3)
        else:
            a = torch.relu(torch.nn.functional.batch_norm(x, None, None, iw, ib, True, 0.0, 1e-3))
            y = torch.nn.functional.conv2d(a, w, b, 2, 1)
            var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
            running = [r.double() for r in running]
            torch.nn.functional.batch_norm(y.detach(), *running, None, None, True, 0.3)
        ((y * g.to(y.dtype)).sum() + mean.sum() * 0.3 + var.sum() * 0.7).backward()
        results.append([y, mean, var, *running] + [t.grad for t in leaves])
    names = ["y", "mean", "var", "running_mean", "running_var", "grad x", "grad in_weight",
             "grad in_bias", "grad weight", "grad bias"]
    for name, a, b in zip(names, *results):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=name)


def test_running_statistics_follow_nn_batchnorm():
    # momentum=None: the cumulative average over the batches seen, as nn.BatchNorm2d keeps it
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, momentum=None)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    ours = [torch.zeros(4), torch.ones(4), torch.tensor(0)]
    for _ in range(3):
        x = torch.randn(2, 3, 5, 5)
        bn(conv(x))
        ops.conv2d_bn_train(x, None, None, None, None, False, 0.0, conv.weight, None, 1, 1, 1,
                            *ours, None)
    torch.testing.assert_close(ours[0], bn.running_mean)
    torch.testing.assert_close(ours[1], bn.running_var)
    assert int(ours[2]) == int(bn.num_batches_tracked) == 3


def _layer_ops(fn) -> list:
    """The resfast ops a call of fn makes, in the profiler's names."""
    with torch.profiler.profile() as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("resfast::")]


class _Observer(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_the_training_layers_take_it_where_nothing_observes_them(layout):
    fmt = CL if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=fmt).requires_grad_()
    conv1, conv2 = nn.Conv2d(4, 4, 3, bias=False), nn.Conv2d(4, 4, 3, bias=False)
    bn1, bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def two_layers():
        h = F.conv_bn_pending(x, conv1.weight, None, F.BatchNormArgs.of(bn1))
        return F.finish(F.conv_bn_pending(h, conv2.weight, None, F.BatchNormArgs.of(bn2)))

    # both layers, the second with the first one's pending BN + ReLU in the same call
    called = _layer_ops(two_layers)
    assert called.count("resfast::conv2d_bn_train") == 2
    assert called.count("resfast::bn_batch_act") == 2  # the second layer's input, the output
    # observed (a dispatch mode), float64 (ATen's reference), eval mode: one op at a time
    with _Observer():
        assert "resfast::conv2d_bn_train" not in _layer_ops(two_layers)
    x = x.detach().double()
    conv1.double(), conv2.double(), bn1.double(), bn2.double()
    assert "resfast::conv2d_bn_train" not in _layer_ops(two_layers)
    bn1.eval(), bn2.eval()
    assert "resfast::conv2d_bn_train" not in _layer_ops(two_layers)


def test_synchronised_batch_norm_keeps_its_global_statistics():
    # a stats_reducer's statistics are not y's own: the layer must not take the one call
    conv, bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
    bn.stats_reducer = lambda mean, var, count: (mean, var, count)
    x = torch.randn(2, 3, 6, 6)
    called = _layer_ops(lambda: F.conv_bn_pending(x, conv.weight, None, F.BatchNormArgs.of(bn)))
    assert "resfast::conv2d_bn_train" not in called
    assert "resfast::bn_finalize" in called  # the scale and shift of the global statistics


@pytest.mark.parametrize("change, match", [
    (dict(in_var=None), "in_mean and in_var must be given together"),
    (dict(in_mean=None, in_var=None, in_relu=True), "need in_mean and in_var"),
    (dict(running_var=None), "running_mean and running_var must be given together"),
    (dict(num_batches_tracked=None, momentum=None), "needs num_batches_tracked"),
    (dict(x=torch.randn(1, 3, 1, 1), in_mean=None, in_var=None),
     "Expected more than 1 value per channel when training, got 1"),
])
def test_bad_input_raises_value_errors_naming_it(change, match):
    args = dict(x=torch.randn(2, 3, 5, 5), in_mean=torch.zeros(3), in_var=torch.ones(3),
                in_weight=None, in_bias=None, in_relu=False, in_eps=1e-5,
                weight=torch.randn(4, 3, 1, 1), bias=None, stride=1, padding=0, dilation=1,
                running_mean=torch.zeros(4), running_var=torch.ones(4),
                num_batches_tracked=torch.tensor(0), momentum=0.1)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ops.conv2d_bn_train(**args)


def test_a_resnet_trains_through_it_as_through_the_ops(monkeypatch):
    # two training steps of a whole network: every parameter's gradient and every buffer
    # equal to the op-by-op route's
    torch.manual_seed(0)
    a = resfast.models.resnet20().train()
    b = resfast.models.resnet20().train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 16, 16)
    for _ in range(2):
        a(x).square().sum().backward()
        monkeypatch.setattr(F._eager, "takes_one_call", lambda *args: False)
        b(x).square().sum().backward()
        monkeypatch.undo()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        _equal(p.grad, q.grad, f"grad {name}")
    for (name, s), t in zip(a.named_buffers(), b.buffers()):
        _equal(s, t, name)


@pytest.mark.parametrize("kw, match", [
    (dict(stride=True), "stride must be an integer, got True"),
    (dict(stride=1.5), "stride must be an integer, got 1.5"),
    (dict(stride=3), "stride must be 1 or 2"),
    (dict(padding=-1), "padding >= 0"),
    (dict(dilation=0), "dilation"),
])
def test_a_training_layer_names_a_bad_conv_argument(kw, match):
    bn = F.BatchNormArgs.of(nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=match):
        F.conv_bn_relu(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), None, bn, **kw)
