// resfast::conv2d_winograd: a 3x3 convolution (stride 1, padding 1, dilation 1, one group)
// over a channels_last float32 input by Winograd's F(4x4, 3x3) algorithm, with a per-channel
// scale and shift (an eval-mode BatchNorm), a residual add and a ReLU applied to its output.
//
// A direct 3x3 convolution makes 9 multiply-adds per input channel per output; F(4x4, 3x3)
// makes 36 per 16 outputs, 2.25, in 36 GEMMs ([tiles, C_in] x [C_in, C_out], one per
// position in a transformed 6x6 tile) between two cheap transforms. Measured on ResNet-50's
// and VGG's layers on a 2-core AVX512 CPU, that is 1.3-2x faster than oneDNN's direct
// convolution (benchmarks/cpu_winograd.py). Its rounding differs: the transforms add
// terms of mixed sign, and float32 results are ~1e-5 of the output's range off the exact
// ones where the direct convolution's are ~1e-6 (tests/ops/test_conv2d_winograd.py), as with
// the Winograd kernels cuDNN picks on GPUs.
//
// The tiles are processed in chunks small enough for a chunk's transformed input and GEMM
// outputs to stay in a core's cache, one chunk at a time on each thread: the transforms
// then cost about a pass over the input and one over the output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <optional>

#include "bn_kernels.h"

namespace resfast::cpu {
namespace {

constexpr int64_t kPositions = 36;  // a 6x6 transformed tile

// Tiles per chunk: about 512 KiB of transformed input and GEMM output (half a core's L2
// here), but at least 64 tiles, below which the GEMMs run short rows and re-read their
// weights too often (measured on 16-512 channels: 0.25-8 MiB, 16-64 tiles at least), and
// at least as many chunks as threads.
int64_t tiles_per_chunk(int64_t tiles, int64_t c_in, int64_t c_out) {
  const int64_t bytes_per_tile = kPositions * (c_in + c_out) * static_cast<int64_t>(sizeof(float));
  int64_t chunk = std::max<int64_t>(64, (int64_t{1} << 19) / bytes_per_tile);
  const int64_t threads = at::get_num_threads();
  chunk = std::min(chunk, (tiles + threads - 1) / threads);
  return std::max<int64_t>(1, chunk);
}

// The BLAS sgemm that torch's CPU build carries (MKL on x86-64), called directly: a chunk's
// 36 GEMMs are a few microseconds each, less than at::mm's own overhead. Where torch has no
// BLAS to find, at::mm_out on views of the buffers does the same work.
using Sgemm = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                       const float*, const int*, const float*, const int*, const float*, float*,
                       const int*);
Sgemm blas_sgemm() {
  static const Sgemm found = reinterpret_cast<Sgemm>(dlsym(RTLD_DEFAULT, "sgemm_"));
  return found;
}

// c[rows, cols] = a[rows, inner] b[inner, cols], all row-major and dense.
void matmul(const float* a, const float* b, float* c, int64_t rows, int64_t inner, int64_t cols) {
  if (const Sgemm sgemm = blas_sgemm()) {
    // BLAS is column-major: c^T = b^T a^T
    const int m = static_cast<int>(cols), n = static_cast<int>(rows), k = static_cast<int>(inner);
    const float one = 1.f, zero = 0.f;
    sgemm("N", "N", &m, &n, &k, &one, b, &m, a, &k, &zero, c, &m);
    return;
  }
  const auto options = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::from_blob(c, {rows, cols}, options);
  at::mm_out(out, at::from_blob(const_cast<float*>(a), {rows, inner}, options),
             at::from_blob(const_cast<float*>(b), {inner, cols}, options));
}

void check_vector(const std::optional<at::Tensor>& v, const char* name, int64_t channels) {
  if (!v) return;
  TORCH_CHECK_VALUE(v->dim() == 1 && v->size(0) == channels && v->scalar_type() == at::kFloat,
                    name, " must be a float32 vector of ", channels, " elements, got ",
                    v->scalar_type(), " ", v->sizes());
}

at::Tensor conv2d_winograd_cpu(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& shift,
                               const std::optional<at::Tensor>& residual, bool relu) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be a 4-D tensor (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(0) == kPositions &&
                        weight.scalar_type() == at::kFloat,
                    "weight must be a float32 (36, C_in, C_out) transformed weight, got ",
                    weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), "weight has ", weight.size(1),
                    " input channels but x has ", x.size(1));
  const int64_t N = x.size(0), c_in = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t c_out = weight.size(2);
  check_vector(scale, "scale", c_out);
  check_vector(shift, "shift", c_out);
  if (residual) {
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef({N, c_out, H, W}) &&
                          residual->scalar_type() == at::kFloat,
                      "residual must be float32 of shape ", at::IntArrayRef({N, c_out, H, W}),
                      ", got ", residual->scalar_type(), " ", residual->sizes());
  }
  constexpr auto kRows = at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(kRows), v = weight.contiguous();
  const at::Tensor s = scale ? scale->contiguous() : at::Tensor();
  const at::Tensor b = shift ? shift->contiguous() : at::Tensor();
  const at::Tensor r = residual ? residual->contiguous(kRows) : at::Tensor();
  at::Tensor y = at::empty({N, c_out, H, W}, x.options().memory_format(kRows));
  const int64_t tiles_h = (H + 3) / 4, tiles_w = (W + 3) / 4;
  const int64_t tiles = N * tiles_h * tiles_w;
  if (tiles == 0 || c_out == 0) return y;
  const int64_t chunk = tiles_per_chunk(tiles, c_in, c_out);
  const int64_t chunks = (tiles + chunk - 1) / chunk;
  const Kernels& k = kernels();
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> u(kPositions * chunk * c_in), m(kPositions * chunk * c_out);
    for (int64_t i = first; i < last; ++i) {
      const WinogradTiles t{H, W, tiles_h, tiles_w, i * chunk, std::min(tiles, (i + 1) * chunk)};
      const int64_t count = t.end - t.begin;
      k.winograd_input({xc.const_data_ptr<float>(), c_in, t, u.data()});
      for (int64_t p = 0; p < kPositions; ++p) {
        matmul(u.data() + p * count * c_in, v.const_data_ptr<float>() + p * c_in * c_out,
               m.data() + p * count * c_out, count, c_in, c_out);
      }
      k.winograd_output({m.data(), c_out, t, s.defined() ? s.const_data_ptr<float>() : nullptr,
                         b.defined() ? b.const_data_ptr<float>() : nullptr,
                         r.defined() ? r.const_data_ptr<float>() : nullptr, relu,
                         y.mutable_data_ptr<float>()});
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) { m.impl("conv2d_winograd", &conv2d_winograd_cpu); }

}  // namespace resfast::cpu
