"""Which GEMM runs ``resfast::conv2d_bn`` on a GPU: our Triton implicit GEMM or cuDNN.

Both paths keep the fused BatchNorm kernels around the GEMM; they differ in
where the prologue and the statistics happen (see ``resfast.ops.conv2d_bn``).
Neither wins everywhere, so the choice is made per problem, by measurement,
the way ``torch.backends.cudnn.benchmark`` picks cuDNN's algorithms: the first
call of a problem times every path on the real arguments and remembers the
fastest for the rest of the process.

The measurement: each path first runs WARMUP + 1 times untimed (Triton compiles,
cuDNN picks its algorithms, the clocks ramp up), then ROUNDS timed runs per path,
alternating which path goes first, and the medians decide. A path that raises
(a Triton tile that does not fit a smaller GPU's shared memory, no CUDA kernel image
for this GPU) is left out with a warning; only when every path raises does the
error propagate. Under ``torch.distributed`` every rank takes the same path: the
first rank to finish measuring a problem publishes its choice in the job's store,
and the others take it. That needs no collective, so a rank that meets a problem
alone (rank 0 evaluating, say) never waits for the others.

float32 precision follows torch's own convolutions (:func:`allow_tf32`); it is part
of the problem key, as are the layouts of every tensor the paths read.

``RESFAST_CONV_PATH`` = ``auto`` (the default: measure), ``triton`` or ``cudnn``
forces one path. Without a CUDA device, or while a CUDA graph is being
captured (timing would break the capture), ``auto`` takes Triton unmeasured.
"""
import hashlib
import os
import statistics
import warnings
from typing import Callable, Dict, Hashable, Tuple

import torch

PATHS = ("triton", "cudnn")
_DEFAULT = "triton"
WARMUP = 2
ROUNDS = 5
_chosen: Dict[Hashable, str] = {}


def mode() -> str:
    m = os.environ.get("RESFAST_CONV_PATH", "auto").strip().lower()
    if m not in ("auto",) + PATHS:
        raise ValueError(f"RESFAST_CONV_PATH must be auto, triton or cudnn, got {m!r}")
    return m


def allow_tf32() -> bool:
    """Whether torch lets its own float32 convolutions on the GPU use TF32: the cuDNN path
    then does, and the Triton path is told to. Resolved as torch resolves it: the
    convolution setting, else cuDNN's, else the global one (``fp32_precision``, "none"
    meaning "ask the parent"); torch without that API has only ``cudnn.allow_tf32``."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        return bool(torch.backends.cudnn.allow_tf32)
    for precision in (conv.fp32_precision, torch.backends.cudnn.fp32_precision,
                      torch.backends.fp32_precision):
        if precision != "none":
            return precision == "tf32"
    return False


def _cuda_time_ms(runs: Dict[str, Callable[[], object]]) -> Dict[str, float]:
    """The median time of each run in milliseconds, on the current device: WARMUP untimed
    calls of every run first, then ROUNDS rounds of one timed call each, alternating the
    order so that no path is always the one timed after an idle gap."""
    for run in runs.values():
        for _ in range(WARMUP):
            run()
    names = list(runs)
    events = []
    for r in range(ROUNDS):
        for name in names if r % 2 == 0 else names[::-1]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runs[name]()
            end.record()
            events.append((name, start, end))
    torch.cuda.synchronize()
    samples = {name: [] for name in names}
    for name, start, end in events:
        samples[name].append(start.elapsed_time(end))
    return {name: statistics.median(s) for name, s in samples.items()}


def _agreed(key: Hashable, choice: str, runnable) -> str:
    """The path every rank of a distributed job takes for key: the first rank's choice,
    through the job's key-value store (compare_set keeps the first value written). A path
    that another rank chose but that cannot run here leaves this rank with its own."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return choice
    from torch.distributed.distributed_c10d import _get_default_store

    # the same name on every rank: devices by type (each rank has its own cuda:N)
    shared = tuple(k.type if isinstance(k, torch.device) else k for k in key)
    name = "resfast/conv_path/" + hashlib.sha1(repr(shared).encode()).hexdigest()
    agreed = _get_default_store().compare_set(name, "", choice).decode()
    return agreed if agreed in runnable else choice


def choose(key: Hashable, impls: Dict[str, Callable], args: Tuple, device: torch.device) -> str:
    """The name of the path (a key of ``impls``) to run ``args`` with."""
    m = mode()
    if m != "auto":
        return m
    if key in _chosen:
        return _chosen[key]
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return _DEFAULT
    with torch.cuda.device(device):
        runs, errors = {}, {}
        for name, impl in impls.items():
            try:
                impl(*args)  # the first call: compiles, and shows whether the path runs at all
            except Exception as e:  # whatever it is, the other path may run
                errors[name] = e
                warnings.warn(f"resfast.conv2d_bn: the {name} path cannot run {key}: "
                              f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
            else:
                runs[name] = (lambda impl=impl: impl(*args))
        if not runs:
            raise next(iter(errors.values()))
        times = _cuda_time_ms(runs) if len(runs) > 1 else dict.fromkeys(runs, 0.0)
    _chosen[key] = _agreed(key, min(times, key=times.get), runs)
    return _chosen[key]


def chosen_paths() -> Dict[Hashable, str]:
    """The measured choices so far (problem key -> path), for reports."""
    return dict(_chosen)


def forget() -> None:
    """Drop the remembered choices (tests; a changed GPU clock or driver)."""
    _chosen.clear()
