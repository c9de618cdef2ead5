// bn_act and bn_act_backward: one read of each input, one write of each output.
//
// The backward produces grad_y, grad_residual and both per-channel sums in the
// same pass. Sums are accumulated per block in the accumulation type (in
// registers) and per thread in double, merged in a fixed order.
#include "common.h"

namespace resfast::cpu::CPU_CAPABILITY {
namespace {

// Compile-time choices of one bn_act(_backward) call.
template <bool Scale, bool Residual, bool Relu, bool Sums = false>
struct Flags {
  static constexpr bool kScale = Scale, kResidual = Residual, kRelu = Relu, kSums = Sums;
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

  // ---- forward ----

  // n <= K elements at offset `off` of every activation; sc/sh/cc the channels'.
  template <typename F>
  static void forward_vec(const ActArgs& a, int64_t off, int64_t n, const V& sc, const V& sh,
                          const V& cc) {
    V z = load(static_cast<const T*>(a.y) + off, n);
    if constexpr (F::kScale) z = at::vec::fmadd(z - cc, sc, sh);
    if constexpr (F::kResidual) z += load(static_cast<const T*>(a.residual) + off, n);
    if constexpr (F::kRelu) z = relu(z);
    store(static_cast<T*>(a.out) + off, z, n);
  }

