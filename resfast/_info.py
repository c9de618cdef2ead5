"""`resfast.info()`: what this installation was built with and can run."""
import platform

import torch


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def info() -> dict:
    """Return the build and runtime facts: CUDA archs compiled, kernel paths
    available, torch / triton / CUDA versions and the GPU, if any."""
    from . import kernels

    archs = torch.ops.resfast.build_info().split("=", 1)[1]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    from .ops import OPS

    def backends(op):
        name = f"resfast::{op}"
        return "+".join(k for k in ("CPU", "CUDA")
                        if torch._C._dispatch_has_kernel_for_dispatch_key(name, k))

    return {
        "resfast_cuda_archs": archs.replace(";", " ").split() if archs else [],
        "cuda_kernels_built": bool(archs),
        "cpu_kernels": torch.ops.resfast.cpu_isa(),  # the instruction set of the CPU BN kernels
        "kernels": {op: backends(op) for op in OPS},
        "triton_kernels_available": kernels.triton_available(),
        "triton_interpreter": kernels.interpreting(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda_runtime": torch.version.cuda,
        "gpu": gpu,
        "python": platform.python_version(),
    }


def format_info(facts: dict) -> str:
    width = max(len(k) for k in facts)
    lines = []
    for key, value in facts.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k:<{width - 2}}  {v}" for k, v in value.items()]
        else:
            lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)
