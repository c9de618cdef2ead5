"""Keep freed memory mapped in the process (glibc): ``resfast bench --keep-freed-memory``.

A step allocates and frees the same large activations every time. glibc's malloc
serves large blocks with ``mmap`` and gives freed memory at the top of its heap back
to the OS, adapting both thresholds to what it has seen freed; memory handed back is
faulted in again (zeroed by the kernel) inside the kernel that next writes it. A
process that runs one model settles into a steady pattern: ``resfast train --model
resnet20`` on the README's 2-core machine spends 7.0 s of system time with glibc's
defaults and 1.3 s with these thresholds, and takes 109 s either way (6.5 s per
epoch). A benchmark that times several models round by round in one process keeps
breaking that pattern: there the page faults were 15-20% of a ResNet-20 step, for
torch.nn and resfast alike. Raising the
two thresholds, as jemalloc or tcmalloc behave by default, takes them out. The
price: the process keeps its peak heap size.

The setting is the whole process's, so only a command line sets it, never a library
import.
"""
import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at 32 MiB on 64-bit systems: blocks above it are still
# mapped and unmapped per allocation.
_MMAP_THRESHOLD = 32 * 1024 * 1024
_TRIM_THRESHOLD = 2**31 - 1  # the largest int: never trim


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process. Returns whether they
    were set: False off Linux, without glibc's ``mallopt``, or when glibc refuses a
    value."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
