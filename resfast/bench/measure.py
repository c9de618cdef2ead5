"""Timing, device ceilings, kernel paths and the runner that turns a case into
result rows.

Timing: after warm-up (the first call, which includes torch.compile's and
Triton's compilation, is timed separately as ``first_call_s``), ``rounds`` x
``steps`` calls; on CUDA each round is bracketed by CUDA events (the GPU time
of the round, the host free to run ahead), on the CPU by ``perf_counter``.
``ms`` is the median round's time per step. With ``interleave`` (the default
at ``--size cpu``) the providers of one case and configuration take turns,
round by round (:func:`time_interleaved`), so that load from other processes
on a shared machine falls on all of them alike and their ratios stay fair;
round i of every provider then ran back to back, so each round gives a ratio of
its own: the ratios reported are the median of those, with their quartiles
(``ratio_vs_*_quartiles``), which say how far a ratio moved from round to round.

Ceilings, measured in the same run on the same device: copy bandwidth (a large
device-to-device ``copy_``, counting read + write) and matmul throughput
(square matmuls in bf16, and in fp32 with TF32 allowed, as cuDNN's convs run
fp32 by default).
"""
import collections
import contextlib
import copy
import gc
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import baselines
from . import cases as C


@dataclass
class Settings:
    device: torch.device
    size: str
    warmup: int
    steps: int
    rounds: int
    compile: bool
    compile_reason: Optional[str] = None  # why compile does not run
    providers: Tuple[str, ...] = C.PROVIDERS
    # CPU intra-op threads while measuring (None: leave torch's setting)
    threads: Optional[int] = None
    # let cuDNN pick its fastest algorithms (the eager baseline at its best)
    cudnn_benchmark: bool = True
    # time the providers of a case round by round in turn (see time_interleaved)
    interleave: bool = False
    # glibc keeps freed memory mapped (--keep-freed-memory: resfast.cpu_memory)
    malloc_keeps_freed: bool = False


def default_settings(device=None, size=None, compile=None, steps=None, warmup=None, rounds=None,
                     providers=None) -> Settings:
    """Defaults: cuda if present; size "full" on a GPU and "cpu-tiny" on the CPU;
    torch.compile on a GPU and at size "cpu" (inductor's CPU build of even a
    tiny op takes a minute or more: not worth it at cpu-tiny). Size "cpu" times
    its providers interleaved, 7 rounds of one step after 2 warm-up steps."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gpu = device.type == "cuda"
    if size in (None, "auto"):
        size = "full" if gpu else "cpu-tiny"
    reason = None
    if compile in (None, "auto"):
        compile = gpu or size == "cpu"
        if not compile:
            reason = ("torch.compile skipped on the CPU by default: inductor's C++ build takes a "
                      "minute or more even for a tiny op (force it with --compile on / "
                      "--bench-compile=on)")
    elif compile in ("off", False):
        compile, reason = False, "torch.compile disabled (--no-compile / --compile off)"
    elif compile in ("on", True):
        compile = True
    else:
        raise ValueError(f"compile must be auto, on or off, got {compile!r}")
    full, cpu = size == "full", size == "cpu"
    # At cpu-tiny shapes extra intra-op threads only add synchronisation (9x slower
    # steps measured on a loaded 2-core machine), so the CPU runs them on one.
    threads = 1 if device.type == "cpu" and size == "cpu-tiny" else None
    return Settings(device, size,
                    warmup=warmup if warmup is not None else (3 if full else 2 if cpu else 1),
                    steps=steps if steps is not None else (10 if full else 1),
                    rounds=rounds if rounds is not None else (3 if full else 7 if cpu else 1),
                    compile=compile, compile_reason=reason,
                    providers=tuple(providers) if providers else C.PROVIDERS, threads=threads,
                    interleave=cpu)


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


@contextlib.contextmanager
def cpu_threads(n: Optional[int]):
    """torch's intra-op thread count set to ``n`` for the block (None: unchanged)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(old)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    ms: float               # median over rounds, per step
    ms_min: float
    ms_rounds: List[float]
    # the first call alone (compilation, and for resfast the kernel-path recording, included)
    first_call_s: float


