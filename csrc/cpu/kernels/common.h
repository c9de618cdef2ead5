// Helpers of the vectorized CPU loops. Every file of csrc/cpu/kernels/
// is compiled once per instruction set with CPU_CAPABILITY naming it, so all
// of this lives in namespace resfast::cpu::CPU_CAPABILITY and never leaks
// one instruction set's code into another's.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../bn_kernels.h"

namespace resfast::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// Accumulation type: double for double activations, float for the others.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// One vector of the accumulation type holds kSize elements of T; these load
// and store them (bfloat16 and float16 converted on the fly).
template <typename T>
struct Lanes {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  static constexpr int64_t kSize = V::size();
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<T>;

  static V load(const T* p) {
    if constexpr (kReduced) {
      V v;
      at::vec::load_to_float(p, v);
      return v;
    } else {
      return V::loadu(p);
    }
  }
  // The first n < kSize elements; the other lanes are zero.
  static V load(const T* p, int64_t n) {
    if constexpr (kReduced) {
      return std::get<0>(at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, n)));
    } else {
      return V::loadu(p, n);
    }
  }
  static void store(T* p, const V& v) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<T>(v, v).store(p, kSize);
    } else {
      v.store(p);
    }
  }
  static void store(T* p, const V& v, int64_t n) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<T>(v, v).store(p, n);
    } else {
      v.store(p, n);
    }
  }
};

// relu that keeps NaN (NaN < 0 is false), as at::relu does.
template <typename A>
Vectorized<A> relu(const Vectorized<A>& z) {
  return Vectorized<A>::blendv(z, Vectorized<A>(0), z < Vectorized<A>(0));
}

// Calls f with std::true_type or std::false_type.
template <typename F>
void with_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Calls f(T{}) for the activation dtype T (float, double, bfloat16, float16;
// check_activation lets no other through).
template <typename F>
void with_dtype(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kDouble:
      return f(double{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      TORCH_CHECK(false, "resfast: no CPU kernel for dtype ", dtype);
  }
}

// Blocks of the reductions: rows of a channels_last block, elements of one
// channel in an NCHW block. A block is reduced in the accumulation type (in
// registers, in chains of at most 64 terms) and then merged in double, so
// float rounding is that of a short sum whatever the batch; a block is also
// small enough for a second pass over it to find it in cache.
constexpr int64_t kRowBlock = 64;
constexpr int64_t kPlaneBlock = 1024;

// Elements a thread should have at least before another one helps (ATen's grain).
constexpr int64_t kGrain = 32768;

// Number of pieces to split `elements` of work into: one per thread, fewer
// for small inputs. Fixed by the thread count alone, so reductions that merge
// per-piece partials in piece order are deterministic.
inline int64_t num_pieces(int64_t elements, int64_t max_pieces) {
  const int64_t by_size = std::max<int64_t>(1, elements / kGrain);
  return std::max<int64_t>(1, std::min<int64_t>({by_size, max_pieces, at::get_num_threads()}));
}

// [begin, end) of piece p of n pieces over `total` items.
inline int64_t piece_begin(int64_t p, int64_t n, int64_t total) { return total * p / n; }

// Runs f(piece, begin, end) for `pieces` contiguous ranges of [0, total), in parallel.
template <typename F>
void for_each_piece(int64_t total, int64_t pieces, const F& f) {
  at::parallel_for(0, pieces, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      f(p, piece_begin(p, pieces, total), piece_begin(p + 1, pieces, total));
    }
  });
}

// Chan et al.: the coefficients of merging a state of n_b elements into one of n_a,
// which depend on the counts alone (computed once for all the channels of a block).
struct ChanWeights {
  double frac_b, weight;  // n_b / (n_a + n_b), n_a n_b / (n_a + n_b)
  ChanWeights(int64_t n_a, int64_t n_b)
      : frac_b(static_cast<double>(n_b) / static_cast<double>(n_a + n_b)),
        weight(static_cast<double>(n_a) * frac_b) {}
};

// Merges the state (mean_b, m2_b) into (mean, m2) (the caller adds n_b to the count).
inline void chan_merge(double& mean, double& m2, double mean_b, double m2_b,
                       const ChanWeights& w) {
  const double delta = mean_b - mean;
  mean += delta * w.frac_b;
  m2 += m2_b + delta * delta * w.weight;
}

// The Welford state (mean relative to a shift, sum of squared deviations m2,
// count n) of one channel, in double.
struct ChannelState {
  double mean = 0, m2 = 0;
  int64_t n = 0;
  void merge(double mean_b, double m2_b, int64_t n_b) {
    if (n_b == 0) return;
    chan_merge(mean, m2, mean_b, m2_b, ChanWeights(n, n_b));
    n += n_b;
  }
  void merge(const ChannelState& b) { merge(b.mean, b.m2, b.n); }
};

// Welford states of C channels that share the count.
struct ChannelStates {
  std::vector<double> mean, m2;
  int64_t n = 0;
  explicit ChannelStates(int64_t C) : mean(C, 0.0), m2(C, 0.0) {}

  // Merges states (mean_b, m2_b) over n_b more elements per channel.
  template <typename A>
  void merge(const A* mean_b, const A* m2_b, int64_t n_b) {
    if (n_b == 0) return;
    const int64_t C = static_cast<int64_t>(mean.size());
    const ChanWeights w(n, n_b);
    double* mp = mean.data();
    double* m2p = m2.data();
    for (int64_t c = 0; c < C; ++c) {
      chan_merge(mp[c], m2p[c], static_cast<double>(mean_b[c]), static_cast<double>(m2_b[c]), w);
    }
    n += n_b;
  }
  void merge(const ChannelStates& b) { merge(b.mean.data(), b.m2.data(), b.n); }
};

// Per-channel sums in double: the second level of every float reduction, so
// that rounding grows with the length of a block, not of the whole batch.
struct ChannelSums {
  std::vector<double> gy, g;
  explicit ChannelSums(int64_t C) : gy(C, 0.0), g(C, 0.0) {}
};

}  // namespace resfast::cpu::CPU_CAPABILITY
