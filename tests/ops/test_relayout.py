"""resfast::relayout and resfast.ops.layout.to_memory_format: the copy between
NCHW and channels_last. The copy moves bits, so every result must equal ATen's
own ``contiguous(memory_format=...)`` exactly, in the requested strides."""
import pytest
import torch

import resfast  # noqa: F401  (registers the ops)
from resfast.ops.layout import to_memory_format

ops = torch.ops.resfast
CL = torch.channels_last
NCHW = torch.contiguous_format
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# full 16 x 16 tiles, partial tiles on either side, C or HW below one tile, C = 1 and
# HW = 1 (dense in both layouts), the shapes of ResNet layers
SHAPES = [(2, 32, 4, 8), (3, 5, 7, 9), (2, 63, 5, 5), (1, 17, 1, 33), (2, 1, 6, 6),
          (4, 40, 1, 1), (2, 256, 7, 7), (8, 2048, 4, 4), (1, 3, 45, 45)]


def _values(shape, dtype):
    # distinct values (as far as the dtype can tell them apart): a misplaced element shows
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float64).view(shape).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("to_cl", [True, False], ids=["to_channels_last", "to_nchw"])
def test_relayout_equals_aten_copy(dtype, shape, to_cl):
    src_fmt, fmt = (NCHW, CL) if to_cl else (CL, NCHW)
    x = _values(shape, dtype).contiguous(memory_format=src_fmt)
    out = ops.relayout(x, to_cl)
    assert out.is_contiguous(memory_format=fmt)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr()  # a new tensor, also when x is dense in both layouts


@pytest.mark.parametrize("to_cl", [True, False])
def test_relayout_of_views_and_empty_tensors(to_cl):
    fmt = CL if to_cl else NCHW
    base = torch.randn(3, 8, 10, 12)
    for x in (base[:, 1:6], base[..., ::2], base.permute(0, 1, 3, 2), base[:0],
              torch.randn(2, 0, 4, 4), base.to(torch.int32), (base > 0)):
        out = ops.relayout(x, to_cl)
        assert out.is_contiguous(memory_format=fmt)
        assert torch.equal(out, x)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_relayout_moves_bits(dtype):
    # integers through the tile path (C and H*W past one tile): every bit pattern moves as it
    # is, also those that read as NaN or -0 when the copy goes as bfloat16 or float
    info = torch.iinfo(dtype)
    x = torch.randint(info.min, info.max, (2, 40, 5, 7), dtype=dtype)
    x.view(-1)[:4] = torch.tensor([-1, 0, info.min, info.max], dtype=dtype)
    if dtype == torch.int32:
        x.view(-1)[4:6] = torch.tensor([0x7F800001, -2147483648], dtype=dtype)  # NaN, -0.0
    else:
        x.view(-1)[4:6] = torch.tensor([0x7F81, -32768], dtype=dtype)  # bfloat16 NaN, -0.0
    for to_cl, src in ((True, x), (False, x.contiguous(memory_format=CL))):
        assert torch.equal(ops.relayout(src, to_cl), x)


def test_to_memory_format_returns_dense_inputs_as_they_are():
    x = torch.randn(2, 3, 4, 5)
    assert to_memory_format(x, NCHW) is x
    y = x.contiguous(memory_format=CL)
    assert to_memory_format(y, CL) is y
    z = to_memory_format(x, CL)
    assert z.is_contiguous(memory_format=CL) and torch.equal(z, x)
    v = torch.randn(6, 3, 4, 5)[::2]  # dense in neither layout: ATen's copy
    assert torch.equal(to_memory_format(v, CL), v)


