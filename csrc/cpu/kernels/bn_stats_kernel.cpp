// bn_stats and bn_stats_backward: one read of y from memory each.
//
// bn_stats is Welford/Chan by blocks. Each thread owns a piece of the batch
// and keeps, per channel, a Welford state in double. It walks its piece in
// blocks small enough to stay in cache; a block's state is computed exactly
// (its mean, then its centred sum of squares, both in registers from the
// cached block) and merged into the thread's by Chan's formula; the threads'
// states are merged the same way, in a fixed order. Values are first shifted
// by the channel's first element, so a mean far larger than the spread costs
// no precision (float32 blocks would otherwise round the deviations away).
#include "common.h"

namespace resfast::cpu::CPU_CAPABILITY {
namespace {

template <typename T>
struct Stats {
  using L = Lanes<T>;
  using A = typename L::A;
  using V = typename L::V;
  static constexpr int64_t K = L::kSize;
  // Vectors of channels per tile of the channels_last walk (registers permitting).
  static constexpr int kTileUnits = sizeof(V) >= 64 ? 4 : 2;
  // Accumulators of a channels_last block's sums: independent dependency chains hide
  // the adds' latency, each a kChains-th as long (float rounding grows with the length
  // of a chain). Eight for one vector of channels, four for a wider tile (registers
  // permitting).
  static constexpr int kChains = 8;
  static constexpr int tile_chains(int units) { return units == 1 ? kChains : 4; }

  // ---- channels_last: y is [M, C] ----

  // Block state of rows [0, rows) of y for the U * K channels at y[0..):
  // mean (relative to shift) and m2 of each, written to mean_out/m2_out.
  // With kTail the last vector holds only `tail` channels (the rest read as 0,
  // with shift 0 there, so they stay 0).
  template <int U, bool kTail>
  static void block_tile(const T* y, int64_t rows, int64_t C, const A* shift, int64_t tail,
                         A* mean_out, A* m2_out) {
    auto load = [&](const T* p, int u) {
      return kTail && u == U - 1 ? L::load(p, tail) : L::load(p);
    };
    // Row r in chain r % Chains (the last rows in chain 0); the chains are indexed by
    // constants only, so that they stay in registers.
    constexpr int Chains = tile_chains(U);
    V sh[U], mean[U], acc[Chains][U];
    auto reduce = [&](auto term) {
      for (int j = 0; j < Chains; ++j) {
        for (int u = 0; u < U; ++u) acc[j][u] = V(0);
      }
      int64_t r = 0;
      for (; r + Chains <= rows; r += Chains) {
        for (int j = 0; j < Chains; ++j) {
          const T* row = y + (r + j) * C;
          for (int u = 0; u < U; ++u) acc[j][u] += term(load(row + u * K, u) - sh[u], u);
        }
      }
      for (; r < rows; ++r) {
        for (int u = 0; u < U; ++u) acc[0][u] += term(load(y + r * C + u * K, u) - sh[u], u);
      }
    };
    auto total = [&](int u) {
      V t = acc[0][u];
      for (int j = 1; j < Chains; ++j) t += acc[j][u];
      return t;
    };
    for (int u = 0; u < U; ++u) sh[u] = V::loadu(shift + u * K);
    reduce([](const V& d, int) { return d; });
    for (int u = 0; u < U; ++u) {
      mean[u] = total(u) / V(static_cast<A>(rows));
      mean[u].store(mean_out + u * K);
    }
    reduce([&](const V& d, int u) {
      const V e = d - mean[u];
      return e * e;
    });
    for (int u = 0; u < U; ++u) total(u).store(m2_out + u * K);
  }

  template <int U = 1, typename F>
  static void with_units(int64_t units, const F& f) {
    if constexpr (U <= kTileUnits) {
      if (units == U) {
        f(std::integral_constant<int, U>{});
      } else {
        with_units<U + 1>(units, f);
      }
    }
  }

