"""The fused modules end to end through each GPU path of the conv op.

The conv op has two GPU paths (resfast.ops.conv_path): the Triton implicit GEMM
and cuDNN's GEMM with the BN kernels around it. Here each is forced with
RESFAST_CONV_PATH and checked against torch.nn, composed with the rest of the
op layer (prologue backward, BN statistics gradients, folding).

On the CPU, RESFAST_TRITON_ON_CPU=1 sends the op through the GPU paths: the
Triton kernels under the Triton interpreter, on small shapes, so CI checks what
the GPU runs; the cuDNN path's ATen calls on the CPU. On a GPU both run on it.
Also: the measured choice between the paths."""
import pytest
import torch
from torchvision.models.resnet import BasicBlock as TVBasic
from torchvision.models.resnet import Bottleneck as TVBottleneck

import resfast
from resfast.ops import conv_path
from resfast.twin import torch_twin
from tests.nn.test_blocks import _projection, _randomize
from tests.nn.test_conv_bn_relu import _randomize_bn
from tests.support.helpers import check_module_pair, triton_interpreter_problem

DTYPES = [torch.float32, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, params=conv_path.PATHS)
def path(request, monkeypatch):
    if request.param == "triton" and DEVICE == "cpu" and triton_interpreter_problem() is not None:
        pytest.skip(f"the Triton kernels need a GPU, or on the CPU: {triton_interpreter_problem()}")
    monkeypatch.setenv("RESFAST_TRITON_ON_CPU", "1")
    monkeypatch.setenv("RESFAST_CONV_PATH", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("conf", [(3, 8, 3, 1), (13, 5, 1, 2)], ids=str)
def test_conv_bn_relu(dtype, training, conf):
    cin, cout, k, stride = conf
    ref = torch_twin(resfast.nn.Conv2dBNReLU(cin, cout, k, stride, bias=True))
    _randomize_bn(ref.bn)
    ours = resfast.nn.Conv2dBNReLU(cin, cout, k, stride, bias=True)
    n = 8 if dtype == torch.bfloat16 else 2
    check_module_pair(ours, ref, [torch.randn(n, cin, 7, 9)], dtype=dtype, device=DEVICE,
                      training=training)


# (C_in, C_out, K, stride, dilation): below and above 16 input channels (the Triton GEMMs'
# folded-tap and tap-by-tap loops), a 3x3 at stride 2 dilated 3
DILATED = [(5, 8, 3, 1, 2), (13, 6, 3, 2, 3), (20, 6, 3, 1, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("conf", DILATED, ids=str)
def test_dilated_conv_bn(dtype, training, layout, conf):
    """A dilated conv + BN (+ ReLU in float32; bf16 leaves it out, as
    tests/nn/test_conv_bn_relu.py's dilated test says why)."""
    cin, cout, k, stride, dilation = conf
    relu = dtype == torch.float32
    ref = torch_twin(resfast.nn.Conv2dBNReLU(cin, cout, k, stride, bias=True, relu=relu,
                                             dilation=dilation))
    _randomize_bn(ref.bn)
    ours = resfast.nn.Conv2dBNReLU(cin, cout, k, stride, bias=True, relu=relu, dilation=dilation)
    n = 8 if dtype == torch.bfloat16 else 2
    check_module_pair(ours, ref, [torch.randn(n, cin, 9, 7)], dtype=dtype, device=DEVICE,
                      training=training, layout=layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_bn_relu_conv(dtype, layout):
    ref = torch_twin(resfast.nn.BNReLUConv2d(6, 5, 3, 2))
    ours = resfast.nn.BNReLUConv2d(6, 5, 3, 2)
    n = 8 if dtype == torch.bfloat16 else 2
    check_module_pair(ours, ref, [torch.randn(n, 6, 7, 7)], dtype=dtype, device=DEVICE,
                      training=True, layout=layout)


def test_dilated_bn_relu_conv():
    """Pre-activation with a dilated conv: the prologue applied at the dilated taps."""
    ref = torch_twin(resfast.nn.BNReLUConv2d(6, 5, 3, 1, dilation=2))
    ours = resfast.nn.BNReLUConv2d(6, 5, 3, 1, dilation=2)
    check_module_pair(ours, ref, [torch.randn(2, 6, 7, 8)], dtype=torch.float32, device=DEVICE,
                      training=True, layout="nchw")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_basic_block(training):
    ref = _randomize(TVBasic(8, 16, 2, _projection(8, 16, 2)))
    ours = resfast.nn.BasicBlock(8, 16, 2, _projection(8, 16, 2))
    check_module_pair(ours, ref, [torch.randn(2, 8, 7, 7)], dtype=torch.float32, device=DEVICE,
                      training=training)


def test_bottleneck():
    ref = _randomize(TVBottleneck(16, 4, 1))
    ours = resfast.nn.Bottleneck(16, 4, 1)
    check_module_pair(ours, ref, [torch.randn(2, 16, 5, 5)], dtype=torch.float32, device=DEVICE,
                      training=True)

