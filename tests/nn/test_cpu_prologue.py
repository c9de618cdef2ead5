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


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_a_training_bn_backward_is_one_node_with_no_extra_pass(layout):
    # conv + BN + ReLU in training mode: the BN's backward (bn_batch_act_backward) gives y's whole
    # gradient, the statistics' path included; the conv's backward then gets no gradient for
    # its statistics and makes no pass of its own over y (a bn_act: the statistics' gradient).
    torch.manual_seed(0)
    m = resfast.nn.Conv2dBNReLU(8, 8, 3).train()
    x = torch.randn(2, 8, 9, 9).to(memory_format=layout).requires_grad_()
    passes, backward = _calls_in_backward(m, x)
    assert backward == 1
    assert passes == 0


def test_bn_add_relu_backward_makes_no_statistics_pass():
    # BN + add + ReLU on a tensor (its statistics from bn_stats): bn_batch_act_backward gives y's
    # whole gradient, so bn_stats' own backward (a pass over y) must not run, with zeros.
    torch.manual_seed(0)
    m = resfast.nn.BatchNormAddReLU(8).train()
    y = torch.randn(2, 8, 5, 5, requires_grad=True)
    r = torch.randn(2, 8, 5, 5, requires_grad=True)
    loss = m(y, r).square().sum()
    with torch.profiler.profile() as prof:
        loss.backward()
    names = [e.name for e in prof.events()]
    assert names.count("resfast::bn_batch_act_backward") == 1
    assert names.count("resfast::bn_stats_backward") == 0


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_an_eval_block_makes_no_pass_between_its_convs(block):
    # eval mode: every BN is folded into its conv, the ReLU and the residual add ride on the
    # oneDNN call; a conv's complete output must reach the next conv as it is, not through a
    # bn_act that only copies it (it did: one copy per inner conv, 2.5% of ResNet-50's eval)
    torch.manual_seed(0)
    m = {"basic": lambda: resfast.nn.BasicBlock(8, 8),
         "bottleneck": lambda: resfast.nn.Bottleneck(16, 4)}[block]().eval()
    x = torch.randn(2, m.conv1.in_channels, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.profiler.profile() as prof:
        m(x)
    names = [e.name for e in prof.events()]
    # (each conv one resfast::conv2d_bn_eval call: tests/ops/test_conv2d_bn_eval.py)
    assert names.count("resfast::conv2d_bn_eval") == (2 if block == "basic" else 3)
    assert names.count("resfast::bn_act") == 0
