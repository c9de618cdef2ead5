// resfast::conv2d_winograd: a 3x3 convolution (stride 1, padding 1, dilation 1, one group)
// over a channels_last float32 input by Winograd's F(4x4, 3x3) algorithm, with a per-channel
// scale and shift (an eval-mode BatchNorm, a bias), a residual add and a ReLU applied to its
// output; and resfast::winograd_weight, the weights it takes.
//
// A direct 3x3 convolution makes 9 multiply-adds per input channel per output; F(4x4, 3x3)
// makes 36 per 16 outputs, 2.25, in 36 GEMMs ([tiles, C_in] x [C_in, C_out], one per
// position in a transformed 6x6 tile) between two cheap transforms. Measured on ResNet-50's
// and VGG's layers on a 2-core AVX512 CPU, that is 1.7-2.9x faster than oneDNN's direct
// convolution (benchmarks/cpu_winograd.py). Its rounding differs: the transforms add terms
// of mixed sign, and float32 results are up to ~50 epsilons of the size of the summed terms
// off the exact ones where the direct convolution's are ~5
// (tests/ops/test_conv2d_winograd.py), as with the Winograd kernels cuDNN picks on GPUs.
//
// The tiles are processed in chunks, one chunk at a time on each thread, each chunk's
// transformed input and GEMM outputs in buffers of that thread's: at few channels they stay
// in a core's cache, and the transforms cost about a pass over the input and one over the
// output (tiles_per_chunk says where longer GEMM rows win over cache).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>

#include "../checks.h"
#include "bn_kernels.h"
#include "winograd.h"

