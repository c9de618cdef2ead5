"""A BatchNorm (or any per-channel affine map) folded into a convolution's
weights, cached per weight version.

``conv2d_bn`` with an epilogue ``(z - centre) * scale + shift`` over its output
``z = conv(a, weight) + bias`` runs one convolution with

    weight' = weight * scale             (per output channel)
    bias'   = (bias - centre) * scale + shift

Folding reads and writes every weight (and on the CPU reorders it into
oneDNN's blocked format), which for an inference step at a small batch costs
as much as several layers' activations; so the result is kept, one entry per
weight tensor, and reused while

  * the weight is the same tensor, with the same data pointer, dtype, shape,
    strides and version counter (an optimizer step, ``load_state_dict``,
    ``copy_`` or any other in-place change bumps the version; ``.to()`` and
    ``.data =`` change the data pointer or the dtype);
  * bias, scale, shift and centre have the same values (C numbers each,
    compared exactly: a changed running statistic, BN parameter or eps is
    seen however it was changed);
  * the packing target is the same (on the CPU: the stride, padding, dilation and
    input shape oneDNN packs the weight for).

In-place changes made through ``.data`` bypass the version counter, as they
bypass autograd; call :func:`clear_cache` after them. Inference tensors
(created under ``torch.inference_mode``) have no version counter and are
folded on every call. An entry dies with its weight (a weak reference).

The CPU's eval layers called for inference keep their entries in C++, by the same
rules (``resfast::conv2d_bn_eval``, csrc/cpu/conv2d_bn_eval.cpp; there the entries
of dead weights are dropped at every fold and every 64th call); :func:`clear_cache`
and :func:`cache_stats` cover both.
"""
import weakref
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..dtypes import stats_dtype


class _Entry(NamedTuple):
    identity: Tuple
    values: Tuple[Optional[Tensor], ...]
    target: object
    folded: Tuple[Tensor, ...]


_entries: Dict[int, _Entry] = {}
_hits = {"hit": 0, "miss": 0}


def _eval_cache(clear: bool):
    return torch.ops.resfast.conv2d_bn_eval_cache(clear)


def clear_cache() -> None:
    """Forget every folded weight (after in-place changes through ``.data``)."""
    _entries.clear()
    _casts.clear()
    _eval_cache(True)


def cache_stats() -> Dict[str, int]:
    """How often a fold was reused and how often one was made, here and in the C++ eval
    layer's cache, and how many entries the C++ cache holds (tests, reports)."""
    hits, misses, entries = _eval_cache(False)
    return {"hit": _hits["hit"] + hits, "miss": _hits["miss"] + misses, "cpp_entries": entries}


def _identity(w: Tensor) -> Tuple:
    return (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape), w.stride())


def _same(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


_casts: Dict[int, Tuple[Tuple, Tensor]] = {}


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, the same tensor again while ``t`` is unchanged (the key of
    :func:`fold`): a parameter cast for autocast keeps its folded entry. Only
    for tensors no gradient flows through."""
    if t.is_inference():
        return t.to(dtype)
    key, identity = id(t), _identity(t) + (dtype,)
    entry = _casts.get(key)
    if entry is not None and entry[0] == identity:
        return entry[1]
    if entry is None:
        weakref.finalize(t, _casts.pop, key, None)
    with torch.no_grad():
        _casts[key] = (identity, t.to(dtype))
    return _casts[key][1]


def folded_bias(bias: Optional[Tensor], scale: Tensor, shift: Tensor, centre: Optional[Tensor],
                dtype: torch.dtype) -> Tensor:
    """bias' = (bias - centre) * scale + shift (bias and centre default 0), computed in
    ``dtype``."""
    s = scale.to(dtype)
    b = torch.zeros_like(s) if bias is None else bias.to(dtype)
    if centre is not None:
        b = b - centre.to(dtype)
    return b * s + shift.to(dtype)


def fold_now(weight: Tensor, bias: Optional[Tensor], scale: Tensor, shift: Tensor,
             centre: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(weight', bias') in the weight's dtype, computed in the statistics dtype."""
    dt = stats_dtype(weight)
    w = (weight.to(dt) * scale.to(dt).view(-1, 1, 1, 1)).to(weight.dtype)
    return w, folded_bias(bias, scale, shift, centre, dt).to(weight.dtype)


def cached(weight: Tensor, values: Tuple[Optional[Tensor], ...], target: object,
           compute: Callable[[], Tuple[Tensor, ...]]) -> Tuple[Tensor, ...]:
    """``compute()``, a function of ``weight``, the per-channel ``values`` and
    ``target``, from the cache when none of them has changed (see the module
    docstring)."""
    if weight.is_inference():
        return compute()
    values = tuple(None if t is None else t.detach() for t in values)
    key, identity = id(weight), _identity(weight)
    entry = _entries.get(key)
    if (entry is not None and entry.identity == identity and entry.target == target
            and len(entry.values) == len(values)
            and all(_same(a, b) for a, b in zip(entry.values, values))):
        _hits["hit"] += 1
        return entry.folded
    _hits["miss"] += 1
    with torch.no_grad():
        result = compute()
    if entry is None:
        weakref.finalize(weight, _entries.pop, key, None)
    _entries[key] = _Entry(identity, tuple(None if t is None else t.clone() for t in values),
                           target, result)
    return result


def fold(weight: Tensor, bias: Optional[Tensor], scale: Tensor, shift: Tensor,
         centre: Optional[Tensor], target: object = None,
         pack: Optional[Callable[[Tensor], Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """The folded (weight', bias'), ``pack(weight')`` when ``pack`` is given,
    from the cache when nothing it depends on has changed. ``target`` names
    what ``pack`` packs for (it is part of the key)."""
    def compute():
        w, b = fold_now(weight, bias, scale, shift, centre)
        return (pack(w) if pack else w), b
    return cached(weight, (bias, scale, shift, centre), ("fold", target), compute)
