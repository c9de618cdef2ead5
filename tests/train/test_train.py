"""The trainer: the loss falls, stop + --resume continues bit for bit, checkpoints
survive a crash mid-save, metrics/plots are written, both backends agree."""
import json
import os

import pytest
import torch

from resfast.train import train_main
from resfast.train.checkpoint import CheckpointError, atomic_save, load_checkpoint
from resfast.train.schedule import LRFactor

SMALL = ["--train-subset", "64", "--test-subset", "32", "--batch-size", "16", "--workers", "0",
         "--progress", "off"]
TIMING = {"images_per_s", "epoch_time_s", "eval_time_s", "time_s"}


def run(out, *extra, model="tiny_models:tiny_resnet"):
    rc = train_main(["--model", model, "--out", str(out), *SMALL, *extra])
    assert rc == 0
    return load_checkpoint(os.path.join(out, "checkpoint.pt"))


def strip_timing(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


def assert_same_state(a, b):
    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert strip_timing(a["history"]) == strip_timing(b["history"])
    assert a["scheduler"] == b["scheduler"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"])


# A VGG-layout net (dropout: the resume must restore the torch RNG), a cosine
# schedule stepped per iteration, augmentation on: everything a resume must get right.
RESUME_ARGS = ("--epochs", "2", "--schedule", "cosine", "--warmup-epochs", "0.5", "--seed", "3")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return run(out, *RESUME_ARGS, model="tiny_models:tiny_vgg"), out


def test_loss_falls_and_outputs(tmp_path):
    # one batch of 32 digits, 5 steps: the training loss must fall clearly
    ckpt = run(tmp_path, "--train-subset", "32", "--batch-size", "32", "--no-augment", "--epochs",
               "5", "--lr", "0.2", "--schedule", "step", "--milestones", "4")
    h = ckpt["history"]
    assert len(h) == 5
    losses = [r["train_loss"] for r in h]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses
    assert [r["lr"] for r in h] == pytest.approx([0.2, 0.2, 0.2, 0.2, 0.02])
    for name in ("metrics.jsonl", "metrics.csv", "curves.png", "run.json", "final.json"):
        assert os.path.getsize(tmp_path / name) > 0, name
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == h
    for key in ("train_loss", "train_top1_err", "train_top5_err", "test_top1_err", "test_top5_err",
                "lr", "images_per_s", "epoch_time_s"):
        assert key in rows[0]
    assert open(tmp_path / "metrics.csv").readline().startswith("epoch,lr,train_loss")
    with open(tmp_path / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    final = json.load(open(tmp_path / "final.json"))
    assert final["epoch"] == 5 and final["test_top1_err"] == h[-1]["test_top1_err"]


def test_stop_and_resume_is_exact(uninterrupted, tmp_path):
    full, _ = uninterrupted
    part = run(tmp_path, *RESUME_ARGS, "--stop-after", "1", model="tiny_models:tiny_vgg")
    assert part["epoch"] == 1
    resumed = run(tmp_path, *RESUME_ARGS, "--resume", model="tiny_models:tiny_vgg")
    assert_same_state(resumed, full)


def test_crash_during_save_keeps_last_checkpoint(uninterrupted, tmp_path, monkeypatch):
    """torch.save dies half-way through writing the epoch-2 checkpoint: the
    epoch-1 checkpoint stays loadable and resuming from it ends where the
    uninterrupted run ended."""
    full, _ = uninterrupted
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"PK\x03\x04 half a checkpoint")
            f.flush()
            raise OSError("simulated crash (disk full) while writing")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="simulated crash"):
        train_main(["--model", "tiny_models:tiny_vgg", "--out", str(tmp_path), *SMALL,
                    *RESUME_ARGS])
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "curves.png", "metrics.csv",
                                            "metrics.jsonl", "run.json"]  # no temp file left behind
    ckpt = load_checkpoint(os.path.join(tmp_path, "checkpoint.pt"))
    assert ckpt["epoch"] == 1
    resumed = run(tmp_path, *RESUME_ARGS, "--resume", model="tiny_models:tiny_vgg")
    assert_same_state(resumed, full)


