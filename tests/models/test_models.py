"""Every network in the registry.

* builds, runs forward and backward on the CPU at a small size (CIFAR nets at
  32x32, ImageNet ResNets at 64x64, VGGs at 32x32; batch 2);
* has the published number of weight layers and parameters;
* is initialised as torchvision initialises;
* where torchvision has no twin (plain nets, CIFAR and pre-activation ResNets,
  shortcut options A and C, VGG A-LRN and C), computes the same function as its
  plain torch.nn twin (resfast.twin: the same modules' own torch.nn forwards;
  tolerances: tests/support/equivalence.py; for VGG A-LRN and C the features,
  run by torch's own nn.Sequential forward);
* VGG dense evaluation and multi-scale evaluation;
* argument checks.
The torchvision twins (resnet18..152, vgg11..19 and _bn) are also run, at
length, by test_torchvision_equivalence.py.
"""
import math

import pytest
import torch
from torch import nn

import resfast.models as M
from resfast import nn as rnn
from resfast.models.preact import PreActBasicBlock, PreActBottleneck, PreActResNet
from resfast.twin import torch_twin
from tests.support.equivalence import check_equivalence, fill_, meta_build

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
ALL = M.list_models()
BUILD_ONLY = ("resnet1202", "preact_resnet1001")
# the deepest nets' forward + backward (seconds each on 2 cores)
SLOW_FORWARD = BUILD_ONLY + ("resnet152", "plain152", "preact_resnet152", "resnet101", "plain101",
                             "preact_resnet101")
TV = set(M.TORCHVISION_EQUIVALENT)


def _size(name):
    return 32 if name in M.CIFAR_MODELS or name.startswith("vgg") else 64


# ---- registry --------------------------------------------------------------------------

def test_registry_names():
    expected = {
        "vgg11", "vgg11_bn", "vgg11_lrn", "vgg13", "vgg13_bn", "vgg16_c", "vgg16_c_bn", "vgg16",
        "vgg16_bn", "vgg19",
        "vgg19_bn", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "plain18",
        "plain34", "plain50",
        "plain101", "plain152", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "resnet1202", "plain20",
        "plain32", "plain44", "plain56", "plain110", "preact_resnet18", "preact_resnet34",
        "preact_resnet50",
        "preact_resnet101", "preact_resnet152", "preact_resnet110", "preact_resnet164",
        "preact_resnet1001"}
    assert set(ALL) == expected and ALL == sorted(ALL)
    for name in ALL:
        assert getattr(M, name) is M.registry.model_info(name).builder


def test_registry_entries():
    """What each network is registered with: its data set's input size, its torchvision twin."""
    assert set(M.TORCHVISION_EQUIVALENT) == {f"resnet{d}" for d in (18, 34, 50, 101, 152)} | {
        f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")}
    for info in M.registry.registered():
        assert info.input_size == ((3, 32, 32) if info.name in M.CIFAR_MODELS
                                   else (3, 224, 224)), info
        upper = M.default_input_size(info.name.upper())
        assert M.default_input_size(info.name) == upper == info.input_size
        assert info.torchvision == (info.name if info.name in TV else None), info
    assert M.default_input_size("not_a_registered_model") == (3, 224, 224)


def test_register_model_rejects_duplicates_and_unknown_data_sets():
    with pytest.raises(ValueError, match="already registered"):
        M.register_model()(M.resnet18)
    with pytest.raises(ValueError, match="dataset must be one of"):
        M.register_model(dataset="mnist")


def test_get_model_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        M.get_model("resnet19")
    msg = str(e.value)
    assert "unknown model 'resnet19'" in msg and "Did you mean" in msg
    assert all(name in msg for name in ALL)
    with pytest.raises(TypeError, match="name must be a str"):
        M.get_model(18)


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "vgg11", "preact_resnet110", "plain18"])
def test_num_classes_checked(name):
    with torch.device("meta"):
        with pytest.raises(TypeError, match="num_classes must be an int, got str"):
            M.get_model(name, num_classes="10")
        with pytest.raises(TypeError, match="num_classes must be an int, got float"):
            M.get_model(name, num_classes=10.0)
        with pytest.raises(TypeError, match="num_classes must be an int, got bool"):
            M.get_model(name, num_classes=True)
        with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
            M.get_model(name, num_classes=0)
        assert M.get_model(name, num_classes=7).state_dict()["fc.weight" if "vgg" not in name else
                                                              "classifier.6.weight"].shape[0] == 7


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20", "preact_resnet164"])
def test_shortcut_checked(name):
    with torch.device("meta"):
        for bad in ("D", "a", None, 1):
            with pytest.raises(ValueError, match=r"shortcut must be one of 'A', 'B', 'C', got"):
                M.get_model(name, shortcut=bad)


