"""The Triton conv kernels as a GPU process has them, recorded, for tests without a GPU.

Under the interpreter ``triton.jit`` gives InterpretedFunction objects, which torch's
wrappers pass through untouched, so launch-path defects would hide. ``install`` replaces
each kernel by a real ``JITFunction`` of the same source, the kind ``triton.jit`` returns
in a GPU process, whose launches are recorded (kernel name, grid, arguments, and the
current device where the test supplies a probe) and then run by the interpreted kernel,
or not run where only the call pattern matters.
"""
from typing import Callable, NamedTuple, Optional

from triton.runtime.jit import JITFunction

import resfast.kernels.conv2d_bn as conv_kernels
import resfast.kernels.partials as partial_kernels

KERNELS = [(conv_kernels, "_conv2d_bn_forward_kernel"), (conv_kernels, "_conv2d_bn_dgrad_kernel"),
           (conv_kernels, "_conv2d_bn_wgrad_kernel"), (partial_kernels, "_merge_tile_stats_kernel"),
           (partial_kernels, "_sum_partials_kernel")]


class Launch(NamedTuple):
    kernel: str
    grid: tuple
    kwargs: dict
    device: object  # the current device at the launch, where the test asks for it


class GpuStyleKernel(JITFunction):
    """A JITFunction of the interpreted kernel's source; records each launch and, with
    ``execute``, runs it with the interpreted kernel."""

    def __init__(self, interpreted, log, execute, current_device):
        super().__init__(interpreted.fn)
        self.interpreted, self.log = interpreted, log
        self.execute, self.current_device = execute, current_device

    # by identity: hashing the source (JITFunction's way) would compile the interpreted helpers
    __hash__ = object.__hash__

    def run(self, *args, grid, warmup, **kwargs):
        self.log.append(Launch(self.fn.__name__, grid, kwargs,
                               self.current_device() if self.current_device else None))
        if self.execute:
            return self.interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)
        return None


def install(monkeypatch, execute: bool = True,
            current_device: Optional[Callable[[], object]] = None) -> list:
    """Swap every conv kernel for its GpuStyleKernel (undone by ``monkeypatch``); returns the
    list the launches are recorded in, in launch order."""
    log = []
    for module, name in KERNELS:
        kernel = GpuStyleKernel(getattr(module, name), log, execute, current_device)
        monkeypatch.setattr(module, name, kernel)
    return log
