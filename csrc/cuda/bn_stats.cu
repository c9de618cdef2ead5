// CUDA implementations of bn_stats and bn_stats_backward over channels_last
// activations viewed as [M, C] (see vec.cuh). bn_stats is a two-stage Welford
// reduction: each thread runs Welford over its rows, a block merges its
// threads' states (Chan et al.) into one partial per channel, and a second
// kernel merges the blocks' partials. Deterministic; no E[y^2] - E[y]^2.
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

// Welford state of this block's rows for every channel:
// partial_mean/partial_m2[blockIdx.y, c] and partial_count[blockIdx.y].
template <typename T, int VEC>
__global__ __launch_bounds__(kThreads) void bn_stats_kernel(const T* __restrict__ y, int64_t M, int64_t C,
                                                            acc_t<T>* __restrict__ partial_mean,
                                                            acc_t<T>* __restrict__ partial_m2,
                                                            int64_t* __restrict__ partial_count) {
  using A = acc_t<T>;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = g < C / VEC;  // inactive threads still take part in the block reduction
  const int64_t c0 = g * VEC;
  A mean[VEC], m2[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) mean[i] = m2[i] = A(0);
  int64_t n = 0;  // the VEC channels of a thread see the same rows

  if (active) {
    const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M; r += stride) {
      A x[VEC];
      load_vec<VEC>(y + r * C + c0, x);
      ++n;
      const A inv_n = A(1) / static_cast<A>(n);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const A delta = x[i] - mean[i];
        mean[i] += delta * inv_n;
        m2[i] += delta * (x[i] - mean[i]);
      }
    }
  }

  // Tree merge over threadIdx.y (blockDim.y is a power of two). A thread keeps
  // its state in registers; the shared arrays at tid hold it for its partner.
  __shared__ A s_mean[VEC][kThreads];
  __shared__ A s_m2[VEC][kThreads];
  __shared__ int64_t s_n[kThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    s_mean[i][tid] = mean[i];
    s_m2[i][tid] = m2[i];
  }
  s_n[tid] = n;
  __syncthreads();
  for (unsigned s = blockDim.y / 2; s > 0; s >>= 1) {
    if (threadIdx.y < s) {
      const int other = tid + s * blockDim.x;
      A mean_b[VEC], m2_b[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        mean_b[i] = s_mean[i][other];
        m2_b[i] = s_m2[i][other];
      }
      welford_merge<VEC>(mean, m2, n, mean_b, m2_b, s_n[other]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        s_mean[i][tid] = mean[i];
        s_m2[i][tid] = m2[i];
      }
      s_n[tid] = n;
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
    const int64_t off = static_cast<int64_t>(blockIdx.y) * C + c0;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      partial_mean[off + i] = mean[i];
      partial_m2[off + i] = m2[i];
    }
    // Every thread of a block row sees the same rows: thread 0 has the count.
    if (blockIdx.x == 0 && threadIdx.x == 0) partial_count[blockIdx.y] = n;
  }
}

// Merges P partial Welford states per channel: mean[c], var[c] = m2 / n.
template <typename A>
__global__ __launch_bounds__(kThreads) void bn_stats_merge_kernel(const A* __restrict__ partial_mean,
                                                                  const A* __restrict__ partial_m2,
                                                                  const int64_t* __restrict__ partial_count,
                                                                  int64_t P, int64_t C, A* __restrict__ mean_out,
                                                                  A* __restrict__ var_out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  A mean[1] = {A(0)}, m2[1] = {A(0)};
  int64_t n = 0;
  if (c < C) {
    for (int64_t p = threadIdx.y; p < P; p += blockDim.y) {
      const A mean_b[1] = {partial_mean[p * C + c]};
      const A m2_b[1] = {partial_m2[p * C + c]};
      welford_merge<1>(mean, m2, n, mean_b, m2_b, partial_count[p]);
    }
  }
  __shared__ A s_mean[kThreads];
  __shared__ A s_m2[kThreads];
  __shared__ int64_t s_n[kThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  s_mean[tid] = mean[0];
  s_m2[tid] = m2[0];
  s_n[tid] = n;
  __syncthreads();
  for (unsigned s = blockDim.y / 2; s > 0; s >>= 1) {
    if (threadIdx.y < s) {
      const int other = tid + s * blockDim.x;
      const A mean_b[1] = {s_mean[other]};
      const A m2_b[1] = {s_m2[other]};
      welford_merge<1>(mean, m2, n, mean_b, m2_b, s_n[other]);
      s_mean[tid] = mean[0];
      s_m2[tid] = m2[0];
      s_n[tid] = n;
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < C) {
    mean_out[c] = mean[0];
    var_out[c] = m2[0] / static_cast<A>(n);
  }
}

// grad_y = (grad_mean + 2 (y - mean) grad_var) * inv_count.
template <typename T, int VEC>
__global__ __launch_bounds__(kThreads) void bn_stats_backward_kernel(const T* __restrict__ y,
                                                                     const acc_t<T>* __restrict__ grad_mean,
                                                                     const acc_t<T>* __restrict__ grad_var,
                                                                     const acc_t<T>* __restrict__ mean,
                                                                     acc_t<T> inv_count, T* __restrict__ grad_y,
                                                                     int64_t M, int64_t C) {
  using A = acc_t<T>;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= C / VEC) return;
  const int64_t c0 = g * VEC;
  A gm[VEC], gv[VEC], mu[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    gm[i] = grad_mean[c0 + i];
    gv[i] = grad_var[c0 + i];
    mu[i] = mean[c0 + i];
  }
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M; r += stride) {
    const int64_t off = r * C + c0;
    A x[VEC];
    load_vec<VEC>(y + off, x);
#pragma unroll
    for (int i = 0; i < VEC; ++i) x[i] = (gm[i] + A(2) * (x[i] - mu[i]) * gv[i]) * inv_count;
    store_vec<VEC>(grad_y + off, x);
  }
}