def test_other_argument_checks():
    with torch.device("meta"):
        with pytest.raises(TypeError, match="zero_init_residual must be a bool"):
            M.get_model("resnet18", zero_init_residual="yes")
        with pytest.raises(TypeError, match="batch_norm must be a bool"):
            M.get_model("vgg11", batch_norm=1)
        with pytest.raises(TypeError, match="dense must be a bool"):
            M.get_model("vgg11", dense="no")
        with pytest.raises(TypeError, match="unexpected keyword argument 'shortcut'"):
            M.get_model("plain18", shortcut="A")
        with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):
            M.cifar.cifar_resnet(21)


# ---- build, forward, backward --------------------------------------------------------------

def _forward_cases():
    for name in ALL:
        marks = []
        if name in SLOW_FORWARD or (name in TV and name.startswith("vgg")):
            # VGG twins: test_torchvision_equivalence runs them; building one costs ~3 s of init
            marks.append(pytest.mark.slow)
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_forward_cases()))
def test_forward_backward(name):
    model = M.get_model(name, num_classes=10)
    s = _size(name)
    x = torch.randn(2, 3, s, s)
    y = model(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    y.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    model.eval()
    with torch.no_grad():
        y_eval = model(x.contiguous(memory_format=torch.channels_last))
    assert y_eval.shape == (2, 10) and torch.isfinite(y_eval).all()


@pytest.mark.parametrize("name, params_m", [("resnet1202", 19.4), ("preact_resnet1001", 10.3)])
def test_deepest_nets_build(name, params_m):
    model = M.get_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == params_m
    assert torch.isfinite(model.fc.weight).all()


# ---- layer and parameter counts -------------------------------------------------------------

WEIGHT_LAYERS = {
    "vgg11": 11, "vgg11_lrn": 11, "vgg13": 13, "vgg16_c": 16, "vgg16": 16, "vgg19": 19,
    "resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152,
    "plain18": 18, "plain34": 34, "plain50": 50, "plain101": 101, "plain152": 152,
    "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110,
    "resnet1202": 1202, "plain20": 20, "plain32": 32, "plain44": 44, "plain56": 56, "plain110": 110,
    "preact_resnet18": 18, "preact_resnet34": 34, "preact_resnet50": 50, "preact_resnet101": 101,
    "preact_resnet152": 152, "preact_resnet110": 110, "preact_resnet164": 164,
    "preact_resnet1001": 1001,
}


@pytest.mark.parametrize("name", sorted(WEIGHT_LAYERS))
def test_weight_layers(name):
    """The depth in the name counts convs and FC layers (not shortcut projections)."""
    model = meta_build(lambda: M.get_model(name))
    n = sum(1 for qual, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in qual)
    assert n == WEIGHT_LAYERS[name]


# published parameter counts, in millions, to the digits published
PAPER_PARAMS = {
    "resnet18": "11.69", "resnet34": "21.80", "resnet50": "25.56", "resnet101": "44.55",
    "resnet152": "60.19",
    "vgg16": "138.36", "vgg11": "133", "vgg11_lrn": "133", "vgg13": "133", "vgg16_c": "134",
    "vgg19": "144",
    "resnet20": "0.27", "resnet32": "0.46", "resnet44": "0.66", "resnet56": "0.85",
    "resnet110": "1.7", "resnet1202": "19.4", "preact_resnet164": "1.7", "preact_resnet110": "1.7",
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts(name):
    model = meta_build(lambda: M.get_model(name))
    published = PAPER_PARAMS[name]
    digits = len(published.split(".")[1]) if "." in published else 0
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, digits) == float(published)


def test_preact_resnet1001_parameters():
    """The paper's 10.2M counts the conv and FC weights; the BN parameters add 0.15M."""
    model = meta_build(M.preact_resnet1001)
    weights = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                  for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert round(weights / 1e6, 1) == 10.2


def test_bottleneck_arithmetic():
    """SPEC: a bottleneck at 256 channels has 69,632 conv weights against
    1,179,648 for a basic block of that width."""
    b = rnn.Bottleneck(256, 64)
    assert sum(getattr(b, c).weight.numel() for c in ("conv1", "conv2", "conv3")) == 69_632
    basic = rnn.BasicBlock(256, 256)
    assert basic.conv1.weight.numel() + basic.conv2.weight.numel() == 1_179_648


# ---- init ------------------------------------------------------------------------------------

def _check_kaiming_fan_out(model):
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            std = m.weight.std().item()
            expected = math.sqrt(2.0 / fan_out)
            # the sample std of n normal draws is within a few / sqrt(2n) of the true one
            assert abs(std / expected - 1) < 0.05 + 5 / math.sqrt(2 * m.weight.numel()), name
            if m.bias is not None:
                assert torch.all(m.bias == 0), name
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name


def test_resnet_init():
    model = M.resnet18()
    _check_kaiming_fan_out(model)
    bound = 1 / math.sqrt(512)  # nn.Linear's default init, as torchvision keeps it
    assert model.fc.weight.abs().max() <= bound and model.fc.bias.abs().max() <= bound
    assert model.fc.weight.std() > 0.5 * bound / math.sqrt(3)
    zero = M.resnet18(zero_init_residual=True)
    assert all(torch.all(b.bn2.weight == 0) and torch.all(b.bn1.weight == 1) for b in zero.modules()
               if isinstance(b, rnn.BasicBlock))
    zero50 = M.resnet50(zero_init_residual=True)
    assert all(torch.all(b.bn3.weight == 0) for b in zero50.modules()
               if isinstance(b, rnn.Bottleneck))
    zero20 = M.resnet20(zero_init_residual=True)
    assert all(torch.all(b.bn2.weight == 0) for b in zero20.modules()
               if isinstance(b, rnn.BasicBlock))
    _check_kaiming_fan_out(M.preact_resnet164())


def test_vgg_init():
    model = M.vgg11()
    _check_kaiming_fan_out(model)
    for m in model.classifier:
        if isinstance(m, nn.Linear):
            assert abs(m.weight.std().item() / 0.01 - 1) < 0.02 and torch.all(m.bias == 0)


# ---- structure -------------------------------------------------------------------------------

def test_shortcut_options():
    def keys(model):
        return {k.rsplit(".", 2)[0] for k in model.state_dict() if ".downsample." in k}

    with torch.device("meta"):
        assert keys(M.resnet20()) == set()  # option A: parameter-free
        assert keys(M.resnet20(shortcut="B")) == {"layer2.0.downsample", "layer3.0.downsample"}
        assert len(keys(M.resnet20(shortcut="C"))) == 9
        assert keys(M.resnet18()) == {"layer2.0.downsample", "layer3.0.downsample",
                                      "layer4.0.downsample"}
        assert keys(M.resnet18(shortcut="A")) == set()
        assert len(keys(M.resnet50(shortcut="C"))) == 16
        assert keys(M.resnet50(shortcut="A")) == set()
        assert keys(M.preact_resnet110()) == {"layer2.0.downsample", "layer3.0.downsample"}
        assert keys(M.plain34()) == set()
        pre = M.preact_resnet164()
    # the first unit follows the stem's BN
    assert pre.layer1[0].bn1 is None and pre.layer1[1].bn1 is not None
    assert "bn_final.weight" in pre.state_dict()
    assert {"layer1.0.downsample"} <= keys(pre)  # 16 -> 64 channels


def test_vgg_layouts():
    with torch.device("meta"):
        lrn = M.vgg11_lrn()
        c = M.vgg16_c()
        cbn = M.vgg16_c_bn()
    assert (isinstance(lrn.features[2], nn.LocalResponseNorm)
            and isinstance(lrn.features[3], nn.MaxPool2d))
    assert lrn.features[2].size == 5 and lrn.features[2].k == 2.0
    one_by_one = [i for i,
                  m in enumerate(c.features) if isinstance(m, nn.Conv2d)
                  and m.kernel_size == (1, 1)]
    assert len(one_by_one) == 3 and all(isinstance(c.features[i + 2], nn.MaxPool2d)
                                        for i in one_by_one)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in cbn.features) == 13
    assert isinstance(c.features, M.vgg.FusedSequential)


