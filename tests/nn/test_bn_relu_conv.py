"""Pre-activation conv(relu(bn(x))) against torch.nn (the module's plain torch.nn twin,
resfast.twin)."""
import pytest
import torch

import resfast
from resfast.twin import torch_twin
from tests.support.helpers import DEVICES, LOW_PRECISION, check_module_pair

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (N, C_in, C_out, H, W, K, stride)
SHAPES = [(2, 3, 8, 13, 13, 3, 1), (1, 63, 16, 7, 7, 3, 2), (3, 16, 5, 7, 7, 1, 2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_relu_conv(device, dtype, shape, layout, training):
    n, cin, cout, h, w, k, stride = shape
    n = n * 4 if dtype in LOW_PRECISION else n  # see GRAD_FLOOR in tests/support/helpers.py
    ref = torch_twin(resfast.nn.BNReLUConv2d(cin, cout, k, stride))
    with torch.no_grad():
        ref.bn.weight.uniform_(0.5, 1.5)
        ref.bn.bias.uniform_(-0.5, 0.5)
        ref.bn.running_mean.uniform_(-0.5, 0.5)
    ours = resfast.nn.BNReLUConv2d(cin, cout, k, stride)
    check_module_pair(ours, ref, [torch.randn(n, cin, h, w) + 0.5], dtype=dtype, device=device,
                      training=training, layout=layout)
