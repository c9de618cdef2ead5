"""Bad input gives a clear error naming the argument, never a crash or a silent
wrong answer; an empty batch gives a correct empty result where torch gives one."""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import resfast
from resfast import functional as F
from resfast.functional import BatchNormArgs
from tests.support.helpers import DEVICES

ops = torch.ops.resfast


def _bn(c):
    return BatchNormArgs.of(nn.BatchNorm2d(c))


def test_three_d_input():
    with pytest.raises(ValueError, match="x must be 4-D"):
        F.conv_bn_relu(torch.randn(3, 8, 8), torch.randn(4, 3, 3, 3), None, _bn(4), padding=1)


def test_integer_input():
    with pytest.raises(ValueError, match="x must be floating point"):
        F.conv_bn_relu(torch.ones(1, 3, 8, 8, dtype=torch.int64), torch.randn(4, 3, 3, 3), None,
                       _bn(4))


def test_channel_mismatch():
    with pytest.raises(ValueError, match="does not take 5 input channels"):
        F.conv_bn_relu(torch.randn(2, 5, 8, 8), torch.randn(4, 3, 3, 3), None, _bn(4))


def test_bn_channel_mismatch():
    with pytest.raises(ValueError, match=r"bn.weight must have shape \(4,\)"):
        F.conv_bn_relu(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), None, _bn(6))


def test_weight_dtype_mismatch():
    with pytest.raises(ValueError, match="weight dtype"):
        F.conv_bn_relu(torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 3, 3), None,
                       _bn(4))


def test_residual_shape_mismatch():
    with pytest.raises(ValueError, match="residual shape"):
        F.add_relu(torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 6))


def test_residual_dtype_mismatch_at_op_level():
    with pytest.raises(ValueError, match="residual must have the dtype of y"):
        ops.bn_act(torch.randn(2, 4, 5, 5), None, None,
                   torch.randn(2, 4, 5, 5, dtype=torch.float64), True)


def test_scale_without_shift():
    with pytest.raises(ValueError, match="scale and shift must be given together"):
        ops.bn_act(torch.randn(2, 4, 5, 5), torch.ones(4), None, None, True)


def test_scale_wrong_length():
    with pytest.raises(ValueError, match=r"scale must have shape \(4\)"):
        ops.bn_act(torch.randn(2, 4, 5, 5), torch.ones(3), torch.zeros(3), None, True)


def test_non_tensor_input():
    with pytest.raises(TypeError, match="x must be a Tensor"):
        F.conv_bn_relu([[1.0]], torch.randn(4, 3, 3, 3), None, _bn(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for a device mix")
def test_device_mix():
    with pytest.raises(ValueError, match="is on"):
        F.conv_bn_relu(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3, device="cuda"), None,
                       _bn(4))


def test_device_mix_meta():
    """A device mix is caught before any kernel runs (meta tensors stand in for a GPU)."""
    with pytest.raises(ValueError, match="is on meta"):
        F.conv_bn_relu(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3, device="meta"), None,
                       _bn(4))


def test_single_value_per_channel_in_training():
    m = resfast.nn.Conv2dBNReLU(3, 4, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 3, 1, 1))


def test_empty_batch_training_raises_like_torch():
    m = resfast.nn.Conv2dBNReLU(3, 4, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(0, 3, 8, 8))


def test_empty_batch_eval_gives_empty_output():
    m = resfast.nn.Conv2dBNReLU(3, 4, 3, stride=2).eval()
    out = m(torch.randn(0, 3, 8, 8))
    assert out.shape == (0, 4, 4, 4)


def test_unfusable_conv_is_rejected():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    with pytest.raises(ValueError, match="groups=2"):
        resfast.nn.Conv2dBNReLU.from_modules(conv, nn.BatchNorm2d(4), relu=True)


def test_kernel_larger_than_input():
    with pytest.raises(ValueError, match="smaller than the kernel"):
        ops.conv2d_bn(torch.randn(1, 3, 2, 2), torch.randn(4, 3, 3, 3), None, None, None, False, 1,
                      0, False, False)


# ---- the conv op's boundary: every argument checked once, by the op and its fake ----------

def _conv_args(device):
    """A valid resfast::conv2d_bn call: 3x3, stride 2, 13 -> 5 channels, bias, prologue,
    statistics."""
    return dict(x=torch.randn(1, 13, 9, 7, device=device),
                weight=torch.randn(5, 13, 3, 3, device=device),
                bias=torch.randn(5, device=device), in_scale=torch.rand(13, device=device) + 0.5,
                in_shift=torch.randn(13, device=device), in_relu=True, stride=2, padding=1,
                stats=True, out_relu=False)


