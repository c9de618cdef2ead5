"""Implicit-GEMM convolution over NHWC with the BatchNorm fusions around it.

Forward (one kernel, ``_conv2d_bn_forward_kernel``), a GEMM of
(output pixels) x (K*K*Ci) by (K*K*Ci) x Co:

    a = [relu](x * in_scale + in_shift)      prologue, applied while x is loaded;
                                             padded taps are 0 *after* it
    y = conv2d(a, weight, stride, padding) + bias,  [relu(y)] with out_relu
    per-tile (mean, M2) of y per channel     epilogue, merged on the host by
                                             Chan's formula into mean and biased var

Backward, with g = grad_y * [y > 0] + (grad_mean + 2 (y - mean) grad_var) / count
formed while grad_y is loaded (never materialized):

    grad_a       ``_conv2d_bn_dgrad_kernel``: GEMM of (input pixels) x (K*K*Co) by
                 (K*K*Co) x Ci; output pixel (ih + padding - kh) / stride where divisible
    grad_weight  ``_conv2d_bn_wgrad_kernel``: GEMM of g^T by a (a recomputed from x) and
    grad_bias    column sums of g, split over output pixels into partials summed on the host

Elementwise math (prologue, g, epilogue, statistics) runs in the accumulator dtype,
float32 (float64 for float64 input). ``tl.dot`` gets operands in the input dtype
(bf16/fp16 on tensor cores, float32 as IEEE fp32, float64 as float64), except under the
Triton interpreter, which computes bfloat16 wrongly: there half types stay float32.
Tiles, warps, pipeline depths and dot precision: :mod:`resfast.kernels.configs`.

float64 is test-only here: the op keeps float64 on ATen (tensor cores have no float64
path worth a kernel, and ATen keeps gradcheck exact), so it never launches these kernels
in float64. The variant stays because the kernel tests (tests/kernels/test_conv2d_bn.py)
compare its index logic with float64 references at rounding level, 1e-12, where a wrong
mask or offset cannot hide in float32 noise, and the sm_90 compile test covers it.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ..dtypes import stats_dtype
from . import interpreting
from .configs import dot_config, gemm_tiles, launch_options, wgrad_rows_per_split, wgrad_tiles

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
def _load_input_tile(x_ptr, scale_ptr, shift_ptr, n, ih, iw, row_ok, ci, H, W, Ci,
                     HAS_AFFINE: tl.constexpr, IN_RELU: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """a[pixel, ci] = [relu](x * scale + shift) at input pixels (n, ih, iw); 0 outside the image."""
    ci_ok = ci < Ci
    pix_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    mask = pix_ok[:, None] & ci_ok[None, :]
    base = ((n.to(tl.int64) * H + ih) * W + iw) * Ci
    a = tl.load(x_ptr + base[:, None] + ci[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    if HAS_AFFINE:
        scale = tl.load(scale_ptr + ci, mask=ci_ok, other=0.0).to(ACC_DTYPE)
        shift = tl.load(shift_ptr + ci, mask=ci_ok, other=0.0).to(ACC_DTYPE)
        a = a * scale[None, :] + shift[None, :]
    if IN_RELU:
        a = tl.maximum(a, 0.0)
    # the shift would make padding nonzero: zero it after the prologue
    return tl.where(mask, a, 0.0)


@triton.jit
def _load_grad_out(gy_ptr, y_ptr, gmean_ptr, gvar_ptr, mean_ptr, rows, row_ok, co, Co, count,
                   HAS_GY: tl.constexpr, HAS_GMEAN: tl.constexpr, HAS_GVAR: tl.constexpr,
                   OUT_RELU: tl.constexpr, ACC_DTYPE: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Effective output gradient g[row, co] (see module doc); 0 where masked."""
    co_ok = co < Co
    mask = row_ok[:, None] & co_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * Co + co[None, :]
    g = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
    if OUT_RELU or HAS_GVAR:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if HAS_GY:
        g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        if OUT_RELU:
            g = tl.where(y > 0, g, 0.0)
    if HAS_GMEAN:
        g += tl.load(gmean_ptr + co, mask=co_ok, other=0.0).to(ACC_DTYPE)[None, :] / count
    if HAS_GVAR:
        mean = tl.load(mean_ptr + co, mask=co_ok, other=0.0).to(ACC_DTYPE)
        gvar = tl.load(gvar_ptr + co, mask=co_ok, other=0.0).to(ACC_DTYPE)
        g += 2.0 * (y - mean[None, :]) * (gvar / count)[None, :]
    return tl.where(mask, g, 0.0)


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
    H, W, Ci, OH, OW, Co, M,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_AFFINE: tl.constexpr, IN_RELU: tl.constexpr,
    OUT_RELU: tl.constexpr, STATS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M output pixels) x (BLOCK_N output channels) tile of y; w is (K*K*Ci, Co)."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    n, oh, ow = _split_pixel(rows, OH, OW)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Co

    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    n_cblocks = tl.cdiv(Ci, BLOCK_K)
    # one flat loop over (tap, channel block): the software pipeliner sees all iterations
    for kk in range(KSIZE * KSIZE * n_cblocks):
        tap = kk // n_cblocks
        ci = (kk - tap * n_cblocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        ih = oh * STRIDE - PAD + tap // KSIZE
        iw = ow * STRIDE - PAD + tap % KSIZE
        a = _load_input_tile(x_ptr, scale_ptr, shift_ptr, n, ih, iw, row_ok, ci, H, W, Ci,
                             HAS_AFFINE, IN_RELU, ACC_DTYPE)
        w = tl.load(w_ptr + (tap * Ci + ci)[:, None] * Co + co[None, :],
                    mask=(ci < Ci)[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(ACC_DTYPE)[None, :]
    if OUT_RELU:
        acc = tl.maximum(acc, 0.0)
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
    H, W, Ci, OH, OW, Co, M_in, count,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    HAS_GY: tl.constexpr, HAS_GMEAN: tl.constexpr, HAS_GVAR: tl.constexpr, OUT_RELU: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M input pixels) x (BLOCK_N input channels) tile of grad_a; w is (K*K*Co, Ci)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M_in
    n, ih, iw = _split_pixel(rows, H, W)
    ci = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci < Ci

    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    n_cblocks = tl.cdiv(Co, BLOCK_K)
    for kk in range(KSIZE * KSIZE * n_cblocks):
        tap = kk // n_cblocks
        co = (kk - tap * n_cblocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        # the output pixel that reads (ih, iw) through this tap, if any; clamp before % and //
        # because their rounding of negatives differs between the GPU and the interpreter
        th = ih + PAD - tap // KSIZE
        tw = iw + PAD - tap % KSIZE
        thc = tl.maximum(th, 0)
        twc = tl.maximum(tw, 0)
        oh = thc // STRIDE
        ow = twc // STRIDE
        hit = (row_ok & (th >= 0) & (tw >= 0) & (thc % STRIDE == 0) & (twc % STRIDE == 0)
               & (oh < OH) & (ow < OW))
        g = _load_grad_out(gy_ptr, y_ptr, gmean_ptr, gvar_ptr, mean_ptr, (n * OH + oh) * OW + ow,
                           hit, co, Co, count, HAS_GY, HAS_GMEAN, HAS_GVAR, OUT_RELU, ACC_DTYPE,
                           BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + (tap * Co + co)[:, None] * Ci + ci[None, :],
                    mask=(co < Co)[:, None] & ci_ok[None, :], other=0.0)
        acc = tl.dot(g.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)

    tl.store(ga_ptr + rows.to(tl.int64)[:, None] * Ci + ci[None, :],
             acc.to(ga_ptr.dtype.element_ty), mask=row_ok[:, None] & ci_ok[None, :])


@triton.jit
def _conv2d_bn_wgrad_kernel(
    x_ptr, scale_ptr, shift_ptr, gy_ptr, y_ptr, gmean_ptr, gvar_ptr, mean_ptr, gw_part_ptr,
    gb_part_ptr, H, W, Ci, OH, OW, Co, M, rows_per_split,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    HAS_AFFINE: tl.constexpr, IN_RELU: tl.constexpr,
    HAS_GY: tl.constexpr, HAS_GMEAN: tl.constexpr, HAS_GVAR: tl.constexpr, OUT_RELU: tl.constexpr,
    WANT_W: tl.constexpr, WANT_B: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    """Partial grad_weight[co, tap, ci] (and grad_bias[co]) over one split of the output pixels.

    Grid: (Co blocks, taps x Ci blocks, splits); partials are (splits, Co, K*K*Ci) and
    (splits, Co). grad_bias comes from the programs of the first (tap, Ci block) only.
    """
    co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    n_cblocks = tl.cdiv(Ci, BLOCK_CI)
    tap = pid_k // n_cblocks
    ci = (pid_k - tap * n_cblocks) * BLOCK_CI + tl.arange(0, BLOCK_CI)

    acc_w = tl.zeros((BLOCK_CO, BLOCK_CI), ACC_DTYPE)
    acc_b = tl.zeros((BLOCK_CO,), ACC_DTYPE)
    row_start = split * rows_per_split
    for r0 in range(row_start, tl.minimum(row_start + rows_per_split, M), BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        g = _load_grad_out(gy_ptr, y_ptr, gmean_ptr, gvar_ptr, mean_ptr, rows, row_ok, co, Co, M,
                           HAS_GY, HAS_GMEAN, HAS_GVAR, OUT_RELU, ACC_DTYPE, BLOCK_M, BLOCK_CO)
        if WANT_W:
            n, oh, ow = _split_pixel(rows, OH, OW)
            ih = oh * STRIDE - PAD + tap // KSIZE
            iw = ow * STRIDE - PAD + tap % KSIZE
            a = _load_input_tile(x_ptr, scale_ptr, shift_ptr, n, ih, iw, row_ok, ci, H, W, Ci,
                                 HAS_AFFINE, IN_RELU, ACC_DTYPE)
            acc_w = tl.dot(tl.trans(g.to(DOT_DTYPE)), a.to(DOT_DTYPE), acc_w,
                           input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if WANT_B:
            acc_b += tl.sum(g, axis=0)

    co_ok = co < Co
    if WANT_W:
        kkci = KSIZE * KSIZE * Ci
        offs = (split * Co + co).to(tl.int64)[:, None] * kkci + (tap * Ci + ci)[None, :]
        tl.store(gw_part_ptr + offs, acc_w, mask=co_ok[:, None] & (ci < Ci)[None, :])
    if WANT_B:
        tl.store(gb_part_ptr + split * Co + co, acc_b, mask=co_ok & (pid_k == 0))


# ---- host side -------------------------------------------------------------------------

def _out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


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


def _merge_tile_stats(part_mean: Tensor, part_m2: Tensor, m: int,
                      block_m: int) -> tuple[Tensor, Tensor]:
    """Chan's parallel merge of per-tile (mean, M2) into the mean and biased variance over m rows.

    All tiles are merged at once: mean = sum(n_i mean_i) / m and
    M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2); only deviations are squared, so a large
    |mean| does not cancel the variance away.
    """
    starts = torch.arange(part_mean.shape[0], device=part_mean.device,
                          dtype=part_mean.dtype) * block_m
    counts = (m - starts).clamp(max=block_m)[:, None]
    mean = (counts * part_mean).sum(0) / m
    m2 = part_m2.sum(0) + (counts * (part_mean - mean) ** 2).sum(0)
    return mean, m2 / m


def triton_conv2d_bn_forward(x: Tensor, weight: Tensor, bias: Tensor | None,
                             in_scale: Tensor | None, in_shift: Tensor | None, in_relu: bool,
                             stride: int, padding: int, stats: bool,
                             out_relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var), y = [relu](conv2d([relu](x * in_scale + in_shift), weight, stride,
    padding) + bias) in channels_last, with the per-channel mean and biased variance of y when
    stats (else empty)."""
    _check_preconditions(x, weight, bias=bias, in_scale=in_scale, in_shift=in_shift)
    n, ci, h, w = x.shape
    co, k = weight.shape[0], weight.shape[2]
    oh, ow = _out_size(h, k, stride, padding), _out_size(w, k, stride, padding)
    sdt = stats_dtype(x.dtype)
    y = torch.empty((n, co, oh, ow), dtype=x.dtype, device=x.device, memory_format=_CL)
    m = n * oh * ow
    if m == 0:
        nan = torch.full((co,), float("nan"), dtype=sdt, device=x.device)
        return (y, nan, nan.clone()) if stats else (y, y.new_empty((0,), dtype=sdt),
                                                    y.new_empty((0,), dtype=sdt))

    x = x.contiguous(memory_format=_CL)
    w_gemm = weight.permute(2, 3, 1, 0).reshape(k * k * ci, co).contiguous()  # [(kh, kw, ci), co]
    tiles = gemm_tiles(co, ci, x.dtype)
    tiles_m = triton.cdiv(m, tiles.block_m)
    if stats:
        part_mean = torch.empty((tiles_m, co), dtype=sdt, device=x.device)
        part_m2 = torch.empty_like(part_mean)
    else:
        part_mean = part_m2 = y  # never read or written
    grid = (tiles_m, triton.cdiv(co, tiles.block_n))
    wrap_triton(_conv2d_bn_forward_kernel)[grid](
        x, w_gemm, y if bias is None else bias, y if in_scale is None else in_scale,
        y if in_shift is None else in_shift, y, part_mean, part_m2,
        h, w, ci, oh, ow, co, m,
        KSIZE=k, STRIDE=stride, PAD=padding,
        HAS_BIAS=bias is not None, HAS_AFFINE=in_scale is not None, IN_RELU=in_relu,
        OUT_RELU=out_relu, STATS=stats, **dot_config(x.dtype).constexprs(), **tiles.constexprs(),
        **launch_options(tiles.block_m * tiles.block_n, x.dtype).kwargs())
    if not stats:
        return y, y.new_empty((0,), dtype=sdt), y.new_empty((0,), dtype=sdt)
    mean, var = _merge_tile_stats(part_mean, part_m2, m, tiles.block_m)
    return y, mean, var


def triton_conv2d_bn_backward(grad_y: Tensor | None, grad_mean: Tensor | None,
                              grad_var: Tensor | None, x: Tensor, weight: Tensor, y: Tensor | None,
                              mean: Tensor | None, in_scale: Tensor | None, in_shift: Tensor | None,
                              in_relu: bool, stride: int, padding: int, out_relu: bool,
                              output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_a, grad_weight, grad_bias) of triton_conv2d_bn_forward, grad_a being w.r.t. the
    prologue output a (not x); unselected outputs of output_mask are empty (0,) tensors."""
    _check_preconditions(x, weight, in_scale=in_scale, in_shift=in_shift, grad_y=grad_y, y=y,
                         grad_mean=grad_mean, grad_var=grad_var, mean=mean)
    if y is None and (out_relu or grad_var is not None):
        raise ValueError("y is needed with out_relu or grad_var")
    if mean is None and grad_var is not None:
        raise ValueError("mean is needed with grad_var")
    n, ci, h, w = x.shape
    co, k = weight.shape[0], weight.shape[2]
    oh, ow = _out_size(h, k, stride, padding), _out_size(w, k, stride, padding)
    want_a, want_w, want_b = (bool(b) for b in output_mask)
    empty = x.new_empty((0,))
    m = n * oh * ow
    if m == 0:
        return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_CL) if want_a
                else empty, torch.zeros_like(weight) if want_w else empty,
                weight.new_zeros((co,)) if want_b else empty)

    x = x.contiguous(memory_format=_CL)
    grads = dict(
        gy_ptr=x if grad_y is None else grad_y.contiguous(memory_format=_CL),
        y_ptr=x if y is None else y.contiguous(memory_format=_CL),
        gmean_ptr=x if grad_mean is None else grad_mean,
        gvar_ptr=x if grad_var is None else grad_var, mean_ptr=x if grad_var is None else mean,
        HAS_GY=grad_y is not None, HAS_GMEAN=grad_mean is not None, HAS_GVAR=grad_var is not None,
        OUT_RELU=out_relu)
    conv = dict(KSIZE=k, STRIDE=stride, PAD=padding, **dot_config(x.dtype).constexprs())
    grad_a = _dgrad(x, weight, oh, ow, grads, conv) if want_a else empty
    grad_w, grad_b = (_wgrad(x, weight, in_scale, in_shift, in_relu, oh, ow, grads, conv, want_w,
                             want_b)
                      if want_w or want_b else (None, None))
    return grad_a, grad_w if want_w else empty, grad_b if want_b else empty


def _dgrad(x, weight, oh, ow, grads, conv) -> Tensor:
    n, ci, h, w = x.shape
    co, k = weight.shape[0], weight.shape[2]
    grad_a = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_CL)
    w_gemm = weight.permute(2, 3, 0, 1).reshape(k * k * co, ci).contiguous()  # [(kh, kw, co), ci]
    tiles = gemm_tiles(ci, co, x.dtype)
    m_in = n * h * w
    grid = (triton.cdiv(m_in, tiles.block_m), triton.cdiv(ci, tiles.block_n))
    wrap_triton(_conv2d_bn_dgrad_kernel)[grid](
        w_ptr=w_gemm, ga_ptr=grad_a, H=h, W=w, Ci=ci, OH=oh, OW=ow, Co=co, M_in=m_in,
        count=n * oh * ow,
        **grads, **conv, **tiles.constexprs(),
        **launch_options(tiles.block_m * tiles.block_n, x.dtype).kwargs())
    return grad_a


def _wgrad(x, weight, in_scale, in_shift, in_relu, oh, ow, grads, conv, want_w, want_b):
    n, ci, h, w = x.shape
    co, k = weight.shape[0], weight.shape[2]
    m = n * oh * ow
    tiles = wgrad_tiles(co, ci, x.dtype)
    rows_per_split = wgrad_rows_per_split(tiles, co, ci, m, k * k, x.device)
    splits = triton.cdiv(m, rows_per_split)
    acc_dtype = stats_dtype(x.dtype)
    gw_part = torch.empty((splits, co, k * k * ci) if want_w else (0,), dtype=acc_dtype,
                          device=x.device)
    gb_part = torch.empty((splits, co) if want_b else (0,), dtype=acc_dtype, device=x.device)
    # without grad_weight only the first (tap, Ci block) column of programs is needed, for the bias
    k_tiles = k * k * triton.cdiv(ci, tiles.block_ci) if want_w else 1
    grid = (triton.cdiv(co, tiles.block_co), k_tiles, splits)
    wrap_triton(_conv2d_bn_wgrad_kernel)[grid](
        x_ptr=x, scale_ptr=x if in_scale is None else in_scale,
        shift_ptr=x if in_shift is None else in_shift,
        gw_part_ptr=gw_part, gb_part_ptr=gb_part, H=h, W=w, Ci=ci, OH=oh, OW=ow, Co=co, M=m,
        HAS_AFFINE=in_scale is not None, IN_RELU=in_relu, WANT_W=want_w, WANT_B=want_b,
        rows_per_split=rows_per_split, **grads, **conv, **tiles.constexprs(),
        **launch_options(tiles.block_co * tiles.block_ci, x.dtype).kwargs())
    grad_w = (gw_part.sum(0).view(co, k, k, ci).permute(0, 3, 1, 2).to(weight.dtype).contiguous()
              if want_w else None)
    grad_b = gb_part.sum(0).to(weight.dtype) if want_b else None
    return grad_w, grad_b
