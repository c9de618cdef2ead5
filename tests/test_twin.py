"""The plain torch.nn twin (resfast/twin.py, ``--backend torch``, the benchmarks'
baselines, the tests' references): the same networks through plain torch.nn,
same state_dict, same function, not one resfast op."""
import copy

import pytest
import torch

from resfast.functional import shortcut_a
from resfast.twin import (
    has_fused_layers,
    recording_resfast_ops,
    resfast_ops_called,
    to_torch,
    torch_twin,
)
from tests.support import tiny_models

models = pytest.importorskip("resfast.models")


def close(a, b, msg=""):
    """Equal to float64 rounding, relative to the tensor's scale (plain nets at
    initialisation have gradients in the hundreds next to tiny ones)."""
    scale = float(b.detach().abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * scale + 1e-12, msg=msg or None)


def check_same(model, x, *, dense=False):
    """Train-mode forward + backward of the resfast model and its torch twin in
    float64 (so that agreement means the same function, not fp32 luck):
    outputs, every parameter gradient, running statistics; the twin runs no resfast op."""
    model, x = model.double(), x.double()
    ref = to_torch(copy.deepcopy(model))
    assert has_fused_layers(model) and not has_fused_layers(ref)
    assert ref.state_dict().keys() == model.state_dict().keys()
    assert resfast_ops_called(model, x[:1])
    assert resfast_ops_called(ref, x[:1]) == set()
    for m in (model, ref):
        m.train()
        torch.manual_seed(1)  # the same dropout masks
        out = m(x)
        out.square().mean().backward()
        m.out = out
    close(model.out, ref.out)
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        close(p.grad, p_ref.grad, f"grad of {name}")
    for (name, b), b_ref in zip(model.named_buffers(), ref.buffers()):
        close(b, b_ref, name)
    model.eval(), ref.eval()  # eval mode: resfast folds BN into the conv, torch applies it
    with torch.no_grad():
        close(model(x), ref(x))
    if dense:
        model.eval(), ref.eval()
        with torch.no_grad():
            big = torch.randn(2, 3, x.shape[2] + 8, x.shape[3] + 16, dtype=torch.float64)
            assert resfast_ops_called(ref, big[:1]) == set()
            close(model.forward_dense(big), ref.forward_dense(big))


def _small(kind):
    """Registry networks, or the same classes with one block per stage (the
    bottleneck families at full depth are too slow for a CPU test)."""
    from resfast import nn as rnn
    from resfast.models.preact import PreActBasicBlock, PreActBottleneck, PreActResNet
    from resfast.models.resnet import PlainBottleneck, ResNet

    return {
        "resnet20": lambda: models.get_model("resnet20"),
        "plain20": lambda: models.get_model("plain20"),
        "resnet18": lambda: models.get_model("resnet18", num_classes=10),
        "bottleneck_B": lambda: ResNet(rnn.Bottleneck, [1, 1, 1, 1], num_classes=10, shortcut="B"),
        "bottleneck_C": lambda: ResNet(rnn.Bottleneck, [1, 1, 1, 1], num_classes=10, shortcut="C"),
        "plain_bottleneck": lambda: ResNet(PlainBottleneck, [1, 1, 1, 1], num_classes=10),
        "preact_basic_A": lambda: PreActResNet(PreActBasicBlock, [1, 1, 1], num_classes=10,
                                               shortcut="A", widths=(16, 32, 64), stem="cifar"),
        "preact_basic_B": lambda: models.get_model("preact_resnet18", num_classes=10),
        "preact_bottleneck_C": lambda: PreActResNet(PreActBottleneck, [1, 1, 1, 1], num_classes=10,
                                                    shortcut="C"),
    }[kind]()


@pytest.mark.parametrize("kind", ["resnet20", "plain20", "resnet18", "bottleneck_B", "bottleneck_C",
                                  "plain_bottleneck", "preact_basic_A", "preact_basic_B",
                                  "preact_bottleneck_C"])
def test_registry_networks(kind):
    torch.manual_seed(0)
    check_same(_small(kind), torch.randn(2, 3, 32, 32))


def test_vgg_fused_features_and_dense():
    """A VGG of resfast.models (FusedSequential features, dense evaluation) with
    a small classifier in the same layout."""
    from torch import nn

    from resfast.models.vgg import VGG, make_layers

    torch.manual_seed(0)
    for bn in (True, False):  # conv-BN-ReLU and conv(+bias)-ReLU runs of a FusedSequential
        model = VGG(make_layers([8, "M", 512, "M"], batch_norm=bn), num_classes=10,
                    init_weights=False)
        model.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        model.classifier = nn.Sequential(nn.Linear(512 * 4, 16), nn.ReLU(True), nn.Dropout(0.5),
                                         nn.Linear(16, 16),
                                         nn.ReLU(True), nn.Dropout(0.5), nn.Linear(16, 10))
        check_same(model, torch.randn(2, 3, 8, 8), dense=True)


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_vgg", "tiny_plain"])
def test_resfast_nn_layers(name):
    torch.manual_seed(0)
    check_same(getattr(tiny_models, name)(), torch.randn(4, 3, 32, 32))


def test_torch_model_pickles():
    import io

    model = to_torch(models.get_model("resnet20"))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert type(again) is type(model)


def test_torch_twin_is_a_copy():
    """torch_twin leaves the module it copies fused and untouched, and shares no tensor with it."""
    model = tiny_models.tiny_resnet()
    twin = torch_twin(model)
    assert has_fused_layers(model) and not has_fused_layers(twin)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name


def test_recording_sees_forward_and_backward_ops():
    model = tiny_models.tiny_resnet()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with recording_resfast_ops() as used:
        model(x).sum().backward()
    # on the CPU a training BN is applied by bn_batch_act (resfast.functional._batch_pending)
    assert {"resfast::conv2d_bn", "resfast::conv2d_bn_backward", "resfast::bn_batch_act",
            "resfast::bn_batch_act_backward"} <= used
    with recording_resfast_ops() as used:
        torch_twin(model)(x).sum().backward()
    assert used == set()


def _shortcut_a_by_concatenation(x, out_channels, stride):
    y = x[:, :, ::stride, ::stride]
    extra = out_channels - x.shape[1]
    before = y.new_zeros(y.shape[0], extra // 2, *y.shape[2:])
    after = y.new_zeros(y.shape[0], extra - extra // 2, *y.shape[2:])
    return torch.cat([before, y, after], dim=1)


@pytest.mark.parametrize("cin,cout,stride", [(16, 32, 2), (16, 16, 1), (3, 8, 2), (5, 6, 1)])
def test_shortcut_a(cin, cout, stride):
    """The option A shortcut (the one the fused blocks and the twin share) against
    an independent construction: strided identity between zero channels."""
    x = torch.randn(2, cin, 7, 6)
    torch.testing.assert_close(shortcut_a(x, cout, stride),
                               _shortcut_a_by_concatenation(x, cout, stride), rtol=0, atol=0)
