"""What is benchmarked: the cases (an op, a block or a network at one shape,
in training or inference), the providers that run them and the step each
provider times.

Sizes:
  full      ResNet-50 layer shapes at batch 128 for ops and blocks, networks at
            batch 256 (224x224; 32x32 for the CIFAR resnet56). For a GPU.
  cpu       what a CPU user runs (issue 11), float32: the ops and blocks at
            ResNet-20's first stage (32x32x16, batch 128) and ResNet-50's first
            stage (56x56, batch 8); ResNet-20 training (batch 128, 32x32, NCHW
            and channels_last), ResNet-50 training (batch 8, 112x112) and
            ResNet-50 / VGG-11-BN inference (batch 8, 224x224), channels_last.
            Providers are timed interleaved, round by round, so that load from
            other processes falls on all of them alike.
  cpu-tiny  the same cases at tiny shapes (batch 2-4, 8x8 maps; networks as
            thin twins, widths / 8, at 32x32, in two of the four
            configurations), so the whole suite runs on a CPU in CI.

Providers:
  resfast     the resfast module / network
  eager       the same computation in torch.nn (the module's twin,
              ``resfast.twin.torch_twin``; torchvision's own network where it
              exists), cuDNN on a GPU
  compile     ``torch.compile`` of that torch.nn module (default mode); the
              optimizer step of a network stays eager in every provider
  conv_alone  (eval conv + BN + ReLU only) the bare ``nn.Conv2d``: what a
              folded conv + BN + ReLU should cost
  cudnn_fe    (training conv + BN (+ ReLU) only) NVIDIA's cuDNN frontend, the
              fastest library path: a cuDNN graph of conv_fprop + genstats
              (per-channel sum and sum of squares in the conv's kernel), the BN
              finalize on C-length vectors in torch (cudnn-frontend's Python API
              has no bn_finalize node), a second graph of scale, bias and ReLU;
              backward through the aten kernels eager runs
              (``baselines.CudnnFEConvBNReLU``). Optional: skipped with the reason
              without ``nvidia-cudnn-frontend``, without a CUDA GPU, in fp32 or
              NCHW; checked once against torch.nn before it is timed

Precision: parameters stay float32; "bf16" runs under ``torch.autocast`` and
gives op and block inputs in bfloat16 (as they are inside a network), network
inputs in float32. Layout: "channels_last" converts module and inputs.

A training step of an op or block is forward + backward of a fixed random
output gradient (grads set to None first); of a network, forward +
cross-entropy + backward + SGD (momentum 0.9, weight decay 1e-4) +
``zero_grad``. An inference step is the forward under ``torch.no_grad``.
"""
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import nn as rnn
from ..twin import torch_twin
from . import baselines

SIZES = ("cpu-tiny", "cpu", "full")
GROUPS = ("ops", "blocks", "models")
MODES = ("train", "eval")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")
PROVIDERS = ("resfast", "eager", "compile", "conv_alone", "cudnn_fe")
MODELS = ("vgg11", "vgg16", "vgg19", "resnet18", "resnet50", "resnet101", "resnet152", "resnet56")
# networks at cpu-tiny run in these two (dtype, layout) configurations only: CI time
CPU_TINY_MODEL_CONFIGS = (("fp32", "nchw"), ("bf16", "channels_last"))


@dataclass(frozen=True)
class Case:
    """One benchmark: ``kind`` at one shape in one mode."""

    name: str                       # "conv3x3_bn_relu-56x56x64", "resnet50"
    group: str                      # ops | blocks | models
    kind: str  # conv_bn_relu | bn_add_relu | bn_relu_conv | basic_block | bottleneck | model
    mode: str                       # train | eval
    batch: int
    in_shape: Tuple[int, int, int]  # (C, H, W) of the input
    # kind-specific settings (cout, k, stride, relu, model ...)
    spec: Tuple[Tuple[str, object], ...] = ()
    # which ceiling "% of ceiling" refers to: compute (matmul) | memory (copy)
    bound: str = "compute"
    skip: Optional[str] = None      # why this case does not run at this size
    # the (dtype, layout) pairs it runs in; None: all
    configs: Optional[Tuple[Tuple[str, str], ...]] = None

    @property
    def id(self) -> str:
        return f"{self.name}/{self.mode}"

    def get(self, key, default=None):
        return dict(self.spec).get(key, default)

    def with_batch(self, batch: int) -> "Case":
        return dataclasses.replace(self, batch=batch)

    def config_skip(self, dtype: str, layout: str) -> Optional[str]:
        """Why this case does not run in (dtype, layout), or None."""
        if self.configs is None or (dtype, layout) in self.configs:
            return None
        return (f"at this size {self.name} runs only in "
                + ", ".join(f"{d}/{layout}" for d, layout in self.configs))

    def providers(self) -> Tuple[str, ...]:
        extra = ()
        if self.kind == "conv_bn_relu":
            extra = ("conv_alone",) if self.mode == "eval" else ("cudnn_fe",)
        return ("resfast", "eager", "compile") + extra


