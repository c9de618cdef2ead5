"""Double backward through the registered ops raises; it never returns silent zeros.

The ``*_backward`` ops have no derivative of their own. Without an Autograd kernel for them
the dispatcher only warns, and a second differentiation through a first-order gradient
(``create_graph=True``) would hand back zero or missing gradients: a wrong answer. The
extension registers torch's not-implemented fallback for them (csrc/ops.cpp), so the second
backward raises. The direct eager route is tested in test_eager_calls.py.
"""
import warnings

import pytest
import torch

import resfast  # noqa: F401  (registers the ops)

ops = torch.ops.resfast


def _x():
    torch.manual_seed(0)
    return torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)


def _first_order_bn_act():
    x = _x()
    scale = torch.rand(3, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out = ops.bn_act(x, scale, shift, None, True)
    return torch.autograd.grad(out.square().sum(), x, create_graph=True)[0]


def _first_order_bn_stats():
    x = _x()
    _, var = ops.bn_stats(x)
    return torch.autograd.grad(var.square().sum(), x, create_graph=True)[0]


def _first_order_bn_batch_act():
    x = _x()
    mean, var = ops.bn_stats(x)
    out = ops.bn_batch_act(x, mean, var, None, None, None, True, 1e-5)
    return torch.autograd.grad(out.square().sum(), x, create_graph=True)[0]


def _first_order_bn_finalize():
    mean = torch.randn(3, dtype=torch.float64, requires_grad=True)
    var = torch.rand(3, dtype=torch.float64, requires_grad=True)
    scale, _ = ops.bn_finalize(mean, var, None, None, 1e-5)
    return torch.autograd.grad(scale.square().sum(), var, create_graph=True)[0]


def _first_order_conv2d_bn():
    x = _x()
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    y = ops.conv2d_bn(x, w, None, None, None, False, 1, 1, True, False)[0]
    return torch.autograd.grad(y.square().sum(), x, create_graph=True)[0]


CASES = {
    "bn_act_backward": _first_order_bn_act,
    "bn_stats_backward": _first_order_bn_stats,
    "bn_batch_act_backward": _first_order_bn_batch_act,
    "bn_finalize_backward": _first_order_bn_finalize,
    "conv2d_bn_backward": _first_order_conv2d_bn,
}


@pytest.mark.parametrize("op", CASES)
def test_second_backward_through_the_op_raises(op):
    grad = CASES[op]()
    # the first-order gradient is part of a graph: the second backward reaches the op
    assert grad.requires_grad and grad.grad_fn is not None
    with pytest.raises(RuntimeError, match=rf"resfast(::|\.){op}"):
        grad.sum().backward()


@pytest.mark.parametrize("op", ["bn_act_backward", "bn_stats_backward", "bn_batch_act_backward",
                                "bn_finalize_backward"])
def test_backward_ops_called_without_grad_neither_warn_nor_record(op):
    """The fallback costs nothing in a plain backward: no warning, no graph."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = _x()
        loss = {"bn_act_backward": lambda: ops.bn_act(x, torch.ones(3, dtype=x.dtype),
                                                      torch.zeros(3, dtype=x.dtype), None, True),
                "bn_stats_backward": lambda: ops.bn_stats(x)[1],
                "bn_batch_act_backward": lambda: ops.bn_batch_act(x, *ops.bn_stats(x), None, None,
                                                                  None, True, 1e-5),
                "bn_finalize_backward": lambda: ops.bn_finalize(x.mean((0, 2, 3)),
                                                                x.var((0, 2, 3)), None, None,
                                                                1e-5)[0]}[op]()
        (grad,) = torch.autograd.grad(loss.square().sum(), x)
    assert not grad.requires_grad and grad.grad_fn is None
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
