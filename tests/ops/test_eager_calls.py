"""resfast.ops.eager: the CPU calls that skip torch.library's Python dispatch.

They must compute exactly what the ops compute (the same kernels: results bitwise equal,
gradients and running statistics too), take the direct route only where nothing observes
the call, and otherwise call the registered op, which torch.compile, dispatch and function
modes, autocast and tensor subclasses must keep seeing.
"""
import copy
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import resfast
from resfast import functional as F
from resfast.ops import eager
from tests.ops.test_conv_cpu import FLAGS, SHAPES, _args, _cast, _run

ops = torch.ops.resfast
DTYPES = [torch.float32] + ([torch.bfloat16] if torch.ops.mkldnn._is_mkldnn_bf16_supported()
                            else [])
# resfast.functional with every op call going through the dispatcher, one op at a time
# (no training layer in one resfast::conv2d_bn_train call, no eval layer in one
# resfast::conv2d_bn_eval call)
THROUGH_OPS = types.SimpleNamespace(conv2d_bn=ops.conv2d_bn, bn_act=ops.bn_act,
                                    bn_batch_act=ops.bn_batch_act, bn_finalize=ops.bn_finalize,
                                    bn_stats=ops.bn_stats, takes_one_call=lambda *args: False,
                                    takes_eval_call=lambda *args: False)


def _direct(t: torch.Tensor) -> bool:
    """Whether t came out of a direct call (its node is eager.py's Function's, or the C++
    formula of resfast::conv2d_stats, which only the direct route calls)."""
    return _node(t).startswith(("_Conv2dBN", "_BnAct", "_BnFinalize", "_BnStats", "Conv2dStats"))


def _node(t: torch.Tensor) -> str:
    """The name of t's autograd node, without the C++ namespaces and template."""
    return t.grad_fn.name().rsplit("::", 1)[-1].rstrip(">")


