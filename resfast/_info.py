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

    build = dict(kv.split("=", 1) for kv in torch.ops.resfast.build_info().split(";") if "=" in kv)
    archs = build.get("cuda_archs", "")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "resfast_cuda_archs": archs.split() if archs else [],
        "cuda_kernels_built": bool(archs),
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
    return "\n".join(f"{k:<{width}}  {v}" for k, v in facts.items())
