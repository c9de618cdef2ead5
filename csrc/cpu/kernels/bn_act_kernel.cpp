// bn_act and bn_act_backward: one read of each input, one write of each output.
// bn_batch_act_backward runs the backward twice: once for the sums only, then
// with the batch statistics' gradient added to grad_y (kStatsGrad).
//
// The backward produces grad_y, grad_residual and both per-channel sums in the
// same pass. Sums are accumulated per block in the accumulation type (in
// registers; for wide channels_last rows and small NCHW planes, in per-channel
// vectors in cache) and per thread in double, merged in a fixed order. Every
// loop walks memory in order.
#include "common.h"

namespace resfast::cpu::CPU_CAPABILITY {
namespace {

// Compile-time choices of one bn_act(_backward) call. kStatsGrad: grad_y also
// receives (y - centre) * stats_slope + stats_offset (with a scale, no sums).
template <bool Scale, bool Residual, bool Relu, bool Sums = false, bool StatsGrad = false>
struct Flags {
  static constexpr bool kScale = Scale, kResidual = Residual, kRelu = Relu, kSums = Sums;
  static constexpr bool kStatsGrad = StatsGrad;
};

template <typename F>
void with_flags(bool scale, bool residual, bool relu, bool sums, const F& f) {
  with_bool(scale, [&](auto s) {
    with_bool(residual, [&](auto r) {
      with_bool(relu, [&](auto a) {
        with_bool(sums, [&](auto m) {
          f(Flags<decltype(s)::value, decltype(r)::value, decltype(a)::value,
                  decltype(m)::value>{});
        });
      });
    });
  });
}

template <typename T>
struct Act {
  using L = Lanes<T>;
  using A = typename L::A;
  using V = typename L::V;
  static constexpr int64_t K = L::kSize;
  static constexpr int kTileUnits = sizeof(V) >= 64 ? 4 : 2;

  // Loads K elements at p, or the first n when n < K (the rest are zero).
  static V load(const T* p, int64_t n) { return n < K ? L::load(p, n) : L::load(p); }
  static void store(T* p, const V& v, int64_t n) {
    if (n < K) {
      L::store(p, v, n);
    } else {
      L::store(p, v);
    }
  }

  // The tensors of one call as loop-local pointers: the loops read them from
  // registers (through a reference they would be reloaded after every vector
  // store, which may alias anything).
  struct Tensors {
    const T* in;  // y (forward) or grad_out (backward)
    const T* y;
    const T* residual;
    T* out;  // out (forward) or grad_y (backward)
    T* grad_residual;
  };

  // The scale, shift and centre of every channel (and the statistics'
  // gradient coefficients, when given), padded with zeros to whole vectors.
  struct Channels {
    std::vector<A> sc, sh, cc, slope, offset;
    Channels(const void* scale, const void* shift, const void* centre, int64_t C,
             const void* stats_slope = nullptr, const void* stats_offset = nullptr)
        : sc(padded(C), A(0)), sh(padded(C), A(0)), cc(padded(C), A(0)) {
      if (scale == nullptr) return;
      std::copy_n(static_cast<const A*>(scale), C, sc.begin());
      std::copy_n(static_cast<const A*>(shift), C, sh.begin());
      std::copy_n(static_cast<const A*>(centre), C, cc.begin());
      if (stats_slope == nullptr) return;
      slope.assign(padded(C), A(0));
      offset.assign(padded(C), A(0));
      std::copy_n(static_cast<const A*>(stats_slope), C, slope.begin());
      std::copy_n(static_cast<const A*>(stats_offset), C, offset.begin());
    }
  };
  static int64_t padded(int64_t C) { return (C + K - 1) / K * K; }