def _conv_backward_args(device):
    a = _conv_args(device)
    y, mean = torch.zeros(1, 5, 5, 4, device=device), torch.zeros(5, device=device)
    return dict(grad_y=torch.ones_like(y), grad_mean=torch.ones_like(mean),
                grad_var=torch.ones_like(mean), x=a["x"], weight=a["weight"], y=y, mean=mean,
                in_scale=a["in_scale"], in_shift=a["in_shift"], in_relu=True, stride=2, padding=1,
                out_relu=False, output_mask=[True, True, True])


BAD_CONV = {
    "x_not_4d": (dict(x=lambda a: a["x"][0]), "x must be a 4-D"),
    "x_int": (dict(x=lambda a: a["x"].to(torch.int32)), "x must be floating point"),
    "weight_dtype": (dict(weight=lambda a: a["weight"].double()),
                     "weight dtype torch.float64 does not go with"),
    "channels": (dict(weight=lambda a: a["weight"][:, :-1]),
                 "weight has 12 input channels but x has 13"),
    "non_square": (dict(weight=lambda a: a["weight"][..., :-1]),
                   r"weight must be \(C_out, C_in, K, K\)"),
    "weight_device": (dict(weight=lambda a: a["weight"].to("meta")), "weight is on meta"),
    "scale_without_shift": (dict(in_shift=lambda a: None),
                            "in_scale and in_shift must be given together"),
    "scale_dtype": (dict(in_scale=lambda a: a["in_scale"].half()),
                    "in_scale must be torch.float32"),
    "bias_shape": (dict(bias=lambda a: a["bias"][:-1]), r"bias must have shape \(5,\)"),
    "stride": (dict(stride=lambda a: 0), "stride must be 1 or 2"),
    "padding": (dict(padding=lambda a: -1), "padding >= 0"),
    "too_small": (dict(x=lambda a: a["x"][..., :2, :2], padding=lambda a: 0),
                  "smaller than the kernel"),
    "stats_with_out_relu": (dict(out_relu=lambda a: True), "out_relu cannot be combined"),
}


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_bn_valid_arguments(device):
    """The arguments the bad cases below start from are valid: each case fails for its own
    reason."""
    y, mean, var = ops.conv2d_bn(*_conv_args(device).values())
    assert y.shape == (1, 5, 5, 4) and mean.shape == var.shape == (5,)
    grads = ops.conv2d_bn_backward(*_conv_backward_args(device).values())
    assert [tuple(g.shape) for g in grads] == [(1, 13, 9, 7), (5, 13, 3, 3), (5,)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change,match", BAD_CONV.values(), ids=list(BAD_CONV))
def test_conv2d_bn_bad_input(change, match, device):
    args = _conv_args(device)
    args.update({k: f(args) for k, f in change.items()})
    with pytest.raises(ValueError, match=match):
        ops.conv2d_bn(*args.values())


BAD_CONV_BACKWARD = {
    "grad_y_shape": (dict(grad_y=lambda a: a["grad_y"][:, :-1]),
                     r"grad_y must have shape \(1, 5, 5, 4\)"),
    "y_device": (dict(y=lambda a: a["y"].to("meta")), "y is on meta"),
    "mask_length": (dict(output_mask=lambda a: [True, True]), "output_mask must have 3"),
    "grad_mean_dtype": (dict(grad_mean=lambda a: a["grad_mean"].double()),
                        "grad_mean must be torch.float32"),
    "mean_shape": (dict(mean=lambda a: a["mean"][:-1]), r"mean must have shape \(5,\)"),
    "channels": (dict(weight=lambda a: a["weight"][:, :-1]),
                 "weight has 12 input channels but x has 13"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change,match", BAD_CONV_BACKWARD.values(), ids=list(BAD_CONV_BACKWARD))
def test_conv2d_bn_backward_bad_input(change, match, device):
    args = _conv_backward_args(device)
    args.update({k: f(args) for k, f in change.items()})
    with pytest.raises(ValueError, match=match):
        ops.conv2d_bn_backward(*args.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dilation", [0, -1])
def test_conv2d_bn_bad_dilation(dilation, device):
    """Forward, backward and the fake name the dilation."""
    match = f"dilation must be an integer >= 1, got {dilation}"
    with pytest.raises(ValueError, match=match):
        ops.conv2d_bn(*_conv_args(device).values(), dilation=dilation)
    with pytest.raises(ValueError, match=match):
        ops.conv2d_bn_backward(*_conv_backward_args(device).values(), dilation=dilation)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=match):
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                for a in _conv_args(device).values()]
        ops.conv2d_bn(*args, dilation=dilation)


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_bn_dilated_kernel_larger_than_input(device):
    """Dilated 5, the 3x3 spans 11x11: more than the 9x7 input padded by 1."""
    with pytest.raises(ValueError, match=r"smaller than the kernel \(3x3, dilation 5: 11x11\)"):
        ops.conv2d_bn(*_conv_args(device).values(), dilation=5)
