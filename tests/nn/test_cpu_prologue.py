"""On the CPU a conv's prologue (the previous BN + ReLU) is its own autograd node
(resfast.functional._conv_input): the backward reads its kept output instead of
recomputing it. Counted with torch.profiler, which sees the ops the conv op calls
inside itself too."""
import pytest
import torch

import resfast

ops = torch.ops.resfast


def _calls_in_backward(module, x):
    loss = module(x).square().sum()
    with torch.profiler.profile() as prof:
        loss.backward()
    names = [e.name for e in prof.events()]
    # a BN on batch statistics is applied by bn_batch_act on the CPU, by bn_act elsewhere
    return (names.count("resfast::bn_act") + names.count("resfast::bn_batch_act"),
            names.count("resfast::bn_act_backward")
            + names.count("resfast::bn_batch_act_backward"))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_prologue_not_recomputed_in_backward(layout):
    torch.manual_seed(0)
    # BN (batch statistics) + ReLU, applied as the conv's prologue; the conv has no
    # statistics, so its backward has no pass of its own over y
    m = resfast.nn.BNReLUConv2d(8, 8, 3, 1).train()
    x = torch.randn(2, 8, 9, 9).to(memory_format=layout).requires_grad_()
    recomputed, backward = _calls_in_backward(m, x)
    assert backward == 1  # the prologue's own backward
    assert recomputed == 0


def test_prologue_in_the_op_when_the_gemm_applies_it(monkeypatch):
    # where the implementation fuses the prologue into its GEMM (the GPU paths), the layer
    # leaves it to the op; forced here to show the count above can fail
    monkeypatch.setattr(resfast.ops.conv2d_bn, "writes_prologue_apart", lambda x: False)
    torch.manual_seed(0)
    m = resfast.nn.BNReLUConv2d(8, 8, 3, 1).train()
    x = torch.randn(2, 8, 9, 9).requires_grad_()
    recomputed, backward = _calls_in_backward(m, x)
    assert recomputed == 1  # the op recomputes a = relu(bn(x)) for the weight's gradient
    assert backward == 1