namespace resfast::cpu {
namespace {

constexpr int64_t kPositions = 36;  // a 6x6 transformed tile

// Tiles per chunk: about 512 KiB of transformed input and GEMM output (half a core's L2
// here) where the channels are few, but at least 64 tiles (256 from 512 channels in and
// out), which trades staying in L2 for longer GEMM rows and fewer passes over the
// transformed weights: from 56 channels in and out on, a chunk is larger than 512 KiB
// (1.2 MB at 64 + 64, 38 MB at 512 + 512, in L3 or memory). Measured on 16-512 channels:
// 0.25-8 MiB, 16-512 tiles at least; 512 channels at 28x28: 70 ms at 64 tiles, 50 ms at
// 256. And at least as many chunks as threads.
int64_t tiles_per_chunk(int64_t tiles, int64_t c_in, int64_t c_out) {
  const int64_t bytes_per_tile = kPositions * (c_in + c_out) * static_cast<int64_t>(sizeof(float));
  const int64_t least = c_in + c_out >= 1024 ? 256 : 64;
  int64_t chunk = std::max<int64_t>(least, (int64_t{1} << 19) / bytes_per_tile);
  const int64_t threads = at::get_num_threads();
  chunk = std::min(chunk, (tiles + threads - 1) / threads);
  return std::max<int64_t>(1, chunk);
}

// The GEMMs are a few microseconds each (a chunk makes 36), less than at::mm's own
// overhead, so they are called straight: torch's cpublas::brgemm, exported for its CPU
// attention, which runs oneDNN's batch-reduce GEMM kernel where torch's build and the CPU
// have it and torch's own gemm (its BLAS) otherwise (measured here 1.15-1.25x the speed of
// the MKL sgemm torch carries, on this AMD CPU, 2026-11-30). Should it raise (a torch
// without it), at::mm_out on views of the buffers.
bool has_brgemm() {
  static const bool works = [] {
    float a[1] = {1.f}, b[1] = {1.f}, c[1] = {0.f};
    try {
      at::native::cpublas::brgemm(1, 1, 1, 1, 1, 1, false, a, b, c, false);
      at::native::cpublas::brgemm_release(false);
      return c[0] == 1.f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return works;
}

// brgemm where it runs; RESFAST_CPU_WINOGRAD_GEMM=aten asks for at::mm_out (the tests run
// both).
bool use_brgemm() {
  const char* asked = std::getenv("RESFAST_CPU_WINOGRAD_GEMM");
  const std::string kind = asked ? asked : "";
  TORCH_CHECK_VALUE(kind.empty() || kind == "brgemm" || kind == "aten",
                    "RESFAST_CPU_WINOGRAD_GEMM must be brgemm or aten, got '", kind, "'");
  return kind != "aten" && has_brgemm();
}

// c[rows, cols] = a[rows, inner] b[inner, cols], all row-major and dense.
void matmul(bool brgemm, const float* a, const float* b, float* c, int64_t rows, int64_t inner,
            int64_t cols) {
  if (brgemm) {
    at::native::cpublas::brgemm(rows, cols, inner, inner, cols, cols, false, a, b, c, false);
    return;
  }
  const auto options = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::from_blob(c, {rows, cols}, options);
  at::mm_out(out, at::from_blob(const_cast<float*>(a), {rows, inner}, options),
             at::from_blob(const_cast<float*>(b), {inner, cols}, options));
}

void check_float32(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, name, " must be float32, got ",
                    t.scalar_type());
}

at::Tensor conv2d_winograd_cpu(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& shift,
                               const std::optional<at::Tensor>& residual, bool relu) {
  check_activation(x, "x");
  check_float32(x, "x");
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(0) == kPositions &&
                        weight.scalar_type() == at::kFloat,
                    "weight must be a float32 (36, C_in, C_out) transformed weight, got ",
                    weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), "weight has ", weight.size(1),
                    " input channels but x has ", x.size(1));
  TORCH_CHECK_VALUE(x.size(1) > 0, "x must have at least one channel, got ", x.sizes());
  const int64_t N = x.size(0), c_in = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t c_out = weight.size(2);
  const auto check_vector = [&](const std::optional<at::Tensor>& v, const char* name) {
    if (!v) return;
    check_channel_vector(*v, c_out, x, name);
    check_float32(*v, name);
  };
  check_vector(scale, "scale");
  check_vector(shift, "shift");
  constexpr auto kRows = at::MemoryFormat::ChannelsLast;
  at::Tensor y = at::empty({N, c_out, H, W}, x.options().memory_format(kRows));
  if (residual) check_same_as(*residual, y, "residual", "the output");
  const at::Tensor xc = x.contiguous(kRows), v = weight.contiguous();
  const at::Tensor s = scale ? scale->contiguous() : at::Tensor();
  const at::Tensor b = shift ? shift->contiguous() : at::Tensor();
  const at::Tensor r = residual ? residual->contiguous(kRows) : at::Tensor();
  const int64_t tiles_h = (H + 3) / 4, tiles_w = (W + 3) / 4;
  const int64_t tiles = N * tiles_h * tiles_w;
  if (tiles == 0 || c_out == 0) return y;
  const int64_t chunk = tiles_per_chunk(tiles, c_in, c_out);
  const int64_t chunks = (tiles + chunk - 1) / chunk;
  const Kernels& k = kernels();
  const bool brgemm = use_brgemm();
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    // 64-byte aligned and not cleared (every element read is written first)
    const auto options = at::TensorOptions().dtype(at::kFloat);
    at::Tensor u_buffer = at::empty({kPositions * chunk * c_in}, options);
    at::Tensor m_buffer = at::empty({kPositions * chunk * c_out}, options);
    float* const u = u_buffer.mutable_data_ptr<float>();
    float* const m = m_buffer.mutable_data_ptr<float>();
    for (int64_t i = first; i < last; ++i) {
      const WinogradTiles t{H, W, tiles_h, tiles_w, i * chunk, std::min(tiles, (i + 1) * chunk)};
      const int64_t count = t.end - t.begin;
      k.winograd_input({xc.const_data_ptr<float>(), c_in, t, u});
      for (int64_t p = 0; p < kPositions; ++p) {
        matmul(brgemm, u + p * count * c_in, v.const_data_ptr<float>() + p * c_in * c_out,
               m + p * count * c_out, count, c_in, c_out);
      }
      k.winograd_output({m, c_out, t, s.defined() ? s.const_data_ptr<float>() : nullptr,
                         b.defined() ? b.const_data_ptr<float>() : nullptr,
                         r.defined() ? r.const_data_ptr<float>() : nullptr, relu,
                         y.mutable_data_ptr<float>()});
    }
    if (brgemm) at::native::cpublas::brgemm_release(false);
  });
  return y;
}