  // channels_last: calls f(rows, off, c, n, sc, sh, cc) for each vector of
  // channels [c, c + n) of rows [r0, r1), `rows` (an integral_constant) rows
  // at a time from offset off (row i at off + i * C), so that a vector of
  // scale, shift and centre (and of the caller's sums) is loaded once for
  // Group rows (4, or 1 for one row after another in memory order).
  static constexpr int kRowGroup = 4;
  template <int Group = kRowGroup, typename Fn>
  static void walk_rows(int64_t r0, int64_t r1, int64_t C, const Channels& ch, const Fn& f) {
    const A *sc = ch.sc.data(), *sh = ch.sh.data(), *cc = ch.cc.data();
    auto group = [&](int64_t r, auto rows) {
      auto vec = [&](int64_t c, int64_t n) {
        f(rows, r * C + c, c, n, V::loadu(sc + c), V::loadu(sh + c), V::loadu(cc + c));
      };
      int64_t c = 0;
      for (; c + K <= C; c += K) vec(c, K);
      if (c < C) vec(c, C - c);
    };
    int64_t r = r0;
    for (; r + Group <= r1; r += Group) group(r, std::integral_constant<int, Group>{});
    for (; r < r1; ++r) group(r, std::integral_constant<int, 1>{});
  }

  // The forward (and the backward without sums) walks rows in groups while the
  // activation is at most this many elements (in cache, the group saves loads
  // of the channel vectors); a larger one streams from memory, which the
  // groups' interleaved rows slow down (measured: 2x at 8x256x56x56 float32).
  static constexpr int64_t kGroupedForward = int64_t{1} << 20;

  // ---- forward ----

  // n <= K elements at offset `off` of every activation; sc/sh/cc the channels'.
  template <typename F>
  static void forward_vec(const Tensors& t, int64_t off, int64_t n, const V& sc, const V& sh,
                          const V& cc) {
    V z = load(t.in + off, n);
    if constexpr (F::kScale) z = at::vec::fmadd(z - cc, sc, sh);
    if constexpr (F::kResidual) z += load(t.residual + off, n);
    // clamp_min keeps NaN, as at::relu does.
    if constexpr (F::kRelu) z = at::vec::clamp_min(z, V(0));
    store(t.out + off, z, n);
  }

  template <typename F>
  static void forward(const ActArgs& a) {
    const Geometry& g = a.g;
    const int64_t C = g.C;
    const Tensors tensors{static_cast<const T*>(a.y), nullptr, static_cast<const T*>(a.residual),
                          static_cast<T*>(a.out), nullptr};
    const Channels ch(a.scale, a.shift, a.centre, C);
    if (g.layout == Layout::kRows) {
      const bool grouped = g.rows() * C <= kGroupedForward;
      at::parallel_for(0, g.rows(), grain(C), [&](int64_t r0, int64_t r1) {
        const Tensors t = tensors;
        auto f = [&](auto rows, int64_t off, int64_t, int64_t n, const V& sc, const V& sh,
                     const V& cc) {
          for (int i = 0; i < decltype(rows)::value; ++i) {
            forward_vec<F>(t, off + i * C, n, sc, sh, cc);
          }
        };
        if (grouped) {
          walk_rows(r0, r1, C, ch, f);
        } else {
          walk_rows<1>(r0, r1, C, ch, f);
        }
      });
      return;
    }
    const int64_t HW = g.HW;
    at::parallel_for(0, g.N * C, grain(HW), [&](int64_t p0, int64_t p1) {
      const Tensors t = tensors;
      // The channel follows the plane without a division per plane.
      for (int64_t p = p0, c = p0 % C; p < p1; ++p, c = c + 1 == C ? 0 : c + 1) {
        const V sc(ch.sc[c]), sh(ch.sh[c]), cc(ch.cc[c]);
        int64_t i = 0;
        for (; i + K <= HW; i += K) forward_vec<F>(t, p * HW + i, K, sc, sh, cc);
        if (i < HW) forward_vec<F>(t, p * HW + i, HW - i, sc, sh, cc);
      }
    });
  }

  // ---- backward ----

