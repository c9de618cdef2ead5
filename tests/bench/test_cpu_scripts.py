"""The CPU measurement scripts of benchmarks/ run (on tiny inputs) and print
what their docstrings promise; they are run by hand, so nothing else would
notice them break."""
import os
import subprocess
import sys

import pytest
import torch

import resfast  # noqa: F401  (registers the ops)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_cpu_host_time_prints_each_measurement():
    out = _run("-c", "import sys; sys.path.insert(0, 'benchmarks'); import cpu_host_time; "
                     "cpu_host_time.main(rounds=2, calls=2)")
    for label in ("torch.nn conv+BN+ReLU, forward + backward",
                  "resfast conv_bn_relu, forward + backward", "conv2d_bn op (with autograd)",
                  "conv2d_bn op (no grad)", "conv2d_bn_train op", "its oneDNN call alone",
                  "torch.nn conv+BN+ReLU, eval forward", "resfast conv_bn_relu, eval forward",
                  "conv2d_bn_eval op (what that calls)",
                  "torch.nn ResNet-20 inference, batch 1", "resfast ResNet-20 inference, batch 1"):
        line = next(ln for ln in out.splitlines() if label in ln)
        assert float(line.split()[-2]) > 0


def test_cpu_bn_ops_relayout_rows():
    out = _run("benchmarks/cpu_bn_ops.py", "--cases", "relayout", "--shapes", "2x16x4x8",
               "--dtypes", "float32", "--reps", "2")
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("relayout")]
    assert [r[3] for r in rows] == ["channels_last", "nchw"]
    assert all(float(r[-1]) > 0 for r in rows)


def test_cpu_bn_ops_batch_backward_rows():
    """bn_batch_act's rows: its time, torch's, their ratio, the old chain's and its ratio."""
    out = _run("benchmarks/cpu_bn_ops.py", "--cases", "bn_batch_bwd", "bn_batch_add_bwd",
               "--shapes", "2x16x4x8", "--dtypes", "float32", "bfloat16", "--reps", "2")
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("bn_batch_")]
    assert sorted({r[0] for r in rows}) == ["bn_batch_add_bwd", "bn_batch_bwd"]
    assert len(rows) == 8 and all(len(r) == 9 for r in rows)
    assert all(float(x) > 0 for r in rows for x in r[4:])


def test_cpu_fuse_prints_a_row_per_model_and_step():
    pytest.importorskip("torchvision")
    out = _run("benchmarks/cpu_fuse.py", "--models", "tv:resnet18", "--modes", "eval",
               "--rounds", "1")
    rows = [line.split() for line in out.splitlines() if line.startswith("tv:")]
    assert [r[:2] for r in rows] == [["tv:resnet18", "eval"]]
    ratios = [float(v.rstrip("x")) for v in rows[0][6:]]
    assert len(ratios) == 4 and all(r > 0 for r in ratios)


def test_cpu_winograd_prints_a_row_per_layer():
    out = _run("benchmarks/cpu_winograd.py", "--shapes", "2x16x16x16", "2x16x24x8", "--rounds", "1")
    rows = [line.split() for line in out.splitlines() if line.startswith("custom")]
    assert [r[1:3] for r in rows] == [["2x16->16@16", "yes"], ["2x16->24@8", "no"]]
    assert all(float(v.rstrip("x")) > 0 for r in rows for v in r[3:])


def test_cpu_weight_grad_prints_a_row_per_layer():
    out = _run("benchmarks/cpu_weight_grad.py", "--shapes", "2x64x64x2x3x1", "2x16x16x8x3x1",
               "2x16x8x8x3x1", "--rounds", "1")
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    direct = "direct" if torch.ops.resfast.cpu_isa() == "AVX2" else "onednn"  # AVX2's loop
    assert [(r[0], r[3], r[4]) for r in rows] == [("2x64x64x2,", "8", "gemm"),
                                                  ("2x16x16x8,", "128", direct),
                                                  ("2x16x8x8,", "128", "onednn")]
    assert all(float(v.rstrip("x")) > 0 for r in rows for v in r[5:])


def test_cpu_weight_grad_network_mode_alternates_the_two():
    out = _run("benchmarks/cpu_weight_grad.py", "--network", "resnet20", "--rounds", "1")
    rows = [line.split() for line in out.splitlines() if line.startswith("resnet20")]
    assert len(rows) == 1 and rows[0][1] == "op" and rows[0][-5] == "ratio"
    assert float(rows[0][2]) > 0 and float(rows[0][-4].rstrip("x")) > 0
    # the replacement ran for every one of ResNet-20's 19 convolutions in the oneDNN steps
    # (2 rounds of 2 steps), and only there: it was removed before the op's steps
    assert rows[0][-1] == "76)"


def test_cpu_nchw_1x1_rows(capsys):
    """In-process (the script's work is two small calls): a row per shape, with both times
    and the GEMM within float32 rounding of the convolution."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import cpu_nchw_1x1
    finally:
        sys.path.pop(0)
    cpu_nchw_1x1.main(shapes=[(2, 8, 5, 3), (1, 3, 16, 4)], rounds=1, steps=1)
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln[:1].isdigit()]
    assert len(rows) == 2
    for r in rows:
        assert float(r[-4]) > 0 and float(r[-3]) > 0
        assert float(r[-1]) < 1e-5

