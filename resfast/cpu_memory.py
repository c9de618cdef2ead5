"""Keep freed memory mapped in the process (glibc), for steps that run on the CPU.

A training or inference step allocates and frees the same large activations every
step. glibc's malloc serves large blocks with ``mmap`` and gives freed memory at
the top of its heap back to the OS, so each step faults the same pages in again
(zeroed by the kernel) inside the kernels that first write them. Measured on the
2-core machine of the README (ResNet-20, batch 128, channels_last, training):
about 1.3e5 page faults per step and 15-20% of the step's time, for torch.nn and
resfast alike. Raising glibc's two thresholds keeps those pages in the process, as
jemalloc or tcmalloc do by default. The price: the process keeps its peak heap
size (it does not shrink between steps).

``resfast train`` calls :func:`keep_freed_memory` when it trains on the CPU;
``resfast bench`` measures malloc as it is unless ``RESFAST_MALLOC=keep`` (both
providers of a case share the process, so the setting falls on torch.nn and
resfast alike). ``RESFAST_MALLOC=system`` leaves malloc as it is everywhere. A
library import never changes it: the setting is the whole process's.
"""
import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at 32 MiB on 64-bit systems (HEAP_MAX / 2): blocks
# above it are still mapped and unmapped per allocation.
_MMAP_THRESHOLD = 32 * 1024 * 1024
_TRIM_THRESHOLD = 2**31 - 1  # the largest int: never trim


def keep_freed_memory(default: bool = True) -> bool:
    """Raise glibc's mmap and trim thresholds for this process when ``RESFAST_MALLOC``
    says ``keep``, or is unset and ``default`` is true. Returns whether they were set:
    False with ``RESFAST_MALLOC=system``, off Linux/glibc, or when glibc refuses a
    value."""
    choice = os.environ.get("RESFAST_MALLOC", "").strip().lower() or (
        "keep" if default else "system")
    if choice not in ("keep", "system"):
        raise ValueError(f"RESFAST_MALLOC must be 'keep' or 'system', got {choice!r}")
    if choice == "system" or sys.platform != "linux":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