  // Rows [r0, r1) into `state`; block_mean/block_m2 are scratch of C rounded up to K.
  static void rows_piece(const T* y, int64_t r0, int64_t r1, int64_t C, const A* shift,
                         A* block_mean, A* block_m2, ChannelStates& state) {
    for (int64_t b = r0; b < r1; b += kRowBlock) {
      const int64_t rows = std::min(kRowBlock, r1 - b);
      for (int64_t c0 = 0; c0 < C; c0 += kTileUnits * K) {
        const int64_t width = std::min<int64_t>(kTileUnits * K, C - c0);
        const int64_t tail = width % K;
        const T* tile = y + b * C + c0;
        with_units((width + K - 1) / K, [&](auto units) {
          constexpr int U = decltype(units)::value;
          if (tail) {
            block_tile<U, true>(tile, rows, C, shift + c0, tail, block_mean + c0, block_m2 + c0);
          } else {
            block_tile<U, false>(tile, rows, C, shift + c0, 0, block_mean + c0, block_m2 + c0);
          }
        });
      }
      state.merge(block_mean, block_m2, rows);
    }
  }

  static void rows(const T* y, const Geometry& g, A* mean_out, A* var_out) {
    const int64_t M = g.rows(), C = g.C;
    const int64_t padded = (C + K - 1) / K * K;
    std::vector<A> shift(padded, A(0));
    for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<A>(y[c]);
    const int64_t pieces = num_pieces(M * C, M);
    std::vector<ChannelStates> states(pieces, ChannelStates(C));
    for_each_piece(M, pieces, [&](int64_t p, int64_t r0, int64_t r1) {
      std::vector<A> block_mean(padded), block_m2(padded);
      rows_piece(y, r0, r1, C, shift.data(), block_mean.data(), block_m2.data(), states[p]);
    });
    finish(states, shift.data(), C, mean_out, var_out);
  }

  // ---- NCHW: y is N*C planes of HW ----

  // Block state (mean relative to shift, m2) of `runs` runs of `len` elements,
  // run i at first + i * stride. (Two chains: eight measured 0.72-0.81x as fast at
  // ResNet-20's and -50's NCHW shapes, unlike the channels_last tiles above.)
  static void block_runs(const T* first, int64_t stride, int64_t runs, int64_t len, A shift,
                         A& mean_out, A& m2_out) {
    const V sh(shift);
    // f(x - shift) summed over the block, two accumulators for two chains.
    auto reduce = [&](auto f) {
      V acc0(0), acc1(0);
      for (int64_t run = 0; run < runs; ++run) {
        const T* p = first + run * stride;
        int64_t i = 0;
        for (; i + 2 * K <= len; i += 2 * K) {
          acc0 += f(L::load(p + i) - sh);
          acc1 += f(L::load(p + i + K) - sh);
        }
        for (; i + K <= len; i += K) acc0 += f(L::load(p + i) - sh);
        if (i < len) acc1 += V::set(V(0), f(L::load(p + i, len - i) - sh), len - i);
      }
      return at::vec::vec_reduce_all<A>([](V& a, V& b) { return a + b; }, acc0 + acc1);
    };
    const A mean = reduce([](const V& d) { return d; }) / static_cast<A>(runs * len);
    const V mean_v(mean);
    m2_out = reduce([&](const V& d) {
      const V e = d - mean_v;
      return e * e;
    });
    mean_out = mean;
  }

  // Planes [n0, n1) of channel c into `state`.
  static void planes_piece(const T* y, const Geometry& g, int64_t c, int64_t n0, int64_t n1,
                           A shift, ChannelState& state) {
    const int64_t HW = g.HW, stride = g.C * HW;
    const T* channel = y + c * HW;
    A mean_b = 0, m2_b = 0;
    if (HW >= kPlaneBlock) {
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t i = 0; i < HW; i += kPlaneBlock) {
          const int64_t len = std::min(kPlaneBlock, HW - i);
          block_runs(channel + n * stride + i, stride, 1, len, shift, mean_b, m2_b);
          state.merge(mean_b, m2_b, len);
        }
      }
    } else {
      const int64_t group = kPlaneBlock / HW;
      for (int64_t n = n0; n < n1; n += group) {
        const int64_t runs = std::min(group, n1 - n);
        block_runs(channel + n * stride, stride, runs, HW, shift, mean_b, m2_b);
        state.merge(mean_b, m2_b, runs * HW);
      }
    }
  }

  static void planes(const T* y, const Geometry& g, A* mean_out, A* var_out) {
    const int64_t N = g.N, C = g.C, HW = g.HW;
    std::vector<A> shift(C);
    for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<A>(y[c * HW]);
    // Channels are independent; split the batch too when there are fewer
    // channels than threads (segments of the batch, merged in order).
    const int64_t threads = num_pieces(N * C * HW, N * C);
    const int64_t segments = std::min(N, (threads + C - 1) / C);
    std::vector<ChannelState> states(segments * C);
    at::parallel_for(0, segments * C, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t s = i / C, c = i % C;
        planes_piece(y, g, c, piece_begin(s, segments, N), piece_begin(s + 1, segments, N),
                     shift[c], states[i]);
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      ChannelState total;
      for (int64_t s = 0; s < segments; ++s) total.merge(states[s * C + c]);
      write(total.mean, total.m2, total.n, shift[c], mean_out + c, var_out + c);
    }
  }