@pytest.mark.parametrize("to_cl", [True, False])
def test_gradient_passes_through(to_cl):
    # as Tensor.contiguous's does: the values of the output's gradient, in its own layout
    src_fmt, fmt = (NCHW, CL) if to_cl else (CL, NCHW)
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64).contiguous(
        memory_format=src_fmt).requires_grad_()
    g = torch.randn(2, 5, 6, 7, dtype=torch.float64).contiguous(memory_format=fmt)
    (grad,) = torch.autograd.grad(to_memory_format(x, fmt), x, g)
    assert torch.equal(grad, g) and grad.is_contiguous(memory_format=fmt)
    torch.autograd.gradcheck(lambda t: ops.relayout(t, to_cl), (x.detach().requires_grad_(),))


def test_bad_input_is_named():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with pytest.raises(ValueError, match="x must be 4-D"):
        ops.relayout(torch.randn(2, 3, 4), True)
    with FakeTensorMode(), pytest.raises(ValueError, match="x must be 4-D"):
        ops.relayout(torch.empty(2, 3, 4), True)


def test_bn_ops_read_the_other_layout_through_it():
    # bn_act with a residual in the other layout than y: the residual is relaid, the result
    # must be what the same call with matching layouts gives
    y = torch.randn(2, 24, 9, 11).contiguous(memory_format=CL)
    r = torch.randn(2, 24, 9, 11)
    scale, shift = torch.rand(24) + 0.5, torch.randn(24)
    mixed = ops.bn_act(y, scale, shift, r, True)
    same = ops.bn_act(y, scale, shift, r.contiguous(memory_format=CL), True)
    assert torch.equal(mixed, same)


def test_conv_returns_the_gradient_of_an_nchw_input_in_nchw():
    # as torch.nn's convolution does: the op computes in its input's layout, NCHW here
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    grads = {}
    for name, fmt in (("nchw", NCHW), ("channels_last", CL)):
        x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(1)).contiguous(
            memory_format=fmt).requires_grad_()
        y, _, _ = ops.conv2d_bn(x, w, None, None, None, False, 1, 1, False, False)
        assert y.is_contiguous(memory_format=fmt), name
        (grads[name],) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert grads[name].is_contiguous(memory_format=fmt), name
    # (two oneDNN algorithms: equal to float32 rounding, not bitwise)
    torch.testing.assert_close(grads["nchw"], grads["channels_last"], rtol=1e-5, atol=1e-5)


def _relayouts(fn):
    with torch.profiler.profile() as prof:
        out = fn()
    return out, sum(e.name == "resfast::relayout" for e in prof.events())


def test_a_chain_of_nchw_layers_makes_no_relayout():
    # Two training conv + BN + ReLU layers on an NCHW leaf compute in NCHW, forward and
    # backward, as torch.nn's do: no copy between the layouts anywhere.
    from resfast import functional as F

    torch.manual_seed(0)
    bn1, bn2 = torch.nn.BatchNorm2d(16), torch.nn.BatchNorm2d(16)
    w1, w2 = torch.randn(16, 16, 3, 3), torch.randn(16, 16, 3, 3)
    x = torch.randn(2, 16, 8, 8).requires_grad_()
    out, forward = _relayouts(lambda: F.conv_bn_relu(
        F.conv_bn_relu(x, w1, None, F.BatchNormArgs.of(bn1), padding=1), w2, None,
        F.BatchNormArgs.of(bn2), padding=1))
    assert out.is_contiguous() and forward == 0
    _, backward = _relayouts(lambda: out.backward(torch.randn_like(out)))
    assert backward == 0
    assert x.grad.is_contiguous()


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "vgg11_bn"])
def test_a_network_makes_its_nchw_input_channels_last_once(name):
    # a whole network is faster channels_last: it copies its NCHW input once, at its entry,
    # and runs channels_last from there (no copy back and forth between the layers)
    from resfast.models import get_model

    torch.manual_seed(0)
    model = get_model(name, num_classes=10).train()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out, forward = _relayouts(lambda: model(x))
    assert forward == 1
    _, backward = _relayouts(lambda: out.sum().backward())
    assert backward <= 1  # at most the input's gradient, handed back in NCHW
    assert x.grad.is_contiguous()
