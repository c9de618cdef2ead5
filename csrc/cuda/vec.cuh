// Helpers shared by resfast's CUDA kernels.
//
// Every activation kernel views a channels_last tensor as a row-major
// [M = N*H*W, C] matrix. A thread owns VEC adjacent channels (one "column
// group") and walks the rows with a grid stride; VEC = 16 / sizeof(T) gives
// 16-byte loads and stores, VEC = 1 is the fallback for any C or alignment.
// Blocks are kThreads threads, laid out (tx column groups) x (ty rows).
//
// Only c10's Half and BFloat16 come from torch (no ATen). The few device
// intrinsics sit behind __CUDA_ARCH__ with host fallbacks; the kernels are
// checked against the CPU ops on a GPU (tests/kernels/test_bn_ops_cuda.py).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#define RESFAST_HD __host__ __device__ __forceinline__

namespace resfast::cuda {

// Threads per block of every kernel (the shared-memory arrays are sized by it).
constexpr int kThreads = 256;

// Accumulation type: float, or double for double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// Elements per 16-byte vector.
template <typename T>
constexpr int kVecWidth = 16 / static_cast<int>(sizeof(T));

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Loads VEC elements of p (aligned to sizeof(T) * VEC) converted to A.
template <int VEC, typename A, typename T>
RESFAST_HD void load_vec(const T* p, A (&out)[VEC]) {
  const Vec<T, VEC> in = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<A>(in.v[i]);
}

// Stores VEC values converted to T at p (aligned to sizeof(T) * VEC).
template <int VEC, typename T, typename A>
RESFAST_HD void store_vec(T* p, const A (&in)[VEC]) {
  Vec<T, VEC> out;
#pragma unroll
  for (int i = 0; i < VEC; ++i) out.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Vec<T, VEC>*>(p) = out;
}

// Correctly rounded reciprocal square root and multiplication that the
// compiler may not contract into an fma, so the per-channel formulas round as
// the CPU reference's separate tensor operations do.
RESFAST_HD float rsqrt_rn(float x) {
#ifdef __CUDA_ARCH__
  return __frsqrt_rn(x);
#else
  return 1.0f / std::sqrt(x);
#endif
}
RESFAST_HD double rsqrt_rn(double x) {
#ifdef __CUDA_ARCH__
  return ::rsqrt(x);
#else
  return 1.0 / std::sqrt(x);
#endif
}
RESFAST_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
RESFAST_HD double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// Chan et al.'s merge of Welford states (mean, m2, n) for VEC channels that
// share the count n: (mean, m2, n) <- (mean, m2, n) + (mean_b, m2_b, n_b).
template <int VEC, typename A>
RESFAST_HD void welford_merge(A (&mean)[VEC], A (&m2)[VEC], int64_t& n, const A (&mean_b)[VEC],
                              const A (&m2_b)[VEC], int64_t n_b) {
  if (n_b == 0) return;
  if (n == 0) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      mean[i] = mean_b[i];
      m2[i] = m2_b[i];
    }
    n = n_b;
    return;
  }
  const int64_t n_ab = n + n_b;
  const A frac_b = static_cast<A>(n_b) / static_cast<A>(n_ab);  // n_b / n_ab
  const A weight = static_cast<A>(n) * frac_b;                   // n_a n_b / n_ab
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const A delta = mean_b[i] - mean[i];
    mean[i] += delta * frac_b;
    m2[i] += m2_b[i] + delta * delta * weight;
  }
  n = n_ab;
}

// Launch shape of a kernel over a [rows, groups] grid of column groups:
// blocks of (tx, ty) = kThreads threads, grid (gx, gy). tx is a power of two
// covering the column groups up to max_tx; gy is capped so that gx * gy is
// about max_blocks (the kernels grid-stride over the remaining rows).
struct Tile {
  unsigned tx, ty, gx, gy;
};

inline Tile make_tile(int64_t rows, int64_t groups, int64_t max_blocks, unsigned max_tx = kThreads) {
  unsigned tx = 1;
  while (tx < static_cast<uint64_t>(groups) && tx < max_tx) tx <<= 1;
  const unsigned ty = kThreads / tx;
  const int64_t gx = (groups + tx - 1) / tx;
  const int64_t gy_needed = (rows + ty - 1) / ty;
  const int64_t gy_cap = std::max<int64_t>(1, max_blocks / std::max<int64_t>(gx, 1));
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>({gy_needed, gy_cap, 65535}));
  return {tx, ty, static_cast<unsigned>(gx), static_cast<unsigned>(gy)};
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace resfast::cuda

#ifdef __CUDACC__
// ---- Host helpers of the .cu files ------------------------------------------
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace resfast::cuda {

// Blocks of kThreads threads of `kernel` that the current device runs at once
// (one full wave): the kernels grid-stride over the rows beyond it.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel) {
  int sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  return static_cast<int64_t>(sms) * std::max(per_sm, 1);
}

inline dim3 grid_of(const Tile& t) { return dim3(t.gx, t.gy); }
inline dim3 block_of(const Tile& t) { return dim3(t.tx, t.ty); }

// t as a row-major [N*H*W, C] buffer: t itself when it is channels_last already.
inline at::Tensor rows_of(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

// The buffer a kernel writes `out` through: `out` itself when it is
// channels_last, else a channels_last temporary that finish_rows copies back.
inline at::Tensor rows_for(const at::Tensor& out) {
  return out.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? out
             : at::empty(out.sizes(), out.options().memory_format(at::MemoryFormat::ChannelsLast));
}
inline void finish_rows(at::Tensor& out, const at::Tensor& rows) {
  if (!rows.is_same(out)) out.copy_(rows);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* mutable_ptr_or_null(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

}  // namespace resfast::cuda
#endif  // __CUDACC__