  template <typename F>
  static void forward(const ActArgs& a) {
    const Geometry& g = a.g;
    const A* scale = static_cast<const A*>(a.scale);
    const A* shift = static_cast<const A*>(a.shift);
    const A* centre = static_cast<const A*>(a.centre);
    const int64_t C = g.C;
    if (g.layout == Layout::kRows) {
      const int64_t padded = (C + K - 1) / K * K;
      std::vector<A> sc(padded, A(0)), sh(padded, A(0)), cc(padded, A(0));
      if constexpr (F::kScale) {
        std::copy(scale, scale + C, sc.begin());
        std::copy(shift, shift + C, sh.begin());
        std::copy(centre, centre + C, cc.begin());
      }
      at::parallel_for(0, g.rows(), grain(C), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t c = 0; c < C; c += K) {
            forward_vec<F>(a, r * C + c, std::min(K, C - c), V::loadu(sc.data() + c),
                           V::loadu(sh.data() + c), V::loadu(cc.data() + c));
          }
        }
      });
      return;
    }
    const int64_t HW = g.HW;
    at::parallel_for(0, g.N * C, grain(HW), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % C;
        const V sc(F::kScale ? scale[c] : A(0)), sh(F::kScale ? shift[c] : A(0));
        const V cc(F::kScale ? centre[c] : A(0));
        for (int64_t i = 0; i < HW; i += K)
          forward_vec<F>(a, p * HW + i, std::min(K, HW - i), sc, sh, cc);
      }
    });
  }

  // ---- backward ----

  // g for n <= K elements at offset `off` (also writing grad_y and
  // grad_residual); yv receives y - centre where the sums need it.
  template <typename F>
  static V backward_vec(const ActBackwardArgs& a, int64_t off, int64_t n, const V& sc, const V& sh,
                        const V& cc, V& yv) {
    V g = load(static_cast<const T*>(a.grad_out) + off, n);
    if constexpr (F::kRelu || F::kSums) {
      yv = load(static_cast<const T*>(a.y) + off, n);
      if constexpr (F::kScale) yv = yv - cc;
    }
    if constexpr (F::kRelu) {
      V z = F::kScale ? at::vec::fmadd(yv, sc, sh) : yv;
      if constexpr (F::kResidual) z += load(static_cast<const T*>(a.residual) + off, n);
      // A product, not a select: NaN and Inf in grad_out survive the mask.
      g = g * z.gt(V(0));
    }
    if (a.grad_y) store(static_cast<T*>(a.grad_y) + off, F::kScale ? g * sc : g, n);
    if (a.grad_residual) store(static_cast<T*>(a.grad_residual) + off, g, n);
    return g;
  }

  // channels_last: rows [0, rows) of a block, the U vectors of channels from
  // c0 (the last one `last` channels wide); sums added to sum_gy/sum_g.
  template <typename F, int U>
  static void rows_tile(const ActBackwardArgs& a, int64_t r0, int64_t rows, int64_t c0,
                        int64_t last, const A* scale, const A* shift, const A* centre,
                        double* sum_gy, double* sum_g) {
    const int64_t C = a.g.C;
    V sc[U], sh[U], cc[U], acc_gy[U], acc_g[U];
    for (int u = 0; u < U; ++u) {
      sc[u] = V::loadu(scale + c0 + u * K);
      sh[u] = V::loadu(shift + c0 + u * K);
      cc[u] = V::loadu(centre + c0 + u * K);
      acc_gy[u] = acc_g[u] = V(0);
    }
    for (int64_t r = r0; r < r0 + rows; ++r) {
      for (int u = 0; u < U; ++u) {
        V yv;
        const V g = backward_vec<F>(a, r * C + c0 + u * K, u == U - 1 ? last : K, sc[u], sh[u],
                                    cc[u], yv);
        if constexpr (F::kSums) {
          acc_gy[u] = at::vec::fmadd(g, yv, acc_gy[u]);
          acc_g[u] += g;
        }
      }
    }
    if constexpr (F::kSums) {
      A gy[U * K], g1[U * K];
      for (int u = 0; u < U; ++u) {
        acc_gy[u].store(gy + u * K);
        acc_g[u].store(g1 + u * K);
      }
      const int64_t width = (U - 1) * K + last;
      for (int64_t i = 0; i < width; ++i) {
        sum_gy[c0 + i] += gy[i];
        sum_g[c0 + i] += g1[i];
      }
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
    const int64_t padded = (C + K - 1) / K * K;
    std::vector<A> sc(padded, A(0)), sh(padded, A(0)), cc(padded, A(0));
    if constexpr (F::kScale) {
      std::copy(static_cast<const A*>(a.scale), static_cast<const A*>(a.scale) + C, sc.begin());
      std::copy(static_cast<const A*>(a.shift), static_cast<const A*>(a.shift) + C, sh.begin());
      std::copy(static_cast<const A*>(a.centre), static_cast<const A*>(a.centre) + C, cc.begin());
    }
    const int64_t pieces = num_pieces(M * C, M);
    std::vector<ChannelSums> sums(F::kSums ? pieces : 0, ChannelSums(C));
    for_each_piece(M, pieces, [&](int64_t p, int64_t r0, int64_t r1) {
      double* sum_gy = F::kSums ? sums[p].gy.data() : nullptr;
      double* sum_g = F::kSums ? sums[p].g.data() : nullptr;
      for (int64_t b = r0; b < r1; b += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, r1 - b);
        for (int64_t c0 = 0; c0 < C; c0 += kTileUnits * K) {
          const int64_t width = std::min<int64_t>(kTileUnits * K, C - c0);
          const int64_t units = (width + K - 1) / K;
          with_units(units, [&](auto u) {
            rows_tile<F, decltype(u)::value>(a, b, rows, c0, width - (units - 1) * K, sc.data(),
                                             sh.data(), cc.data(), sum_gy, sum_g);
          });
        }
      }
    });
    if constexpr (F::kSums) write_sums(a, sums, /*stride=*/1);
  }

  // NCHW: elements [i0, i1) of plane p of channel c; returns its sums in acc_gy/acc_g.
  template <typename F>
  static void plane_span(const ActBackwardArgs& a, int64_t p, int64_t i0, int64_t i1, A sc, A sh,
                         A cc, V& acc_gy, V& acc_g) {
    const V scv(sc), shv(sh), ccv(cc);
    const int64_t base = p * a.g.HW;
    for (int64_t i = i0; i < i1; i += K) {
      V yv;
      const V g = backward_vec<F>(a, base + i, std::min(K, i1 - i), scv, shv, ccv, yv);
      if constexpr (F::kSums) {
        acc_gy = at::vec::fmadd(g, yv, acc_gy);
        acc_g += g;
      }
    }
  }

  template <typename F>
  static void backward_planes(const ActBackwardArgs& a) {
    const int64_t N = a.g.N, C = a.g.C, HW = a.g.HW;
    const A* scale = static_cast<const A*>(a.scale);
    const A* shift = static_cast<const A*>(a.shift);
    const A* centre = static_cast<const A*>(a.centre);
    auto channel = [&](int64_t c, A& sc, A& sh, A& cc) {
      sc = F::kScale ? scale[c] : A(0);
      sh = F::kScale ? shift[c] : A(0);
      cc = F::kScale ? centre[c] : A(0);
    };
    if constexpr (!F::kSums) {
      at::parallel_for(0, N * C, grain(HW), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          A sc, sh, cc;
          channel(p % C, sc, sh, cc);
          V unused_gy, unused_g;
          plane_span<F>(a, p, 0, HW, sc, sh, cc, unused_gy, unused_g);
        }
      });
      return;
    }
    // One item per (segment of the batch, channel), as in bn_stats.
    const int64_t threads = num_pieces(N * C * HW, N * C);
    const int64_t segments = std::min(N, (threads + C - 1) / C);
    std::vector<ChannelSums> sums(segments, ChannelSums(C));
    at::parallel_for(0, segments * C, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t s = i / C, c = i % C;
        A sc, sh, cc;
        channel(c, sc, sh, cc);
        double total_gy = 0, total_g = 0;
        for (int64_t n = piece_begin(s, segments, N); n < piece_begin(s + 1, segments, N); ++n) {
          for (int64_t j = 0; j < HW; j += kPlaneBlock) {
            V acc_gy(0), acc_g(0);
            plane_span<F>(a, n * C + c, j, std::min(HW, j + kPlaneBlock), sc, sh, cc, acc_gy,
                          acc_g);
            total_gy += at::vec::vec_reduce_all<A>([](V& x, V& y) { return x + y; }, acc_gy);
            total_g += at::vec::vec_reduce_all<A>([](V& x, V& y) { return x + y; }, acc_g);
          }
        }
        sums[s].gy[c] = total_gy;
        sums[s].g[c] = total_g;
      }
    });
    write_sums(a, sums, 1);
  }

  static void write_sums(const ActBackwardArgs& a, const std::vector<ChannelSums>& sums, int64_t) {
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
    // The residual only matters through the ReLU mask.
    with_flags(a.scale != nullptr, a.relu && a.residual != nullptr, a.relu, a.sum_g != nullptr,
               [&](auto f) { Act<decltype(t)>::template backward<decltype(f)>(a); });
  });
}

}  // namespace resfast::cpu::CPU_CAPABILITY
