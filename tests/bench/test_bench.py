"""The benchmark tooling: `resfast bench`, the pytest-benchmark suite in
benchmarks/, the torch.nn baselines and benchmarks/plot_history.py.

Everything here runs on the CPU at tiny sizes (no timing is asserted, only
that every field is there and means what it says); one GPU test runs the CLI
on CUDA with torch.compile when a GPU is present.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from resfast.bench import baselines as B
from resfast.bench import bench_main
from resfast.bench import cases as C
from resfast.bench.measure import Runner, default_settings
from resfast.twin import torch_twin
from tests.support.helpers import GLIBC, no_resfast_ops, triton_interpreter_problem

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_CUDA = torch.cuda.is_available()
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """Tiny shapes run faster on one intra-op thread (and much faster on a
    shared, loaded machine), as resfast bench itself runs them at cpu-tiny."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(args, timeout=240):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


# ---- resfast bench ------------------------------------------------------------------------

def test_cli_cpu_tiny_writes_json_png_md(tmp_path, capsys):
    rc = bench_main(["--device", "cpu", "--size", "cpu-tiny", "--names", "conv3x3_bn_relu-8x8x8",
                     "bn_add_relu-*", "resnet56/train", "--dtype", "all", "--layout", "all",
                     "--out", str(tmp_path), "--name", "run", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for col in ("benchmark", "provider", "images/s", "ms/step", "vs eager", "vs compile", "TFLOP/s",
                "GB/s", "% ceiling", "peak MB", "kernel path"):
        assert col in out
    assert "torch.compile skipped on the CPU by default" in out  # the reason is shown

    doc = json.loads((tmp_path / "run.json").read_text())
    assert doc["format"] == "resfast-bench/1" and doc["complete"] is True
    assert doc["command"].startswith("resfast bench --device cpu")
    assert len(doc["date"]) == 10 and doc["timestamp"].startswith(doc["date"])
    env = doc["environment"]
    for key in ("torch", "triton", "cuda_runtime", "gpu", "device", "python", "resfast",
                "resfast_info"):
        assert key in env
    assert env["device"] == "cpu" and env["device_slug"] == "cpu"
    ceil = doc["ceilings"]
    assert (ceil["copy_gbs"] > 0 and ceil["matmul_tflops"]["fp32"] > 0
            and ceil["matmul_tflops"]["bf16"] > 0)

    rows = doc["results"]
    ok = [r for r in rows if r["status"] == "ok"]
    by = {(r["name"], r["mode"], r["dtype"], r["layout"], r["provider"]): r for r in rows}
    # every configuration of the ops ran through resfast and eager; compile skipped with the reason
    for dtype in ("fp32", "bf16"):
        for layout in ("nchw", "channels_last"):
            for name, mode in (("conv3x3_bn_relu-8x8x8", "train"),
                               ("conv3x3_bn_relu-8x8x8", "eval"), ("bn_add_relu-8x8x16", "train")):
                ours, eager = (by[(name, mode, dtype, layout, "resfast")],
                               by[(name, mode, dtype, layout, "eager")])
                assert ours["status"] == eager["status"] == "ok", (ours["reason"], eager["reason"])
                assert ours["ms"] > 0 and ours["images_per_s"] > 0 and ours["ratio_vs_eager"] > 0
                assert ours["ratio_vs_eager"] == pytest.approx(eager["ms"] / ours["ms"])
                assert eager["ratio_vs_eager"] == pytest.approx(1.0)
                assert ours["ratio_vs_compile"] is None
                assert by[(name, mode, dtype, layout, "compile")]["status"] == "skipped"
                assert ours["kernel_path"] and ours["kernels"]
                assert eager["kernel_path"] == "aten/cpu"
    conv = by[("conv3x3_bn_relu-8x8x8", "train", "fp32", "nchw", "resfast")]
    assert (conv["kernels"]["resfast::conv2d_bn"] == "onednn"
            and conv["kernels"]["resfast::conv2d_bn_backward"] == "onednn")
    assert conv["kernel_path"] == "conv:onednn bn:cpu"
    assert conv["flops"] > 0 and conv["tflops"] > 0 and conv["bytes"] > 0 and conv["gbs"] > 0
    assert conv["bound"] == "compute" and conv["ceiling"].startswith("matmul fp32")
    assert conv["pct_of_ceiling"] == pytest.approx(100 * conv["tflops"]
                                                   / ceil["matmul_tflops"]["fp32"])
    evalc = by[("conv3x3_bn_relu-8x8x8", "eval", "bf16", "channels_last", "resfast")]
    assert evalc["ratio_vs_conv_alone"] > 0
    assert by[("conv3x3_bn_relu-8x8x8", "eval", "bf16", "channels_last",
               "conv_alone")]["status"] == "ok"
    bn = by[("bn_add_relu-8x8x16", "train", "bf16", "channels_last", "resfast")]
    assert bn["bound"] == "memory" and bn["ceiling"].startswith("copy") and bn["gbs"] > 0
    assert bn["bytes"] == 12 * 4 * 16 * 8 * 8 * 2  # 12 passes over a bf16 activation
    assert bn["pct_of_ceiling"] == pytest.approx(100 * bn["gbs"] / ceil["copy_gbs"])
    assert bn["tflops"] is None  # no GEMM FLOPs
    net = by[("resnet56", "train", "bf16", "channels_last", "resfast")]
    assert net["status"] == "ok" and net["flops"] > 0 and net["spec"]["width_div"] == 2
    assert by[("resnet56", "train", "bf16", "channels_last",
               "eager")]["baseline"] == "torch.nn (resfast.twin of ResNet)"
    skipped = by[("resnet56", "train", "fp32", "channels_last", "resfast")]
    assert skipped["status"] == "skipped" and "runs only in" in skipped["reason"]
    assert all(r["peak_mem_mb"] is None for r in ok)  # CUDA only

    assert (tmp_path / "run.png").read_bytes()[:8] == PNG
    md = (tmp_path / "run.md").read_text()
    assert "| benchmark |" in md and "conv3x3_bn_relu-8x8x8 train fp32 NCHW" in md

    # --report redraws an existing file
    (tmp_path / "run.png").unlink()
    assert bench_main(["--report", str(tmp_path / "run.json")]) == 0
    assert (tmp_path / "run.png").read_bytes()[:8] == PNG
    assert torch.get_num_threads() >= 1


def test_cli_default_name_never_overwrites(tmp_path, capsys):
    args = ["--device", "cpu", "--names", "bn_add_relu-*", "--out", str(tmp_path), "--no-plot",
            "--quiet"]
    assert bench_main(args) == 0 and bench_main(args) == 0
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert len(names) == 2 and names[0].endswith("-cpu-2.json") and names[1].endswith("-cpu.json")
    assert names[1][:10].count("-") == 2  # YYYY-MM-DD-cpu.json


def test_cli_list_budget_and_bad_arguments(tmp_path, capsys):
    assert bench_main(["--device", "cpu", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in C.MODELS + ("bn_add_relu", "bn_relu_conv3x3", "basic_block", "bottleneck",
                            "conv1x1_bn-"):
        assert name in listed
    assert bench_main(["--device", "cpu", "--size", "full", "--list", "--names", "resnet50"]) == 0
    assert "resnet50/train" in capsys.readouterr().out

    assert bench_main(["--device", "cpu", "--sets", "blocks", "--time-budget", "0", "--out",
                       str(tmp_path), "--name", "b", "--no-plot", "--quiet"]) == 0
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["results"] and all(r["status"] == "skipped" and "time budget" in r["reason"]
                                  for r in doc["results"])

    assert bench_main(["--device", "cpu", "--sets", "nets"]) == 2
    assert bench_main(["--device", "cpu", "--names", "no-such-net"]) == 2
    assert "no benchmark matches" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_main(["--device", "cpu", "--dtype", "fp8", "--list"])


def test_python_m_resfast_bench_is_wired():
    r = _run(["-m", "resfast", "bench", "--device", "cpu", "--list", "--sets", "blocks"],
             timeout=120)
    assert r.returncode == 0, r.stderr
    assert "bottleneck-8x8x16/train" in r.stdout


@pytest.mark.skipif(HAS_CUDA or triton_interpreter_problem() is not None,
                    reason=f"the Triton interpreter on CPU tensors (a machine without a GPU): "
                           f"{'a GPU is here' if HAS_CUDA else triton_interpreter_problem()}")
def test_kernel_path_reports_the_triton_conv(monkeypatch):
    """With the Triton kernels sent CPU tensors, the row says so: the path is
    what ran, not what was assumed."""
    monkeypatch.setenv("RESFAST_TRITON_ON_CPU", "1")
    runner = Runner(default_settings("cpu", "cpu-tiny", "off"),
                    ceilings={"copy_gbs": 1.0, "matmul_tflops": {"fp32": 1.0, "bf16": 1.0}})
    case = C.Case("conv3x3_bn_relu-4x4x4", "ops", "conv_bn_relu", "train", 2, (4, 4, 4),
                  (("cout", 4), ("k", 3), ("stride", 1), ("relu", True)))
    row = runner.measure(case, "fp32", "channels_last", "resfast")
    assert row.status == "ok", row.reason
    assert (row.kernels["resfast::conv2d_bn"] == "triton"
            and row.kernels["resfast::conv2d_bn_backward"] == "triton")
    assert row.kernel_path.startswith("conv:triton")


# ---- the baselines compute what resfast computes ---------------------------------------------

# every op and block; networks: each baseline class and stem once (the deeper
# ResNets and VGGs are the same classes with more blocks)
TWIN_CASES = [c for c in C.all_cases("cpu-tiny")
              if c.name in ("vgg11", "resnet18", "resnet50", "resnet56")
              or c.group != "models"]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("case", TWIN_CASES, ids=lambda c: c.id)
def test_eager_twin_is_the_same_computation(case):
    """float64, so the comparison is exact up to rounding (amplified by
    train-mode BN over a batch of 2 in the nets: norm-relative 1e-7): the
    baseline and resfast compute the same function (output, input gradients,
    BN statistics), and the baseline uses no resfast op."""
    ours = C.build_resfast(case, "cpu").double()
    with torch.no_grad():  # non-trivial BN state, so that eval mode is not the identity
        for m in ours.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    ref = C.build_modules(case, "cpu").eager.double()  # the baseline the benchmark times: the twin
    assert type(ref) is type(torch_twin(ours))
    ref.load_state_dict(ours.state_dict())
    shape = (case.batch, *case.in_shape)
    xs = [torch.randn(shape, dtype=torch.float64, requires_grad=True)
          for _ in range(2 if case.kind == "bn_add_relu" else 1)]
    xr = [x.detach().clone().requires_grad_() for x in xs]
    torch.manual_seed(1)
    y = ours(*xs)
    torch.manual_seed(1)  # the same dropout masks
    with no_resfast_ops("the eager baseline"):
        y_ref = ref(*xr)
    assert y.shape == y_ref.shape and _rel(y, y_ref) < 1e-9
    if case.mode == "train":
        g = torch.randn_like(y)
        y.backward(g)
        with no_resfast_ops("the eager baseline"):
            y_ref.backward(g)
        for a, b in zip(xs, xr):
            assert _rel(a.grad, b.grad) < 1e-7
    mine = [v for k, v in ours.named_buffers() if k.endswith(("running_mean", "running_var"))]
    theirs = [v for k, v in ref.named_buffers() if k.endswith(("running_mean", "running_var"))]
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        assert _rel(a, b) < 1e-9


@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_full_size_baseline_is_torchvision(name):
    """At full size the ImageNet networks' baseline is torchvision's own, with
    resfast's weights (built on the meta device: no memory, no compute)."""
    pytest.importorskip("torchvision")
    case = next(c for c in C.all_cases("full") if c.name == name and c.mode == "train")
    mods = C.build_modules(case, "meta")
    assert mods.baseline == f"torchvision.models.{name}"
    assert type(mods.eager).__module__.startswith("torchvision")
    assert list(mods.eager.state_dict()) == list(mods.resfast.state_dict())
    assert C.count_flops(case) > 1e12  # a training step at batch 256, 224x224


def test_full_size_cases():
    full = C.all_cases("full")
    ops = {c.id: c for c in full if c.group == "ops"}
    assert all(c.batch == 128 for c in full if c.group in ("ops", "blocks"))
    assert all(c.batch == 256 for c in full if c.group == "models")
    assert ops["conv3x3_bn_relu-56x56x64/train"].in_shape == (64, 56, 56)
    assert {c.name for c in full if c.group == "models"} == set(C.MODELS)
    assert next(c for c in full if c.name == "resnet50").in_shape == (3, 224, 224)
    assert next(c for c in full if c.name == "resnet56").in_shape == (3, 32, 32)
    assert not any(c.skip or c.configs for c in full)



def test_cpu_size_cases_are_issue_11s():
    """--size cpu: float32, the networks and layouts issue 11 sets its targets at, the ops
    and blocks in both layouts; torch.compile on and the providers interleaved."""
    cpu = C.all_cases("cpu")
    models = {(c.name, c.mode, c.batch, c.in_shape, tuple(c.configs)) for c in cpu
              if c.group == "models"}
    both = (("fp32", "nchw"), ("fp32", "channels_last"))
    cl = (("fp32", "channels_last"),)
    assert models == {("resnet20", "train", 128, (3, 32, 32), both),
                      ("resnet50", "train", 8, (3, 112, 112), cl),
                      ("resnet50", "eval", 8, (3, 224, 224), cl),
                      ("vgg11_bn", "eval", 8, (3, 224, 224), cl)}
    assert all(tuple(c.configs) == both for c in cpu if c.group != "models")
    s = default_settings("cpu", "cpu", None)
    assert s.compile and s.interleave and s.threads is None and s.rounds == 7


def test_time_interleaved_takes_turns():
    """Each round times every step once, in turn: a slow period of the machine falls on
    all of them, not on whichever provider happened to be measured then."""
    from resfast.bench.measure import time_interleaved

    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    timings = time_interleaved(steps, torch.device("cpu"), warmup=2, n_steps=1, rounds=3)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-up each, then turns
    assert set(timings) == {"a", "b"}
    assert all(len(t.ms_rounds) == 3 and t.ms >= 0 for t in timings.values())

# ---- the cuDNN frontend peer (provider cudnn_fe) -------------------------------------------------

def _conv_case(stride=1, relu=True, k=3, mode="train"):
    return C.Case(f"conv{k}x{k}_bn-t", "ops", "conv_bn_relu", mode, 4, (8, 8, 8),
                  (("cout", 8), ("k", k), ("stride", stride), ("relu", relu)))


def test_cudnn_fe_provider_is_listed_for_training_conv_ops():
    assert "cudnn_fe" in C.PROVIDERS
    for case in C.all_cases("full") + C.all_cases("cpu-tiny"):
        want = case.kind == "conv_bn_relu" and case.mode == "train"
        assert ("cudnn_fe" in case.providers()) == want, case.id


@pytest.mark.skipif(HAS_CUDA, reason="the CPU path: the cudnn_fe rows are skipped with the reason")
def test_cudnn_fe_rows_skipped_on_cpu_with_reason(tmp_path, capsys):
    rc = bench_main(["--device", "cpu", "--names", "conv3x3_bn_relu-8x8x8", "--dtype", "all",
                     "--layout", "channels_last", "--out", str(tmp_path), "--name", "fe",
                     "--no-plot", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = json.loads((tmp_path / "fe.json").read_text())["results"]
    fe = [r for r in rows if r["provider"] == "cudnn_fe"]
    # no eval row
    assert {(r["mode"], r["dtype"]) for r in fe} == {("train", "fp32"), ("train", "bf16")}
    for r in fe:
        assert r["status"] == "skipped" and r["ms"] is None
        assert (r["reason"].startswith(B.CUDNN_FE_INSTALL)
                or r["reason"] == "cudnn_fe needs a CUDA GPU"), r["reason"]
    ours = next(r for r in rows if r["provider"] == "resfast" and r["mode"] == "train"
                and r["dtype"] == "bf16")
    assert (ours["status"] == "ok" and ours["ratio_vs_eager"] > 0
            and ours["ratio_vs_cudnn_fe"] is None)
    # listed under skipped
    assert "cudnn frontend not installed" in out or "cudnn_fe needs a CUDA GPU" in out


def test_cudnn_fe_skip_reasons():
    reason = B.cudnn_fe_skip_reason("cpu", torch.bfloat16, "channels_last")
    assert reason and (reason.startswith(B.CUDNN_FE_INSTALL) or "CUDA GPU" in reason)
    try:
        import cudnn  # noqa: F401
    except Exception:
        assert reason.startswith("cudnn frontend not installed (pip install nvidia-cudnn-frontend)")
        return
    if HAS_CUDA:
        assert "bf16/fp16 only" in B.cudnn_fe_skip_reason("cuda", torch.float32, "channels_last")
        assert "channels_last" in B.cudnn_fe_skip_reason("cuda", torch.bfloat16, "nchw")


@pytest.mark.parametrize("stride,relu,k", [(1, True, 3), (2, True, 3), (1, False, 1)])
def test_cudnn_fe_peer_math_matches_torch_nn(stride, relu, k):
    """The peer's finalize (mean, variance, scale, shift), running-statistics
    update and backward (aten threshold / BN / conv backward), with its two
    cuDNN graphs replaced by torch ops, against torch.nn in float64."""
    case = _conv_case(stride, relu, k)
    mods = C.build_modules(case, "cpu")
    eager = mods.eager.double()
    with torch.no_grad():
        eager.bn.weight.uniform_(0.5, 1.5)
        eager.bn.bias.uniform_(-0.5, 0.5)
    peer = B.cudnn_fe_twin(eager, backend="torch")
    x = torch.randn(case.batch, *case.in_shape, dtype=torch.float64)
    assert B.check_against_eager(peer, eager, x, backward=True, dtype=torch.float64,
                                 tol=1e-9) is None
    # running statistics as nn.BatchNorm2d updates them (momentum and the unbiased variance)
    eager.bn.momentum = None  # cumulative average, twice
    peer = B.cudnn_fe_twin(eager, backend="torch")
    for _ in range(2):
        peer(x)
        eager(x)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(peer.bn, name), getattr(eager.bn, name), rtol=1e-12,
                              atol=1e-12), name
    with pytest.raises(RuntimeError, match="training-mode"):
        peer.eval()(x)


def test_cudnn_fe_check_catches_a_wrong_peer():
    case = _conv_case()
    eager = C.build_modules(case, "cpu").eager.double()
    wrong = B.cudnn_fe_twin(eager, backend="torch")
    wrong.use_relu = False  # a graph without its ReLU
    x = torch.randn(case.batch, *case.in_shape, dtype=torch.float64)
    reason = B.check_against_eager(wrong, eager, x, dtype=torch.float64)
    assert reason and reason.startswith("disagrees with torch.nn") and "output" in reason


@pytest.mark.gpu
def test_cudnn_fe_peer_on_cuda(tmp_path):
    """The real path: the cuDNN FE graphs against torch.nn (bf16 tolerance),
    then the benchmark row measured with its ratios."""
    pytest.importorskip("cudnn", reason=B.CUDNN_FE_INSTALL)
    for stride, relu, k in ((1, True, 3), (2, True, 3), (1, False, 1)):
        case = _conv_case(stride, relu, k)
        mods = C.build_modules(case, "cuda")
        eager = mods.eager.to(memory_format=torch.channels_last)
        x = torch.randn(case.batch, *case.in_shape, device="cuda", dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)
        peer = B.cudnn_fe_twin(eager).to(memory_format=torch.channels_last)
        assert B.check_against_eager(peer, eager, x, backward=True,
                                     dtype=torch.bfloat16) is None, (stride, relu, k)
    runner = Runner(default_settings("cuda", "cpu-tiny", "off", steps=2),
                    ceilings={"copy_gbs": 1.0, "matmul_tflops": {"fp32": 1.0, "bf16": 1.0}})
    case = next(c for c in C.all_cases("cpu-tiny") if c.id == "conv3x3_bn_relu-8x8x8/train")
    fe = runner.measure(case, "bf16", "channels_last", "cudnn_fe")
    assert fe.status == "ok", fe.reason
    assert fe.ms > 0 and fe.kernel_path.startswith("cudnn_fe:")
    runner.complete(fe, case)
    assert fe.ratio_vs_eager > 0
    ours = runner.complete(runner.measure(case, "bf16", "channels_last", "resfast"), case)
    assert ours.ratio_vs_cudnn_fe == pytest.approx(fe.ms / ours.ms)
    skipped = runner.measure(case, "fp32", "channels_last", "cudnn_fe")
    assert skipped.status == "skipped" and "bf16/fp16 only" in skipped.reason


# ---- the pytest-benchmark suite ---------------------------------------------------------------

def test_suite_collects_every_benchmark():
    r = _run(["-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider",
              "--bench-device", "cpu"], timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    for fn in ("bench_ops.py::bench_conv_bn_relu_train", "bench_ops.py::bench_conv_bn_relu_eval",
               "bench_ops.py::bench_bn_add_relu_train", "bench_ops.py::bench_bn_relu_conv_train",
               "bench_blocks.py::bench_basic_block_train", "bench_blocks.py::bench_bottleneck_eval",
               "bench_models.py::bench_model_train", "bench_models.py::bench_model_eval"):
        assert any(i.startswith(fn + "[") for i in ids), fn
    for name in C.MODELS:
        assert (any(f"[{name}-train-" in i for i in ids)
                and any(f"[{name}-eval-" in i for i in ids)), name
    for part in ("-fp32-nchw-", "-bf16-channels_last-", "-resfast]", "-eager]", "-compile]",
                 "-conv_alone]"):
        assert any(part in i for i in ids), part


def test_suite_subset_runs(tmp_path):
    k = "(conv3x3_bn_relu-8x8x8-train or resnet56-train) and bf16 and channels_last"
    r = _run(["-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
              "--bench-device", "cpu", "-k", k, "-rs"], timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
    assert "torch.compile skipped on the CPU by default" in r.stdout  # -rs shows each skip's reason

    # with timing on and a JSON file: the rows ride in extra_info, the run's facts in "resfast"
    out = tmp_path / "suite.json"
    r = _run(["-m", "pytest", "benchmarks/bench_ops.py", "-q", "-p", "no:cacheprovider",
              "--bench-device", "cpu",
              "-k", "bn_add_relu and fp32 and nchw", f"--benchmark-json={out}"], timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["resfast"]["ceilings"]["copy_gbs"] > 0
    assert doc["resfast"]["environment"]["torch"] == torch.__version__
    rows = {b["extra_info"]["provider"]: b for b in doc["benchmarks"]}
    assert set(rows) == {"eager", "resfast"}
    ours = rows["resfast"]
    assert ours["group"] == "bn_add_relu-8x8x16/train fp32 nchw"
    assert ours["extra_info"]["ratio_vs_eager"] > 0 and ours["extra_info"]["gbs"] > 0
    assert ours["extra_info"]["kernel_path"] == "bn:cpu"
    assert ours["stats"]["rounds"] >= 1


# ---- benchmarks/plot_history.py ------------------------------------------------------------

def _fake_results(path, date, ratio, gpu="Example GPU"):
    row = {"name": "resnet50", "mode": "train", "dtype": "bf16", "layout": "channels_last",
           "provider": "resfast", "status": "ok", "ratio_vs_eager": ratio,
           "ratio_vs_compile": ratio / 1.2, "images_per_s": 1000 * ratio}
    doc = {"format": "resfast-bench/1", "date": date,
           "environment": {"gpu": gpu, "device": "cuda:0"},
           "results": [row, dict(row, provider="eager", ratio_vs_eager=1.0)]}
    path.write_text(json.dumps(doc))


def test_plot_history(tmp_path):
    """Synthetic files in a temporary directory (the repository's results
    directory holds real runs only)."""
    script = os.path.join(ROOT, "benchmarks", "plot_history.py")
    r = _run([script, "--results", str(tmp_path)], timeout=60)
    assert r.returncode == 0 and "nothing to draw" in r.stdout

    _fake_results(tmp_path / "2030-01-01-example-gpu.json", "2030-01-01", 1.1)
    _fake_results(tmp_path / "2030-02-01-example-gpu.json", "2030-02-01", 1.3)
    suite = {"datetime": "2030-03-01T00:00:00", "resfast": {"environment": {"gpu": "Example GPU"}},
             "benchmarks": [{"name": "x",
                             "extra_info": {"name": "resnet50", "mode": "train", "dtype": "bf16",
                                            "layout": "channels_last", "provider": "resfast",
                                            "status": "ok", "ratio_vs_eager": 1.4}}]}
    (tmp_path / "2030-03-01-example-gpu-pytest-benchmark.json").write_text(json.dumps(suite))
    (tmp_path / "notes.json").write_text("[1, 2]")  # not a results file: ignored
    out = tmp_path / "h.png"
    r = _run([script, "--results", str(tmp_path), "--out", str(out)], timeout=60)
    assert r.returncode == 0, r.stderr
    assert "resnet50 train bf16 NHWC" in r.stdout and "1.400" in r.stdout and "3 runs" in r.stdout
    assert out.read_bytes()[:8] == PNG


# ---- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cli_on_cuda_with_compile(tmp_path, capsys):
    rc = bench_main(["--device", "cuda", "--size", "cpu-tiny", "--names",
                     "conv3x3_bn_relu-8x8x8/train", "--dtype", "bf16", "--layout", "channels_last",
                     "--steps", "2", "--out", str(tmp_path), "--name", "gpu", "--quiet"])
    assert rc == 0, capsys.readouterr()
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["environment"]["gpu"] == torch.cuda.get_device_name()
    by = {r["provider"]: r for r in doc["results"]}
    assert all(by[p]["status"] == "ok" for p in ("resfast", "eager", "compile")), by
    ours = by["resfast"]
    assert (ours["ratio_vs_eager"] > 0 and ours["ratio_vs_compile"] > 0
            and ours["peak_mem_mb"] is not None)
    assert ours["kernels"]["resfast::conv2d_bn"] == "triton"
    assert (by["eager"]["kernel_path"] == "aten/cudnn"
            and by["compile"]["kernel_path"] == "inductor/triton")
    assert doc["ceilings"]["matmul_tflops"]["bf16"] > 1 and doc["ceilings"]["copy_gbs"] > 100


def test_headline_selection_in_order(capsys):
    """--headline: the issue-10 cases, in their order (ops first, each network last);
    at cpu-tiny the first case of each kind stands in."""
    from resfast.bench.headline import CASES, kind

    assert bench_main(["--device", "cpu", "--size", "full", "--list", "--headline"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(CASES)
    assert bench_main(["--device", "cpu", "--size", "full", "--list", "--headline",
                       "--names", "vgg16"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["vgg16/train"]
    assert bench_main(["--device", "cpu", "--list", "--headline"]) == 0
    tiny = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert [kind(c) for c in tiny] == [kind(c) for c in CASES] and tiny != list(CASES)


def test_append_rows_order_and_targets(tmp_path):
    """Two processes' worth of rows in one file (--append keeps the first run's rows and
    ceilings); eager is measured before resfast; the headline check reads the file."""
    from resfast.bench.headline import check_targets, format_checks

    common = ["--device", "cpu", "--headline", "--out", str(tmp_path), "--name", "run", "--no-plot",
              "--quiet", "--dtype", "bf16", "--layout", "channels_last"]
    assert bench_main(common + ["--names", "bn_add_relu*"]) == 0
    first = json.loads((tmp_path / "run.json").read_text())
    assert bench_main(common + ["--names", "conv3x3*", "--modes", "eval", "--append"]) == 0
    doc = json.loads((tmp_path / "run.json").read_text())
    assert doc["ceilings"] == first["ceilings"]
    assert doc["results"][:len(first["results"])] == first["results"]
    assert {r["name"].split("-")[0] for r in doc["results"]} == {"bn_add_relu", "conv3x3_bn_relu"}
    assert [run["command"] for run in doc["runs"]] == [r["command"] for r in (doc["results"][0],
                                                                              doc["results"][-1])]
    md = (tmp_path / "run.md").read_text()
    assert all(f"`{run['command']}`" in md for run in doc["runs"])
    conv = {r["provider"]: r for r in doc["results"] if r["name"].startswith("conv3x3")}
    ours = conv["resfast"]
    assert ours["ratio_vs_eager"] == pytest.approx(conv["eager"]["ms"] / ours["ms"])
    assert ours["ratio_vs_conv_alone"] == pytest.approx(conv["conv_alone"]["ms"] / ours["ms"])
    checks = {c.label: c for c in check_targets(doc)}
    eval_check = checks["eval conv+BN+ReLU vs the bare conv"]
    assert eval_check.measured == conv["resfast"]["ratio_vs_conv_alone"]
    assert eval_check.status == ("met" if eval_check.measured >= 1 / 1.1 else "missed")
    assert checks["ResNet-50 train vs eager"].status == "not measured"
    assert "| eval conv+BN+ReLU vs the bare conv |" in format_checks(check_targets(doc))


def test_measurement_order_eager_first_compile_last():
    from resfast.bench.cli import ORDER

    assert ORDER[0] == "eager" and ORDER[1] == "resfast" and ORDER[-1] == "compile"
    assert set(ORDER) == set(C.PROVIDERS)


def test_profile_table(tmp_path):
    from resfast.bench.profile import main

    out = tmp_path / "p.txt"
    assert main(["bottleneck-8x8x16/train", "--warmup", "1", "--steps", "1", "--rows", "5", "--out",
                 str(out)]) == 0
    text = out.read_text()
    assert text.startswith("bottleneck-8x8x16/train batch") and "ms/step" in text
    assert "resfast::" in text or "aten::" in text
    assert main(["no-such-case/train"]) == 2


def test_gpu_run_summary(tmp_path):
    """scripts/gpu_summary.py: steps, test counts and failures (a killed shard too), targets."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import gpu_summary
    finally:
        sys.path.pop(0)
    work, results = tmp_path / "work", tmp_path / "results"
    work.mkdir()
    results.mkdir()
    (work / "steps.tsv").write_text("setup\tok\t0\t12\t45\t\nops\tfailed\t1\t30\t150\t\n"
                                    "model\ttimeout\t124\t150\t150\t\n"
                                    "train-torch\tskipped\t-\t0\t60\tbudget spent\n")
    (work / "ops.log").write_text("..F.\n=== FAILED tests/ops/test_x.py::test_a[cuda] (call)\n"
                                  "AssertionError\n=== end of tests/ops/test_x.py::test_a[cuda]\n"
                                  "FAILED tests/ops/test_x.py::test_a[cuda] - AssertionError\n"
                                  "1 failed, 3 passed, 5 deselected in 30.1s\n")
    (work / "model.log").write_text("...\n")
    text = gpu_summary.summary(str(work), str(results), budget=450, elapsed=300)
    assert "300 s of a 450 s budget" in text
    assert "| ops | failed (rc 1) | 30 | 150 |" in text and "| model | timeout (rc 124) |" in text
    assert "- ops (failed): 1 failed, 3 passed, 5 deselected" in text
    assert "  - FAILED tests/ops/test_x.py::test_a[cuda]" in text
    assert "- model (timeout): no summary (killed?)" in text
    assert "Headline targets" not in text  # no bench.json yet
    assert gpu_summary.main(["--work", str(work), "--results", str(results)]) == 0
    assert (results / "summary.md").read_text() == gpu_summary.summary(str(work), str(results))


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's (Linux)")
def test_keep_freed_memory_is_recorded(tmp_path):
    # a subprocess: the setting is the whole process's (resfast.cpu_memory)
    res = _run(["-m", "resfast", "bench", "--device", "cpu", "--size", "cpu-tiny", "--names",
                "bn_add_relu-8x8x16", "--modes", "train", "--providers", "resfast", "eager",
                "--keep-freed-memory", "--out", str(tmp_path), "--name", "run", "--quiet"])
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "run.json").read_text())["settings"]["malloc_keeps_freed"]
    assert "glibc keeps freed memory (--keep-freed-memory)" in (tmp_path / "run.md").read_text()


def test_paired_ratios_of_interleaved_rounds():
    from resfast.bench.measure import paired_ratios

    # round i of both ran back to back: the ratios are 2, 2, 2, 1, 4 (sorted 1, 2, 2, 2, 4)
    ref = [2.0, 4.0, 6.0, 1.0, 8.0]
    ours = [1.0, 2.0, 3.0, 1.0, 2.0]
    assert paired_ratios(ref, ours) == (2.0, 2.0, 2.0)
    assert paired_ratios([1.0, 3.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0]) == (2.5, 1.75, 3.25)
    assert paired_ratios([1.0, 2.0], [1.0, 2.0]) is None  # too few rounds
    assert paired_ratios([1.0, 2.0, 3.0], [1.0, 2.0]) is None  # not paired


def test_interleaved_run_reports_the_rounds_median_ratio_and_quartiles():
    import dataclasses

    from resfast.bench import report

    settings = dataclasses.replace(default_settings("cpu", "cpu-tiny", "off", rounds=5),
                                   interleave=True, providers=("resfast", "eager"))
    runner = Runner(settings,
                    ceilings={"copy_gbs": 1.0, "matmul_tflops": {"fp32": 1.0, "bf16": 1.0}})
    case = C.Case("bn_add_relu-4x4x4", "ops", "bn_add_relu", "train", 2, (4, 4, 4), ())
    ours = runner.complete(runner.measure(case, "fp32", "channels_last", "resfast"), case)
    eager = runner.complete(runner.measure(case, "fp32", "channels_last", "eager"), case)
    assert ours.status == eager.status == "ok", (ours.reason, eager.reason)
    assert len(ours.ms_rounds) == len(eager.ms_rounds) == 5
    ratios = sorted(e / o for e, o in zip(eager.ms_rounds, ours.ms_rounds))
    lo, hi = ours.ratio_vs_eager_quartiles
    # 5 rounds: the quartiles are the 2nd and 4th ratio, the median the 3rd, inside them
    assert (lo, ours.ratio_vs_eager, hi) == pytest.approx((ratios[1], ratios[2], ratios[3]))
    cell = report.row_cells(ours.as_dict())[4]
    assert cell == f"{ours.ratio_vs_eager:.2f}x [{lo:.2f}-{hi:.2f}]"
    assert report.has_quartiles([ours.as_dict()])
    # the reference against itself: 1x, no spread to show
    assert eager.ratio_vs_eager == 1.0 and eager.ratio_vs_eager_quartiles is None
    # rounds timed one provider after the other (cpu-tiny, GPUs) are not paired: no quartiles
    plain = Runner(default_settings("cpu", "cpu-tiny", "off", rounds=5),
                   ceilings={"copy_gbs": 1.0, "matmul_tflops": {"fp32": 1.0, "bf16": 1.0}})
    assert plain.complete(plain.measure(case, "fp32", "channels_last", "resfast"),
                          case).ratio_vs_eager_quartiles is None
