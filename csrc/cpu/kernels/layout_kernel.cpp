// The copy of an activation between its two dense layouts, NCHW and
// channels_last. Per image it is the transpose of a [rows, cols] matrix (C x HW
// one way, HW x C the other). It goes by square tiles transposed in vector
// registers (ATen's transpose_mxn): the tile's rows are read and its columns
// written a whole cache line at a time, where ATen's copy_ between the two
// layouts writes element by element (up to 5x slower on ResNet activations:
// benchmarks/cpu_bn_ops.py --cases relayout). Only where ATen has such a
// transpose: float on AVX2 and AVX512, 16-bit types on AVX512. Elsewhere its
// transpose_mxn is a scalar loop, measured 2x slower than copy_ (DEFAULT, float),
// and the caller copies with ATen.
#include "common.h"

namespace resfast::cpu::CPU_CAPABILITY {
namespace {

// 16 x 16 elements: one 64-byte line per row for float, a register per row on AVX512.
constexpr int64_t kTile = 16;

#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kVectorFloat = true, kVector16Bit = true;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr bool kVectorFloat = true, kVector16Bit = false;
#else
constexpr bool kVectorFloat = false, kVector16Bit = false;
#endif

template <typename T>
void transpose_tile(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t m, int64_t n) {
  if (m == kTile && n == kTile) {
    at::vec::transpose_mxn<T, kTile, kTile>(src, ld_src, dst, ld_dst);
  } else {
    at::vec::transpose_mxn<T>(src, ld_src, dst, ld_dst, static_cast<int>(m), static_cast<int>(n));
  }
}

// dst[n][j][i] = src[n][i][j], i < rows, j < cols. A work item is a strip of
// kTile rows or columns of one image, across the shorter side, walked tile by
// tile along the longer one: the tiles of a strip then read (rows) or write
// (columns) kTile long sequential runs, which is what keeps the walk at memory
// speed (measured: the other order is 2x slower on 64 x 3136 floats).
template <typename T>
void transpose_images(const T* src, T* dst, int64_t N, int64_t rows, int64_t cols) {
  const bool row_strips = rows <= cols;
  const int64_t across = row_strips ? rows : cols, along = row_strips ? cols : rows;
  const int64_t strips = (across + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, kTile * along));
  at::parallel_for(0, N * strips, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const T* s = src + (item / strips) * rows * cols;
      T* d = dst + (item / strips) * rows * cols;
      const int64_t a = (item % strips) * kTile;
      const int64_t width = std::min(kTile, across - a);
      for (int64_t b = 0; b < along; b += kTile) {
        const int64_t length = std::min(kTile, along - b);
        const int64_t i = row_strips ? a : b, j = row_strips ? b : a;
        transpose_tile(s + i * cols + j, cols, d + j * rows + i, rows, row_strips ? width : length,
                       row_strips ? length : width);
      }
    }
  });
}

}  // namespace

bool transpose_images(const TransposeArgs& a) {
  // A side under one tile leaves the tiles mostly empty: a network's 3-channel input
  // was 2.5-5x slower in tiles 3/16 full (benchmarks/cpu_bn_ops.py --cases relayout).
  if (a.N == 0 || std::min(a.rows, a.cols) < kTile) return false;
  // The copy moves bits: 16-bit types go as bfloat16, 32-bit ones as float.
  const auto bytes = c10::elementSize(a.dtype);
  if (bytes == 2 && kVector16Bit) {
    transpose_images(static_cast<const c10::BFloat16*>(a.src), static_cast<c10::BFloat16*>(a.dst),
                     a.N, a.rows, a.cols);
    return true;
  }
  if (bytes == 4 && kVectorFloat) {
    transpose_images(static_cast<const float*>(a.src), static_cast<float*>(a.dst), a.N, a.rows,
                     a.cols);
    return true;
  }
  return false;
}

}  // namespace resfast::cpu::CPU_CAPABILITY
