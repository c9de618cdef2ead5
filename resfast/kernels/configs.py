"""Launch configurations of the Triton conv kernels (:mod:`resfast.kernels.conv2d_bn`).

Every tile size, warp count, pipeline depth and dot precision the launchers use
comes from here, each with the reason behind it, so that the GPU launch, the
sm_90 compile test (tests/kernels/conv2d_bn_sm90.py) and a reader see one set of
choices. Under the Triton interpreter (TRITON_INTERPRET=1, the tests on a CPU)
the choices are different on purpose: there every ``tl`` op costs Python
overhead whatever its size, so the tiles are the smallest legal ones.
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..dtypes import stats_dtype
from . import interpreting

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float32: tl.float32, torch.float64: tl.float64}


class DotConfig(NamedTuple):
    """How ``tl.dot`` runs: operand dtype, accumulator dtype, float32 precision."""

    operand: object  # a tl dtype
    acc: object  # a tl dtype
    precision: Optional[str]

    def constexprs(self) -> dict:
        return dict(DOT_DTYPE=self.operand, ACC_DTYPE=self.acc, DOT_PRECISION=self.precision)


class GemmTiles(NamedTuple):
    """Tiles of the forward and dgrad GEMMs: BLOCK_M output rows (pixels) by
    BLOCK_N output columns (channels), BLOCK_K channels reduced per step."""

    block_m: int
    block_n: int
    block_k: int

    def constexprs(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k)


class WgradTiles(NamedTuple):
    """Tiles of the wgrad GEMM: a (BLOCK_CO x BLOCK_CI) block of one tap's
    weight gradient, reducing BLOCK_M output pixels per step."""

    block_m: int
    block_co: int
    block_ci: int

    def constexprs(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_CO=self.block_co, BLOCK_CI=self.block_ci)


class LaunchOptions(NamedTuple):
    """num_warps / num_stages of a launch; None: Triton's default (the interpreter takes none)."""

    num_warps: Optional[int] = None
    num_stages: Optional[int] = None

    def kwargs(self) -> dict:
        return {k: v for k, v in self._asdict().items() if v is not None}


def dot_config(dtype: torch.dtype, allow_tf32: bool = False) -> DotConfig:
    """Accumulate in float32 (float64 for float64). Operands stay in the input
    dtype: bf16/fp16 on tensor cores (wgmma on sm_90); float32 as TF32 on tensor
    cores where torch allows TF32 for its own convolutions (``allow_tf32``, which
    the op reads from torch's settings), else as IEEE float32, so that float32
    results match float32 references; float64 as float64. The interpreter
    computes half-type dots wrongly: there the operands are the accumulator dtype."""
    acc = _TL_DTYPE[stats_dtype(dtype)]
    operand = acc if interpreting() else _TL_DTYPE[dtype]
    precision = None
    if dtype == torch.float32:
        precision = "tf32" if allow_tf32 else "ieee"
    return DotConfig(operand, acc, precision)


def tile_cap(dtype: torch.dtype) -> int:
    """The widest tile side: 128 for half types; 64 for float32/64, whose IEEE
    dots run on FMA units and spill registers at 128x64 (sm_90, ptxas)."""
    return 128 if dtype.itemsize <= 2 else 64


# The smallest K block a tl.dot takes. A tap with fewer input channels than this
# (the 7x7 stem's 3 RGB channels) would leave most of every K block zero (13 of
# 16: ~5x the MMA work), so such convolutions reduce over the taps folded into
# K instead: one flat index (kh, kw, ci) per column of the A tile.
MIN_BLOCK_K = 16


def fold_taps(ci: int) -> bool:
    """Whether the GEMMs reduce over the flat (kh, kw, ci) index instead of tap by tap."""
    return ci < MIN_BLOCK_K


def group_m() -> int:
    """Row tiles per group of the forward and dgrad grids: a group's programs sweep
    every column tile of GROUP_M row tiles before the next group starts, so those
    rows of x (or grad_y) are read from DRAM once and then from L2, not once per
    column tile. 8 x 128 rows of 64-256 channels is 128-512 KiB of bf16, well within
    L2. Under the interpreter 2, so that the tests' few row tiles still form
    several groups, the last one partial."""
    return 2 if interpreting() else 8


def gemm_tiles(n_cols: int, n_red: int, dtype: torch.dtype) -> GemmTiles:
    """Tiles for a GEMM with ``n_cols`` output columns and ``n_red`` values reduced
    per K step (the channels of a tap, or every (kh, kw, ci) when taps are folded).

    On the GPU: ``tile_cap``-row tiles, channel blocks as wide as the channels
    (16..cap output columns, 16..cap/2 reduced). Under the interpreter the
    smallest GPU-legal channel blocks (16) and 32-row tiles keep the tests' tiny
    shapes at a few programs while still spanning several row tiles.
    """
    if interpreting():
        return GemmTiles(32, 16, MIN_BLOCK_K)
    cap = tile_cap(dtype)
    return GemmTiles(cap, min(cap, max(16, triton.next_power_of_2(n_cols))),
                     min(cap // 2, max(MIN_BLOCK_K, triton.next_power_of_2(n_red))))


def wgrad_tiles(co: int, n_cols: int, dtype: torch.dtype) -> WgradTiles:
    """(Co, columns) tiles of the weight gradient, the columns being one tap's Ci
    channels or the folded (kh, kw, ci) index, as wide as those (16..cap); half-cap
    output pixels per step. Under the interpreter the smallest legal ones."""
    if interpreting():
        return WgradTiles(32, 16, MIN_BLOCK_K)
    cap = tile_cap(dtype)
    return WgradTiles(cap // 2, min(cap, max(16, triton.next_power_of_2(co))),
                      min(cap, max(MIN_BLOCK_K, triton.next_power_of_2(n_cols))))


def wgrad_rows_per_split(tiles: WgradTiles, n_tiles: int, m: int, device: torch.device) -> int:
    """Output pixels each wgrad program reduces: the m pixels are split so that
    (n_tiles weight tiles x splits) programs fill the GPU, 4 per SM; the partial
    sums are then added by one small kernel. Under the interpreter two splits per
    tile, so that the sum runs."""
    if interpreting():
        target_programs = 2 * n_tiles
    else:
        target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(m, tiles.block_m)
    splits = max(1, min(row_blocks, triton.cdiv(target_programs, n_tiles)))
    return triton.cdiv(row_blocks, splits) * tiles.block_m


class ReduceTiles(NamedTuple):
    """Blocks of the small kernels that finish a conv: BLOCK_T per-tile statistics
    of BLOCK_C channels per step (merge), BLOCK elements per program (partial sums)."""

    block_t: int
    block_c: int
    block: int


def reduce_tiles() -> ReduceTiles:
    """64 tiles x 32 channels per merge step (8 KiB of float32 in flight per
    program), 1024 elements per partial-sum program; under the interpreter 4 x 16
    and 256, so that the tests' few tiles and channels still take several steps."""
    return ReduceTiles(4, 16, 256) if interpreting() else ReduceTiles(64, 32, 1024)


def launch_options(tile_elems: int, dtype: torch.dtype) -> LaunchOptions:
    """8 warps for an output tile of 128x128 accumulators or more, else 4; 3
    pipeline stages for half types, 2 for float32/64, whose operand tiles are
    twice the bytes and fit fewer stages in shared memory. Nothing under the
    interpreter."""
    if interpreting():
        return LaunchOptions()
    return LaunchOptions(num_warps=8 if tile_elems >= 128 * 128 else 4,
                         num_stages=3 if dtype.itemsize <= 2 else 2)
