"""resfast.fuse on the models people fine-tune: timm's ResNets, torchvision's ResNets
(also with FrozenBatchNorm2d), its detection backbones (Faster R-CNN, Mask R-CNN,
RetinaNet) and segmentation models (FCN, DeepLabV3: dilated blocks). No weights are
downloaded: pretrained=False / weights=None.

What is fused and what is kept, with why, is checked on every model (built on the
meta device: seconds); that the fused model computes the same function as the
model it came from (outputs, every gradient, buffers; tests/support/equivalence.py)
on a representative few by default and on all of them with --run-slow."""
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import detection, segmentation
from torchvision.ops.misc import FrozenBatchNorm2d

import resfast
from resfast.fusion import fused_modules, unfused_modules
from tests.support.equivalence import check_equivalence, fill_, meta_build
from tests.support.residual_blocks import import_timm, randomize_norms_

timm = import_timm()

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
ILG_STEM = "Conv2d: runs in the forward of IntermediateLayerGetter, which resfast does not rewrite"


def _timm(name, **kwargs):
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


def _frozen_fpn_backbone(name="resnet50", returned_layers=None):
    """The backbone torchvision's detection models get from pretrained weights:
    FrozenBatchNorm2d, the stem and layer1 not trained."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resnet_fpn_backbone's positional-argument notice
        return resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3, returned_layers=returned_layers)


def _detection(name):
    return lambda: getattr(detection, name)(weights=None, weights_backbone=None)


def _segmentation(name):
    return lambda: getattr(segmentation, name)(weights=None, weights_backbone=None)


def _kinds(model):
    counts = {}
    for _, kind in fused_modules(model):
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _se(what):
    return [(f"layer{i}.{j}", f"Bottleneck: se ({what}) in the residual branch computes "
                              "something besides conv, BN and ReLU")
            for i, n in ((1, 3), (2, 4), (3, 6), (4, 3)) for j in range(n)]


DOWN = "Sequential(conv_bn x1)"
TV_STEM = "ResNet stem (conv1 -> bn1 -> relu)"
TIMM_STEM = "ResNet stem (conv1 -> bn1 -> act1)"

# name -> (builder, fused kinds and counts, kept (name, why-prefix) in model order; a
# None entry list means: only its count is checked)
MODELS = {
    "timm_resnet18": (_timm("resnet18"), {TIMM_STEM: 1, "BasicBlock": 8, DOWN: 3}, []),
    "timm_resnet26": (_timm("resnet26"), {TIMM_STEM: 1, "Bottleneck": 8, DOWN: 4}, []),
    "timm_resnet50": (_timm("resnet50"), {TIMM_STEM: 1, "Bottleneck": 16, DOWN: 4}, []),
    # the deep stem's convs are a Sequential ending in a lone conv; bn1 -> act1 after it are
    # the stem's fused BN + ReLU
    "timm_resnet50d": (_timm("resnet50d"), {TIMM_STEM: 1, "Sequential(conv_bn_relu x2, conv x1)": 1,
                                            "Bottleneck": 16, DOWN: 4}, []),
    "timm_resnet26d": (_timm("resnet26d"), {TIMM_STEM: 1, "Sequential(conv_bn_relu x2, conv x1)": 1,
                                            "Bottleneck": 8, DOWN: 4}, []),
    "timm_seresnet50": (_timm("seresnet50"), {TIMM_STEM: 1, DOWN: 4}, _se("SEModule")),
    "timm_resnet50_eca": (_timm("resnet50", block_args=dict(attn_layer="eca")),
                          {TIMM_STEM: 1, DOWN: 4}, _se("EcaModule")),
    # drop path grows linearly from 0: the first block has none
    "timm_resnet18_drop_path": (_timm("resnet18", drop_path_rate=0.1),
                                {TIMM_STEM: 1, "BasicBlock": 1, DOWN: 3},
                                [(b, "BasicBlock: drop_path (DropPath) in the residual")
                                 for b in ("layer1.1", "layer2.0", "layer2.1", "layer3.0",
                                           "layer3.1", "layer4.0", "layer4.1")]),
    "resnet18": (torchvision.models.resnet18, {TV_STEM: 1, "BasicBlock": 8, DOWN: 3}, []),
    "resnet34": (torchvision.models.resnet34, {TV_STEM: 1, "BasicBlock": 16, DOWN: 3}, []),
    "resnet50": (torchvision.models.resnet50, {TV_STEM: 1, "Bottleneck": 16, DOWN: 4}, []),
    "resnet101": (torchvision.models.resnet101, {TV_STEM: 1, "Bottleneck": 33, DOWN: 4}, []),
    "wide_resnet50_2": (torchvision.models.wide_resnet50_2, {TV_STEM: 1, "Bottleneck": 16,
                                                             DOWN: 4}, []),
    "resnext50_32x4d": (torchvision.models.resnext50_32x4d, {TV_STEM: 1, DOWN: 4},
                        [(f"layer{i}.{j}", "Bottleneck: conv2 cannot be fused: groups=32")
                         for i, n in ((1, 3), (2, 4), (3, 6), (4, 3)) for j in range(n)]),
    "resnet50_frozen_bn": (lambda: torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d),
                           {TV_STEM: 1, "Bottleneck": 16, DOWN: 4}, []),
    "fpn_backbone_frozen_bn": (_frozen_fpn_backbone, {"Bottleneck": 16, DOWN: 4},
                               [("body.conv1", ILG_STEM)] + [
                                   (f"fpn.{k}_blocks.{i}.0", "Conv2d: inside Conv2dNormActivation")
                                   for k in ("inner", "layer") for i in range(4)]),
    "fasterrcnn_resnet50_fpn": (_detection("fasterrcnn_resnet50_fpn"),
                                {"Bottleneck": 16, DOWN: 4}, None),
    "maskrcnn_resnet50_fpn": (_detection("maskrcnn_resnet50_fpn"),
                              {"Bottleneck": 16, DOWN: 4}, None),
    "retinanet_resnet50_fpn": (_detection("retinanet_resnet50_fpn"),
                               {"Bottleneck": 16, DOWN: 4}, None),
    # layer3 and layer4 dilated (2, then 2 and 4), fused like the others; ASPP's 1x1 branch
    # is a plain Sequential, fused
    "fcn_resnet50": (_segmentation("fcn_resnet50"), {"Bottleneck": 16, DOWN: 4},
                     [("backbone.conv1", ILG_STEM),
                      ("classifier.0", "Conv2d: inside FCNHead"),
                      ("classifier.4", "Conv2d: inside FCNHead")]),
    "deeplabv3_resnet50": (_segmentation("deeplabv3_resnet50"),
                           {"Bottleneck": 16, DOWN: 4, "Sequential(conv_bn_relu x1)": 2}, None),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_what_is_fused_and_what_is_kept(name):
    builder, kinds, kept = MODELS[name]
    model = meta_build(builder)
    fused = resfast.fuse(model)
    assert _kinds(fused) == kinds
    listed = unfused_modules(fused)
    if kept is not None:
        assert len(listed) == len(kept), listed
        for (got_name, got_why), (want_name, want_why) in zip(listed, kept):
            assert got_name == want_name and got_why.startswith(want_why), (got_name, got_why)
    assert list(fused.state_dict()) == list(model.state_dict())


def test_dilated_blocks_are_fused():
    model = meta_build(_segmentation("deeplabv3_resnet50"))
    assert model.backbone.layer4[1].conv2.dilation == (4, 4)
    fused = resfast.fuse(model)
    assert ("backbone.layer4.1", "Bottleneck") in fused_modules(fused)
    why = dict(unfused_modules(fused))
    assert "backbone.layer4.1" not in why
    # ASPP's dilated convs are fusable convs; what keeps them is the nn.Sequential subclass
    assert why["classifier.0.convs.1.0"].startswith("Conv2d: inside ASPPConv, a subclass of "
                                                    "nn.Sequential")


# ---- the same function ---------------------------------------------------------------------

class Features(nn.Module):
    """A backbone's dict of feature maps as one tensor, for check_equivalence."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        out = self.backbone(x)
        maps = out.values() if isinstance(out, dict) else [out]
        return torch.cat([m.flatten(1) for m in maps], 1)


