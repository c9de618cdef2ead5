// CUDA implementations of bn_act and bn_act_backward over channels_last
// activations viewed as [M, C] (see vec.cuh). The backward computes grad_y,
// grad_residual and the per-channel sums for grad_scale and grad_shift in one
// pass over the inputs; per-block partial sums are merged by a second, tiny
// kernel, so results are deterministic.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../checks.h"
#include "fallback.h"
#include "vec.cuh"

namespace resfast::cuda {
namespace {

// ---- Kernels ----------------------------------------------------------------

// out = [relu]((y - centre) * scale + shift [+ residual]); scale/shift/residual may be
// null, centre too (then 0).
template <typename T, int VEC>
__global__ __launch_bounds__(kThreads) void bn_act_kernel(const T* __restrict__ y, const acc_t<T>* __restrict__ scale,
                                                          const acc_t<T>* __restrict__ shift,
                                                          const acc_t<T>* __restrict__ centre,
                                                          const T* __restrict__ residual, T* __restrict__ out,
                                                          int64_t M, int64_t C, bool relu) {
  using A = acc_t<T>;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= C / VEC) return;
  const int64_t c0 = g * VEC;
  A sc[VEC] = {}, sh[VEC] = {}, cc[VEC] = {};
  if (scale) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      sc[i] = scale[c0 + i];
      sh[i] = shift[c0 + i];
      cc[i] = centre ? centre[c0 + i] : A(0);
    }
  }
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M; r += stride) {
    const int64_t off = r * C + c0;
    A z[VEC];
    load_vec<VEC>(y + off, z);
    if (scale) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] = (z[i] - cc[i]) * sc[i] + sh[i];
    }
    if (residual) {
      A res[VEC];
      load_vec<VEC>(residual + off, res);
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] += res[i];
    }
    if (relu) {
      // Not max(z, 0): a NaN propagates as in at::relu.
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] = z[i] < A(0) ? A(0) : z[i];
    }
    store_vec<VEC>(out + off, z);
  }
}

// g = grad_out [* (pre-activation > 0)]; grad_y = g [* scale]; grad_residual = g;
// partial_gy[blockIdx.y, c] = sum(g * (y - centre)), partial_g[blockIdx.y, c] = sum(g) over
// this block's rows. Null outputs are skipped; the partial sums are computed
// when partial_g is not null (then partial_gy is not null either).
template <typename T, int VEC>
__global__ __launch_bounds__(kThreads) void bn_act_backward_kernel(
    const T* __restrict__ grad_out, const T* __restrict__ y, const acc_t<T>* __restrict__ scale,
    const acc_t<T>* __restrict__ shift, const acc_t<T>* __restrict__ centre, const T* __restrict__ residual,
    bool relu, T* __restrict__ grad_y,
    T* __restrict__ grad_residual, acc_t<T>* __restrict__ partial_gy, acc_t<T>* __restrict__ partial_g, int64_t M,
    int64_t C) {
  using A = acc_t<T>;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = g < C / VEC;  // inactive threads still take part in the block reduction
  const bool sums = partial_g != nullptr;
  const int64_t c0 = g * VEC;
  A sum_gy[VEC], sum_g[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) sum_gy[i] = sum_g[i] = A(0);

  if (active) {
    A sc[VEC] = {}, sh[VEC] = {}, cc[VEC] = {};
    if (scale) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        sc[i] = scale[c0 + i];
        sh[i] = shift[c0 + i];
        cc[i] = centre ? centre[c0 + i] : A(0);
      }
    }
    const bool need_y = relu || sums;
    const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M; r += stride) {
      const int64_t off = r * C + c0;
      A gv[VEC], yv[VEC] = {};
      load_vec<VEC>(grad_out + off, gv);
      if (need_y) {
        load_vec<VEC>(y + off, yv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) yv[i] -= cc[i];  // y - centre (cc is 0 without scale)
      }
      if (relu) {
        A z[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) z[i] = scale ? yv[i] * sc[i] + sh[i] : yv[i];
        if (residual) {
          A res[VEC];
          load_vec<VEC>(residual + off, res);
#pragma unroll
          for (int i = 0; i < VEC; ++i) z[i] += res[i];
        }
        // torch's threshold_backward: 0 where z <= 0, the gradient elsewhere (NaN z too).
#pragma unroll
        for (int i = 0; i < VEC; ++i) gv[i] = z[i] <= A(0) ? A(0) : gv[i];
      }
      if (grad_y) {
        if (scale) {
          A gy[VEC];
#pragma unroll
          for (int i = 0; i < VEC; ++i) gy[i] = gv[i] * sc[i];
          store_vec<VEC>(grad_y + off, gy);
        } else {
          store_vec<VEC>(grad_y + off, gv);
        }
      }
      if (grad_residual) store_vec<VEC>(grad_residual + off, gv);
      if (sums) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          sum_gy[i] += gv[i] * yv[i];
          sum_g[i] += gv[i];
        }
      }
    }
  }
  if (!sums) return;  // uniform over the grid: no thread waits at a barrier below

  // Tree reduction over threadIdx.y (blockDim.y is a power of two). A thread
  // keeps its running sums in registers; s[tid] holds them for its partner.
  __shared__ A s_gy[VEC][kThreads];
  __shared__ A s_g[VEC][kThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    s_gy[i][tid] = sum_gy[i];
    s_g[i][tid] = sum_g[i];
  }
  __syncthreads();
  for (unsigned s = blockDim.y / 2; s > 0; s >>= 1) {
    if (threadIdx.y < s) {
      const int other = tid + s * blockDim.x;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        sum_gy[i] += s_gy[i][other];
        sum_g[i] += s_g[i][other];
        s_gy[i][tid] = sum_gy[i];
        s_g[i][tid] = sum_g[i];
      }
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
    const int64_t off = static_cast<int64_t>(blockIdx.y) * C + c0;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      partial_gy[off + i] = sum_gy[i];
      partial_g[off + i] = sum_g[i];
    }
  }
}