# ---- the case lists -----------------------------------------------------------------

def _conv(name, mode, batch, c, hw, cout, k, stride=1, relu=True):
    return Case(name, "ops", "conv_bn_relu", mode, batch, (c, hw, hw),
                (("cout", cout), ("k", k), ("stride", stride), ("relu", relu)))


# --size cpu: float32 only; the networks' layouts as issue 11 states its targets
_CL = (("fp32", "channels_last"),)
_BOTH = (("fp32", "nchw"), ("fp32", "channels_last"))


def _cpu_op_cases() -> List[Case]:
    def conv(*args, **kw):
        return dataclasses.replace(_conv(*args, **kw), configs=_BOTH)
    cases = []
    for mode in MODES:
        cases += [conv("conv3x3_bn_relu-32x32x16", mode, 128, 16, 32, 16, 3),
                  conv("conv3x3_bn_relu-56x56x64", mode, 8, 64, 56, 64, 3),
                  conv("conv1x1_bn_relu-56x56x256to64", mode, 8, 256, 56, 64, 1)]
    cases += [Case(f"bn_add_relu-{hw}x{hw}x{c}", "ops", "bn_add_relu", "train", n, (c, hw, hw),
                   bound="memory", configs=_BOTH)
              for n, c, hw in ((128, 16, 32), (8, 256, 56))]
    cases += [Case(f"bn_relu_conv3x3-{hw}x{hw}x{c}", "ops", "bn_relu_conv", "train", n,
                   (c, hw, hw), (("cout", c), ("k", 3), ("stride", 1)), configs=_BOTH)
              for n, c, hw in ((128, 16, 32), (8, 64, 56))]
    return cases


def _op_cases(size: str) -> List[Case]:
    if size == "cpu":
        return _cpu_op_cases()
    if size == "full":  # ResNet-50 layer shapes, batch 128
        n = 128
        cases = [
            _conv("conv3x3_bn_relu-56x56x64", "train", n, 64, 56, 64, 3),
            _conv("conv3x3_bn_relu-28x28x128", "train", n, 128, 28, 128, 3),
            _conv("conv3x3_bn_relu-14x14x256", "train", n, 256, 14, 256, 3),
            _conv("conv3x3_bn_relu-7x7x512", "train", n, 512, 7, 512, 3),
            _conv("conv3x3_bn_relu-56x56x128-s2", "train", n, 128, 56, 128, 3, stride=2),
            _conv("conv1x1_bn_relu-56x56x256to64", "train", n, 256, 56, 64, 1),
            _conv("conv1x1_bn-56x56x64to256", "train", n, 64, 56, 256, 1, relu=False),
            _conv("conv3x3_bn_relu-56x56x64", "eval", n, 64, 56, 64, 3),
            _conv("conv3x3_bn_relu-14x14x256", "eval", n, 256, 14, 256, 3),
        ]
        bn = [(256, 56), (512, 28), (1024, 14), (2048, 7)]
        pre = [(64, 56), (256, 14)]
    else:
        n = 4
        cases = [
            _conv("conv3x3_bn_relu-8x8x8", "train", n, 8, 8, 8, 3),
            _conv("conv3x3_bn_relu-8x8x8-s2", "train", n, 8, 8, 8, 3, stride=2),
            _conv("conv1x1_bn_relu-8x8x16to8", "train", n, 16, 8, 8, 1),
            _conv("conv1x1_bn-8x8x8to16", "train", n, 8, 8, 16, 1, relu=False),
            _conv("conv3x3_bn_relu-8x8x8", "eval", n, 8, 8, 8, 3),
        ]
        bn = [(16, 8)]
        pre = [(8, 8)]
    cases += [Case(f"bn_add_relu-{hw}x{hw}x{c}", "ops", "bn_add_relu", "train", n, (c, hw, hw),
                   bound="memory")
              for c, hw in bn]
    cases += [Case(f"bn_relu_conv3x3-{hw}x{hw}x{c}", "ops", "bn_relu_conv", "train", n, (c, hw, hw),
                   (("cout", c), ("k", 3), ("stride", 1))) for c, hw in pre]
    return cases


