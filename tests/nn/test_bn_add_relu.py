"""relu(bn(y) + shortcut) and relu(y + shortcut) against torch.nn (the modules'
plain torch.nn twins, resfast.twin)."""
import pytest
import torch

import resfast
from resfast.twin import torch_twin
from tests.support.helpers import DEVICES, LOW_PRECISION, check_module_pair, no_resfast_ops

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(2, 3, 13, 13), (1, 63, 7, 7), (3, 16, 7, 7), (2, 64, 5, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_add_relu(device, dtype, shape, layout, training):
    n, c, h, w = shape
    n = n * 4 if dtype in LOW_PRECISION else n  # see GRAD_FLOOR in tests/support/helpers.py
    ours = resfast.nn.BatchNormAddReLU(c)
    ref = torch_twin(ours)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
        ref.running_var.uniform_(0.5, 2)
    y = torch.randn(n, c, h, w) * 3 + 1
    residual = torch.randn(n, c, h, w)
    check_module_pair(ours, ref, [y, residual], dtype=dtype, device=device, training=training,
                      layout=layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_add_relu(device, dtype, layout):
    y, residual = torch.randn(2, 13, 7, 5), torch.randn(2, 13, 7, 5)
    ours = resfast.nn.AddReLU()
    check_module_pair(ours, torch_twin(ours), [y, residual], dtype=dtype, device=device,
                      training=True, layout=layout)


def test_large_mean_statistics():
    """Batch statistics stay accurate when |mean| >> std (no E[y^2]-E[y]^2
    cancellation). The output is computed as y * scale + shift, whose float32
    rounding is |mean| / std * eps relative to the normalized value (cuDNN's
    and apex's fused NHWC kernels share this form), hence the output tolerance."""
    ours = resfast.nn.BatchNormAddReLU(8)
    bn_ref = torch_twin(ours).double()
    y = torch.randn(4, 8, 9, 9, dtype=torch.float64) * 0.01 + 300.0
    r = torch.randn(4, 8, 9, 9, dtype=torch.float64)
    out = ours(y.float(), r.float())
    with no_resfast_ops():
        want = bn_ref(y, r)
    torch.testing.assert_close(ours.running_var.double(), bn_ref.running_var, rtol=1e-4, atol=0)
    torch.testing.assert_close(ours.running_mean.double(), bn_ref.running_mean, rtol=1e-6, atol=0)
    bound = 4 * (300.0 / 0.01) * torch.finfo(torch.float32).eps
    torch.testing.assert_close(out.double(), want, rtol=0, atol=bound)
