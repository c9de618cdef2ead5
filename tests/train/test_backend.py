"""``--backend torch``: the same networks through plain torch.nn, same
state_dict, same function, not one resfast op."""
import copy

import pytest
import torch

from resfast.train.backend import has_fused_layers, resfast_ops_called, to_torch
from resfast.train.sync_bn import SyncBatchNorm2d, convert_sync_bn

import tiny_models

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
        "preact_basic_A": lambda: PreActResNet(PreActBasicBlock, [1, 1, 1], num_classes=10, shortcut="A",
                                               widths=(16, 32, 64), stem="cifar"),
        "preact_basic_B": lambda: models.get_model("preact_resnet18", num_classes=10),
        "preact_bottleneck_C": lambda: PreActResNet(PreActBottleneck, [1, 1, 1, 1], num_classes=10, shortcut="C"),
    }[kind]()


@pytest.mark.parametrize("kind", ["resnet20", "plain20", "resnet18", "bottleneck_B", "bottleneck_C",
                                  "plain_bottleneck", "preact_basic_A", "preact_basic_B", "preact_bottleneck_C"])
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
        model = VGG(make_layers([8, "M", 512, "M"], batch_norm=bn), num_classes=10, init_weights=False)
        model.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        model.classifier = nn.Sequential(nn.Linear(512 * 4, 16), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(16, 16),
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


def test_convert_sync_bn_classes():
    ref = convert_sync_bn(to_torch(tiny_models.tiny_resnet()))
    bns = [m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.stats_reducer is not None for m in bns)
    assert all(isinstance(m, SyncBatchNorm2d) for m in bns if type(m).__name__ != "Torch_resfast_nn_BatchNormAddReLU")
    # outside a process group the reducer is the identity: the same function
    x = torch.randn(4, 3, 32, 32)
    plain = to_torch(tiny_models.tiny_resnet())
    plain.load_state_dict(ref.state_dict())
    torch.testing.assert_close(ref(x), plain(x), rtol=1e-5, atol=1e-6)


def test_fused_layers_call_the_stats_reducer():
    """The fused ops hand every training-mode BN's batch statistics to the
    reducer (once per BN, before scale/shift): what --sync-bn relies on."""
    model = convert_sync_bn(tiny_models.tiny_resnet())
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    calls = []

    def reducer(mean, var, count):
        calls.append(mean.shape[0])
        return mean, var, count

    for m in bns:
        m.stats_reducer = reducer
    x = torch.randn(4, 3, 32, 32)
    plain = tiny_models.tiny_resnet()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), plain(x))
    assert sorted(calls) == sorted(m.num_features for m in bns)
    model.eval()
    model(x)
    assert len(calls) == len(bns)  # eval mode: running statistics, no reduction
