"""resfast: fused BatchNorm / ReLU / residual kernels for training VGG and ResNet.

Layers, bottom to top: ``resfast.kernels`` (Triton) and ``csrc/`` (C++/CUDA)
-> ``resfast.ops`` (torch.library ops in the ``resfast`` namespace)
-> ``resfast.functional`` -> ``resfast.nn`` -> ``resfast.models``.
"""
import torch  # noqa: F401  (the extension links against torch's libraries)

from . import _C  # noqa: F401  (registers the C++ ops, whose fakes and autograd the Python ops add)

# isort: split
from . import functional, nn, ops
from ._info import info

__version__ = "0.1.0"


def __getattr__(name):
    # models and fuse sit above nn and are imported on first use, which keeps
    # `import resfast` light for users of the ops alone.
    if name == "models":
        import importlib

        return importlib.import_module(".models", __name__)
    if name == "fuse":
        from .fusion import fuse

        return fuse
    raise AttributeError(f"module 'resfast' has no attribute {name!r}")


__all__ = ["ops", "functional", "nn", "models", "fuse", "info", "__version__"]
