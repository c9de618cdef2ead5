"""torch.library.opcheck over every op, gradcheck in float64, and
torch.compile(fullgraph=True) through the fused modules."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import resfast
from resfast.ops import OPS
from tests.support.helpers import DEVICES

ops = torch.ops.resfast
F64 = dict(dtype=torch.float64)


def _vec(c, device, lo=-1.0, hi=1.0, **kw):
    return torch.empty(c, device=device, **kw).uniform_(lo, hi)


def _cases(device):
    """(op name, args) pairs covering every op and its optional arguments."""
    kw = dict(device=device, **F64)
    x = torch.randn(2, 5, 6, 7, **kw).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = torch.randn(2, 5, 6, 7, **kw).requires_grad_()
    r = torch.randn(2, 5, 6, 7, **kw).requires_grad_()
    w3 = torch.randn(4, 5, 3, 3, **kw).requires_grad_()
    w1 = torch.randn(4, 5, 1, 1, **kw).requires_grad_()
    b = torch.randn(4, **kw).requires_grad_()
    scale = _vec(5, device, 0.5, 1.5, **F64).requires_grad_()
    shift = _vec(5, device, **F64).requires_grad_()
    mean, var = (_vec(5, device, **F64).requires_grad_(),
                 _vec(5, device, 0.5, 2, **F64).requires_grad_())
    gamma, beta = (_vec(5, device, 0.5, 1.5, **F64).requires_grad_(),
                   _vec(5, device, **F64).requires_grad_())
    y_out = torch.randn(2, 4, 6, 7, **kw).contiguous(memory_format=torch.channels_last)
    centre = _vec(5, device, -2, 2, **F64).requires_grad_()
    # the conv's epilogue (eval-mode BN over its 4 output channels) and residual
    out_scale, out_shift, out_centre = (_vec(4, device, 0.5, 1.5, **F64).requires_grad_(),
                                        _vec(4, device, **F64).requires_grad_(),
                                        _vec(4, device, **F64).requires_grad_())
    res = torch.randn(2, 4, 6, 7, **kw).requires_grad_()
    res_s2 = torch.randn(2, 4, 3, 4, **kw).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    # float32 (the CPU's oneDNN kernels; float64 stays on the ATen reference)
    k32 = dict(device=device, dtype=torch.float32)
    x32 = torch.randn(2, 5, 6, 7, **k32).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    w32 = torch.randn(4, 5, 3, 3, **k32).requires_grad_()
    vec32 = [_vec(c, device, lo, hi, dtype=torch.float32).requires_grad_()
             for c, lo, hi in ((5, 0.5, 1.5), (5, -1, 1), (5, -1, 1), (4, 0.5, 1.5), (4, -1, 1),
                               (4, -1, 1))]
    res32 = torch.randn(2, 4, 6, 7, **k32).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    # the CPU training conv in C++ (float32 / bfloat16 only: no float64 gradcheck; its
    # results are held bitwise to conv2d_bn's in tests/ops/test_conv2d_stats.py)
    cpu_only = [
        ("conv2d_stats", (x32, w32, vec32[4], 1, 1, 1)),
        ("conv2d_stats", (x32, w32, None, 2, 2, 2)),
        ("conv2d_stats_backward",
         (torch.randn_like(y_out).float(), _vec(4, device, dtype=torch.float32), None,
          x32.detach(), w32.detach(), y_out.float(), _vec(4, device, dtype=torch.float32), 1, 1,
          1, [True, True, True])),
        ("conv2d_stats_backward",
         (None, None, _vec(4, device, dtype=torch.float32), x32.detach(), w32.detach(),
          y_out.float(), _vec(4, device, dtype=torch.float32), 1, 1, 1, [False, True, False])),
        # the CPU training layer's forward in one call (its parts' results bitwise:
        # tests/ops/test_conv2d_bn_train.py)
        ("conv2d_bn_train",
         (x32, *_stats(x32), *vec32[:2], True, 1e-5, w32, vec32[4], 2, 1, 1,
          torch.zeros(4, device=device), torch.ones(4, device=device),
          torch.tensor(0, device=device), 0.1)),
        ("conv2d_bn_train",
         (x32, None, None, None, None, False, 1e-5, w32, None, 1, 1, 1, None, None, None, None)),
        # the CPU eval layer in one call, inference only (bitwise against conv2d_bn's route:
        # tests/ops/test_conv2d_bn_eval.py): with a residual, and NCHW, strided and dilated
        ("conv2d_bn_eval",
         (x32.detach(), w32.detach(), vec32[4].detach(), vec32[5].detach(), vec32[3].detach(),
          vec32[3].detach(), vec32[4].detach(), 1e-5, res32.detach(), True, 1, 1, 1)),
        ("conv2d_bn_eval",
         (x32.detach().contiguous(), w32.detach(), None, vec32[5].detach(),
          vec32[3].detach(), None, None, 1e-3, None, False, 2, 2, 2)),
        # inference's Winograd convolution (against the exact convolution:
        # tests/ops/test_conv2d_winograd.py)
        ("conv2d_winograd",
         (x32.detach(), torch.randn(36, 5, 4, **k32), *[v.detach() for v in vec32[3:5]],
          res32.detach(), True)),
        ("conv2d_winograd", (x32.detach(), torch.randn(36, 5, 4, **k32), None, None, None, False)),
        ("winograd_weight", (w32.detach(), False)),
        ("winograd_weight", (w32.detach(), True)),
        # the CPU training conv's weight gradient, by oneDNN, (a large weight over 4 output
        # positions) by GEMM and (16 channels, channels_last) by the direct loop on AVX2
        # (against torch: tests/ops/test_conv2d_weight_grad.py)
        ("conv2d_weight_grad", (y_out.float(), x32.detach(), w32.detach(), 1, 1, 1)),
        ("conv2d_weight_grad",
         (torch.randn(1, 64, 2, 2, **k32), torch.randn(1, 64, 4, 4, **k32),
          torch.randn(64, 64, 3, 3, **k32).contiguous(memory_format=torch.channels_last), 2, 1,
          1)),
        ("conv2d_weight_grad",
         (torch.randn(2, 16, 6, 7, **k32).contiguous(memory_format=torch.channels_last),
          torch.randn(2, 16, 6, 7, **k32).contiguous(memory_format=torch.channels_last),
          torch.randn(16, 16, 3, 3, **k32), 1, 1, 1)),
    ]
    return cpu_only + [
        ("bn_stats", (y,)),
        ("bn_stats", (x,)),
        ("bn_stats_backward",
         (_vec(5, device, **F64), _vec(5, device, **F64), y.detach(), mean.detach())),
        ("bn_finalize", (mean, var, gamma, beta, 1e-5)),
        ("bn_finalize", (mean, var, None, None, 1e-3)),
        ("bn_finalize_backward",
         (_vec(5, device, **F64), _vec(5, device, **F64), mean.detach(), var.detach(),
          gamma.detach(), 1e-5)),
        ("bn_update_running_stats_",
         (_vec(5, device, **F64), _vec(5, device, 0.5, 2, **F64), mean.detach(), var.detach(),
          84, 0.1)),
        ("bn_act", (y, scale, shift, r, True)),
        ("bn_act", (x, scale, shift, None, False)),
        ("bn_act", (y, None, None, r, True)),
        ("bn_act", (x, scale, shift, r, True, centre)),
        ("bn_act_backward",
         (torch.randn_like(y), y.detach(), scale.detach(), shift.detach(), r.detach(), True,
          [True, True, True, True])),
        ("bn_act_backward",
         (torch.randn_like(y), y.detach(), None, None, None, True, [True, False, False, False])),
        ("bn_act_backward",
         (torch.randn_like(y), x.detach(), scale.detach(), shift.detach(), None, True,
          [True, True, True, False], centre.detach())),
        ("conv2d_bn", (x, w3, b, None, None, False, 1, 1, True, False)),
        ("conv2d_bn", (y, w3, None, scale, shift, True, 2, 1, True, False)),
        ("conv2d_bn", (x, w1, b, scale, shift, False, 1, 0, False, True)),
        ("conv2d_bn", (y, w3, b, scale, shift, True, 1, 1, False, True, centre, out_scale,
                       out_shift, out_centre, res)),
        ("conv2d_bn", (x, w3, None, None, None, False, 2, 1, False, False, None, out_scale,
                       out_shift, None, res_s2)),
        ("conv2d_bn", (x, w3, b, scale, shift, True, 1, 1, True, False, centre)),
        ("conv2d_bn", (x32, w32, None, *vec32[:2], True, 1, 1, False, True, vec32[2],
                       *vec32[3:], res32)),
        ("conv2d_bn", (x32, w32, None, None, None, False, 1, 1, False, True, None, *vec32[3:])),
        ("conv2d_bn", (x32, w32, None, *vec32[:2], True, 1, 1, True, False, vec32[2])),
        # dilated (the last argument): statistics at stride 2, an epilogue and residual, oneDNN
        ("conv2d_bn", (y, w3, b, scale, shift, True, 2, 2, True, False, None, None, None, None,
                       None, 2)),
        ("conv2d_bn", (x, w3, None, None, None, False, 1, 3, False, True, None, out_scale,
                       out_shift, out_centre, res, 3)),
        ("conv2d_bn", (x32, w32, None, *vec32[:2], True, 1, 2, False, True, vec32[2],
                       *vec32[3:], res32, 2)),
        ("conv2d_bn", (x32, w32, None, None, None, False, 2, 2, True, False, None, None, None,
                       None, None, 2)),
        ("conv2d_bn_backward",
         (torch.randn_like(y_out), _vec(4, device, **F64), _vec(4, device, **F64), x.detach(),
          w3.detach(), y_out, _vec(4, device, **F64), scale.detach(), shift.detach(), True,
          1, 1, False, [True, True, True])),
        ("conv2d_bn_backward", (None, _vec(4, device, **F64), None, x.detach(), w3.detach(), y_out,
                                _vec(4, device, **F64), None, None, False, 1, 1, False,
                                [False, True, False])),
        ("conv2d_bn_backward",
         (torch.randn_like(y_out), None, None, x.detach(), w3.detach(), y_out, y_out.new_empty(0),
          scale.detach(), shift.detach(), True, 1, 1, True, [True, True, True],
          centre.detach())),
        ("conv2d_bn_backward",
         (torch.randn_like(y_out).float(), _vec(4, device, dtype=torch.float32),
          _vec(4, device, dtype=torch.float32), x32.detach(), w32.detach(), y_out.float(),
          _vec(4, device, dtype=torch.float32), vec32[0].detach(), vec32[1].detach(), True, 1, 1,
          False, [True, True, False], vec32[2].detach())),
        ("conv2d_bn_backward",
         (torch.randn_like(y_out), _vec(4, device, **F64), _vec(4, device, **F64), x.detach(),
          w3.detach(), y_out, _vec(4, device, **F64), scale.detach(), shift.detach(), True,
          1, 2, False, [True, True, True], centre.detach(), 2)),
        ("relayout", (y, True)),
        ("relayout", (x32, False)),
        # y's own batch statistics (detached: their gradient is inside grad_y)
        ("bn_batch_act", (x, *_stats(x), gamma, beta, r, True, 1e-5)),
        ("bn_batch_act", (y, *_stats(y), None, None, None, False, 1e-3)),
        ("bn_batch_act_backward",
         (torch.randn_like(x), x.detach(), *_stats(x), gamma.detach(), beta.detach(), r.detach(),
          True, 1e-5, [True, True, True, True])),
        ("bn_batch_act_backward",
         (torch.randn_like(y), y.detach(), *_stats(y), None, beta.detach(), None, False, 1e-5,
          [True, True, True, False])),
    ]


def _stats(y):
    return tuple(t.detach() for t in ops.bn_stats(y))


def test_every_op_is_covered():
    assert {name for name, _ in _cases("cpu")} == set(OPS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(_cases("cpu"))))
def test_opcheck(device, case):
    name, args = _cases(device)[case]
    if (name.startswith(("conv2d_stats", "conv2d_bn_train", "conv2d_bn_eval", "conv2d_w",
                         "winograd_"))
            and device != "cpu"):
        pytest.skip(f"{name} is a CPU op (the GPU's training conv is conv2d_bn)")
    torch.library.opcheck(getattr(ops, name).default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for c, (name, args) in enumerate(_cases("cpu"))
                                  if not name.endswith("backward") and not name.endswith("_")
                                  and args[0].dtype == torch.float64
                                  # its mean and var must be y's: gradchecked with bn_stats
                                  # in tests/kernels/test_bn_batch_act.py
                                  and name != "bn_batch_act"])
def test_gradcheck(device, case):
    name, args = _cases(device)[case]
    op = getattr(ops, name)
    tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def f(*tensors):
        full = list(args)
        for i, t in zip(tensor_pos, tensors):
            full[i] = t
        out = op(*full)
        return tuple(o for o in (out if isinstance(out, tuple) else (out,)) if o.numel())

    assert torch.autograd.gradcheck(f, [args[i] for i in tensor_pos], eps=1e-6, atol=1e-5,
                                    rtol=1e-4)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 2, 2), (2, 3, 3), (2, 0, 2), (1, 1, 4)])
def test_fake_shape_is_the_real_one_when_dilated(stride, padding, dilation):
    """The fake's output shape, (H + 2p - d (k - 1) - 1) // s + 1, is the op's (odd sizes)."""
    x, w = torch.randn(2, 5, 11, 8), torch.randn(4, 5, 3, 3)
    args = (None, None, None, False, stride, padding, True, False)
    real = ops.conv2d_bn(x, w, *args, dilation=dilation)
    with FakeTensorMode() as mode:
        fake = ops.conv2d_bn(mode.from_tensor(x), mode.from_tensor(w), *args, dilation=dilation)
    want = torch.nn.functional.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
    assert real[0].shape == fake[0].shape == want.shape
    assert [t.shape for t in real[1:]] == [t.shape for t in fake[1:]]


def _block():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        resfast.nn.Conv2dBNReLU(3, 8, 3),
        resfast.nn.BasicBlock(8, 8),
        resfast.nn.Bottleneck(8, 4, 2, torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, 2, bias=False),
                                                           torch.nn.BatchNorm2d(16))),
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph(training):
    """torch.compile(fullgraph=True) traces through every op (no graph break)
    and computes what eager computes, gradients and running statistics too."""
    eager, compiled_src = _block(), _block()
    compiled_src.load_state_dict(eager.state_dict())
    eager.train(training)
    compiled_src.train(training)
    compiled = torch.compile(compiled_src, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 10, 10).contiguous(memory_format=torch.channels_last)
    out_e, out_c = eager(x), compiled(x)
    torch.testing.assert_close(out_c, out_e)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_src.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, msg=name)
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled_src.buffers()):
        torch.testing.assert_close(b_c, b_e, msg=name)