def _real(builder, seed=0):
    torch.manual_seed(seed)
    return randomize_norms_(fill_(meta_build(builder).to_empty(device="cpu"), seed), seed)


def _equivalent(ref, label, size=64, train=((F64, "nchw"),), eval_=((F32, "nhwc"),)):
    """The fused model against ``ref``: one training step (float64, 2 images of ``size``:
    a 2x2 last stage; at 1x1 training-mode BN normalizes 2 values to +-1 and its
    gradient is rounding noise) and one eval step (at half the size)."""
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    fused = resfast.fuse(ref)
    assert list(fused.state_dict()) == list(state)
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in state.items())
    if train:
        check_equivalence(ref, lambda: resfast.fuse(ref), torch.randn(2, 3, size, size),
                          training=True, configs=list(train), label=label)
    if eval_:
        check_equivalence(ref, lambda: resfast.fuse(ref), torch.randn(2, 3, size // 2, size // 2),
                          training=False, configs=list(eval_), label=label)


# by default one of each kind (timm's blocks with its avg-pool shortcut and deep stem, drop
# path in training mode, FrozenBatchNorm2d); every model with --run-slow
DEFAULT = ["timm_resnet26d", "timm_resnet18_drop_path", "resnet18_frozen_bn"]
SLOW = ["timm_resnet18", "timm_resnet26", "timm_resnet50", "timm_resnet50d", "timm_seresnet50",
        "timm_resnet50_eca", "resnet34", "resnet50", "wide_resnet50_2", "resnext50_32x4d",
        "resnet50_frozen_bn"]
BUILDERS = {**{k: v[0] for k, v in MODELS.items()},
            "resnet18_frozen_bn": lambda: torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)}


