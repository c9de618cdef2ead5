"""Which GEMM runs ``resfast::conv2d_bn`` on a GPU: our Triton implicit GEMM or cuDNN.

Both paths keep the fused BatchNorm kernels around the GEMM; they differ in
where the prologue and the statistics happen (see ``resfast.ops.conv2d_bn``).
Neither wins everywhere, so the choice is made per problem, by measurement,
the way ``torch.backends.cudnn.benchmark`` picks cuDNN's algorithms: the first
call of a shape times every path on the real arguments and remembers the
fastest for the rest of the process.

``RESFAST_CONV_PATH`` = ``auto`` (the default: measure), ``triton`` or ``cudnn``
forces one path. Without a CUDA device, or while a CUDA graph is being
captured (timing would break the capture), ``auto`` takes Triton unmeasured.
"""
import os
from typing import Callable, Dict, Hashable, Tuple

import torch

PATHS = ("triton", "cudnn")
_DEFAULT = "triton"
_chosen: Dict[Hashable, str] = {}


def mode() -> str:
    m = os.environ.get("RESFAST_CONV_PATH", "auto").strip().lower()
    if m not in ("auto",) + PATHS:
        raise ValueError(f"RESFAST_CONV_PATH must be auto, triton or cudnn, got {m!r}")
    return m


def _cuda_time_ms(fn: Callable[[], object], reps: int = 3) -> float:
    fn()  # compile / autotune / allocate outside the timed region
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def choose(key: Hashable, impls: Dict[str, Callable], args: Tuple, device: torch.device,
           timer: Callable[[Callable[[], object]], float] = _cuda_time_ms) -> str:
    """The name of the path (a key of ``impls``) to run ``args`` with."""
    m = mode()
    if m != "auto":
        return m
    if key in _chosen:
        return _chosen[key]
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return _DEFAULT
    times = {name: timer(lambda f=f: f(*args)) for name, f in impls.items()}
    _chosen[key] = min(times, key=times.get)
    return _chosen[key]


def chosen_paths() -> Dict[Hashable, str]:
    """The measured choices so far (problem key -> path), for reports."""
    return dict(_chosen)


def forget() -> None:
    """Drop the remembered choices (tests; a changed GPU clock or driver)."""
    _chosen.clear()