# ---- equivalence with a torch.nn reference (networks torchvision does not have) -------------
# The reference is the network's plain torch.nn twin (resfast.twin), which runs no resfast
# op (check_equivalence asserts it); its option A shortcut is checked in tests/test_twin.py.

def _small_preact(block, shortcut="B"):
    return PreActResNet(block, [2, 2, 2], num_classes=10, shortcut=shortcut, widths=(8, 16, 32),
                        stem="cifar")


REFERENCE_CASES = {
    "resnet20": (lambda: M.resnet20(), 32),
    "resnet20-B": (lambda: M.resnet20(shortcut="B"), 32),
    "resnet20-C": (lambda: M.resnet20(shortcut="C"), 32),
    "plain20": (lambda: M.plain20(), 32),
    "plain18": (lambda: M.plain18(num_classes=10), 64),
    "plain50": (lambda: M.plain50(num_classes=10), 64),
    "resnet18-A": (lambda: M.resnet18(num_classes=10, shortcut="A"), 64),
    "resnet18-C": (lambda: M.resnet18(num_classes=10, shortcut="C"), 64),
    "resnet50-A": (lambda: M.resnet50(num_classes=10, shortcut="A"), 64),
    "preact_resnet18": (lambda: M.preact_resnet18(num_classes=10), 64),
    "preact_resnet50": (lambda: M.preact_resnet50(num_classes=10), 64),
    "preact-cifar-basic": (lambda: _small_preact(PreActBasicBlock), 32),
    "preact-cifar-bottleneck": (lambda: _small_preact(PreActBottleneck), 32),
    "preact-cifar-basic-A": (lambda: _small_preact(PreActBasicBlock, "A"), 32),
    "preact-cifar-bottleneck-C": (lambda: _small_preact(PreActBottleneck, "C"), 32),
    # VGG A-LRN and C: what is new is in ``features`` (LRN, 1x1 convs); the
    # classifier is the code test_torchvision_equivalence checks
    "vgg11_lrn.features": (lambda: M.vgg11_lrn(init_weights=False).features, 32),
    "vgg16_c.features": (lambda: M.vgg16_c(init_weights=False).features, 32),
    "vgg16_c_bn.features": (lambda: M.vgg16_c_bn(init_weights=False).features, 32),
}
SLOW_REFERENCE = ("plain50", "resnet50-A", "preact_resnet50", "vgg16_c.features")


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW_REFERENCE
                                               else []) for c in REFERENCE_CASES])
