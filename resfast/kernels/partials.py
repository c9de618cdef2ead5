"""The small kernels that finish the conv kernels' partial results, one launch each.

The forward kernel leaves per-row-tile (mean, M2) of every channel; the wgrad kernel
leaves partial weight and bias gradients per split of the output pixels. Merging them
with torch ops took about ten launches per conv (counts, products, sums, a permute and a
cast); here each is one pass that also writes its result in the dtype and layout the op
returns.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .configs import reduce_tiles


@triton.jit
def _merge_tile_stats_kernel(part_mean_ptr, part_m2_ptr, mean_ptr, var_ptr, M, Co, n_tiles,
                             ROWS_PER_TILE: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """Chan's merge of the tiles' (mean, M2) into the mean and biased variance over M rows.

    Tile t holds min(ROWS_PER_TILE, M - t * ROWS_PER_TILE) rows. mean = sum(n_t mean_t) / M,
    then M2 = sum(M2_t) + sum(n_t (mean_t - mean)^2): only deviations are squared, so a
    large |mean| does not cancel the variance away.
    """
    co = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    co_ok = co < Co
    acc_dtype = part_mean_ptr.dtype.element_ty
    total = tl.zeros((BLOCK_C,), acc_dtype)
    for t0 in range(0, n_tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < n_tiles)[:, None] & co_ok[None, :]
        count = tl.minimum(M - t * ROWS_PER_TILE, ROWS_PER_TILE).to(acc_dtype)
        tile_mean = tl.load(part_mean_ptr + t.to(tl.int64)[:, None] * Co + co[None, :], mask=mask,
                            other=0.0)
        total += tl.sum(tl.where(mask, count[:, None] * tile_mean, 0.0), axis=0)
    mean = total / M
    m2 = tl.zeros((BLOCK_C,), acc_dtype)
    for t0 in range(0, n_tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < n_tiles)[:, None] & co_ok[None, :]
        count = tl.minimum(M - t * ROWS_PER_TILE, ROWS_PER_TILE).to(acc_dtype)
        offs = t.to(tl.int64)[:, None] * Co + co[None, :]
        dev = tl.load(part_mean_ptr + offs, mask=mask, other=0.0) - mean[None, :]
        tile_m2 = tl.load(part_m2_ptr + offs, mask=mask, other=0.0)
        m2 += tl.sum(tl.where(mask, tile_m2 + count[:, None] * dev * dev, 0.0), axis=0)
    tl.store(mean_ptr + co, mean, mask=co_ok)
    tl.store(var_ptr + co, m2 / M, mask=co_ok)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, splits, n, Ci, s_co, s_ci, s_kh, s_kw,
                         KSIZE: tl.constexpr, BLOCK: tl.constexpr):
    """out[co, ci, kh, kw] = sum over s of part[s, co, (kh * KSIZE + kw) * Ci + ci], written
    in out's dtype at out's strides (s_co, s_ci, s_kh, s_kw); part is (splits, n) with
    n = Co * KSIZE * KSIZE * Ci. A bias is the case KSIZE = Ci = 1."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = j < n
    acc = tl.zeros((BLOCK,), part_ptr.dtype.element_ty)
    ptr = part_ptr + j
    for _ in range(splits):
        acc += tl.load(ptr, mask=ok, other=0.0)
        ptr += n
    kkci = KSIZE * KSIZE * Ci
    co = j // kkci
    col = j - co * kkci
    tap = col // Ci
    ci = col - tap * Ci
    kh = tap // KSIZE
    kw = tap - kh * KSIZE
    tl.store(out_ptr + co * s_co + ci * s_ci + kh * s_kh + kw * s_kw,
             acc.to(out_ptr.dtype.element_ty), mask=ok)


def merge_tile_stats(part_mean: Tensor, part_m2: Tensor, m: int,
                     rows_per_tile: int) -> tuple[Tensor, Tensor]:
    """(mean, biased var) over m rows from per-tile (mean, M2) of shape (tiles, Co)."""
    n_tiles, co = part_mean.shape
    mean = torch.empty((co,), dtype=part_mean.dtype, device=part_mean.device)
    var = torch.empty_like(mean)
    tiles = reduce_tiles()
    _merge_tile_stats_kernel[(triton.cdiv(co, tiles.block_c),)](
        part_mean, part_m2, mean, var, m, co, n_tiles, ROWS_PER_TILE=rows_per_tile,
        BLOCK_T=tiles.block_t, BLOCK_C=tiles.block_c)
    return mean, var


def sum_weight_partials(part: Tensor, weight: Tensor) -> Tensor:
    """The sum over splits of part (splits, Co, K*K*Ci; columns (kh, kw, ci)) as a tensor
    like ``torch.empty_like(weight)``: weight's dtype and strides, as the op's fake says."""
    out = torch.empty_like(weight)
    co, ci, k, _ = weight.shape
    _launch_sum(part, out, ci, k, out.stride())
    return out


def sum_bias_partials(part: Tensor, dtype: torch.dtype) -> Tensor:
    """The sum over splits of part (splits, Co), in dtype."""
    out = torch.empty((part.shape[1],), dtype=dtype, device=part.device)
    _launch_sum(part, out, 1, 1, (1, 0, 0, 0))
    return out


def _launch_sum(part: Tensor, out: Tensor, ci: int, k: int, strides) -> None:
    n = out.numel()
    block = reduce_tiles().block
    _sum_partials_kernel[(triton.cdiv(n, block),)](part, out, part.shape[0], n, ci, *strides,
                                                   KSIZE=k, BLOCK=block)
