"""resfast.models.summary: layers, output shapes, parameters, multiply-adds
against the papers' figures (and against the same count over torchvision's
unfused networks, which reach the counter through another path)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from resfast.models.summary import summary, summary_main

REPO = Path(__file__).resolve().parents[2]

# (name, params, multiply-adds per image at the default size, rtol of the
# multiply-adds): torchvision's model cards state 11.69M / 1.81 GFLOPS (they
# mean MACs) for ResNet-18, 25.56M / 4.09 for ResNet-50, 138.36M / 15.47 for
# VGG-16; He et al. 2015 give 0.27M / 0.85M / 1.7M parameters for CIFAR
# ResNet-20 / 56 / 110 (their multiply-adds as commonly quoted: 41M, 125M,
# 253M) and 3.6 / 7.6 / 11.3 GFLOPs (multiply-adds) for ResNet-34 / 101 / 152,
# rounded and for the original bottleneck with the stride in its first 1x1
# (torchvision's, and resfast's, put it in the 3x3: 2-3% more), so those
# are checked to 5%.
FIGURES = [
    ("resnet18", "11.69M", 1.81e9, 0.005),
    ("resnet50", "25.56M", 4.09e9, 0.005),
    ("vgg16", "138.36M", 15.47e9, 0.005),
    ("resnet20", "0.27M", 40.8e6, 0.02),
    ("resnet56", "0.85M", 125.5e6, 0.02),
    ("resnet110", "1.7M", 253e6, 0.02),
    ("resnet34", "21.80M", 3.6e9, 0.05),
    ("resnet101", "44.55M", 7.6e9, 0.05),
    ("resnet152", "60.19M", 11.3e9, 0.05),
]


@pytest.mark.parametrize("name, params, macs, rtol", FIGURES, ids=[f[0] for f in FIGURES])
def test_papers_figures(name, params, macs, rtol):
    s = summary(name, print_fn=None)
    digits = len(params[:-1].split(".")[1])
    assert round(s.params / 1e6, digits) == float(params[:-1])
    assert s.trainable_params == s.params
    assert abs(s.macs / macs - 1) < rtol, s.macs


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16_bn", "vgg11"])
def test_same_count_as_torchvision(name):
    """resfast's fused modules are counted from its ops, torchvision's from its
    layers' forwards: the totals and the per-layer rows must agree."""
    ours = summary(name, print_fn=None)
    with torch.device("meta"):
        tv = getattr(torchvision.models, name)()
    theirs = summary(tv, (3, 224, 224), print_fn=None)
    assert (ours.params, ours.macs) == (theirs.params, theirs.macs)
    key = lambda rows: sorted((r.name, r.kind, r.output_shape, r.params, r.macs) for r in rows  # noqa: E731
                              if r.kind in ("Conv2d", "BatchNorm2d", "Linear"))
    assert key(ours.rows) == key(theirs.rows)


def test_table_contents(capsys):
    s = summary("resnet50")
    out = capsys.readouterr().out
    assert "layer4.2.conv3" in out and "Total params: 25,557,032 (25.56M)" in out
    assert "Mult-adds (conv + FC, per image):" in out and "(4.09GMACs)" in out
    conv1 = next(r for r in s.rows if r.name == "conv1")
    assert (conv1.output_shape == (64, 112, 112) and conv1.params == 9408
            and conv1.macs == 118_013_952)
    fc = next(r for r in s.rows if r.name == "fc")
    assert fc.kind == "Linear" and fc.output_shape == (1000,) and fc.macs == 2048 * 1000
    pool = next(r for r in s.rows if r.name == "maxpool")
    assert pool.output_shape == (64, 56, 56)
    assert sum(r.params for r in s.rows) == s.params  # every parameter shows up exactly once


def test_input_size_and_kwargs():
    s = summary("resnet18", 112, print_fn=None, num_classes=10)
    assert s.input_size == (3, 112, 112) and s.rows[-1].output_shape == (10,)
    full = summary("resnet18", print_fn=None, num_classes=10)
    # a quarter of the pixels; layer4 is 4x4 rather than 3.5x3.5 (ceil), hence a bit more
    assert 0.25 < s.macs / full.macs < 0.3
    assert summary("resnet20", "3,64,64", print_fn=None).input_size == (3, 64, 64)
    assert summary("resnet20", print_fn=None).input_size == (3, 32, 32)
    with pytest.raises(ValueError, match="input_size must"):
        summary("resnet20", "big", print_fn=None)
    with pytest.raises(ValueError, match="unknown model"):
        summary("resnet19", print_fn=None)
    with pytest.raises(TypeError, match="only apply to a model given by name"):
        summary(torch.nn.Conv2d(3, 3, 3), print_fn=None, num_classes=3)


def test_summary_main(capsys):
    assert summary_main(["resnet20", "--num-classes", "100"]) == 0
    out = capsys.readouterr().out
    assert "resnet20" in out and "Total params:" in out
    assert summary_main(["--list"]) == 0
    assert "preact_resnet164" in capsys.readouterr().out.split()
    assert summary_main(["resnet19"]) == 2
    assert "unknown model 'resnet19'" in capsys.readouterr().err


def test_python_m_resfast_summary():
    """The ``python -m resfast summary NAME`` hook (wired in resfast/__main__.py)."""
    if not (REPO / "resfast" / "__main__.py").exists():
        pytest.skip("resfast/__main__.py does not exist yet")
    res = subprocess.run([sys.executable, "-m", "resfast", "summary", "resnet20"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Total params: 269,722" in res.stdout