  // g for n <= K elements at offset `off` (also writing grad_y and
  // grad_residual); yv receives y - centre where the sums need it. With
  // kStatsGrad, grad_y = g * sc + (y - centre) * slope + offset.
  template <typename F>
  static V backward_vec(const Tensors& t, int64_t off, int64_t n, const V& sc, const V& sh,
                        const V& cc, V& yv, const V& slope = V(0), const V& offset = V(0)) {
    V g = load(t.in + off, n);
    if constexpr (F::kRelu || F::kSums || F::kStatsGrad) {
      yv = load(t.y + off, n);
      if constexpr (F::kScale) yv = yv - cc;
    }
    if constexpr (F::kRelu) {
      V z = F::kScale ? at::vec::fmadd(yv, sc, sh) : yv;
      if constexpr (F::kResidual) z += load(t.residual + off, n);
      // A product, not a select: NaN and Inf in grad_out survive the mask.
      g = g * z.gt(V(0));
    }
    if constexpr (F::kStatsGrad) {
      store(t.out + off, at::vec::fmadd(yv, slope, at::vec::fmadd(g, sc, offset)), n);
    } else if (t.out) {
      store(t.out + off, F::kScale ? g * sc : g, n);
    }
    if (t.grad_residual) store(t.grad_residual + off, g, n);
    return g;
  }

  static Tensors backward_tensors(const ActBackwardArgs& a) {
    return {static_cast<const T*>(a.grad_out), static_cast<const T*>(a.y),
            static_cast<const T*>(a.residual), static_cast<T*>(a.grad_y),
            static_cast<T*>(a.grad_residual)};
  }

  // channels_last, C <= kTileUnits * K (a row is one tile of U vectors, the
  // last `last` channels wide): rows [r0, r0 + rows), sums in registers,
  // added to sum_gy/sum_g.
  template <typename F, int U>
  static void rows_tile(const Tensors& t, int64_t r0, int64_t rows, int64_t C, int64_t last,
                        const Channels& ch, double* sum_gy, double* sum_g) {
    V sc[U], sh[U], cc[U], acc_gy[U], acc_g[U];
    for (int u = 0; u < U; ++u) {
      sc[u] = V::loadu(ch.sc.data() + u * K);
      sh[u] = V::loadu(ch.sh.data() + u * K);
      cc[u] = V::loadu(ch.cc.data() + u * K);
      acc_gy[u] = acc_g[u] = V(0);
    }
    for (int64_t r = r0; r < r0 + rows; ++r) {
      for (int u = 0; u < U; ++u) {
        V yv;
        const V g = backward_vec<F>(t, r * C + u * K, u == U - 1 ? last : K, sc[u], sh[u], cc[u],
                                    yv);
        acc_gy[u] = at::vec::fmadd(g, yv, acc_gy[u]);
        acc_g[u] += g;
      }
    }
    A gy[U * K], g1[U * K];
    for (int u = 0; u < U; ++u) {
      acc_gy[u].store(gy + u * K);
      acc_g[u].store(g1 + u * K);
    }
    for (int64_t i = 0; i < C; ++i) {
      sum_gy[i] += gy[i];
      sum_g[i] += g1[i];
    }
  }

  // channels_last, wider rows: rows [r0, r0 + rows) walked in memory order,
  // the block's sums in acc_gy/acc_g (C rounded up to K, in cache), then
  // added to sum_gy/sum_g. A tile of columns held in registers would walk
  // the rows C elements apart, which costs more than the accumulators' loads.
  template <typename F>
  static void rows_block(const Tensors& t, int64_t r0, int64_t rows, int64_t C,
                         const Channels& ch, A* acc_gy, A* acc_g, double* sum_gy, double* sum_g) {
    std::fill_n(acc_gy, padded(C), A(0));
    std::fill_n(acc_g, padded(C), A(0));
    walk_rows(r0, r0 + rows, C, ch,
              [&](auto group, int64_t off, int64_t c, int64_t n, const V& sc, const V& sh,
                  const V& cc) {
                V gy = V::loadu(acc_gy + c), g1 = V::loadu(acc_g + c);
                for (int i = 0; i < decltype(group)::value; ++i) {
                  V yv;
                  const V g = backward_vec<F>(t, off + i * C, n, sc, sh, cc, yv);
                  gy = at::vec::fmadd(g, yv, gy);
                  g1 += g;
                }
                gy.store(acc_gy + c);
                g1.store(acc_g + c);
              });
    for (int64_t c = 0; c < C; ++c) {
      sum_gy[c] += acc_gy[c];
      sum_g[c] += acc_g[c];
    }
  }

