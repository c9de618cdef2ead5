"""The statistics dtype: one rule for every layer, from the Triton kernels up.

Per-channel vectors (BatchNorm statistics, scale and shift, their gradients)
and every accumulation are float32, float64 for float64 activations. The C++
ops follow the same rule (``stats_dtype`` in csrc/checks.h).
"""
from typing import Union

import torch


def stats_dtype(of: Union[torch.dtype, torch.Tensor]) -> torch.dtype:
    """The statistics and accumulation dtype of an activation (or of its dtype)."""
    dtype = of.dtype if isinstance(of, torch.Tensor) else of
    return torch.float64 if dtype == torch.float64 else torch.float32