// out_a[c] = sum_p partial_a[p, c], out_b[c] = sum_p partial_b[p, c] over P
// rows of partials; a null output is skipped. One block column per tx channels.
template <typename A>
__global__ __launch_bounds__(kThreads) void column_sum_kernel(const A* __restrict__ partial_a,
                                                              const A* __restrict__ partial_b, int64_t P, int64_t C,
                                                              A* __restrict__ out_a, A* __restrict__ out_b) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  A a = 0, b = 0;
  if (c < C) {
#pragma unroll 4
    for (int64_t p = threadIdx.y; p < P; p += blockDim.y) {
      a += partial_a[p * C + c];
      b += partial_b[p * C + c];
    }
  }
  __shared__ A s_a[kThreads];
  __shared__ A s_b[kThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  s_a[tid] = a;
  s_b[tid] = b;
  __syncthreads();
  for (unsigned s = blockDim.y / 2; s > 0; s >>= 1) {
    if (threadIdx.y < s) {
      a += s_a[tid + s * blockDim.x];
      b += s_b[tid + s * blockDim.x];
      s_a[tid] = a;
      s_b[tid] = b;
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < C) {
    if (out_a) out_a[c] = a;
    if (out_b) out_b[c] = b;
  }
}

// ---- Host side --------------------------------------------------------------

at::Tensor bn_act_cuda(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                       const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual, bool relu,
                       const std::optional<at::Tensor>& centre) {
  check_bn_act_inputs(y, scale, shift, residual, centre);
  if (!use_kernels(y.device())) return aten_fallback::bn_act(y, scale, shift, residual, relu, centre);
  at::Tensor out = at::empty_like(y);
  const int64_t C = y.size(1);
  if (y.numel() == 0) return out;
  const int64_t M = y.numel() / C;
  const c10::cuda::CUDAGuard guard(y.device());
  const auto dt = stats_dtype(y);

  const at::Tensor y_rows = rows_of(y);
  at::Tensor out_rows = rows_for(out);
  const at::Tensor sc = scale ? scale->to(dt).contiguous() : at::Tensor();
  const at::Tensor sh = shift ? shift->to(dt).contiguous() : at::Tensor();
  const at::Tensor cc = centre ? centre->to(dt).contiguous() : at::Tensor();
  const at::Tensor res = residual ? rows_of(*residual) : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "resfast::bn_act", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = kVecWidth<scalar_t>;
    const scalar_t* yp = y_rows.const_data_ptr<scalar_t>();
    const scalar_t* rp = ptr_or_null<scalar_t>(res);
    scalar_t* op = out_rows.mutable_data_ptr<scalar_t>();
    const bool vec = C % V == 0 && aligned16(yp) && aligned16(op) && (!rp || aligned16(rp));
    auto kernel = vec ? bn_act_kernel<scalar_t, V> : bn_act_kernel<scalar_t, 1>;
    const Tile t = make_tile(M, vec ? C / V : C, resident_blocks(kernel));
    kernel<<<grid_of(t), block_of(t), 0, stream>>>(yp, ptr_or_null<A>(sc), ptr_or_null<A>(sh), ptr_or_null<A>(cc), rp,
                                                   op, M, C, relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finish_rows(out, out_rows);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& y, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual, bool relu,
    std::array<bool, 4> output_mask, const std::optional<at::Tensor>& centre) {
  check_bn_act_inputs(y, scale, shift, residual, centre);
  check_same_as(grad_out, y, "grad_out", "y");
  if (!use_kernels(y.device())) {
    return aten_fallback::bn_act_backward(grad_out, y, scale, shift, residual, relu, output_mask,
                                          centre);
  }
  const auto dt = stats_dtype(y);
  const int64_t C = y.size(1);
  const bool sums = scale.has_value() && (output_mask[1] || output_mask[2]);
  // Unselected outputs are empty, with the CPU implementation's dtypes.
  auto empty = [&] { return at::empty({0}, y.options()); };
  auto channels = [&](bool selected) { return at::empty({selected ? C : 0}, y.options().dtype(dt)); };
  at::Tensor grad_y = output_mask[0] ? at::empty_like(y) : empty();
  at::Tensor grad_scale = channels(output_mask[1] && scale);
  at::Tensor grad_shift = channels(output_mask[2] && scale);
  at::Tensor grad_residual = output_mask[3] ? at::empty_like(y) : empty();
  if (y.numel() == 0) {  // the sums over no rows are zero
    grad_scale.zero_();
    grad_shift.zero_();
    return {grad_y, grad_scale, grad_shift, grad_residual};
  }
  if (!output_mask[0] && !output_mask[3] && !sums) return {grad_y, grad_scale, grad_shift, grad_residual};
  const int64_t M = y.numel() / C;
  const c10::cuda::CUDAGuard guard(y.device());

  const at::Tensor go_rows = rows_of(grad_out);
  const at::Tensor y_rows = relu || sums ? rows_of(y) : at::Tensor();
  const at::Tensor res_rows = relu && residual ? rows_of(*residual) : at::Tensor();
  const at::Tensor sc = scale ? scale->to(dt).contiguous() : at::Tensor();
  const at::Tensor sh = shift ? shift->to(dt).contiguous() : at::Tensor();
  const at::Tensor cc = centre ? centre->to(dt).contiguous() : at::Tensor();
  at::Tensor gy_rows = output_mask[0] ? rows_for(grad_y) : at::Tensor();
  at::Tensor gr_rows = output_mask[3] ? rows_for(grad_residual) : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "resfast::bn_act_backward", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = kVecWidth<scalar_t>;
    const scalar_t* gop = go_rows.const_data_ptr<scalar_t>();
    const scalar_t* yp = ptr_or_null<scalar_t>(y_rows);
    const scalar_t* rp = ptr_or_null<scalar_t>(res_rows);
    scalar_t* gyp = mutable_ptr_or_null<scalar_t>(gy_rows);
    scalar_t* grp = mutable_ptr_or_null<scalar_t>(gr_rows);
    const bool vec = C % V == 0 && aligned16(gop) && (!yp || aligned16(yp)) && (!rp || aligned16(rp)) &&
                     (!gyp || aligned16(gyp)) && (!grp || aligned16(grp));
    auto kernel = vec ? bn_act_backward_kernel<scalar_t, V> : bn_act_backward_kernel<scalar_t, 1>;
    const Tile t = make_tile(M, vec ? C / V : C, resident_blocks(kernel));
    // partial[0] holds sum(g * y) per block row, partial[1] sum(g).
    at::Tensor partial = sums ? at::empty({2, static_cast<int64_t>(t.gy), C}, y.options().dtype(dt)) : at::Tensor();
    A* p_gy = sums ? partial.mutable_data_ptr<A>() : nullptr;
    A* p_g = sums ? p_gy + static_cast<int64_t>(t.gy) * C : nullptr;
    kernel<<<grid_of(t), block_of(t), 0, stream>>>(gop, yp, ptr_or_null<A>(sc), ptr_or_null<A>(sh),
                                                   ptr_or_null<A>(cc), rp, relu, gyp, grp, p_gy, p_g, M, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (sums) {
      const Tile t2 = make_tile(t.gy, C, /*max_blocks=*/1, /*max_tx=*/8);
      column_sum_kernel<A><<<grid_of(t2), block_of(t2), 0, stream>>>(
          p_gy, p_g, t.gy, C, output_mask[1] ? grad_scale.mutable_data_ptr<A>() : nullptr,
          output_mask[2] ? grad_shift.mutable_data_ptr<A>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (output_mask[0]) finish_rows(grad_y, gy_rows);
  if (output_mask[3]) finish_rows(grad_residual, gr_rows);
  return {grad_y, grad_scale, grad_shift, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CUDA, m) {
  m.impl("bn_act", &bn_act_cuda);
  m.impl("bn_act_backward", &bn_act_backward_cuda);
}

}  // namespace resfast::cuda