// G of F(4x4, 3x3): a 3x3 kernel w becomes the 6x6 G w G^T.
constexpr double kG[6][3] = {{1.0 / 4, 0, 0},
                             {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                             {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                             {1.0 / 24, 1.0 / 12, 1.0 / 6},
                             {1.0 / 24, -1.0 / 12, 1.0 / 6},
                             {0, 0, 1}};

at::Tensor winograd_weight_cpu(const at::Tensor& weight, bool transposed) {
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 &&
                        weight.scalar_type() == at::kFloat,
                    "weight must be a float32 (C_out, C_in, 3, 3) tensor, got ",
                    weight.scalar_type(), " ", weight.sizes());
  const at::Tensor w = weight.contiguous();
  const int64_t c_out = w.size(0), c_in = w.size(1);
  // (36, C_in, C_out); transposed: (36, C_out, C_in) for the kernel rotated by 180 degrees
  // with its channels swapped, the convolution that gives the input's gradient
  const int64_t rows = transposed ? c_out : c_in, cols = transposed ? c_in : c_out;
  at::Tensor v = at::empty({kPositions, rows, cols}, w.options());
  const float* src = w.const_data_ptr<float>();
  float* dst = v.mutable_data_ptr<float>();
  at::parallel_for(0, c_out, 16, [&](int64_t first, int64_t last) {
    for (int64_t o = first; o < last; ++o) {
      for (int64_t c = 0; c < c_in; ++c) {
        const float* k = src + (o * c_in + c) * 9;
        double g_w[6][3];  // G w
        for (int i = 0; i < 6; ++i) {
          for (int col = 0; col < 3; ++col) {
            double sum = 0;
            for (int j = 0; j < 3; ++j) {
              const int64_t at = transposed ? (2 - j) * 3 + (2 - col) : j * 3 + col;
              sum += kG[i][j] * static_cast<double>(k[at]);
            }
            g_w[i][col] = sum;
          }
        }
        const int64_t offset = transposed ? o * cols + c : c * cols + o;
        for (int i = 0; i < 6; ++i) {
          for (int l = 0; l < 6; ++l) {
            const double sum = g_w[i][0] * kG[l][0] + g_w[i][1] * kG[l][1] + g_w[i][2] * kG[l][2];
            dst[(i * 6 + l) * rows * cols + offset] = static_cast<float>(sum);
          }
        }
      }
    }
  });
  return v;
}

}  // namespace

namespace {

// RESFAST_CPU_WINOGRAD, checked: "inference" where unset.
std::string winograd_mode() {
  const char* flag = std::getenv("RESFAST_CPU_WINOGRAD");
  if (flag == nullptr) return "inference";
  const std::string mode(flag);
  TORCH_CHECK_VALUE(mode == "off" || mode == "inference" || mode == "all",
                    "RESFAST_CPU_WINOGRAD must be off, inference or all, got '", mode, "'");
  return mode;
}

}  // namespace

bool winograd_in_training() { return winograd_mode() == "all"; }

bool winograd_in_inference() { return winograd_mode() != "off"; }

bool winograd_fits(const at::Tensor& a, const at::Tensor& weight, int64_t stride,
                   int64_t padding, int64_t dilation) {
  if (a.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat || a.dim() != 4 ||
      weight.dim() != 4 || weight.size(2) != 3 || weight.size(3) != 3 || stride != 1 ||
      padding != 1 || dilation != 1) {
    return false;
  }
  const int64_t n = a.size(0), h = a.size(2), w = a.size(3);
  return std::min(weight.size(0), weight.size(1)) >= kWinogradMinChannels &&
         std::min(h, w) >= kWinogradMinSize &&
         n * ((h + 3) / 4) * ((w + 3) / 4) >= kWinogradMinTiles;
}

bool winograd_applies(const at::Tensor& a, const at::Tensor& weight, int64_t stride,
                      int64_t padding, int64_t dilation) {
  return winograd_fits(a, weight, stride, padding, dilation) &&
         a.is_contiguous(at::MemoryFormat::ChannelsLast) && !a.is_contiguous() &&
         winograd_in_training();
}

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("conv2d_winograd", &conv2d_winograd_cpu);
  m.impl("winograd_weight", &winograd_weight_cpu);
}

}  // namespace resfast::cpu