def test_against_reference(case):
    builder, size = REFERENCE_CASES[case]
    torch.manual_seed(0)
    ref = torch_twin(fill_(meta_build(builder).to_empty(device="cpu")))

    def ours():
        return meta_build(builder).to_empty(device="cpu")

    x = torch.randn(2, 3, size, size)
    if size == 32:
        check_equivalence(ref, ours, x, training=True,
                          configs=[(F64, "nchw"), (F32, "nhwc"), (BF16, "nhwc")], label=case)
        check_equivalence(ref, ours, x, training=False, configs=[(F32, "nchw")], label=case)
    else:  # the ImageNet-sized ones: the float64 step and a float32 eval step
        check_equivalence(ref, ours, x, training=True, configs=[(F64, "nchw")], label=case)
        check_equivalence(ref, ours, x, training=False, configs=[(F32, "nhwc")], label=case)


# ---- VGG dense and multi-scale evaluation --------------------------------------------------

@pytest.fixture(scope="module")
def vgg11_eval():
    torch.manual_seed(0)
    return fill_(meta_build(lambda: M.vgg11(num_classes=10)).to_empty(device="cpu")).eval()


def test_dense_evaluation(vgg11_eval):
    model = vgg11_eval
    with torch.no_grad():
        # at 224 the feature map is 7x7: dense evaluation is the usual forward
        x = torch.randn(1, 3, 224, 224)
        torch.testing.assert_close(model.forward_dense(x), model(x), rtol=1e-4, atol=1e-5)
        # at 256 (8x8 features) the score map is 2x2: the mean of the classifier on the four 7x7
        # windows
        x = torch.randn(1, 3, 256, 256)
        scores = model.score_map(x)
        assert scores.shape == (1, 10, 2, 2)
        feats = model.features(x)
        windows = [model.classifier(torch.flatten(feats[:, :, i:i + 7, j:j + 7], 1))
                   for i in (0, 1) for j in (0, 1)]
        torch.testing.assert_close(model.forward_dense(x), torch.stack(windows).mean(0), rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(scores.mean(dim=(2, 3)), model.forward_dense(x))
        # dense=True makes it the forward
        model.dense = True
        try:
            torch.testing.assert_close(model(x), model.forward_dense(x))
        finally:
            model.dense = False
        with pytest.raises(ValueError,
                           match="dense evaluation needs a feature map of at least 7x7"):
            model.forward_dense(torch.randn(1, 3, 96, 96))


class _TinyDense(nn.Module):
    """A stand-in with forward_dense: class scores = channel means."""

    def forward_dense(self, x):
        return x.mean(dim=(2, 3)) * 10


def test_multi_scale_eval():
    model = _TinyDense()
    images = torch.randn(2, 3, 20, 30)
    probs = M.multi_scale_eval(model, images, scales=(16, 24), flip=True)
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    want = 0
    for q in (16, 24):
        xq = torch.nn.functional.interpolate(images, size=(q, round(30 * q / 20)), mode="bilinear",
                                             align_corners=False, antialias=True)
        want = (want + torch.softmax(model.forward_dense(xq), 1)
                + torch.softmax(model.forward_dense(xq.flip(3)), 1))
    torch.testing.assert_close(probs, want / 4)
    with pytest.raises(ValueError, match="scales must be a non-empty list of positive ints"):
        M.multi_scale_eval(model, images, scales=())
    with pytest.raises(ValueError, match="images must be a 4-D tensor"):
        M.multi_scale_eval(model, images[0])


def test_multi_scale_eval_vgg(vgg11_eval):
    x = torch.randn(1, 3, 224, 224)
    probs = M.multi_scale_eval(vgg11_eval, x, scales=(224,), flip=False)
    with torch.no_grad():
        torch.testing.assert_close(probs, torch.softmax(vgg11_eval(x), 1), rtol=1e-4, atol=1e-6)
