"""resfast's networks against torchvision's, where torchvision has them.

Same state_dict keys (in order) and shapes; torchvision's state_dict loads
strictly and unchanged; then one step gives the same logits, the same
gradient for every parameter and the input, and the same BN running
statistics, in train and eval mode, float64 / float32 / bf16 autocast, NCHW
and channels_last. Tolerances and why: see tests/support/equivalence.py.

The weights are not torchvision's init (BN at 1/0 with running stats 0/1 would
make eval-mode BN the identity and hide folding errors): both nets get the same
random weights and BN statistics (equivalence.fill_).

CPU sizes: ResNets at 64x64 (at 32x32 the last stage is 1x1 and train-mode BN
sees 2 values per channel: float64 gradients then differ by 5e-5, pure
conditioning), VGGs at 32x32 (torchvision's AdaptiveAvgPool2d((7, 7)) takes
any size), batch 2.

What runs by default (to keep tests/models near 6 minutes on 2 cores): the
state_dict tests for all 13 networks; the precision x layout matrix for
resnet18 and vgg11_bn; a float64 train step and a float32 channels_last eval
step for resnet34, resnet50, vgg11, vgg16, vgg16_bn. ``-m slow`` adds the
full matrix (float64; float32 NCHW and channels_last; bf16 channels_last and
NCHW) for all 13, resnet101/152 and vgg13/19 (+_bn) included.
GPU versions at 224x224, batch 8, with the GPU.
"""
import pytest
import torch
import torchvision

import resfast.models as M
from tests.support.equivalence import build, check_equivalence, meta_build, state_dict_layout

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
TV_MODELS = M.TORCHVISION_EQUIVALENT
FULL = [(F64, "nchw"), (F32, "nchw"), (F32, "nhwc"), (BF16, "nhwc")]
EXTRA = [(BF16, "nchw")]
QUICK = {True: [(F64, "nchw")], False: [(F32, "nhwc")]}
# by default: the full matrix for these (vgg11_bn without float32 NCHW: its
# classifier makes every VGG run cost seconds; NCHW input is the float64 run's) ...
FULL_BY_DEFAULT = {"resnet18": FULL, "vgg11_bn": [(F64, "nchw"), (F32, "nhwc"), (BF16, "nhwc")]}
# ... the quick steps for these; the rest (the same code as these with more
# blocks or another config list) run only under -m slow
QUICK_BY_DEFAULT = ("resnet34", "resnet50", "vgg11", "vgg16", "vgg16_bn")


def _size(name):
    return 32 if name.startswith("vgg") else 64


def _ours(name):
    # built on the meta device: load_state_dict then gives every tensor its value
    return lambda: meta_build(lambda: M.get_model(name)).to_empty(device="cpu")


def _tv(name):
    return getattr(torchvision.models, name)


@pytest.mark.parametrize("name", TV_MODELS)
def test_state_dict_layout(name):
    """Same keys in the same order, same shapes; strict load works."""
    ours = meta_build(lambda: M.get_model(name))
    ref = meta_build(_tv(name))
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert state_dict_layout(ours) == state_dict_layout(ref)
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_load_keeps_values(name):
    """Loading torchvision's state_dict leaves every tensor as it was."""
    ref = build(_tv(name))
    ours = _ours(name)()
    ours.load_state_dict(ref.state_dict())
    theirs = ref.state_dict()
    for k, v in ours.state_dict().items():
        assert v.dtype == theirs[k].dtype and torch.equal(v, theirs[k]), k


def _cases():
    for name in TV_MODELS:
        for training in (True, False):
            mode = "train" if training else "eval"
            if name in FULL_BY_DEFAULT:
                configs = FULL_BY_DEFAULT[name]
                yield pytest.param(name, training, configs, id=f"{name}-{mode}-full")
                rest = [c for c in FULL + EXTRA if c not in configs]
                yield pytest.param(name, training, rest, id=f"{name}-{mode}-rest",
                                   marks=pytest.mark.slow)
            else:
                slow = [] if name in QUICK_BY_DEFAULT else [pytest.mark.slow]
                yield pytest.param(name, training, QUICK[training], id=f"{name}-{mode}-quick",
                                   marks=slow)
                yield pytest.param(name, training, FULL + EXTRA, id=f"{name}-{mode}-full",
                                   marks=pytest.mark.slow)


@pytest.mark.parametrize("name, training, configs", list(_cases()))
def test_equivalence(name, training, configs, capsys):
    ref = build(_tv(name))
    x = torch.randn(2, 3, _size(name), _size(name))
    lines = check_equivalence(ref, _ours(name), x, training=training, configs=configs, label=name)
    with capsys.disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.gpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", TV_MODELS)
def test_equivalence_gpu(name, training, capsys):
    """Full size on the GPU: 224x224, batch 8, bf16 autocast and float32, channels_last."""
    ref = build(_tv(name))
    x = torch.randn(8, 3, 224, 224)
    lines = check_equivalence(ref, _ours(name), x, training=training, device="cuda", label=name,
                              configs=[(F32, "nhwc"), (BF16, "nhwc"), (BF16, "nchw")])
    with capsys.disabled():
        print("\n" + "\n".join(lines))
