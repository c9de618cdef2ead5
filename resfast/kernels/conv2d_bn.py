"""Implicit-GEMM convolution over NHWC with the BatchNorm fusions around it.

Forward (one kernel, ``_conv2d_bn_forward_kernel``), a GEMM of
(output pixels) x (K*K*Ci) by (K*K*Ci) x Co:

    a = [relu](x * in_scale + in_shift)      prologue, applied while x is loaded;
                                             padded taps are 0 *after* it
    y = conv2d(a, weight, stride, padding, dilation) + bias,  [relu(y)] with out_relu
    per-tile (mean, M2) of y per channel     epilogue, merged by Chan's formula into the
                                             mean and biased var (resfast.kernels.partials)

Backward, with g = grad_y * [y > 0] + (grad_mean + 2 (y - mean) grad_var) / count
formed while grad_y is loaded (never materialized):

    grad_a       ``_conv2d_bn_dgrad_kernel``: GEMM of (input pixels) x (K*K*Co) by
                 (K*K*Co) x Ci; output pixel (ih + padding - kh * dilation) / stride where
                 divisible
    grad_weight  ``_conv2d_bn_wgrad_kernel``: GEMM of g^T by a (a recomputed from x) and
    grad_bias    column sums of g, split over output pixels into partials that one small
                 kernel sums into the weight's dtype and layout

The K dimension runs tap by tap, a block of channels at a time; with fewer input
channels than the smallest K block (the 7x7 stem over RGB) the taps are folded into K
instead (``FLAT_K``: one (kh, kw, ci) index per column), so no K block is mostly zeros.
ReLU follows torch: NaN passes the forward, and the backward keeps the gradient
wherever y is not <= 0 (as ``threshold_backward``), NaN y included.

Elementwise math (prologue, g, epilogue, statistics) runs in the accumulator dtype,
float32 (float64 for float64 input). ``tl.dot`` gets operands in the input dtype
(bf16/fp16 on tensor cores, float32 as IEEE fp32 or TF32 as torch's settings allow,
float64 as float64), except under the Triton interpreter, which computes bfloat16 wrongly:
there half types stay float32. Without a prologue (or a gradient transform) a tile goes
from memory to the dot as loaded, which lets the compiler keep it in shared memory.
Tiles, warps, pipeline depths and dot precision: :mod:`resfast.kernels.configs`.

The weight is read where it is, at its strides, with the input channels innermost (a
channels_last weight, or any 1x1 one; others are made channels_last first): no GEMM-layout
copy per call, and nothing cached that an in-place update through ``.data`` (which does
not bump the version counter) could leave stale. Only the folded-tap forward copies its
(small) weight into a (K*K*Ci) x Co matrix, whose rows load as aligned vectors.

The kernels are launched directly (``kernel[grid](...)``) from inside the op, under a
guard that makes x's GPU the current device: the op is opaque to torch.compile, so
``torch.library.wrap_triton``'s tracing machinery would only add Python work and a global
table entry per launch.

float64 is test-only here: the op keeps float64 on ATen (tensor cores have no float64
path worth a kernel, and ATen keeps gradcheck exact), so it never launches these kernels
in float64. The variant stays because the kernel tests (tests/kernels/test_conv2d_bn.py)
compare its index logic with float64 references at rounding level, 1e-12, where a wrong
mask or offset cannot hide in float32 noise, and the sm_90 compile test covers it.
"""
import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..dtypes import stats_dtype
from . import interpreting
from .configs import (
    dot_config,
    fold_taps,
    gemm_tiles,
    group_m,
    launch_options,
    wgrad_rows_per_split,
    wgrad_tiles,
)
from .partials import merge_tile_stats, sum_bias_partials, sum_weight_partials

_CL = torch.channels_last
# float64: tests only (see above)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- device helpers --------------------------------------------------------------------

@triton.jit
def _split_pixel(rows, H, W):
    """Flat NHW pixel index -> (n, h, w)."""
    w = rows % W
    t = rows // W
    return t // H, t % H, w


