"""Bad input gives a clear error naming the argument, never a crash or a silent
wrong answer; an empty batch gives a correct empty result where torch gives one."""
import pytest
import torch
from torch import nn

import resfast
from resfast import functional as F
from resfast.functional import BatchNormArgs

ops = torch.ops.resfast


def _bn(c):
    return BatchNormArgs.of(nn.BatchNorm2d(c))


def test_three_d_input():
    with pytest.raises(ValueError, match="x must be 4-D"):
        F.conv_bn_relu(torch.randn(3, 8, 8), torch.randn(4, 3, 3, 3), None, _bn(4), padding=1)


def test_integer_input():
    with pytest.raises(ValueError, match="x must be floating point"):
        F.conv_bn_relu(torch.ones(1, 3, 8, 8, dtype=torch.int64), torch.randn(4, 3, 3, 3), None, _bn(4))


def test_channel_mismatch():
    with pytest.raises(ValueError, match="does not take 5 input channels"):
        F.conv_bn_relu(torch.randn(2, 5, 8, 8), torch.randn(4, 3, 3, 3), None, _bn(4))


def test_bn_channel_mismatch():
    with pytest.raises(ValueError, match=r"bn.weight must have shape \(4,\)"):
        F.conv_bn_relu(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), None, _bn(6))


def test_weight_dtype_mismatch():
    with pytest.raises(ValueError, match="weight dtype"):
        F.conv_bn_relu(torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 3, 3), None, _bn(4))


def test_residual_shape_mismatch():
    with pytest.raises(ValueError, match="residual shape"):
        F.add_relu(torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 6))


def test_residual_dtype_mismatch_at_op_level():
    with pytest.raises(ValueError, match="residual must have the dtype of y"):
        ops.bn_act(torch.randn(2, 4, 5, 5), None, None, torch.randn(2, 4, 5, 5, dtype=torch.float64), True)


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
        F.conv_bn_relu(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3, device="cuda"), None, _bn(4))


def test_device_mix_meta():
    """A device mix is caught before any kernel runs (meta tensors stand in for a GPU)."""
    with pytest.raises(ValueError, match="is on meta"):
        F.conv_bn_relu(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3, device="meta"), None, _bn(4))


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
        ops.conv2d_bn(torch.randn(1, 3, 2, 2), torch.randn(4, 3, 3, 3), None, None, None, False, 1, 0, False, False)