@pytest.mark.parametrize("name", DEFAULT + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW])
def test_same_function(name):
    _equivalent(_real(BUILDERS[name]), name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fpn_backbone_frozen_bn", "retinanet_backbone_frozen_bn"])
def test_detection_backbone_same_function(name):
    """The backbone of Faster / Mask R-CNN (returned layers 1-4) and RetinaNet (2-4) as
    built from pretrained weights: FrozenBatchNorm2d, the stem and layer1 frozen."""
    layers = [2, 3, 4] if name.startswith("retinanet") else None
    ref = Features(_real(lambda: _frozen_fpn_backbone(returned_layers=layers)))
    _equivalent(ref, name, eval_=((F32, "nhwc"), (BF16, "nhwc")))


# DeepLabV3's backbone (layer3 dilated 2, layer4 2 and 4) by default; FCN's, the same
# ResNet-50, with --run-slow
@pytest.mark.parametrize("name", [pytest.param("fcn_resnet50", marks=pytest.mark.slow),
                                  "deeplabv3_resnet50"])
def test_segmentation_backbone_same_function(name):
    ref = Features(_real(lambda: getattr(segmentation, name)(
        weights=None, weights_backbone=None).backbone))
    _equivalent(ref, name)


def test_faster_rcnn_detects_the_same():
    """The whole detector, fused, in eval mode: the same boxes and scores (float64)."""
    torch.manual_seed(0)
    model = detection.FasterRCNN(_frozen_fpn_backbone(), num_classes=5, min_size=96,
                                 max_size=128)
    model = randomize_norms_(model).eval().double()
    fused = resfast.fuse(model)
    assert _kinds(fused)["Bottleneck"] == 16
    images = [torch.rand(3, 90, 120, dtype=F64), torch.rand(3, 100, 80, dtype=F64)]
    with torch.no_grad():
        want, got = model(images), fused(images)
    for w, g in zip(want, got):
        assert w["boxes"].shape == g["boxes"].shape and w["boxes"].shape[0] > 0
        torch.testing.assert_close(g["boxes"], w["boxes"], rtol=1e-9, atol=1e-8)
        torch.testing.assert_close(g["scores"], w["scores"], rtol=1e-9, atol=1e-10)
        assert torch.equal(g["labels"], w["labels"])
