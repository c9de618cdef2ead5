// A convolution's weight gradient computed directly over channels_last float32
// activations (csrc/cpu/conv2d_weight_grad.cpp says where it runs):
//   out[i][j][c][o] += sum over the pixels p of a unit of x[window (i, j) of p][c] * g[p][o].
// A block of kBlockIn input channels by 16 output channels of one kernel position (i, j)
// sums a whole unit of pixels in 12 vector registers, reading g's 16 output channels of a
// pixel once for all kBlockIn input channels; the block's sums are then added to out.
// oneDNN's weight gradient runs well below the multiply-add rate at few channels (ResNet-20's
// 3x3 layers: 58-76 GFLOP/s on 2 AVX2 cores; this loop 76-122,
// benchmarks/results/2026-11-30-7-cpu-2core-avx2-weight-grad.txt).
//
// Built for AVX2 only: the only instruction set it has been measured on. With AVX512's
// wider vectors, 12 accumulators make one output vector by 12 input channels, a different
// balance of loads and multiply-adds against a different oneDNN kernel; until measured
// there, AVX512 CPUs keep oneDNN's (dispatch.cpp gives them no weight_grad loop).
#ifdef CPU_CAPABILITY_AVX2
#include "common.h"

namespace resfast::cpu::CPU_CAPABILITY {
namespace {

using Vec = Vectorized<float>;
constexpr int kLanes = Vec::size();
static_assert(kOutBlock % kLanes == 0 && kLanes <= kOutBlock);
constexpr int kOutVecs = kOutBlock / kLanes;  // vectors of output channels per block
constexpr int kBlockIn = 12 / kOutVecs;        // input channels per block: 12 accumulators

// The output rows (or columns) o in [lo, hi) whose input row o * stride + k - padding
// lies inside [0, size).
struct Span {
  int64_t lo, hi;
};
Span inside(int64_t lo, int64_t hi, int64_t k, int64_t stride, int64_t padding, int64_t size) {
  const auto ceil_div = [](int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -(-a / b); };
  return {std::max(lo, ceil_div(padding - k, stride)),
          std::min(hi, ceil_div(size + padding - k, stride))};
}

template <int kIn>
void block(const WeightGradArgs& a, int64_t n0, int64_t n1, int64_t h0, int64_t h1, int64_t ki,
           int64_t kj, int64_t c0, int64_t o0) {
  Vec acc[kIn][kOutVecs];
  for (int c = 0; c < kIn; ++c) {
    for (int v = 0; v < kOutVecs; ++v) acc[c][v] = Vec(0.f);
  }
  const Span rows = inside(h0, h1, ki, a.stride, a.padding, a.H);
  const Span cols = inside(0, a.W_out, kj, a.stride, a.padding, a.W);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t h = rows.lo; h < rows.hi; ++h) {
      const float* g = a.g + ((n * a.H_out + h) * a.W_out) * a.C_out + o0;
      const float* x = a.x + (n * a.H + h * a.stride + ki - a.padding) * a.W * a.C_in + c0;
      for (int64_t w = cols.lo; w < cols.hi; ++w) {
        Vec gv[kOutVecs];
        for (int v = 0; v < kOutVecs; ++v) gv[v] = Vec::loadu(g + w * a.C_out + v * kLanes);
        const float* xw = x + (w * a.stride + kj - a.padding) * a.C_in;
        for (int c = 0; c < kIn; ++c) {
          const Vec xv(xw[c]);
          for (int v = 0; v < kOutVecs; ++v) acc[c][v] = at::vec::fmadd(xv, gv[v], acc[c][v]);
        }
      }
    }
  }
  float* out = a.out + ((ki * a.K + kj) * a.C_in + c0) * a.C_out + o0;
  for (int c = 0; c < kIn; ++c) {
    for (int v = 0; v < kOutVecs; ++v) {
      float* o = out + c * a.C_out + v * kLanes;
      (Vec::loadu(o) + acc[c][v]).store(o);
    }
  }
}

// The last input channels, fewer than kBlockIn: a block of their own count (a compile-time
// constant, so that the accumulators stay in registers).
template <int kIn>
void tail_block(int64_t left, const WeightGradArgs& a, int64_t n0, int64_t n1, int64_t h0,
                int64_t h1, int64_t ki, int64_t kj, int64_t c0, int64_t o0) {
  if constexpr (kIn > 0) {
    if (left == kIn) return block<kIn>(a, n0, n1, h0, h1, ki, kj, c0, o0);
    tail_block<kIn - 1>(left, a, n0, n1, h0, h1, ki, kj, c0, o0);
  }
}

}  // namespace

void weight_grad(const WeightGradArgs& a) {
  const int64_t strips = (a.H_out + a.unit_rows - 1) / a.unit_rows;
  for (int64_t u = a.begin; u < a.end; ++u) {
    const int64_t n0 = (u / strips) * a.unit_images, h0 = (u % strips) * a.unit_rows;
    const int64_t n1 = std::min(a.N, n0 + a.unit_images), h1 = std::min(a.H_out, h0 + a.unit_rows);
    // One block of output channels at a time, so that its slice of g stays in the L1 cache
    // over all input channels and kernel positions.
    for (int64_t o0 = 0; o0 < a.C_out; o0 += kOutBlock) {
      for (int64_t c0 = 0; c0 < a.C_in; c0 += kBlockIn) {
        for (int64_t ki = 0; ki < a.K; ++ki) {
          for (int64_t kj = 0; kj < a.K; ++kj) {
            if (a.C_in - c0 >= kBlockIn) {
              block<kBlockIn>(a, n0, n1, h0, h1, ki, kj, c0, o0);
            } else {
              tail_block<kBlockIn - 1>(a.C_in - c0, a, n0, n1, h0, h1, ki, kj, c0, o0);
            }
          }
        }
      }
    }
  }
}

}  // namespace resfast::cpu::CPU_CAPABILITY
#endif  // CPU_CAPABILITY_AVX2
