"""Triton kernels. They run on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1 (how the tests check them without a GPU)."""
import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
