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


def dot_config(dtype: torch.dtype) -> DotConfig:
    """Accumulate in float32 (float64 for float64). Operands stay in the input
    dtype: bf16/fp16 on tensor cores (wgmma on sm_90), float32 and float64 as
    IEEE (no tf32), so float32 results match float32 references. The
    interpreter computes half-type dots wrongly: there the operands are the
    accumulator dtype."""
    acc = _TL_DTYPE[stats_dtype(dtype)]
    operand = acc if interpreting() else _TL_DTYPE[dtype]
    return DotConfig(operand, acc, "ieee" if dtype == torch.float32 else None)


def tile_cap(dtype: torch.dtype) -> int:
    """The widest tile side: 128 for half types; 64 for float32/64, whose IEEE
    dots run on FMA units and spill registers at 128x64 (sm_90, ptxas)."""
    return 128 if dtype.itemsize <= 2 else 64


def gemm_tiles(n_cols: int, n_red: int, dtype: torch.dtype) -> GemmTiles:
    """Tiles for a GEMM with ``n_cols`` output columns and ``n_red`` channels reduced per tap.

    On the GPU: ``tile_cap``-row tiles, channel blocks as wide as the channels
    (16..cap output columns, 16..cap/2 reduced). Under the interpreter the
    smallest GPU-legal channel blocks (16) and 32-row tiles keep the tests' tiny
    shapes at a few programs while still spanning several row tiles.
    """
    if interpreting():
        return GemmTiles(32, 16, 16)
    cap = tile_cap(dtype)
    return GemmTiles(cap, min(cap, max(16, triton.next_power_of_2(n_cols))),
                     min(cap // 2, max(16, triton.next_power_of_2(n_red))))


def wgrad_tiles(co: int, ci: int, dtype: torch.dtype) -> WgradTiles:
    """(Co, Ci) tiles per tap as wide as the channels (16..cap), half-cap output
    pixels per step; under the interpreter the smallest legal ones."""
    if interpreting():
        return WgradTiles(32, 16, 16)
    cap = tile_cap(dtype)
    return WgradTiles(cap // 2, min(cap, max(16, triton.next_power_of_2(co))),
                      min(cap, max(16, triton.next_power_of_2(ci))))


def wgrad_rows_per_split(tiles: WgradTiles, co: int, ci: int, m: int, taps: int,
                         device: torch.device) -> int:
    """Output pixels each wgrad program reduces: the m pixels are split so that
    (tiles x splits) programs fill the GPU, 4 per SM; partial sums are added on
    the host. Under the interpreter two splits per tile, so the merge runs."""
    n_tiles = triton.cdiv(co, tiles.block_co) * taps * triton.cdiv(ci, tiles.block_ci)
    if interpreting():
        target_programs = 2 * n_tiles
    else:
        target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(m, tiles.block_m)
    splits = max(1, min(row_blocks, triton.cdiv(target_programs, n_tiles)))
    return triton.cdiv(row_blocks, splits) * tiles.block_m


def launch_options(tile_elems: int, dtype: torch.dtype) -> LaunchOptions:
    """8 warps for an output tile of 128x128 accumulators or more, else 4; 3
    pipeline stages for half types, 2 for float32/64, whose operand tiles are
    twice the bytes and fit fewer stages in shared memory. Nothing under the
    interpreter."""
    if interpreting():
        return LaunchOptions()
    return LaunchOptions(num_warps=8 if tile_elems >= 128 * 128 else 4,
                         num_stages=3 if dtype.itemsize <= 2 else 2)