def test_atomic_save_unit(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    atomic_save({"epoch": 1, "model": {"w": torch.ones(3)}}, path)
    real_save = torch.save

    def partial(obj, f, *a, **kw):
        f.write(b"garbage")
        raise RuntimeError("killed")

    monkeypatch.setattr(torch, "save", partial)
    with pytest.raises(RuntimeError, match="killed"):
        atomic_save({"epoch": 2, "model": {"w": torch.zeros(3)}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    ck = load_checkpoint(path)
    assert ck["epoch"] == 1 and torch.equal(ck["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["c.pt"]
    # a truncated checkpoint (say, copied by hand and cut off) is a clear error naming the file
    blob = path.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)


def test_refuses_to_clobber_and_resume_errors(uninterrupted, tmp_path, capsys):
    _, out = uninterrupted
    rc = train_main(["--model", "tiny_models:tiny_vgg", "--out", str(out), *SMALL, "--epochs", "1"])
    assert rc == 2 and "already holds a checkpoint" in capsys.readouterr().err
    rc = train_main(["--model", "tiny_models:tiny_vgg", "--out", str(tmp_path / "none"), *SMALL,
                     "--resume"])
    assert rc == 1 and "does not exist" in capsys.readouterr().err
    rc = train_main(["--model", "tiny_models:tiny_resnet", "--out", str(out), *SMALL, "--resume"])
    assert rc == 1 and "is of model" in capsys.readouterr().err


def test_backends_agree(tmp_path):
    """resfast and plain torch.nn, same seed and data: the same training curve (fp32 noise only)."""
    args = ("--epochs", "2", "--lr", "0.05")
    a = run(tmp_path / "resfast", *args, "--backend", "resfast")["history"]
    b = run(tmp_path / "torch", *args, "--backend", "torch")["history"]
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-3)
        assert ra["test_loss"] == pytest.approx(rb["test_loss"], rel=1e-2)
        # at most 2 of 32 flip
        assert abs(ra["test_top1_err"] - rb["test_top1_err"]) <= 100 * 2 / 32


def test_lr_schedules():
    f = LRFactor("cosine", steps_per_epoch=10, epochs=5, warmup_epochs=1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(30) == pytest.approx(0.5) and f(49) < 0.01
    g = LRFactor("step", steps_per_epoch=10, epochs=5, milestones=[2, 3.5])
    assert [g(i) for i in (0, 19, 20, 34, 35)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def _resolved(*argv, image_size=32):
    from resfast.train.trainer import build_parser, resolve_defaults

    return resolve_defaults(build_parser().parse_args(list(argv)), image_size)


def test_schedule_defaults_by_recipe():
    """32x32 data: the ResNet paper's CIFAR schedule (lr / 10 at 50% and 75%), warmed up for
    110+ layers; ImageNet-style data: the plateau rule; explicit choices win."""
    from resfast.train.trainer import UsageError

    a = _resolved("--model", "resnet20")
    assert (a.schedule, a.warmup_epochs, a.lr) == ("step", 0.0, 0.1)
    assert _resolved("--model", "resnet110").warmup_epochs == 1.0
    assert _resolved("--model", "preact_resnet1001").warmup_epochs == 1.0
    assert _resolved("--model", "resnet50", image_size=224).schedule == "plateau"
    assert _resolved("--model", "resnet152", image_size=224).warmup_epochs == 0.0
    assert _resolved("--model", "vgg16", "--milestones", "30,60", image_size=224).schedule == "step"
    assert _resolved("--model", "resnet20", "--schedule", "plateau").schedule == "plateau"
    assert _resolved("--model", "resnet110", "--warmup-epochs", "0").warmup_epochs == 0.0
    with pytest.raises(UsageError, match="plateau"):
        _resolved("--schedule", "plateau", "--warmup-epochs", "1")


def test_default_command_ends_at_the_decayed_rate():
    """`resfast train --model resnet20` as the README gives it: every step of its last epoch
    runs at lr / 100, and its first half at the full rate."""
    from resfast.data import build_datasets
    from resfast.train.schedule import build_scheduler

    args = _resolved("--model", "resnet20")
    train_ds, _, info = build_datasets(args.data, fmt=args.data_format, seed=args.seed,
                                       train_scale=None,
                                       test_scale=None, crop=args.crop, lighting=args.lighting,
                                       train_subset=None, test_subset=None, augment=False)
    assert info.image_size == 32
    steps = len(train_ds) // args.batch_size  # drop_last, as the trainer's loader
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    sched, per_iter = build_scheduler(opt, args.schedule, epochs=args.epochs, steps_per_epoch=steps,
                                      warmup_epochs=args.warmup_epochs,
                                      milestones=args.milestones or ())
    assert per_iter
    lrs = []
    for _ in range(args.epochs * steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[-steps:] == pytest.approx([args.lr / 100] * steps)
    assert lrs[:args.epochs * steps // 2] == pytest.approx([args.lr] * (args.epochs * steps // 2))


def test_default_schedule_in_a_run(tmp_path):
    # 32x32 data without --schedule: lr / 10 after 50% and 75% of the 4 epochs
    ckpt = run(tmp_path, "--epochs", "4")
    assert [r["lr"] for r in ckpt["history"]] == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_plateau_divides_by_ten():
    """lr / 10 once the test accuracy has not improved for more than --patience epochs."""
    from resfast.train.schedule import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched, per_iter = build_scheduler(opt, "plateau", epochs=10, steps_per_epoch=5, patience=1)
    assert not per_iter
    lrs = []
    for acc in (50, 60, 60, 60, 61, 61, 61):
        sched.step(acc)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001])


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--model", "--data", "--epochs", "--batch-size", "--lr", "--momentum",
                "--weight-decay", "--schedule", "--milestones", "--warmup-epochs", "--amp",
                "--channels-last", "--backend", "--out", "--resume", "--seed", "--device",
                "--workers", "--sync-bn", "--eval"):
        assert opt in out, opt
    from resfast.reproduce import reproduce_main

    with pytest.raises(SystemExit) as e:
        reproduce_main(["--help"])
    assert e.value.code == 0 and "degradation" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["dense", "multiscale"])
def test_image_folder_training_with_dense_eval(tmp_path, mode):
    """ImageNet-style data (scale jittering, random crops, flips, PCA lighting),
    then VGG dense / multi-scale evaluation of the final model."""
    from test_data import make_image_folder

    root = make_image_folder(str(tmp_path / "data"), per_class=4)
    rc = train_main(["--model", "tiny_models:tiny_vgg", "--data", root, "--train-scale", "36,44",
                     "--test-scale", "36", "--crop", "32", "--batch-size", "4", "--epochs", "1",
                     "--eval", mode, "--test-scales", "36,40", "--workers", "1", "--progress",
                     "off", "--out", str(tmp_path / "out")])
    assert rc == 0
    final = json.load(open(tmp_path / "out" / "final.json"))
    assert (0 <= final[f"{mode}_top1_err"] <= 100
            and final[f"{mode}_top5_err"] <= final[f"{mode}_top1_err"])
    assert final[f"{mode}_scales"] == ([36] if mode == "dense" else [36, 40])
    run_info = json.load(open(tmp_path / "out" / "run.json"))
    assert run_info["data"]["kind"] == "imagefolder" and run_info["data"]["num_classes"] == 3


def test_progress_off_needs_no_tqdm(tmp_path, monkeypatch):
    """A machine without tqdm (the lent GPU machine) trains with --progress off."""
    import sys

    for name in [m for m in sys.modules if m == "tqdm" or m.startswith("tqdm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    ckpt = run(tmp_path, "--epochs", "1")
    assert len(ckpt["history"]) == 1
    with pytest.raises(ImportError):
        train_main(["--model", "tiny_models:tiny_resnet", "--out", str(tmp_path / "bar"),
                    *SMALL[:-2], "--progress", "on", "--epochs", "1"])
