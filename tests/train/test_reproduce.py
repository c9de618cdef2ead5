"""``resfast reproduce degradation`` end to end, on two tiny stand-ins."""
import json
import os

from resfast.reproduce import reproduce_main

TINY = ["--models", "tiny_models:tiny_plain,tiny_models:tiny_resnet", "--train-subset", "64",
        "--test-subset", "32", "--batch-size", "32", "--epochs", "2", "--progress", "off"]


def test_degradation_figure_and_table(tmp_path, capsys):
    out = tmp_path / "deg"
    assert reproduce_main(["degradation", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| tiny_plain |" in printed and "| tiny_resnet |" in printed
    for name in ("degradation.png", "degradation.md", "degradation.json",
                 "tiny_plain/metrics.jsonl", "tiny_resnet/curves.png"):
        assert os.path.getsize(out / name) > 0, name
    with open(out / "degradation.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = (out / "degradation.md").read_text()
    assert "![degradation](degradation.png)" in md and "final test error" in md
    res = json.loads((out / "degradation.json").read_text())
    assert set(res) == {"tiny_plain", "tiny_resnet"} and res["tiny_resnet"]["final"]["epoch"] == 2
    # --resume reuses the finished runs instead of training again
    assert reproduce_main(["degradation", *TINY, "--out", str(out), "--resume"]) == 0
    assert capsys.readouterr().out.count("reused") == 2


def test_rejects_model_option(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        reproduce_main(["degradation", "--model", "resnet20", "--out", str(tmp_path)])
    assert "--model is set by the experiment" in capsys.readouterr().err
