"""The fused modules end to end through the Triton conv kernels.

On a GPU the conv op always runs Triton (these run in the other test files);
on the CPU, RESFAST_TRITON_ON_CPU=1 sends the op through the same kernels
under the Triton interpreter, on small shapes, so CI checks what the GPU runs,
composed with the rest of the op layer (prologue backward, BN statistics
gradients, folding)."""
import pytest
import torch
from torchvision.models.resnet import BasicBlock as TVBasic
from torchvision.models.resnet import Bottleneck as TVBottleneck

import resfast
from resfast import kernels
from tests.helpers import check_module_pair
from tests.ops.test_blocks import _projection, _randomize
from tests.ops.test_bn_relu_conv import TorchBNReLUConv
from tests.ops.test_conv_bn_relu import TorchConvBNReLU, _randomize_bn

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not kernels.interpreting(),
                                reason="on a GPU the other op tests already run the Triton kernels")

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _triton_on_cpu(monkeypatch):
    monkeypatch.setenv("RESFAST_TRITON_ON_CPU", "1")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("conf", [(3, 8, 3, 1), (13, 5, 1, 2)], ids=str)
def test_conv_bn_relu(dtype, training, conf):
    cin, cout, k, stride = conf
    ref = TorchConvBNReLU(cin, cout, k, stride, True, relu=True)
    _randomize_bn(ref.bn)
    ours = resfast.nn.Conv2dBNReLU(cin, cout, k, stride, bias=True)
    n = 8 if dtype == torch.bfloat16 else 2
    check_module_pair(ours, ref, [torch.randn(n, cin, 7, 9)], dtype=dtype, device="cpu", training=training)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_bn_relu_conv(dtype, layout):
    ref = TorchBNReLUConv(6, 5, 3, 2)
    ours = resfast.nn.BNReLUConv2d(6, 5, 3, 2)
    n = 8 if dtype == torch.bfloat16 else 2
    check_module_pair(ours, ref, [torch.randn(n, 6, 7, 7)], dtype=dtype, device="cpu", training=True,
                      layout=layout)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_basic_block(training):
    ref = _randomize(TVBasic(8, 16, 2, _projection(8, 16, 2)))
    ours = resfast.nn.BasicBlock(8, 16, 2, _projection(8, 16, 2))
    check_module_pair(ours, ref, [torch.randn(2, 8, 7, 7)], dtype=torch.float32, device="cpu", training=training)


def test_bottleneck():
    ref = _randomize(TVBottleneck(16, 4, 1))
    ours = resfast.nn.Bottleneck(16, 4, 1)
    check_module_pair(ours, ref, [torch.randn(2, 16, 5, 5)], dtype=torch.float32, device="cpu", training=True)