  template <int U = 1, typename Fn>
  static void with_units(int64_t units, const Fn& f) {
    if constexpr (U <= kTileUnits) {
      if (units == U) {
        f(std::integral_constant<int, U>{});
      } else {
        with_units<U + 1>(units, f);
      }
    }
  }

  template <typename F>
  static void backward_rows(const ActBackwardArgs& a) {
    const int64_t M = a.g.rows(), C = a.g.C;
    const Tensors tensors = backward_tensors(a);
    const Channels ch(a.scale, a.shift, a.centre, C, a.stats_slope, a.stats_offset);
    if constexpr (!F::kSums) {
      // Grouped rows only in cache, as in the forward (kGroupedForward).
      const bool grouped = M * C <= kGroupedForward;
      at::parallel_for(0, M, grain(C), [&](int64_t r0, int64_t r1) {
        const Tensors t = tensors;
        auto f = [&](auto rows, int64_t off, int64_t c, int64_t n, const V& sc, const V& sh,
                     const V& cc) {
          V unused, slope(0), offset(0);
          if constexpr (F::kStatsGrad) {
            slope = V::loadu(ch.slope.data() + c);
            offset = V::loadu(ch.offset.data() + c);
          }
          for (int i = 0; i < decltype(rows)::value; ++i) {
            backward_vec<F>(t, off + i * C, n, sc, sh, cc, unused, slope, offset);
          }
        };
        if (grouped) {
          walk_rows(r0, r1, C, ch, f);
        } else {
          walk_rows<1>(r0, r1, C, ch, f);
        }
      });
      return;
    }
    const int64_t pieces = num_pieces(M * C, M);
    std::vector<ChannelSums> sums(pieces, ChannelSums(C));
    for_each_piece(M, pieces, [&](int64_t p, int64_t r0, int64_t r1) {
      const Tensors t = tensors;
      double* sum_gy = sums[p].gy.data();
      double* sum_g = sums[p].g.data();
      if (C <= kTileUnits * K) {
        const int64_t units = (C + K - 1) / K;
        with_units(units, [&](auto u) {
          for (int64_t b = r0; b < r1; b += kRowBlock) {
            rows_tile<F, decltype(u)::value>(t, b, std::min(kRowBlock, r1 - b), C,
                                             C - (units - 1) * K, ch, sum_gy, sum_g);
          }
        });
        return;
      }
      std::vector<A> acc(2 * padded(C));
      for (int64_t b = r0; b < r1; b += kRowBlock) {
        rows_block<F>(t, b, std::min(kRowBlock, r1 - b), C, ch, acc.data(),
                      acc.data() + padded(C), sum_gy, sum_g);
      }
    });
    write_sums(a, sums);
  }

  // NCHW: elements [i0, i1) of plane p of one channel, its sums added to
  // acc_gy/acc_g (two of each: two dependency chains, each half as long).
  template <typename F>
  static void plane_span(const Tensors& t, int64_t p, int64_t HW, int64_t i0, int64_t i1,
                         const V& sc, const V& sh, const V& cc, V* acc_gy, V* acc_g,
                         const V& slope = V(0), const V& offset = V(0)) {
    const int64_t base = p * HW;
    auto vec = [&](int64_t i, int64_t n, int chain) {
      V yv;
      const V g = backward_vec<F>(t, base + i, n, sc, sh, cc, yv, slope, offset);
      if constexpr (F::kSums) {
        acc_gy[chain] = at::vec::fmadd(g, yv, acc_gy[chain]);
        acc_g[chain] += g;
      }
    };
    int64_t i = i0;
    for (; i + 2 * K <= i1; i += 2 * K) {
      vec(i, K, 0);
      vec(i + K, K, 1);
    }
    if (i + K <= i1) {
      vec(i, K, 0);
      i += K;
    }
    if (i < i1) vec(i, i1 - i, 1);
  }