  // ---- results ----

  static void write(double state_mean, double m2, int64_t n, A shift, A* mean, A* var) {
    *mean = static_cast<A>(static_cast<double>(shift) + state_mean);
    *var = static_cast<A>(m2 / static_cast<double>(n));
  }

  static void finish(std::vector<ChannelStates>& states, const A* shift, int64_t C, A* mean,
                     A* var) {
    ChannelStates& total = states[0];
    for (size_t p = 1; p < states.size(); ++p) total.merge(states[p]);
    for (int64_t c = 0; c < C; ++c) {
      write(total.mean[c], total.m2[c], total.n, shift[c], mean + c, var + c);
    }
  }

  // ---- bn_stats_backward ----

  static void backward(const StatsBackwardArgs& a) {
    const Geometry& g = a.g;
    const int64_t C = g.C;
    const T* y = static_cast<const T*>(a.y);
    T* out = static_cast<T*>(a.grad_y);
    const A* grad_mean = static_cast<const A*>(a.grad_mean);
    const A* grad_var = static_cast<const A*>(a.grad_var);
    const A* mean = static_cast<const A*>(a.mean);
    // grad_y = (y - mean) * slope + offset: slope = 2 grad_var / count,
    // offset = grad_mean / count (y - mean first: no cancellation for a large mean).
    const int64_t padded = (C + K - 1) / K * K;
    std::vector<A> slope(padded, A(0)), offset(padded, A(0)), mu(padded, A(0));
    const A inv_count = static_cast<A>(a.inv_count);
    for (int64_t c = 0; c < C; ++c) {
      slope[c] = A(2) * grad_var[c] * inv_count;
      offset[c] = grad_mean[c] * inv_count;
      mu[c] = mean[c];
    }
    if (g.layout == Layout::kRows) {
      at::parallel_for(
          0, g.rows(), std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)),
          [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
              const T* yr = y + r * C;
              T* outr = out + r * C;
              int64_t c = 0;
              for (; c + K <= C; c += K) {
                const V d = L::load(yr + c) - V::loadu(mu.data() + c);
                L::store(outr + c, at::vec::fmadd(d, V::loadu(slope.data() + c),
                                                  V::loadu(offset.data() + c)));
              }
              if (c < C) {
                const V d = L::load(yr + c, C - c) - V::loadu(mu.data() + c);
                L::store(outr + c,
                         at::vec::fmadd(d, V::loadu(slope.data() + c), V::loadu(offset.data() + c)),
                         C - c);
              }
            }
          });
      return;
    }
    const int64_t HW = g.HW;
    at::parallel_for(0, g.N * C, std::max<int64_t>(1, kGrain / std::max<int64_t>(HW, 1)),
                     [&](int64_t p0, int64_t p1) {
                       for (int64_t p = p0; p < p1; ++p) {
                         const int64_t c = p % C;
                         const V m(mu[c]), k(slope[c]), b(offset[c]);
                         const T* yp = y + p * HW;
                         T* outp = out + p * HW;
                         int64_t i = 0;
                         for (; i + K <= HW; i += K)
                           L::store(outp + i, at::vec::fmadd(L::load(yp + i) - m, k, b));
                         if (i < HW)
                           L::store(outp + i, at::vec::fmadd(L::load(yp + i, HW - i) - m, k, b),
                                    HW - i);
                       }
                     });
  }
};

}  // namespace

void bn_stats(const StatsArgs& a) {
  with_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    using A = acc_t<T>;
    const T* y = static_cast<const T*>(a.y);
    if (a.g.layout == Layout::kRows) {
      Stats<T>::rows(y, a.g, static_cast<A*>(a.mean), static_cast<A*>(a.var));
    } else {
      Stats<T>::planes(y, a.g, static_cast<A*>(a.mean), static_cast<A*>(a.var));
    }
  });
}

void bn_stats_backward(const StatsBackwardArgs& a) {
  with_dtype(a.dtype, [&](auto t) { Stats<decltype(t)>::backward(a); });
}

}  // namespace resfast::cpu::CPU_CAPABILITY
