// The interface between the CPU BatchNorm ops (csrc/cpu/bn_*.cpp: checks,
// allocation, layouts) and their vectorized loops (csrc/cpu/kernels/*.cpp).
//
// The loops are compiled once per instruction set (DEFAULT everywhere; AVX2
// and AVX512 on x86-64, each in its own namespace, as ATen compiles its own
// CPU kernels) and the ops call the set that ATen itself uses on this CPU
// (`at::get_cpu_capability()`, which honours ATEN_CPU_CAPABILITY).
//
// Plain structs and pointers only: the loop files include no tensor headers.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace resfast::cpu {

// An activation (N, C, H, W) as the loops see it, dense in one of two layouts:
//  kRows:   channels_last, a row-major [M = N*H*W, C] matrix;
//  kPlanes: NCHW, N*C contiguous planes of HW elements (plane n*C + c).
enum class Layout { kRows, kPlanes };

struct Geometry {
  int64_t N, C, HW;
  Layout layout;
  int64_t rows() const { return N * HW; }
};

// Per-channel vectors below are contiguous arrays of C elements of the
// accumulation type: double for double activations, float for the others.

// mean[c], var[c] (biased) of y.
struct StatsArgs {
  const void* y;
  c10::ScalarType dtype;
  Geometry g;
  void* mean;
  void* var;
};

// grad_y = (grad_mean + 2 (y - mean) grad_var) * inv_count.
struct StatsBackwardArgs {
  const void* y;
  c10::ScalarType dtype;
  Geometry g;
  const void* grad_mean;
  const void* grad_var;
  const void* mean;
  double inv_count;
  void* grad_y;
};

// out = [relu]((y - centre) * scale + shift [+ residual]); scale, shift and
// centre are null together, residual may be null; every activation in the
// same layout.
struct ActArgs {
  const void* y;
  c10::ScalarType dtype;
  Geometry g;
  const void* scale;
  const void* shift;
  const void* centre;
  const void* residual;
  bool relu;
  void* out;
};

// g = grad_out [* (pre-activation > 0)]; grad_y = g [* scale]; grad_residual = g;
// sum_gy[c] = sum of g * (y - centre), sum_g[c] = sum of g over channel c.
// Null outputs are skipped; sum_gy and sum_g are null together.
// stats_slope, stats_offset (null together; given only with scale and grad_y, and
// without the sums): grad_y = g * scale + (y - centre) * stats_slope + stats_offset,
// the path through the batch statistics added in the same write
// (bn_batch_act_backward's second pass).
struct ActBackwardArgs {
  const void* grad_out;
  const void* y;
  c10::ScalarType dtype;
  Geometry g;
  const void* scale;
  const void* shift;
  const void* centre;
  const void* residual;
  bool relu;
  void* grad_y;
  void* grad_residual;
  void* sum_gy;
  void* sum_g;
  const void* stats_slope = nullptr;
  const void* stats_offset = nullptr;
};

// dst[n][j][i] = src[n][i][j] for N dense [rows, cols] matrices: an activation
// copied between NCHW ([C, HW] per image) and channels_last ([HW, C]), any dtype
// (the copy moves bits). The loop returns false, having done nothing, where its
// instruction set has no vector transpose for the element size or a side is
// under one tile (16).
struct TransposeArgs {
  const void* src;
  c10::ScalarType dtype;
  int64_t N, rows, cols;
  void* dst;
};

// A Winograd F(4x4, 3x3) convolution (stride 1, padding 1) over channels_last float32
// activations (csrc/cpu/kernels/winograd_kernel.cpp): tiles [begin, end) of the output's
// 4x4 tiles, numbered image by image, row by row.
struct WinogradTiles {
  int64_t H, W;  // the images' height and width (the input's and the output's)
  int64_t tiles_h, tiles_w;
  int64_t begin, end;
};

// u[p][k][c] = (B^T d B)[p] for tile begin + k, channel c: 36 [end - begin, C] matrices.
struct WinogradInputArgs {
  const float* x;
  int64_t C;
  WinogradTiles tiles;
  float* u;
};

// y = [relu](A^T m A * scale + shift [+ residual]) over the tiles' outputs inside the image,
// from m[p][k][c], 36 [end - begin, C] matrices; scale and shift may be null (1 and 0).
struct WinogradOutputArgs {
  const float* m;
  int64_t C;
  WinogradTiles tiles;
  const float* scale;
  const float* shift;
  const float* residual;
  bool relu;
  float* y;
};

// The weight gradient of a convolution (dilation 1) over channels_last float32 activations
// x (N, H, W, C_in) and g = grad_y (N, H_out, W_out, C_out), C_out a multiple of
// kOutBlock (csrc/cpu/kernels/weight_grad_kernel.cpp): adds the sums over units [begin, end)
// of the output's pixels into out, (K, K, C_in, C_out). A unit is unit_images images by
// unit_rows output rows; units are numbered by image group, then by strip of rows.
constexpr int64_t kOutBlock = 16;
struct WeightGradArgs {
  const float* x;
  const float* g;
  int64_t N, C_in, H, W, C_out, H_out, W_out, K, stride, padding;
  int64_t unit_images, unit_rows, begin, end;
  float* out;
};

struct Kernels {
  const char* isa;
  void (*bn_stats)(const StatsArgs&);
  void (*bn_stats_backward)(const StatsBackwardArgs&);
  void (*bn_act)(const ActArgs&);
  void (*bn_act_backward)(const ActBackwardArgs&);
  bool (*transpose_images)(const TransposeArgs&);
  void (*winograd_input)(const WinogradInputArgs&);
  void (*winograd_output)(const WinogradOutputArgs&);
  void (*weight_grad)(const WeightGradArgs&);  // null where not built (dispatch.cpp)
};

// The loops of one instruction set (defined in csrc/cpu/kernels/, inside
// namespace resfast::cpu::ISA; weight_grad for AVX2 only).
#define RESFAST_DECLARE_CPU_KERNELS(ISA)              \
  namespace ISA {                                     \
  void bn_stats(const StatsArgs& a);                  \
  void bn_stats_backward(const StatsBackwardArgs& a); \
  void bn_act(const ActArgs& a);                      \
  void bn_act_backward(const ActBackwardArgs& a);     \
  bool transpose_images(const TransposeArgs& a);      \
  void winograd_input(const WinogradInputArgs& a);    \
  void winograd_output(const WinogradOutputArgs& a);  \
  void weight_grad(const WeightGradArgs& a);          \
  }

// The set this CPU runs (csrc/cpu/dispatch.cpp).
const Kernels& kernels();

}  // namespace resfast::cpu