  // Planes of at most kSmallPlane vectors are summed channel by channel
  // (items of a segment of the batch and a channel, as in bn_stats), the
  // channel's vectors accumulating in registers over its planes until a lane
  // holds kPlaneBlock / K terms: a horizontal sum per plane, or vector sums
  // per channel in cache, cost more than such a plane (measured at 7x7).
  // Larger planes are walked in memory order.
  static constexpr int64_t kSmallPlane = 4;

  template <typename F>
  static void small_planes(const ActBackwardArgs& a) {
    const int64_t N = a.g.N, C = a.g.C, HW = a.g.HW;
    const Tensors tensors = backward_tensors(a);
    const Channels ch(a.scale, a.shift, a.centre, C);
    const int64_t threads = num_pieces(N * C * HW, N * C);
    const int64_t segments = std::min(N, (threads + C - 1) / C);
    const int64_t planes_per_sum = std::max<int64_t>(1, kPlaneBlock / K / ((HW + K - 1) / K));
    std::vector<ChannelSums> sums(segments, ChannelSums(C));
    at::parallel_for(0, segments * C, 1, [&](int64_t i0, int64_t i1) {
      const Tensors t = tensors;
      auto add = [](V& x, V& y) { return x + y; };
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t s = i / C, c = i % C;
        const V sc(ch.sc[c]), sh(ch.sh[c]), cc(ch.cc[c]);
        double total_gy = 0, total_g = 0;
        const int64_t n1 = piece_begin(s + 1, segments, N);
        for (int64_t n = piece_begin(s, segments, N); n < n1; n += planes_per_sum) {
          V acc_gy[2] = {V(0), V(0)}, acc_g[2] = {V(0), V(0)};
          for (int64_t m = n; m < std::min(n1, n + planes_per_sum); ++m) {
            plane_span<F>(t, m * C + c, HW, 0, HW, sc, sh, cc, acc_gy, acc_g);
          }
          total_gy += at::vec::vec_reduce_all<A>(add, acc_gy[0] + acc_gy[1]);
          total_g += at::vec::vec_reduce_all<A>(add, acc_g[0] + acc_g[1]);
        }
        sums[s].gy[c] = total_gy;
        sums[s].g[c] = total_g;
      }
    });
    write_sums(a, sums);
  }

  // NCHW sums of planes [p0, p1), larger ones: summed in registers,
  // kPlaneBlock elements at a time.
  template <typename F>
  static void large_planes(const Tensors& tensors, const Channels& ch, int64_t p0, int64_t p1,
                           int64_t C, int64_t HW, ChannelSums& sums) {
    const Tensors t = tensors;
    auto add = [](V& x, V& y) { return x + y; };
    for (int64_t p = p0, c = p0 % C; p < p1; ++p, c = c + 1 == C ? 0 : c + 1) {
      const V sc(ch.sc[c]), sh(ch.sh[c]), cc(ch.cc[c]);
      for (int64_t j = 0; j < HW; j += kPlaneBlock) {
        V acc_gy[2] = {V(0), V(0)}, acc_g[2] = {V(0), V(0)};
        plane_span<F>(t, p, HW, j, std::min(HW, j + kPlaneBlock), sc, sh, cc, acc_gy, acc_g);
        sums.gy[c] += at::vec::vec_reduce_all<A>(add, acc_gy[0] + acc_gy[1]);
        sums.g[c] += at::vec::vec_reduce_all<A>(add, acc_g[0] + acc_g[1]);
      }
    }
  }