@triton.jit
def _grouped_tile(pid, n_rows, n_cols, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program pid: programs take GROUP_M row tiles through every
    column tile before the next group starts, so those rows are re-read from L2."""
    per_group = GROUP_M * n_cols
    first_row = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_rows - first_row, GROUP_M)
    in_group = pid % per_group
    return first_row + in_group % group_rows, in_group // group_rows


@triton.jit
def _relu(v):
    """max(v, 0) keeping NaN, as torch.relu does (tl.maximum's default turns NaN into 0)."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _tap_tile(n, oh, ow, row_ok, tap, ci, H, W, Ci, KSIZE: tl.constexpr, STRIDE: tl.constexpr,
              PAD: tl.constexpr, DIL: tl.constexpr):
    """Offsets and mask of x at (output pixels n, oh, ow) x (channels ci) through one tap."""
    ih = oh * STRIDE - PAD + (tap // KSIZE) * DIL
    iw = ow * STRIDE - PAD + (tap % KSIZE) * DIL
    pix_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    base = ((n.to(tl.int64) * H + ih) * W + iw) * Ci
    return base[:, None] + ci[None, :], pix_ok[:, None] & (ci < Ci)[None, :]


@triton.jit
def _flat_tile(n, oh, ow, row_ok, kidx, H, W, Ci, KSIZE: tl.constexpr, STRIDE: tl.constexpr,
               PAD: tl.constexpr, DIL: tl.constexpr):
    """Offsets, mask and channel of x at (output pixels n, oh, ow) x (folded reduction
    indices kidx = (kh * KSIZE + kw) * Ci + ci)."""
    tap = kidx // Ci
    ci = kidx - tap * Ci
    kh = (tap // KSIZE) * DIL  # the tap's row and column offsets in x
    kw = (tap % KSIZE) * DIL
    ih0 = oh * STRIDE - PAD
    iw0 = ow * STRIDE - PAD
    ih = ih0[:, None] + kh[None, :]
    iw = iw0[:, None] + kw[None, :]
    ok = (row_ok[:, None] & (kidx < KSIZE * KSIZE * Ci)[None, :] & (ih >= 0) & (ih < H)
          & (iw >= 0) & (iw < W))
    # ((n H + ih) W + iw) Ci + ci, split into a per-row and a per-column term
    row_base = ((n.to(tl.int64) * H + ih0) * W + iw0) * Ci
    return row_base[:, None] + ((kh * W + kw) * Ci + ci)[None, :], ok, ci


@triton.jit
def _input_tile(x_ptr, scale_ptr, shift_ptr, offs, mask, ci, ci_ok,
                HAS_AFFINE: tl.constexpr, IN_RELU: tl.constexpr, ACC_DTYPE: tl.constexpr,
                OUT_DTYPE: tl.constexpr):
    """a = [relu](x * scale[ci] + shift[ci]) at offs, 0 where masked (padding), in OUT_DTYPE."""
    if HAS_AFFINE or IN_RELU:
        a = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        if HAS_AFFINE:
            scale = tl.load(scale_ptr + ci, mask=ci_ok, other=0.0).to(ACC_DTYPE)
            shift = tl.load(shift_ptr + ci, mask=ci_ok, other=0.0).to(ACC_DTYPE)
            a = a * scale[None, :] + shift[None, :]
        if IN_RELU:
            a = _relu(a)
        # the shift would make padding nonzero: zero it after the prologue
        tile = tl.where(mask, a, 0.0).to(OUT_DTYPE)
    else:
        # nothing to apply: straight from memory to the dot, the padding being the load's 0
        tile = tl.load(x_ptr + offs, mask=mask, other=0.0).to(OUT_DTYPE)
    return tile


@triton.jit
def _load_grad_out(gy_ptr, y_ptr, gmean_ptr, gvar_ptr, mean_ptr, rows, row_ok, co, Co, count,
                   HAS_GY: tl.constexpr, HAS_GMEAN: tl.constexpr, HAS_GVAR: tl.constexpr,
                   OUT_RELU: tl.constexpr, ACC_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Effective output gradient g[row, co] (see module doc) in OUT_DTYPE; 0 where masked."""
    co_ok = co < Co
    mask = row_ok[:, None] & co_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * Co + co[None, :]
    if HAS_GY and not (OUT_RELU or HAS_GMEAN or HAS_GVAR):
        # grad_y as it is: straight from memory to the dot
        tile = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(OUT_DTYPE)
    else:
        g = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
        if OUT_RELU or HAS_GVAR:
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        if HAS_GY:
            g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            if OUT_RELU:
                # torch's threshold_backward: 0 where y <= 0, the gradient elsewhere (NaN y too)
                g = tl.where(y <= 0, 0.0, g)
        if HAS_GMEAN:
            g += tl.load(gmean_ptr + co, mask=co_ok, other=0.0).to(ACC_DTYPE)[None, :] / count
        if HAS_GVAR:
            mean = tl.load(mean_ptr + co, mask=co_ok, other=0.0).to(ACC_DTYPE)
            gvar = tl.load(gvar_ptr + co, mask=co_ok, other=0.0).to(ACC_DTYPE)
            g += 2.0 * (y - mean[None, :]) * (gvar / count)[None, :]
        tile = tl.where(mask, g, 0.0).to(OUT_DTYPE)
    return tile


@triton.jit
def _store_tile_stats(acc, row_ok, co, pid_m, M, Co, part_mean_ptr, part_m2_ptr,
                      BLOCK_M: tl.constexpr):
    """Per-channel mean and sum of squared deviations of this tile's rows (two passes in registers,
    so no E[y^2] - E[y]^2 cancellation)."""
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(acc.dtype)
    tile_mean = tl.sum(tl.where(row_ok[:, None], acc, 0.0), axis=0) / count
    dev = tl.where(row_ok[:, None], acc - tile_mean[None, :], 0.0)
    co_ok = co < Co
    tl.store(part_mean_ptr + pid_m * Co + co, tile_mean, mask=co_ok)
    tl.store(part_m2_ptr + pid_m * Co + co, tl.sum(dev * dev, axis=0), mask=co_ok)


# ---- kernels ---------------------------------------------------------------------------

@triton.jit
def _conv2d_bn_forward_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, y_ptr, part_mean_ptr, part_m2_ptr,
    H, W, Ci, OH, OW, Co, M, w_s_co, w_s_kh, w_s_kw,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_AFFINE: tl.constexpr, IN_RELU: tl.constexpr,
    OUT_RELU: tl.constexpr, STATS: tl.constexpr, FLAT_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M output pixels) x (BLOCK_N output channels) tile of y.

    w[co, ci, kh, kw] is at w_ptr + co * w_s_co + kh * w_s_kh + kw * w_s_kw + ci, or with
    FLAT_K at w_ptr + ((kh * KSIZE + kw) * Ci + ci) * Co + co (a (K*K*Ci) x Co matrix).
    """
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(Co, BLOCK_N),
                                 GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    n, oh, ow = _split_pixel(rows, OH, OW)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Co

    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    if FLAT_K:
        n_red = KSIZE * KSIZE * Ci
        for k0 in range(0, n_red, BLOCK_K):
            kidx = k0 + tl.arange(0, BLOCK_K)
            k_ok = kidx < n_red
            offs, mask, ci = _flat_tile(n, oh, ow, row_ok, kidx, H, W, Ci, KSIZE, STRIDE, PAD,
                                        DIL)
            a = _input_tile(x_ptr, scale_ptr, shift_ptr, offs, mask, ci, k_ok, HAS_AFFINE,
                            IN_RELU, ACC_DTYPE, DOT_DTYPE)
            w = tl.load(w_ptr + kidx[:, None] * Co + co[None, :],
                        mask=k_ok[:, None] & co_ok[None, :], other=0.0)
            acc = tl.dot(a, w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                         out_dtype=ACC_DTYPE)
    else:
        n_cblocks = tl.cdiv(Ci, BLOCK_K)
        # one flat loop over (tap, channel block): the software pipeliner sees all iterations
        for kk in range(KSIZE * KSIZE * n_cblocks):
            tap = kk // n_cblocks
            ci = (kk - tap * n_cblocks) * BLOCK_K + tl.arange(0, BLOCK_K)
            offs, mask = _tap_tile(n, oh, ow, row_ok, tap, ci, H, W, Ci, KSIZE, STRIDE, PAD,
                                   DIL)
            a = _input_tile(x_ptr, scale_ptr, shift_ptr, offs, mask, ci, ci < Ci, HAS_AFFINE,
                            IN_RELU, ACC_DTYPE, DOT_DTYPE)
            w_tap = (tap // KSIZE) * w_s_kh + (tap % KSIZE) * w_s_kw
            w = tl.load(w_ptr + w_tap + ci[:, None] + co[None, :] * w_s_co,
                        mask=(ci < Ci)[:, None] & co_ok[None, :], other=0.0)
            acc = tl.dot(a, w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                         out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(ACC_DTYPE)[None, :]
    if OUT_RELU:
        acc = _relu(acc)
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * Co + co[None, :], y,
             mask=row_ok[:, None] & co_ok[None, :])
    if STATS:
        # statistics of y as stored, so that BN normalizes exactly the values it reads back
        _store_tile_stats(y.to(ACC_DTYPE), row_ok, co, pid_m, M, Co, part_mean_ptr, part_m2_ptr,
                          BLOCK_M)


@triton.jit
def _conv2d_bn_dgrad_kernel(
    gy_ptr, y_ptr, gmean_ptr, gvar_ptr, mean_ptr, w_ptr, ga_ptr,
    H, W, Ci, OH, OW, Co, M_in, count, w_s_co, w_s_kh, w_s_kw,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
    HAS_GY: tl.constexpr, HAS_GMEAN: tl.constexpr, HAS_GVAR: tl.constexpr, OUT_RELU: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M input pixels) x (BLOCK_N input channels) tile of grad_a; w as in the
    forward kernel, read as the (K*K*Co) x Ci matrix."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M_in, BLOCK_M), tl.cdiv(Ci, BLOCK_N),
                                 GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M_in
    n, ih, iw = _split_pixel(rows, H, W)
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci < Ci

    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    n_cblocks = tl.cdiv(Co, BLOCK_K)
    for kk in range(KSIZE * KSIZE * n_cblocks):
        tap = kk // n_cblocks
        co = (kk - tap * n_cblocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        # the output pixel that reads (ih, iw) through this tap, if any; clamp before % and //
        # because their rounding of negatives differs between the GPU and the interpreter
        th = ih + PAD - (tap // KSIZE) * DIL
        tw = iw + PAD - (tap % KSIZE) * DIL
        thc = tl.maximum(th, 0)
        twc = tl.maximum(tw, 0)
        oh = thc // STRIDE
        ow = twc // STRIDE
        hit = (row_ok & (th >= 0) & (tw >= 0) & (thc % STRIDE == 0) & (twc % STRIDE == 0)
               & (oh < OH) & (ow < OW))
        g = _load_grad_out(gy_ptr, y_ptr, gmean_ptr, gvar_ptr, mean_ptr, (n * OH + oh) * OW + ow,
                           hit, co, Co, count, HAS_GY, HAS_GMEAN, HAS_GVAR, OUT_RELU, ACC_DTYPE,
                           DOT_DTYPE, BLOCK_M, BLOCK_K)
        w_tap = (tap // KSIZE) * w_s_kh + (tap % KSIZE) * w_s_kw
        w = tl.load(w_ptr + w_tap + co[:, None] * w_s_co + ci[None, :],
                    mask=(co < Co)[:, None] & ci_ok[None, :], other=0.0)
        acc = tl.dot(g, w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)

    tl.store(ga_ptr + rows.to(tl.int64)[:, None] * Ci + ci[None, :],
             acc.to(ga_ptr.dtype.element_ty), mask=row_ok[:, None] & ci_ok[None, :])


@triton.jit
def _conv2d_bn_wgrad_kernel(
    x_ptr, scale_ptr, shift_ptr, gy_ptr, y_ptr, gmean_ptr, gvar_ptr, mean_ptr, gw_part_ptr,
    gb_part_ptr, H, W, Ci, OH, OW, Co, M, rows_per_split,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
    HAS_AFFINE: tl.constexpr, IN_RELU: tl.constexpr,
    HAS_GY: tl.constexpr, HAS_GMEAN: tl.constexpr, HAS_GVAR: tl.constexpr, OUT_RELU: tl.constexpr,
    WANT_W: tl.constexpr, WANT_B: tl.constexpr, FLAT_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    """Partial grad_weight[co, (kh, kw, ci)] (and grad_bias[co]) over one split of the output
    pixels.

    Grid: (Co blocks, column blocks, splits), the columns being a tap's Ci blocks in turn, or
    blocks of the folded (kh, kw, ci) index with FLAT_K; partials are (splits, Co, K*K*Ci)
    and (splits, Co). grad_bias comes from the programs of the first column block only.
    """
    co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    kkci = KSIZE * KSIZE * Ci
    if FLAT_K:
        col = pid_k * BLOCK_CI + tl.arange(0, BLOCK_CI)
        col_ok = col < kkci
    else:
        n_cblocks = tl.cdiv(Ci, BLOCK_CI)
        tap = pid_k // n_cblocks
        ci = (pid_k - tap * n_cblocks) * BLOCK_CI + tl.arange(0, BLOCK_CI)
        col = tap * Ci + ci
        col_ok = ci < Ci

    acc_w = tl.zeros((BLOCK_CO, BLOCK_CI), ACC_DTYPE)
    acc_b = tl.zeros((BLOCK_CO,), ACC_DTYPE)
    row_start = split * rows_per_split
    for r0 in range(row_start, tl.minimum(row_start + rows_per_split, M), BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        g = _load_grad_out(gy_ptr, y_ptr, gmean_ptr, gvar_ptr, mean_ptr, rows, row_ok, co, Co, M,
                           HAS_GY, HAS_GMEAN, HAS_GVAR, OUT_RELU, ACC_DTYPE, ACC_DTYPE, BLOCK_M,
                           BLOCK_CO)
        if WANT_W:
            n, oh, ow = _split_pixel(rows, OH, OW)
            if FLAT_K:
                offs, mask, ci_of_col = _flat_tile(n, oh, ow, row_ok, col, H, W, Ci, KSIZE,
                                                   STRIDE, PAD, DIL)
            else:
                offs, mask = _tap_tile(n, oh, ow, row_ok, tap, ci, H, W, Ci, KSIZE, STRIDE, PAD,
                                       DIL)
                ci_of_col = ci
            a = _input_tile(x_ptr, scale_ptr, shift_ptr, offs, mask, ci_of_col, col_ok,
                            HAS_AFFINE, IN_RELU, ACC_DTYPE, DOT_DTYPE)
            acc_w = tl.dot(tl.trans(g.to(DOT_DTYPE)), a, acc_w, input_precision=DOT_PRECISION,
                           out_dtype=ACC_DTYPE)
        if WANT_B:
            acc_b += tl.sum(g, axis=0)

    co_ok = co < Co
    if WANT_W:
        offs = (split * Co + co).to(tl.int64)[:, None] * kkci + col[None, :]
        tl.store(gw_part_ptr + offs, acc_w, mask=co_ok[:, None] & col_ok[None, :])
    if WANT_B:
        tl.store(gb_part_ptr + split * Co + co, acc_b, mask=co_ok & (pid_k == 0))


# ---- host side -------------------------------------------------------------------------

def _out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _check_preconditions(x: Tensor, weight: Tensor, **others) -> None:
    """What the kernels themselves need; the arguments are validated once, by the
    op (``resfast.ops.conv2d_bn.check_conv_inputs``): a dtype they compile for,
    one dtype for x and weight (the GEMM's), every tensor on x's device, and that
    device a GPU (or the CPU under the Triton interpreter)."""
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError("x must be a CUDA tensor (CPU tensors only under TRITON_INTERPRET=1), "
                         f"got {x.device}")
    for name, t in dict(weight=weight, **others).items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _on_device(device: torch.device):
    """Makes ``device`` current for the launches: Triton launches on the current device,
    which need not be the tensors' (a tensor on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _vector(t: Tensor | None) -> Tensor | None:
    """A per-channel vector as the kernels index it (element c at offset c): gradients such as
    that of ``mean.sum()`` arrive as stride-0 views of one element."""
    return None if t is None else t.contiguous()


def _weight_with_strides(weight: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """The weight with its input channels innermost (as is, when they are: channels_last, or
    1x1), and its (co, kh, kw) strides."""
    if weight.stride(1) != 1:
        weight = weight.contiguous(memory_format=_CL)
    return weight, (weight.stride(0), weight.stride(2), weight.stride(3))


def _flat_weight(weight: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """The weight as the (K*K*Ci) x Co matrix the folded-tap GEMM reads, its rows aligned
    vectors: a copy, of at most 15 K^2 Co values (taps are folded only below 16 channels)."""
    co, ci, k, _ = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(k * k * ci, co).contiguous(), (0, 0, 0)


def triton_conv2d_bn_forward(x: Tensor, weight: Tensor, bias: Tensor | None,
                             in_scale: Tensor | None, in_shift: Tensor | None, in_relu: bool,
                             stride: int, padding: int, stats: bool, out_relu: bool,
                             allow_tf32: bool = False,
                             dilation: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var), y = [relu](conv2d([relu](x * in_scale + in_shift), weight, stride,
    padding, dilation) + bias) in channels_last, with the per-channel mean and biased variance
    of y when stats (else empty). float32 dots run as TF32 with ``allow_tf32``."""
    _check_preconditions(x, weight, bias=bias, in_scale=in_scale, in_shift=in_shift)
    n, ci, h, w = x.shape
    co, k = weight.shape[0], weight.shape[2]
    oh, ow = _out_size(h, k, stride, padding, dilation), _out_size(w, k, stride, padding, dilation)
    sdt = stats_dtype(x.dtype)
    y = torch.empty((n, co, oh, ow), dtype=x.dtype, device=x.device, memory_format=_CL)
    m = n * oh * ow
    if m == 0:
        nan = torch.full((co,), float("nan"), dtype=sdt, device=x.device)
        return (y, nan, nan.clone()) if stats else (y, y.new_empty((0,), dtype=sdt),
                                                    y.new_empty((0,), dtype=sdt))

    x = x.contiguous(memory_format=_CL)
    bias, in_scale, in_shift = _vector(bias), _vector(in_scale), _vector(in_shift)
    flat = fold_taps(ci)
    weight, w_strides = _flat_weight(weight) if flat else _weight_with_strides(weight)
    tiles = gemm_tiles(co, k * k * ci if flat else ci, x.dtype)
    tiles_m = triton.cdiv(m, tiles.block_m)
    if stats:
        part_mean = torch.empty((tiles_m, co), dtype=sdt, device=x.device)
        part_m2 = torch.empty_like(part_mean)
    else:
        part_mean = part_m2 = y  # never read or written
    grid = (tiles_m * triton.cdiv(co, tiles.block_n),)
    with _on_device(x.device):
        _conv2d_bn_forward_kernel[grid](
            x, weight, y if bias is None else bias, y if in_scale is None else in_scale,
            y if in_shift is None else in_shift, y, part_mean, part_m2,
            h, w, ci, oh, ow, co, m, *w_strides,
            KSIZE=k, STRIDE=stride, PAD=padding, DIL=dilation,
            HAS_BIAS=bias is not None, HAS_AFFINE=in_scale is not None, IN_RELU=in_relu,
            OUT_RELU=out_relu, STATS=stats, FLAT_K=flat, GROUP_M=group_m(),
            **dot_config(x.dtype, allow_tf32).constexprs(), **tiles.constexprs(),
            **launch_options(tiles.block_m * tiles.block_n, x.dtype).kwargs())
        if not stats:
            return y, y.new_empty((0,), dtype=sdt), y.new_empty((0,), dtype=sdt)
        mean, var = merge_tile_stats(part_mean, part_m2, m, tiles.block_m)
    return y, mean, var


def triton_conv2d_bn_backward(grad_y: Tensor | None, grad_mean: Tensor | None,
                              grad_var: Tensor | None, x: Tensor, weight: Tensor, y: Tensor | None,
                              mean: Tensor | None, in_scale: Tensor | None, in_shift: Tensor | None,
                              in_relu: bool, stride: int, padding: int, out_relu: bool,
                              output_mask: list[bool], allow_tf32: bool = False,
                              dilation: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_a, grad_weight, grad_bias) of triton_conv2d_bn_forward, grad_a being w.r.t. the
    prologue output a (not x), in channels_last; grad_weight like ``empty_like(weight)``.
    Unselected outputs of output_mask are empty (0,) tensors, a new one each."""
    _check_preconditions(x, weight, in_scale=in_scale, in_shift=in_shift, grad_y=grad_y, y=y,
                         grad_mean=grad_mean, grad_var=grad_var, mean=mean)
    if y is None and (out_relu or grad_var is not None):
        raise ValueError("y is needed with out_relu or grad_var")
    if mean is None and grad_var is not None:
        raise ValueError("mean is needed with grad_var")
    n, ci, h, w = x.shape
    co, k = weight.shape[0], weight.shape[2]
    oh, ow = _out_size(h, k, stride, padding, dilation), _out_size(w, k, stride, padding, dilation)
    want_a, want_w, want_b = (bool(b) for b in output_mask)
    m = n * oh * ow
    if m == 0:
        return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_CL) if want_a
                else x.new_empty((0,)), torch.zeros_like(weight) if want_w else x.new_empty((0,)),
                weight.new_zeros((co,)) if want_b else x.new_empty((0,)))

    x = x.contiguous(memory_format=_CL)
    grads = dict(
        gy_ptr=x if grad_y is None else grad_y.contiguous(memory_format=_CL),
        y_ptr=x if y is None else y.contiguous(memory_format=_CL),
        gmean_ptr=x if grad_mean is None else _vector(grad_mean),
        gvar_ptr=x if grad_var is None else _vector(grad_var),
        mean_ptr=x if grad_var is None else _vector(mean),
        HAS_GY=grad_y is not None, HAS_GMEAN=grad_mean is not None, HAS_GVAR=grad_var is not None,
        OUT_RELU=out_relu)
    conv = dict(KSIZE=k, STRIDE=stride, PAD=padding, DIL=dilation,
                **dot_config(x.dtype, allow_tf32).constexprs())
    with _on_device(x.device):
        grad_a = _dgrad(x, weight, oh, ow, grads, conv) if want_a else x.new_empty((0,))
        grad_w, grad_b = (_wgrad(x, weight, _vector(in_scale), _vector(in_shift), in_relu, oh, ow,
                                 grads, conv, want_w, want_b)
                          if want_w or want_b else (None, None))
    return (grad_a, grad_w if want_w else x.new_empty((0,)),
            grad_b if want_b else x.new_empty((0,)))


def _dgrad(x, weight, oh, ow, grads, conv) -> Tensor:
    n, ci, h, w = x.shape
    co = weight.shape[0]
    grad_a = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_CL)
    weight, w_strides = _weight_with_strides(weight)
    tiles = gemm_tiles(ci, co, x.dtype)
    m_in = n * h * w
    grid = (triton.cdiv(m_in, tiles.block_m) * triton.cdiv(ci, tiles.block_n),)
    _conv2d_bn_dgrad_kernel[grid](
        w_ptr=weight, ga_ptr=grad_a, H=h, W=w, Ci=ci, OH=oh, OW=ow, Co=co, M_in=m_in,
        count=n * oh * ow, w_s_co=w_strides[0], w_s_kh=w_strides[1], w_s_kw=w_strides[2],
        GROUP_M=group_m(), **grads, **conv, **tiles.constexprs(),
        **launch_options(tiles.block_m * tiles.block_n, x.dtype).kwargs())
    return grad_a


def _wgrad(x, weight, in_scale, in_shift, in_relu, oh, ow, grads, conv, want_w, want_b):
    n, ci, h, w = x.shape
    co, k = weight.shape[0], weight.shape[2]
    m = n * oh * ow
    flat = fold_taps(ci)
    tiles = wgrad_tiles(co, k * k * ci if flat else ci, x.dtype)
    col_blocks = (triton.cdiv(k * k * ci, tiles.block_ci) if flat
                  else k * k * triton.cdiv(ci, tiles.block_ci))
    # without grad_weight only the first column block of programs is needed, for the bias
    col_blocks = col_blocks if want_w else 1
    co_blocks = triton.cdiv(co, tiles.block_co)
    rows_per_split = wgrad_rows_per_split(tiles, co_blocks * col_blocks, m, x.device)
    splits = triton.cdiv(m, rows_per_split)
    acc_dtype = stats_dtype(x.dtype)
    gw_part = torch.empty((splits, co, k * k * ci) if want_w else (0,), dtype=acc_dtype,
                          device=x.device)
    gb_part = torch.empty((splits, co) if want_b else (0,), dtype=acc_dtype, device=x.device)
    _conv2d_bn_wgrad_kernel[(co_blocks, col_blocks, splits)](
        x_ptr=x, scale_ptr=x if in_scale is None else in_scale,
        shift_ptr=x if in_shift is None else in_shift,
        gw_part_ptr=gw_part, gb_part_ptr=gb_part, H=h, W=w, Ci=ci, OH=oh, OW=ow, Co=co, M=m,
        HAS_AFFINE=in_scale is not None, IN_RELU=in_relu, WANT_W=want_w, WANT_B=want_b,
        FLAT_K=flat, rows_per_split=rows_per_split, **grads, **conv, **tiles.constexprs(),
        **launch_options(tiles.block_co * tiles.block_ci, x.dtype).kwargs())
    grad_w = sum_weight_partials(gw_part, weight) if want_w else None
    grad_b = sum_bias_partials(gb_part, weight.dtype) if want_b else None
    return grad_w, grad_b