// ---- Host side --------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& y) {
  check_stats_input(y);
  if (!use_kernels(y.device())) return aten_fallback::bn_stats(y);
  const int64_t C = y.size(1);
  const int64_t M = count_per_channel(y);
  const auto dt = stats_dtype(y);
  at::Tensor mean = at::empty({C}, y.options().dtype(dt));
  at::Tensor var = at::empty({C}, y.options().dtype(dt));
  if (C == 0) return {mean, var};
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor y_rows = rows_of(y);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "resfast::bn_stats", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = kVecWidth<scalar_t>;
    const scalar_t* yp = y_rows.const_data_ptr<scalar_t>();
    const bool vec = C % V == 0 && aligned16(yp);
    auto kernel = vec ? bn_stats_kernel<scalar_t, V> : bn_stats_kernel<scalar_t, 1>;
    const Tile t = make_tile(M, vec ? C / V : C, resident_blocks(kernel));
    const int64_t P = t.gy;
    at::Tensor partial = at::empty({2, P, C}, y.options().dtype(dt));
    at::Tensor partial_count = at::empty({P}, y.options().dtype(at::kLong));
    A* p_mean = partial.mutable_data_ptr<A>();
    A* p_m2 = p_mean + P * C;
    int64_t* p_count = partial_count.mutable_data_ptr<int64_t>();
    kernel<<<grid_of(t), block_of(t), 0, stream>>>(yp, M, C, p_mean, p_m2, p_count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Tile t2 = make_tile(P, C, /*max_blocks=*/1, /*max_tx=*/8);
    bn_stats_merge_kernel<A><<<grid_of(t2), block_of(t2), 0, stream>>>(
        p_mean, p_m2, p_count, P, C, mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

at::Tensor bn_stats_backward_cuda(const at::Tensor& grad_mean, const at::Tensor& grad_var, const at::Tensor& y,
                                  const at::Tensor& mean) {
  check_stats_backward_inputs(grad_mean, grad_var, y, mean);
  if (!use_kernels(y.device())) return aten_fallback::bn_stats_backward(grad_mean, grad_var, y, mean);
  const int64_t C = y.size(1);
  // As the CPU and fake implementations: y's own strides when it is dense (a permuted y too).
  at::Tensor grad_y = at::empty_like(y);
  if (y.numel() == 0) return grad_y;
  const int64_t M = y.numel() / C;
  const c10::cuda::CUDAGuard guard(y.device());
  const auto dt = stats_dtype(y);
  const at::Tensor y_rows = rows_of(y);
  at::Tensor gy_rows = rows_for(grad_y);
  const at::Tensor gm = grad_mean.to(dt).contiguous();
  const at::Tensor gv = grad_var.to(dt).contiguous();
  const at::Tensor mu = mean.to(dt).contiguous();
  const double inv_count = 1.0 / static_cast<double>(M);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "resfast::bn_stats_backward", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = kVecWidth<scalar_t>;
    const scalar_t* yp = y_rows.const_data_ptr<scalar_t>();
    scalar_t* gp = gy_rows.mutable_data_ptr<scalar_t>();
    const bool vec = C % V == 0 && aligned16(yp) && aligned16(gp);
    auto kernel = vec ? bn_stats_backward_kernel<scalar_t, V> : bn_stats_backward_kernel<scalar_t, 1>;
    const Tile t = make_tile(M, vec ? C / V : C, resident_blocks(kernel));
    kernel<<<grid_of(t), block_of(t), 0, stream>>>(yp, gm.const_data_ptr<A>(), gv.const_data_ptr<A>(),
                                                   mu.const_data_ptr<A>(), static_cast<A>(inv_count), gp, M, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finish_rows(grad_y, gy_rows);
  return grad_y;
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_stats_backward", &bn_stats_backward_cuda);
}

}  // namespace resfast::cuda