  template <typename F>
  static void backward_planes(const ActBackwardArgs& a) {
    const int64_t N = a.g.N, C = a.g.C, HW = a.g.HW;
    const Tensors tensors = backward_tensors(a);
    const Channels ch(a.scale, a.shift, a.centre, C, a.stats_slope, a.stats_offset);
    if constexpr (!F::kSums) {
      at::parallel_for(0, N * C, grain(HW), [&](int64_t p0, int64_t p1) {
        const Tensors t = tensors;
        for (int64_t p = p0, c = p0 % C; p < p1; ++p, c = c + 1 == C ? 0 : c + 1) {
          V unused_gy[2], unused_g[2];
          plane_span<F>(t, p, HW, 0, HW, V(ch.sc[c]), V(ch.sh[c]), V(ch.cc[c]), unused_gy,
                        unused_g, F::kStatsGrad ? V(ch.slope[c]) : V(0),
                        F::kStatsGrad ? V(ch.offset[c]) : V(0));
        }
      });
      return;
    }
    if (HW <= kSmallPlane * K) {
      small_planes<F>(a);
      return;
    }
    // Pieces of the planes in memory order (a walk channel by channel would
    // jump a page or more from plane to plane, ahead of the prefetcher), each
    // with its channels' sums in double, merged in piece order.
    const int64_t planes = N * C;
    const int64_t pieces = num_pieces(planes * HW, planes);
    std::vector<ChannelSums> sums(pieces, ChannelSums(C));
    for_each_piece(planes, pieces, [&](int64_t piece, int64_t p0, int64_t p1) {
      large_planes<F>(tensors, ch, p0, p1, C, HW, sums[piece]);
    });
    write_sums(a, sums);
  }

  static void write_sums(const ActBackwardArgs& a, const std::vector<ChannelSums>& sums) {
    const int64_t C = a.g.C;
    A* out_gy = static_cast<A*>(a.sum_gy);
    A* out_g = static_cast<A*>(a.sum_g);
    for (int64_t c = 0; c < C; ++c) {
      double gy = 0, g = 0;
      for (const ChannelSums& s : sums) {
        gy += s.gy[c];
        g += s.g[c];
      }
      out_gy[c] = static_cast<A>(gy);
      out_g[c] = static_cast<A>(g);
    }
  }

  template <typename F>
  static void backward(const ActBackwardArgs& a) {
    if (a.g.layout == Layout::kRows) {
      backward_rows<F>(a);
    } else {
      backward_planes<F>(a);
    }
  }

  // parallel_for grain in units of `inner` elements.
  static int64_t grain(int64_t inner) {
    return std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1));
  }
};

}  // namespace

void bn_act(const ActArgs& a) {
  with_dtype(a.dtype, [&](auto t) {
    with_flags(a.scale != nullptr, a.residual != nullptr, a.relu, false,
               [&](auto f) { Act<decltype(t)>::template forward<decltype(f)>(a); });
  });
}

void bn_act_backward(const ActBackwardArgs& a) {
  with_dtype(a.dtype, [&](auto t) {
    using Loops = Act<decltype(t)>;
    if (a.stats_slope != nullptr) {
      // bn_batch_act_backward's second pass: a scale, grad_y, no sums.
      with_bool(a.relu && a.residual != nullptr, [&](auto r) {
        with_bool(a.relu, [&](auto act) {
          Loops::template backward<Flags<true, decltype(r)::value, decltype(act)::value, false,
                                         true>>(a);
        });
      });
      return;
    }
    // The residual only matters through the ReLU mask.
    with_flags(a.scale != nullptr, a.relu && a.residual != nullptr, a.relu, a.sum_g != nullptr,
               [&](auto f) { Act<decltype(t)>::template backward<decltype(f)>(a); });
  });
}

}  // namespace resfast::cpu::CPU_CAPABILITY
