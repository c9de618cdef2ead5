// The transforms of a Winograd F(4x4, 3x3) convolution (Lavin and Gray, 2016) over
// channels_last float32 activations, vectorized across channels: a 6x6 input tile is
// transformed into 36 channel vectors, one for each of the 36 GEMMs that replace the
// convolution, and the 36 GEMM outputs of a tile are transformed back into its 4x4
// outputs, with the layer's per-channel scale and shift, residual add and ReLU applied on
// the way out. csrc/cpu/conv2d_winograd.cpp runs the GEMMs between the two.
//
// The tile of outputs (4ty..4ty+3, 4tx..4tx+3) reads inputs (4ty-1..4ty+4, 4tx-1..4tx+4):
// padding 1, the inputs outside the image read as zero and the outputs outside it are not
// written.
#include "common.h"

namespace resfast::cpu::CPU_CAPABILITY {
namespace {

using Vec = Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

Vec load(const float* p, int64_t n) { return n == kLanes ? Vec::loadu(p) : Vec::loadu(p, n); }
void store(float* p, const Vec& v, int64_t n) {
  if (n == kLanes) {
    v.store(p);
  } else {
    v.store(p, n);
  }
}

// B^T d for one column of six: the rows of F(4x4, 3x3)'s input transform
//   [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1],
// with its common terms shared.
inline void input_rows(const Vec d[6], Vec out[6]) {
  const Vec four(4.f), five(5.f), two(2.f);
  const Vec a = d[4] - d[2], b = d[1] - d[3];
  const Vec c = d[3] + d[4], e = d[1] + d[2];
  const Vec f = d[4] - d[3], g = d[1] - d[2];
  out[0] = at::vec::fmadd(four, d[0], d[4]) - five * d[2];
  out[1] = c - four * e;
  out[2] = at::vec::fmadd(four, g, f);
  out[3] = a - two * b;
  out[4] = at::vec::fmadd(two, b, a);
  out[5] = at::vec::fmadd(four, d[1], d[5]) - five * d[3];
}

// A^T m for one column of six: the rows of the output transform
//   [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1].
inline void output_rows(const Vec m[6], Vec out[4]) {
  const Vec a = m[1] + m[2], b = m[1] - m[2], c = m[3] + m[4], d = m[3] - m[4];
  out[0] = m[0] + a + c;
  out[1] = at::vec::fmadd(Vec(2.f), d, b);
  out[2] = at::vec::fmadd(Vec(4.f), c, a);
  out[3] = at::vec::fmadd(Vec(8.f), d, b) + m[5];
}

struct Tile {
  int64_t n, y0, x0;  // image, first output row and column
};

Tile tile_at(const WinogradTiles& t, int64_t index) {
  const int64_t per_image = t.tiles_h * t.tiles_w;
  const int64_t r = index % per_image;
  return {index / per_image, (r / t.tiles_w) * 4, (r % t.tiles_w) * 4};
}

}  // namespace

void winograd_input(const WinogradInputArgs& a) {
  const WinogradTiles& t = a.tiles;
  const int64_t C = a.C, count = t.end - t.begin;
  for (int64_t k = 0; k < count; ++k) {
    const Tile tile = tile_at(t, t.begin + k);
    const float* image = a.x + tile.n * t.H * t.W * C;
    bool inside[6][6];
    for (int i = 0; i < 6; ++i) {
      for (int j = 0; j < 6; ++j) {
        const int64_t y = tile.y0 - 1 + i, x = tile.x0 - 1 + j;
        inside[i][j] = y >= 0 && y < t.H && x >= 0 && x < t.W;
      }
    }
    for (int64_t c = 0; c < C; c += kLanes) {
      const int64_t n = std::min(kLanes, C - c);
      Vec rows[6][6];  // rows[i][j]: row i of B^T d, column j
      for (int j = 0; j < 6; ++j) {
        Vec column[6];
        for (int i = 0; i < 6; ++i) {
          const float* p = image + ((tile.y0 - 1 + i) * t.W + tile.x0 - 1 + j) * C + c;
          column[i] = inside[i][j] ? load(p, n) : Vec(0.f);
        }
        Vec out[6];
        input_rows(column, out);
        for (int i = 0; i < 6; ++i) rows[i][j] = out[i];
      }
      for (int i = 0; i < 6; ++i) {
        Vec out[6];
        input_rows(rows[i], out);
        for (int j = 0; j < 6; ++j) store(a.u + ((i * 6 + j) * count + k) * C + c, out[j], n);
      }
    }
  }
}

void winograd_output(const WinogradOutputArgs& a) {
  const WinogradTiles& t = a.tiles;
  const int64_t C = a.C, count = t.end - t.begin;
  for (int64_t k = 0; k < count; ++k) {
    const Tile tile = tile_at(t, t.begin + k);
    const int64_t rows_here = std::min<int64_t>(4, t.H - tile.y0);
    const int64_t cols_here = std::min<int64_t>(4, t.W - tile.x0);
    const int64_t base = ((tile.n * t.H + tile.y0) * t.W + tile.x0) * C;
    for (int64_t c = 0; c < C; c += kLanes) {
      const int64_t n = std::min(kLanes, C - c);
      Vec cols[4][6];  // cols[i][j]: row i of A^T m, column j
      for (int j = 0; j < 6; ++j) {
        Vec column[6];
        for (int i = 0; i < 6; ++i) column[i] = load(a.m + ((i * 6 + j) * count + k) * C + c, n);
        Vec out[4];
        output_rows(column, out);
        for (int i = 0; i < 4; ++i) cols[i][j] = out[i];
      }
      const Vec scale = a.scale ? load(a.scale + c, n) : Vec(1.f);
      const Vec shift = a.shift ? load(a.shift + c, n) : Vec(0.f);
      for (int i = 0; i < rows_here; ++i) {
        Vec out[4];
        output_rows(cols[i], out);
        for (int j = 0; j < cols_here; ++j) {
          const int64_t at = base + (i * t.W + j) * C + c;
          Vec v = a.scale ? at::vec::fmadd(out[j], scale, shift) : out[j] + shift;
          if (a.residual) v = v + load(a.residual + at, n);
          if (a.relu) v = relu(v);
          store(a.y + at, v, n);
        }
      }
    }
  }
}

}  // namespace resfast::cpu::CPU_CAPABILITY