def _block_cases(size: str) -> List[Case]:
    if size == "cpu":
        return [Case(name, "blocks", kind, mode, n, (c, hw, hw), (("planes", planes),),
                     configs=_BOTH)
                for mode in MODES
                for name, kind, n, c, hw, planes in (
                    ("basic_block-32x32x16", "basic_block", 128, 16, 32, 16),
                    ("bottleneck-56x56x256", "bottleneck", 8, 256, 56, 64))]
    n, hw, basic_c, bott_c = (128, 56, 64, 256) if size == "full" else (4, 8, 8, 16)
    cases = []
    for mode in MODES:
        cases.append(Case(f"basic_block-{hw}x{hw}x{basic_c}", "blocks", "basic_block", mode, n,
                          (basic_c, hw, hw), (("planes", basic_c),)))
        cases.append(Case(f"bottleneck-{hw}x{hw}x{bott_c}", "blocks", "bottleneck", mode, n,
                          (bott_c, hw, hw), (("planes", bott_c // 4),)))
    return cases


def _cpu_model_cases() -> List[Case]:
    def model(name, mode, batch, hw, configs, classes=1000):
        return Case(name, "models", "model", mode, batch, (3, hw, hw),
                    (("model", name), ("num_classes", classes)), configs=configs)
    return [model("resnet20", "train", 128, 32, _BOTH, classes=10),
            model("resnet50", "train", 8, 112, _CL),
            model("resnet50", "eval", 8, 224, _CL),
            model("vgg11_bn", "eval", 8, 224, _CL)]


def _model_cases(size: str) -> List[Case]:
    if size == "cpu":
        return _cpu_model_cases()
    cases = []
    for name in MODELS:
        cifar = name == "resnet56"
        spec = [("model", name), ("num_classes", 10 if cifar else 1000)]
        configs = skip = None
        if size == "full":
            batch, hw = 256, (32 if cifar else 224)
        else:
            # thin twins of the same architectures (widths / 8, a 64-wide VGG classifier;
            # resnet56 / 2 at 16x16): the same code paths at a CPU's pace
            batch, hw, configs = 2, (16 if cifar else 32), CPU_TINY_MODEL_CONFIGS
            spec = [("model", name), ("num_classes", 10), ("width_div", 2 if cifar else 8),
                    ("hidden", 64)]
        for mode in MODES:
            cases.append(Case(name, "models", "model", mode, batch, (3, hw, hw), tuple(spec),
                              skip=skip, configs=configs))
    return cases


def all_cases(size: str) -> List[Case]:
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    return _op_cases(size) + _block_cases(size) + _model_cases(size)


def matches(case: Case, pattern: str) -> bool:
    """``pattern`` (a shell-style glob) matches the case's name, id ("name/mode"),
    kind or group."""
    return any(fnmatch(s, pattern) for s in (case.name, case.id, case.kind, case.group))


def select_cases(size: str, sets: Optional[Sequence[str]] = None,
                 names: Optional[Sequence[str]] = None,
                 modes: Optional[Sequence[str]] = None, batch: Optional[int] = None) -> List[Case]:
    """The cases of ``size`` in any of ``sets`` (groups) or matching any of
    ``names`` (globs); everything when neither is given. ``modes`` filters."""
    for s in sets or ():
        if s not in GROUPS:
            raise ValueError(f"unknown set {s!r}; sets are {', '.join(GROUPS)}")
    for m in modes or ():
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; modes are {', '.join(MODES)}")
    cases = all_cases(size)
    if sets or names:
        cases = [c for c in cases if c.group in (sets or ())
                 or any(matches(c, p) for p in names or ())]
    if names and not cases:
        raise ValueError(f"no benchmark matches {', '.join(names)}; `resfast bench --list` shows "
                         "them")
    if modes:
        cases = [c for c in cases if c.mode in modes]
    if batch is not None:
        cases = [c.with_batch(batch) for c in cases]
    return cases


# ---- building the modules --------------------------------------------------------------

def _init_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fast deterministic weights on the module's device (networks are built
    on the meta device and skip their real init, seconds for VGG's FC layers):
    He-uniform for conv/linear weights, zero biases, BN at 1/0 with unit
    running variance."""
    gen_device = next((p.device for p in module.parameters()), torch.device("cpu"))
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                a = math.sqrt(6.0 / max(1, m.weight[0].numel()))
                m.weight.uniform_(-a, a, generator=gen)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                if m.running_mean is not None:
                    m.running_mean.zero_()
                    m.running_var.fill_(1.0)
                    m.num_batches_tracked.zero_()
    return module


def _model(case: Case) -> nn.Module:
    """The network of a model case; with ``width_div`` a thin twin: the same
    block types, depths, stem and shortcuts with every width divided (VGG: and
    a ``hidden``-wide classifier)."""
    from .. import models as M

    net = M.get_model(case.get("model"), num_classes=case.get("num_classes"))
    div = case.get("width_div", 1)
    if div == 1:
        return net
    if isinstance(net, M.ResNet):
        stages = net.stages()
        return M.ResNet(type(stages[0][0]), [len(s) for s in stages],
                        num_classes=case.get("num_classes"), shortcut=net.shortcut,
                        widths=[max(1, s[0].conv1.out_channels // div) for s in stages],
                        stem="imagenet" if net.maxpool is not None else "cifar")
    if isinstance(net, M.VGG):
        cfg, bn, last = [], False, 3
        for m in net.features:
            if isinstance(m, nn.Conv2d):
                last = max(1, m.out_channels // div)
                cfg.append(last if m.kernel_size[0] == 3 else (last, m.kernel_size[0]))
            elif isinstance(m, nn.MaxPool2d):
                cfg.append("M")
            elif isinstance(m, nn.LocalResponseNorm):
                cfg.append("LRN")
            elif isinstance(m, nn.BatchNorm2d):
                bn = True
        thin = M.VGG(M.vgg.make_layers(cfg, bn), num_classes=case.get("num_classes"),
                     init_weights=False)
        h, k = case.get("hidden", 4096), thin.avgpool.output_size
        k = k if isinstance(k, int) else k[0]
        thin.classifier = nn.Sequential(nn.Linear(last * k * k, h), nn.ReLU(True), nn.Dropout(0.5),
                                        nn.Linear(h, h), nn.ReLU(True), nn.Dropout(0.5),
                                        nn.Linear(h, case.get("num_classes")))
        return thin
    raise ValueError(f"no thin twin for {type(net).__name__}")


def _allocate_on(module: nn.Module, device) -> nn.Module:
    """A meta-built module given storage on ``device`` and the benchmark's weights."""
    return _init_(module.to_empty(device=device)) if device != torch.device("meta") else module


def build_resfast(case: Case, device) -> nn.Module:
    """The resfast module of ``case`` on ``device`` (meta: shapes only)."""
    device = torch.device(device)
    c = case.in_shape[0]
    with torch.device("meta"):
        if case.kind == "conv_bn_relu":
            k = case.get("k")
            m = rnn.Conv2dBNReLU(c, case.get("cout"), k, case.get("stride"), relu=case.get("relu"))
        elif case.kind == "bn_add_relu":
            m = rnn.BatchNormAddReLU(c)
        elif case.kind == "bn_relu_conv":
            m = rnn.BNReLUConv2d(c, case.get("cout"), case.get("k"), case.get("stride"))
        elif case.kind == "basic_block":
            m = rnn.BasicBlock(c, case.get("planes"))
        elif case.kind == "bottleneck":
            m = rnn.Bottleneck(c, case.get("planes"))
        elif case.kind == "model":
            m = _model(case)
        else:
            raise ValueError(f"unknown benchmark kind {case.kind!r}")
    return _allocate_on(m, device).train(case.mode == "train")


@dataclass
class Modules:
    """A case's modules, all with the same weights."""

    resfast: nn.Module
    eager: nn.Module
    baseline: str                      # what "eager" is
    conv_alone: Optional[nn.Module] = None
    # the cuDNN frontend peer (builds its graphs on first call)
    cudnn_fe: Optional[nn.Module] = None


def build_modules(case: Case, device) -> Modules:
    ours = build_resfast(case, device)
    tv = case.kind == "model" and case.get("width_div", 1) == 1
    eager = baselines.torchvision_twin(case.get("model"), ours) if tv else None
    if eager is not None:
        baseline = f"torchvision.models.{case.get('model')}"
    else:
        eager = torch_twin(ours)
        baseline = f"torch.nn (resfast.twin of {type(ours).__name__})"
    conv_alone = copy.deepcopy(ours.conv) if "conv_alone" in case.providers() else None
    eager = eager.train(case.mode == "train")
    fe = baselines.cudnn_fe_twin(eager) if "cudnn_fe" in case.providers() else None
    return Modules(ours, eager, baseline, conv_alone, fe)


# ---- the steps ---------------------------------------------------------------------------

@dataclass
class Workload:
    """One provider's step for one case and configuration."""

    step: Callable[[], None]
    module: nn.Module
    batch: int
    holds: List[object] = field(default_factory=list)  # what the step keeps alive (the optimizer)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def memory_format(layout: str):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def make_workload(case: Case, module: nn.Module, device, dtype: torch.dtype, layout: str,
                  seed: int = 0) -> Workload:
    """The step ``module`` (one provider's module, already compiled where that
    is the provider) runs for ``case`` in ``dtype`` (autocast) and ``layout``."""
    device = torch.device(device)
    fmt = memory_format(layout)
    module = module.to(memory_format=fmt)
    train = case.mode == "train"
    module.train(train)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (case.batch, *case.in_shape)
    autocast = _autocast(device, dtype)

    if case.kind == "model":
        x = torch.randn(shape, device=device, generator=gen).contiguous(memory_format=fmt)
        target = torch.randint(0, case.get("num_classes"), (case.batch,), device=device,
                               generator=gen)
        if not train:
            def step():
                with torch.no_grad(), autocast:
                    module(x)
            return Workload(step, module, case.batch)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)

        def step():
            with autocast:
                loss = nn.functional.cross_entropy(module(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return Workload(step, module, case.batch, [opt])

    inputs = [torch.randn(shape, device=device, generator=gen,
                          dtype=dtype).contiguous(memory_format=fmt)
              for _ in range(2 if case.kind == "bn_add_relu" else 1)]
    if not train:
        def step():
            with torch.no_grad(), autocast:
                module(*inputs)
        return Workload(step, module, case.batch)

    for t in inputs:
        t.requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]
    grad: List[Optional[Tensor]] = [None]

    def step():
        for t in params:
            t.grad = None
        for t in inputs:
            t.grad = None
        with autocast:
            out = module(*inputs)
        if grad[0] is None:
            grad[0] = torch.randn(out.shape, device=device, generator=gen,
                                  dtype=out.dtype).contiguous(
                memory_format=fmt if out.dim() == 4 else torch.contiguous_format)
        out.backward(grad[0])
    return Workload(step, module, case.batch)


# ---- work per step ---------------------------------------------------------------------

def count_flops(case: Case) -> int:
    """GEMM/conv FLOPs of one step of the torch.nn computation
    (``torch.utils.flop_counter`` on the meta device: no compute), the same
    count for every provider. Elementwise work and the optimizer are not counted."""
    if case.kind == "bn_add_relu":
        return 0  # no conv or GEMM
    from torch.utils.flop_counter import FlopCounterMode

    mods = build_modules(case, "meta")
    module = mods.eager
    shape = (case.batch, *case.in_shape)
    with torch.device("meta"):
        n_in = 2 if case.kind == "bn_add_relu" else 1
        inputs = [torch.randn(shape, requires_grad=case.mode == "train" and case.kind != "model")
                  for _ in range(n_in)]
        target = torch.zeros(case.batch, dtype=torch.long) if case.kind == "model" else None
    with FlopCounterMode(display=False) as counter:
        if case.mode == "eval":
            with torch.no_grad():
                module(*inputs)
        else:
            out = module(*inputs)
            if target is not None:
                out = nn.functional.cross_entropy(out, target)
                out.backward()
            else:
                out.backward(torch.ones_like(out))
    return int(counter.get_total_flops())


def bytes_model(case: Case, dtype: torch.dtype) -> Tuple[Optional[int], Optional[str]]:
    """Bytes one step must move through memory, and how they were counted;
    (None, None) for blocks and networks (compute bound: see TFLOP/s)."""
    if case.group != "ops":
        return None, None
    size = torch.tensor([], dtype=dtype).element_size()
    n, (c, h, w) = case.batch, case.in_shape
    x = n * c * h * w * size
    if case.kind == "bn_add_relu":
        # The two-pass fused design: forward reads y for the statistics, then y and
        # the residual, writes the output (4 passes); backward reads dout, out and y
        # for the reductions, then again to write dy and dresidual (8 passes).
        passes = 4 if case.mode == "eval" else 12
        return passes * x, f"{passes} passes over the activation (fused two-pass BN + add + ReLU)"
    stride = case.get("stride", 1)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    y = n * case.get("cout") * ho * wo * size
    if case.mode == "eval":
        return x + y, "lower bound: read x, write out"
    return (3 * x + 2 * y,
            "lower bound: forward reads x, writes out; backward reads dout and x, writes dx")