def time_steps(step, device: torch.device, warmup: int, steps: int, rounds: int, after_warmup=None,
               first_step=None) -> Timing:
    """``first_step`` (default ``step``) is the first call: it may wrap ``step``
    (the kernel-path recorder does)."""
    t0 = time.perf_counter()
    (first_step or step)()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    sync(device)
    if after_warmup is not None:
        after_warmup()
    per_step = []
    for _ in range(max(1, rounds)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(max(1, steps)):
                step()
            end.record()
            end.synchronize()
            per_step.append(start.elapsed_time(end) / max(1, steps))
        else:
            t = time.perf_counter()
            for _ in range(max(1, steps)):
                step()
            per_step.append((time.perf_counter() - t) * 1e3 / max(1, steps))
    return Timing(statistics.median(per_step), min(per_step), per_step, first)


def time_interleaved(steps: Dict[str, Callable[[], None]], device: torch.device, warmup: int,
                     n_steps: int, rounds: int) -> Dict[str, Timing]:
    """:func:`time_steps` for several steps at once: each is warmed up (its first
    call timed apart), then every round times ``n_steps`` calls of each step in
    turn. Slow and fast periods of a shared machine hit every step alike."""
    first: Dict[str, float] = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        sync(device)
        first[name] = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            step()
        sync(device)
    per_step: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(max(1, rounds)):
        for name, step in steps.items():
            t = time.perf_counter()
            for _ in range(max(1, n_steps)):
                step()
            sync(device)
            per_step[name].append((time.perf_counter() - t) * 1e3 / max(1, n_steps))
    return {name: Timing(statistics.median(v), min(v), v, first[name])
            for name, v in per_step.items()}


def paired_ratios(ref_rounds: List[float], rounds: List[float]
                  ) -> Optional[Tuple[float, float, float]]:
    """(median, lower quartile, upper quartile) of ref / this over rounds timed in
    turn (round i of both ran back to back, :func:`time_interleaved`), so that each
    round gives a ratio of its own; None below 3 rounds."""
    if len(ref_rounds) != len(rounds) or len(rounds) < 3 or min(rounds) <= 0:
        return None
    ratios = [r / m for r, m in zip(ref_rounds, rounds)]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3


# ---- ceilings ----------------------------------------------------------------------------

def _best_time(fn, device, iters: int, reps: int = 3) -> float:
    """Seconds per call, best of ``reps`` runs of ``iters`` calls, after one warm-up call."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3 / iters)
        else:
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            best = min(best, (time.perf_counter() - t) / iters)
    return best


def _copy_time(device, nbytes: int, iters: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return _best_time(lambda: dst.copy_(src), device, iters)


def _matmul_time(device, n: int, dtype, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return _best_time(lambda: torch.mm(a, b), device, iters)


def measure_ceilings(device, dtypes=("fp32", "bf16")) -> Dict[str, object]:
    """Copy GB/s (read + write) and matmul TFLOP/s per dtype on ``device``."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    # the CPU's: past its caches, and a GEMM big enough for MKL to reach its peak
    nbytes = (1 << 30) if gpu else (256 << 20)
    if gpu:
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = min(nbytes, free // 4)
    copy_gbs = 2 * nbytes / _copy_time(device, nbytes, iters=10 if gpu else 3) / 1e9
    matmul = {}
    for name in dtypes:
        dtype = C.DTYPES[name]
        n = (8192 if dtype == torch.bfloat16 else 4096) if gpu else 1024
        with _tf32(gpu and dtype == torch.float32):
            matmul[name] = 2 * n ** 3 / _matmul_time(device, n, dtype,
                                                     iters=10 if gpu else 3) / 1e12
    if gpu:
        torch.cuda.empty_cache()
    return {
        "copy_gbs": copy_gbs,
        "copy_bytes": nbytes,
        "matmul_tflops": matmul,
        "note": ("copy: dst.copy_(src) of copy_bytes, GB/s counting read + write; matmul: square "
                 "torch.mm, "
                 + ("fp32 with TF32 allowed (as cuDNN runs fp32 convs by default)" if gpu
                    else "on the CPU")),
    }


@contextlib.contextmanager
def _tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled or old
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# ---- kernel paths --------------------------------------------------------------------------

_ATEN_CONVS = {"convolution", "convolution_backward", "_convolution", "cudnn_convolution",
               "mkldnn_convolution", "conv2d"}


class _OpRecorder(TorchDispatchMode):
    """Which resfast ops (and which ATen convolutions) a step dispatches."""

    def __init__(self):
        super().__init__()
        self.ops: Dict[str, str] = {}
        self.aten_convs = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns, name = func.namespace, func._opname
        if ns == "resfast":
            dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "?")
            self.ops.setdefault(name, dev)
        elif ns == "aten" and name in _ATEN_CONVS:
            self.aten_convs[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _conv_impl_recorder(chosen: Dict[str, str]):
    """Record which implementation ``resfast::conv2d_bn`` (and its backward) took
    while the step runs (the op module's ``path_recorder`` hook)."""
    try:
        from ..ops import conv2d_bn as mod
    except ImportError:
        yield
        return
    previous, mod.path_recorder = mod.path_recorder, chosen.__setitem__
    try:
        yield
    finally:
        mod.path_recorder = previous


def record_kernels(step) -> Dict[str, object]:
    """Run ``step`` once, recording the kernel path of every resfast op it
    dispatched: {"resfast::op": "triton" | "cudnn" | "onednn" | "aten" | "cuda" | "cpu",
    "aten_convs": n}.
    conv2d_bn reports the implementation it chose; the other ops report the
    device kernel they dispatched to (C++/CUDA in csrc/)."""
    chosen: Dict[str, str] = {}
    rec = _OpRecorder()
    with _conv_impl_recorder(chosen), rec:
        step()
    out: Dict[str, object] = {}
    for op, dev in sorted(rec.ops.items()):
        out[f"resfast::{op}"] = chosen.get(op, dev)
    if rec.aten_convs:
        out["aten_convs"] = sum(rec.aten_convs.values())
    return out


def kernel_path_summary(provider: str, kernels: Optional[Dict[str, object]],
                        device: torch.device) -> str:
    """A short label for the table: "conv:triton bn:cuda", "aten/cudnn", "inductor"."""
    gpu = device.type == "cuda"
    if provider == "compile":
        return "inductor/" + ("triton" if gpu else "c++")
    if provider in ("eager", "conv_alone"):
        return "aten/" + ("cudnn" if gpu and torch.backends.cudnn.enabled else "cpu")
    if provider == "cudnn_fe":
        return "cudnn_fe:conv+genstats,scale+bias+relu bwd:aten"
    if not kernels:
        return "?"
    conv = sorted({v for k, v in kernels.items() if k.startswith("resfast::conv")})
    bn = sorted({v for k, v in kernels.items() if k.startswith("resfast::bn")})
    parts = []
    if conv:
        parts.append("conv:" + "+".join(map(str, conv)))
    if bn:
        parts.append("bn:" + "+".join(map(str, bn)))
    if kernels.get("aten_convs"):
        parts.append("+aten-conv")
    return " ".join(parts) or "?"


# ---- rows ------------------------------------------------------------------------------------

@dataclass
class Row:
    """One result: a case in one (dtype, layout) through one provider."""

    name: str
    group: str
    kind: str
    mode: str
    provider: str
    dtype: str
    layout: str
    batch: int
    input_shape: List[int]
    device: str
    status: str = "ok"                  # ok | skipped | error
    reason: Optional[str] = None        # why skipped / the error
    ms: Optional[float] = None          # per step, median over rounds
    ms_min: Optional[float] = None
    ms_rounds: List[float] = field(default_factory=list)
    steps: int = 0
    rounds: int = 0
    first_call_s: Optional[float] = None
    images_per_s: Optional[float] = None
    ratio_vs_eager: Optional[float] = None     # eager ms / this ms: > 1 is faster than eager
    ratio_vs_compile: Optional[float] = None
    ratio_vs_conv_alone: Optional[float] = None
    ratio_vs_cudnn_fe: Optional[float] = None  # cudnn_fe ms / this ms (training conv + BN + ReLU)
    # interleaved rounds: the ratios above are the median of the rounds' own ratios, and
    # these their [lower, upper] quartiles (paired_ratios)
    ratio_vs_eager_quartiles: Optional[List[float]] = None
    ratio_vs_compile_quartiles: Optional[List[float]] = None
    flops: Optional[int] = None
    tflops: Optional[float] = None
    bytes: Optional[int] = None
    bytes_model: Optional[str] = None
    gbs: Optional[float] = None
    bound: str = "compute"
    ceiling: Optional[str] = None       # which ceiling pct_of_ceiling refers to
    pct_of_ceiling: Optional[float] = None
    # CUDA: peak allocated during the timed steps above what was
    peak_mem_mb: Optional[float] = None
    #                                          allocated before them (activations, workspaces,
    # gradients)
    # CUDA: allocated before the timed steps, by the whole process
    resident_mem_mb: Optional[float] = None
    kernel_path: str = ""
    kernels: Dict[str, object] = field(default_factory=dict)
    baseline: Optional[str] = None      # what "eager" is for this case
    # the case's settings (channels, stride, model ...)
    spec: Dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


class Runner:
    """Measures (case, dtype, layout, provider) combinations, each once per
    session (cached), and fills every row's ratios from the eager and compile
    rows of the same case and configuration, measured in the same run."""

    def __init__(self, settings: Settings, ceilings: Optional[Dict[str, object]] = None, log=None):
        self.s = settings
        self._ceilings = ceilings
        self._rows: Dict[Tuple[str, int, str, str, str], Row] = {}
        self._flops: Dict[Tuple[str, int], Optional[int]] = {}
        self._modules: Tuple[Optional[str], Optional[C.Modules]] = (None, None)
        self._workloads: "collections.OrderedDict[tuple, C.Workload]" = collections.OrderedDict()
        self.log = log or (lambda msg: None)

    # -- ceilings
    @property
    def ceilings(self) -> Dict[str, object]:
        if self._ceilings is None:
            self._ceilings = measure_ceilings(self.s.device)
        return self._ceilings

    # -- skipping
    def skip_reason(self, case: C.Case, provider: str, dtype: Optional[str] = None,
                    layout: Optional[str] = None) -> Optional[str]:
        if case.skip:
            return case.skip
        if dtype is not None and case.config_skip(dtype, layout):
            return case.config_skip(dtype, layout)
        if provider not in case.providers():
            return f"{provider} does not apply to {case.id}"
        if provider not in self.s.providers:
            return f"provider {provider} not selected"
        if provider == "compile" and not self.s.compile:
            return self.s.compile_reason or "torch.compile disabled"
        if provider == "cudnn_fe" and dtype is not None:
            return baselines.cudnn_fe_skip_reason(self.s.device, C.DTYPES[dtype], layout)
        return None

    # -- building
    def modules(self, case: C.Case) -> C.Modules:
        key = f"{case.id}@{case.batch}"
        if self._modules[0] != key:
            self.release()
            self._modules = (key, C.build_modules(case, self.s.device))
        return self._modules[1]

    def release(self) -> None:
        """Drop the cached modules and workloads (and compiled graphs)."""
        self._modules = (None, None)
        self._workloads.clear()
        if self.s.compile:
            torch._dynamo.reset()
        if self.s.device.type == "cuda" or self.s.size == "full":  # gc.collect costs ~0.5 s
            gc.collect()
        if self.s.device.type == "cuda":
            torch.cuda.empty_cache()

    def workload(self, case: C.Case, dtype: str, layout: str, provider: str) -> C.Workload:
        key = (case.id, case.batch, dtype, layout, provider)
        if key in self._workloads:
            self._workloads.move_to_end(key)
            return self._workloads[key]
        mods = self.modules(case)
        proto = {"resfast": mods.resfast, "eager": mods.eager, "compile": mods.eager,
                 "conv_alone": mods.conv_alone, "cudnn_fe": mods.cudnn_fe}[provider]
        module = copy.deepcopy(proto).to(memory_format=C.memory_format(layout))
        if provider == "compile":
            _raise_dynamo_limits()
            module = torch.compile(module)
        if provider == "cudnn_fe":  # a wrong graph is never timed: checked against torch.nn first
            self.check_peer(case, module, mods.eager, dtype, layout)
        wl = C.make_workload(case, module, self.s.device, C.DTYPES[dtype], layout)
        self._workloads[key] = wl
        while len(self._workloads) > len(C.PROVIDERS):
            self._workloads.popitem(last=False)
        return wl

    def check_peer(self, case: C.Case, module, eager, dtype: str, layout: str) -> None:
        """Output and gradients of a peer provider against the torch.nn module on
        one input; raises (the row records an error) when they disagree."""
        gen = torch.Generator(device=self.s.device).manual_seed(2)
        x = torch.randn((case.batch, *case.in_shape), device=self.s.device, generator=gen,
                        dtype=C.DTYPES[dtype]).contiguous(memory_format=C.memory_format(layout))
        ref = copy.deepcopy(eager).to(memory_format=C.memory_format(layout))
        bad = baselines.check_against_eager(module, ref, x, backward=case.mode == "train",
                                            dtype=C.DTYPES[dtype])
        if bad:
            raise RuntimeError(f"{bad} (checked before timing)")

    def flops(self, case: C.Case) -> Optional[int]:
        key = (case.id, case.batch)
        if key not in self._flops:
            try:
                self._flops[key] = C.count_flops(case) or None
            except Exception as e:  # a counting failure must not cost the measurement
                self.log(f"  (FLOP count failed for {case.id}: {type(e).__name__}: {e})")
                self._flops[key] = None
        return self._flops[key]

    # -- measuring
    def blank_row(self, case, dtype, layout, provider) -> Row:
        return Row(case.name, case.group, case.kind, case.mode, provider, dtype, layout, case.batch,
                   [case.batch, *case.in_shape], str(self.s.device), bound=case.bound,
                   spec=dict(case.spec))

    def measure(self, case: C.Case, dtype: str, layout: str, provider: str) -> Row:
        """Time one combination (cached); ratios are filled by :meth:`complete`."""
        key = (case.id, case.batch, dtype, layout, provider)
        if key in self._rows:
            return self._rows[key]
        row = self.blank_row(case, dtype, layout, provider)
        reason = self.skip_reason(case, provider, dtype, layout)
        if reason:
            row.status, row.reason = "skipped", reason
            self._rows[key] = row
            return row
        if self.s.interleave:
            self._measure_interleaved(case, dtype, layout)
            return self._rows[key]
        device = self.s.device
        try:
            wl = self.workload(case, dtype, layout, provider)
            row.baseline = self.modules(case).baseline
            gpu = device.type == "cuda"
            resident = 0

            def after_warmup():
                nonlocal resident
                if gpu:
                    resident = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)

            kernels: Dict[str, object] = {}
            first = ((lambda: kernels.update(record_kernels(wl.step))) if provider == "resfast"
                     else None)
            with cudnn_benchmark(self.s.cudnn_benchmark):
                timing = time_steps(wl.step, device, self.s.warmup, self.s.steps, self.s.rounds,
                                    after_warmup, first)
            if gpu:
                row.peak_mem_mb = (torch.cuda.max_memory_allocated(device) - resident) / 2**20
                row.resident_mem_mb = resident / 2**20
            row.kernels = kernels
            row.kernel_path = kernel_path_summary(provider, row.kernels, device)
            row.ms, row.ms_min, row.ms_rounds = timing.ms, timing.ms_min, timing.ms_rounds
            row.first_call_s = timing.first_call_s
            row.steps, row.rounds = max(1, self.s.steps), max(1, self.s.rounds)
            self._derive(row, case, dtype)
        # recorded, and the run goes on (OOM at full size, a compile failure ...)
        except Exception as e:
            self._error(row, e)
            self._workloads.pop((case.id, case.batch, dtype, layout, provider), None)
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        self._rows[key] = row
        return row

    def _error(self, row: Row, e: Exception) -> None:
        row.status, row.reason = ("error", f"{type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}"[:500])

    def _measure_interleaved(self, case: C.Case, dtype: str, layout: str) -> None:
        """Every provider of (case, dtype, layout) that is not skipped, timed by
        :func:`time_interleaved`; a provider that fails to build or on its first
        call gets an error row and the others go on."""
        steps, rows, kernels = {}, {}, {}
        for provider in case.providers():
            key = (case.id, case.batch, dtype, layout, provider)
            row = self.blank_row(case, dtype, layout, provider)
            self._rows[key] = rows[provider] = row
            reason = self.skip_reason(case, provider, dtype, layout)
            if reason:
                row.status, row.reason = "skipped", reason
                continue
            try:
                wl = self.workload(case, dtype, layout, provider)
                row.baseline = self.modules(case).baseline
                # the first call (compilation included) runs here: a failure drops the provider
                t0 = time.perf_counter()
                if provider == "resfast":
                    kernels = record_kernels(wl.step)
                else:
                    wl.step()
                row.first_call_s = time.perf_counter() - t0
                steps[provider] = wl.step
            except Exception as e:  # recorded, and the others go on
                self._error(row, e)
                self._workloads.pop(key, None)
        # the first calls are done: time_interleaved's own first call is a warm-up step
        timings = time_interleaved(steps, self.s.device, self.s.warmup, self.s.steps,
                                   self.s.rounds)
        for provider, timing in timings.items():
            row = rows[provider]
            row.kernels = kernels if provider == "resfast" else {}
            row.kernel_path = kernel_path_summary(provider, row.kernels, self.s.device)
            row.ms, row.ms_min, row.ms_rounds = timing.ms, timing.ms_min, timing.ms_rounds
            row.steps, row.rounds = max(1, self.s.steps), max(1, self.s.rounds)
            self._derive(row, case, dtype)

    def _derive(self, row: Row, case: C.Case, dtype: str) -> None:
        sec = row.ms / 1e3
        row.images_per_s = case.batch / sec if sec > 0 else None
        row.flops = self.flops(case)
        if row.flops and sec > 0:
            row.tflops = row.flops / sec / 1e12
        row.bytes, row.bytes_model = C.bytes_model(case, C.DTYPES[dtype])
        if row.bytes and sec > 0:
            row.gbs = row.bytes / sec / 1e9
        ceil = self.ceilings
        if case.bound == "memory" and row.gbs:
            row.ceiling = f"copy {ceil['copy_gbs']:.4g} GB/s"
            row.pct_of_ceiling = 100 * row.gbs / ceil["copy_gbs"]
        elif row.tflops and dtype in ceil["matmul_tflops"]:
            peak = ceil["matmul_tflops"][dtype]
            row.ceiling = f"matmul {dtype} {peak:.4g} TFLOP/s"
            row.pct_of_ceiling = 100 * row.tflops / peak

    def complete(self, row: Row, case: C.Case, measure_refs: bool = True) -> Row:
        """Fill ``row``'s ratios from the eager / compile / conv_alone / cudnn_fe
        rows of the same case and configuration (measuring the first three if
        ``measure_refs``; cudnn_fe only when it was measured)."""
        if row.status != "ok":
            return row
        for ref, attr in (("eager", "ratio_vs_eager"), ("compile", "ratio_vs_compile"),
                          ("conv_alone", "ratio_vs_conv_alone"), ("cudnn_fe", "ratio_vs_cudnn_fe")):
            if ref not in case.providers():
                continue
            other = self._rows.get((case.id, case.batch, row.dtype, row.layout, ref))
            if other is None and measure_refs and ref != "cudnn_fe":
                other = self.measure(case, row.dtype, row.layout, ref)
            if other is not None and other.status == "ok" and other.ms and row.ms:
                setattr(row, attr, other.ms / row.ms)
                paired = (paired_ratios(other.ms_rounds, row.ms_rounds)
                          if self.s.interleave and ref in ("eager", "compile")
                          and other is not row else None)
                if paired is not None:  # the rounds' median ratio, and their quartiles
                    setattr(row, attr, paired[0])
                    setattr(row, attr + "_quartiles", list(paired[1:]))
        return row

    def rows(self) -> List[Row]:
        return list(self._rows.values())


def _raise_dynamo_limits() -> None:
    # Every benchmark compiles fresh module instances of the same classes; past
    # dynamo's per-code recompile limit it would silently run them eagerly.
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        try:
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 4096))
        except Exception:  # renamed or read-only in this torch version
            pass