def _equal(a, b, name):
    assert (a is None) == (b is None), name
    if a is not None:
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("flags", FLAGS, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_conv2d_bn_equals_the_op(shape, flags, layout, dtype):
    torch.manual_seed(0)
    args = _args(shape, flags, layout, bias=True)
    ours, ours_grads = _run(_cast(args, dtype), eager.conv2d_bn)
    ref, ref_grads = _run(_cast(args, dtype), ops.conv2d_bn)
    assert _direct(ours[0]) and not _direct(ref[0])
    for name, a, b in zip(("y", "mean", "var"), ours, ref):
        _equal(a, b, name)
    assert ours_grads.keys() == ref_grads.keys()
    for name in ours_grads:
        _equal(ours_grads[name], ref_grads[name], f"grad of {name}")


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_blocks_train_as_through_the_ops(block, layout, monkeypatch):
    # whole residual blocks in training mode, two steps: output, every gradient and the
    # running statistics equal to the same blocks run through the dispatcher
    torch.manual_seed(0)
    make = {"basic": lambda: resfast.nn.BasicBlock(8, 8),
            "bottleneck": lambda: resfast.nn.Bottleneck(16, 4)}[block]
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    a = make().to(memory_format=fmt).train()
    b = copy.deepcopy(a)
    x = torch.randn(3, a.conv1.in_channels, 7, 6).contiguous(memory_format=fmt)
    for _ in range(2):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = a(xa)
        monkeypatch.setattr(F, "_eager", THROUGH_OPS)
        yb = b(xb)
        monkeypatch.undo()
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        _equal(ya, yb, "output")
        _equal(xa.grad, xb.grad, "grad x")
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            _equal(p.grad, q.grad, f"grad {name}")
        for (name, s), t in zip(a.named_buffers(), b.buffers()):
            _equal(s, t, name)


def test_bn_ops_equal_the_ops():
    torch.manual_seed(0)
    y = torch.randn(4, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    res = torch.randn(4, 6, 5, 3)
    gamma, beta = torch.rand(6) + 0.5, torch.randn(6)

    def run(stats, finalize, act):
        leaves = [t.clone().requires_grad_() for t in (y, res, gamma, beta)]
        yy, rr, gg, bb = leaves
        mean, var = stats(yy)
        scale, shift = finalize(torch.zeros_like(var), var, gg, bb, 1e-5)
        out = act(yy, scale, shift, rr, True, mean)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        return [mean, var, scale, shift, out] + [t.grad for t in leaves]

    ours = run(eager.bn_stats, eager.bn_finalize, eager.bn_act)
    assert all(_direct(t) for t in ours[:5])
    ref = run(ops.bn_stats, ops.bn_finalize, ops.bn_act)
    for i, (a, b) in enumerate(zip(ours, ref)):
        _equal(a, b, str(i))


@pytest.mark.parametrize("affine", [True, False])
def test_bn_batch_act_equals_the_op(affine):
    torch.manual_seed(0)
    y = torch.randn(4, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    res = torch.randn(4, 6, 5, 3)
    gamma, beta = (torch.rand(6) + 0.5, torch.randn(6)) if affine else (None, None)

    def run(stats, act):
        leaves = [None if t is None else t.clone().requires_grad_() for t in (y, res, gamma, beta)]
        yy, rr, gg, bb = leaves
        mean, var = stats(yy)
        out = act(yy, mean, var, gg, bb, rr, True, 1e-5)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        return [out] + [None if t is None else t.grad for t in leaves]

    ours = run(eager.bn_stats, eager.bn_batch_act)
    ref = run(ops.bn_stats, ops.bn_batch_act)
    # on the CPU both routes take the op's C++ autograd formula
    assert _node(ours[0]) == _node(ref[0]) == "BnBatchAct"
    for i, (a, b) in enumerate(zip(ours, ref)):
        _equal(a, b, str(i))


def test_synchronised_bn_keeps_scale_and_shift():
    # global statistics are not y's own: bn_batch_act (which folds the statistics' gradient
    # into y's) must not apply them
    bn = torch.nn.BatchNorm2d(4)
    args = F.BatchNormArgs.of(bn)._replace(stats_reducer=lambda m, v, n: (m, v, n))
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    p = F.batch_norm_pending(x, args, relu=True)
    assert p.batch is None and p.scale is not None
    assert F.batch_norm_pending(x, F.BatchNormArgs.of(bn), relu=True).batch is not None


def _conv_args(dtype=torch.float32, requires_grad=True):
    x = torch.randn(2, 4, 6, 6, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 4, 3, 3, dtype=dtype)
    return (x.requires_grad_(requires_grad), w.requires_grad_(requires_grad), None, None, None,
            False, 1, 1, True, False)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_the_op():
    with _Recorder() as rec:
        eager.conv2d_bn(*_conv_args())
        eager.bn_stats(torch.randn(2, 3, 4, 4))
    assert "resfast.conv2d_bn.default" in rec.seen
    assert "resfast.bn_stats.default" in rec.seen


def test_autocast_calls_the_op():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = eager.conv2d_bn(*_conv_args())[0]
        z = eager.bn_act(torch.randn(2, 3, 4, 4, requires_grad=True), None, None, None, True)
    assert not _direct(y) and not _direct(z)
    assert y.dtype == torch.float32  # the op fixes its own precision: autocast recasts nothing


def test_float64_and_subclasses_call_the_op():
    assert not _direct(eager.conv2d_bn(*_conv_args(torch.float64))[0])

    class Marked(torch.Tensor):
        pass

    args = list(_conv_args())
    args[0] = args[0].detach().as_subclass(Marked).requires_grad_()
    assert not _direct(eager.conv2d_bn(*args)[0])


def test_compile_sees_the_op():
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return counter(gm, example_inputs)

    torch._dynamo.reset()
    f = torch.compile(lambda x, w: eager.conv2d_bn(x, w, None, None, None, False, 1, 1, True,
                                                   False)[0].sum(), backend=backend,
                      fullgraph=True)
    x, w = _conv_args()[:2]
    f(x, w).backward()
    assert any("resfast.conv2d_bn" in s for s in seen), seen
    assert w.grad is not None


def test_the_profiler_names_the_ops():
    x, w = _conv_args()[:2]
    with torch.profiler.profile() as prof:
        y, mean, var = eager.conv2d_bn(x, w, None, None, None, False, 1, 1, True, False)
        (y.sum() + mean.sum()).backward()
        z = eager.conv2d_bn(x, w, None, None, None, True, 1, 1, False, True)[0]  # a prologue
        z.sum().backward()
    names = {e.name for e in prof.events()}
    assert _direct(y) and _direct(z)
    assert {"resfast::conv2d_stats", "resfast::conv2d_stats_backward", "resfast::bn_stats",
            "resfast::conv2d_bn", "resfast::conv2d_bn_backward"} <= names


def test_inference_without_grad_is_direct_and_equal():
    x, w = _conv_args(requires_grad=False)[:2]
    with torch.no_grad():
        ours = eager.conv2d_bn(x, w, None, None, None, False, 1, 1, True, False)
        ref = ops.conv2d_bn(x, w, None, None, None, False, 1, 1, True, False)
    for a, b in zip(ours, ref):
        _equal(a, b, "output")


def test_double_backward_raises():
    args = _conv_args()
    y = eager.conv2d_bn(*args)[0]
    (gx,) = torch.autograd.grad(y.square().sum(), args[0], create_graph=True)
    # (the training conv's formula is C++: its backward op has no derivative, and says so)
    with pytest.raises(RuntimeError, match="conv2d_stats_backward is not implemented"):
        gx.sum().backward()
    z = eager.conv2d_bn(args[0], args[1], None, None, None, True, 1, 1, False, True)[0]
    (gx,) = torch.autograd.grad(z.square().sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = eager.bn_batch_act(t, *eager.bn_stats(t), None, None, None, True, 1e-5)
    (gt,) = torch.autograd.grad(out.square().sum(), t, create_graph=True)
    with pytest.raises(RuntimeError, match="bn_batch_act_backward is not implemented"):
        gt.sum().backward()


def test_tracing_and_transforms_call_the_op():
    x, w = _conv_args(requires_grad=False)[:2]

    def f(x):
        return eager.conv2d_bn(x, w, None, None, None, False, 1, 1, False, False)[0]

    traced = torch.jit.trace(f, (x,), check_trace=False)
    assert "resfast::conv2d_bn" in str(traced.graph)
    seen = []

    def g(x):  # inside torch.func.grad a functorch transform is active
        seen.append(eager._unobserved([x]))
        return x.sum()

    torch.func.grad(g)(x)
    assert seen == [False] and eager._unobserved([x])
    with torch.device("cpu"):  # a function mode
        y = eager.conv2d_bn(*_conv_args())[0]
    assert not _direct(y)


def test_forward_mode_ad_raises():
    import torch.autograd.forward_ad as fwAD

    x, w = _conv_args(requires_grad=False)[:2]
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="jvp"):
        dual = fwAD.make_dual(x, torch.ones_like(x))
        eager.conv2d_bn(dual, w, None, None, None, False, 1, 1, True, False)


@pytest.mark.parametrize("fn", [eager.conv2d_bn, ops.conv2d_bn], ids=["direct", "op"])
def test_bad_input_names_the_argument(fn):
    x, w = _conv_args()[:2]
    with pytest.raises(ValueError, match="weight has 4 input channels but x has 3"):
        fn(x[:, :3], w, None, None, None, False, 1, 1, True, False)
    with pytest.raises(ValueError, match="bias must have shape"):
        fn(x, w, torch.zeros(3), None, None, False, 1, 1, True, False)
    # (the op's schema turns a bool into an int: dilation=True is 1 there)
    bad_values = [("stride", "1"), ("padding", 1.0)] + (
        [("dilation", True)] if fn is eager.conv2d_bn else [])
    for name, bad in bad_values:
        kw = {"stride": 1, "padding": 1, "dilation": 1, name: bad}
        # the op's schema rejects a wrong type first, naming the argument too
        error = ValueError if fn is eager.conv2d_bn else (ValueError, RuntimeError)
        with pytest.raises(error, match=name):
            fn(x, w, None, None, None, False, kw["stride"], kw["padding"], True, False,
               dilation=kw["dilation"])
    with pytest.raises((ValueError, RuntimeError), match="scale"):
        eager.bn_act(x, torch.ones(3), torch.zeros(4), None, True)
