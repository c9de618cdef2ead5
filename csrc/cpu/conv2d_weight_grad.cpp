// resfast::conv2d_weight_grad: the gradient of a 2-D convolution's weight on the CPU, in the
// weight's dtype and layout, for both CPU training routes (conv_cpu.backward and
// conv2d_stats_backward). Three ways, the first that applies (path_of):
//
// - "gemm": oneDNN's weight-gradient kernel (aten::convolution_backward) costs time with the
//   size of the weight besides the multiply-adds: where few output positions meet a large
//   weight it runs far below the GEMM rate. ResNet-50's last stage at 112x112 (batch 8, 4x4
//   maps, 128 positions) takes ~12 ms for a 3x3 512->512 gradient, 0.6 GFLOP, which MKL's
//   GEMM does in ~5. There the gradient is one GEMM: [C_out, P] x [P, K*K*C_in] over the P
//   output positions and the input's windows gathered once (im2col, a copy of K*K times the
//   input: small at so few positions). From 4096 weight elements per output position on it
//   ran 0.88-2.66x oneDNN on ResNet-50's layers, the whole backward 1.02-1.82x
//   (benchmarks/cpu_weight_grad.py); on smaller weights per position the GEMM measured
//   0.7-1.0x oneDNN (3x3 and 1x1 layers of 64-512 channels, 2026-11-30).
// - "direct": at few channels oneDNN runs at half the multiply-add rate or less (ResNet-20's
//   3x3 layers: 58-76 GFLOP/s on a 2-core AVX2 CPU). A float32 3x3 convolution over
//   channels_last activations with up to kDirectMaxChannels channels each way and a
//   multiple of kOutBlock out takes the vectorized loop of
//   csrc/cpu/kernels/weight_grad_kernel.cpp there instead: 1.02-1.59x oneDNN on ResNet-20's
//   and ResNet-50's layers (benchmarks/cpu_weight_grad.py), its sums 3-25x closer to the
//   exact ones (short sums in registers, added up unit by unit). On AVX2 CPUs only, the
//   one instruction set it was measured on; past 128 channels a prototype measured 0.8x.
// - "onednn": the rest. ("zeros": an empty input, whose gradient is zero.) A strided 1x1
//   convolution over under 8 channels goes at stride 1 over the input's every stride-th
//   pixel: oneDNN's AVX2 kernel gets it wrong (conv2d_weight_grad_cpu).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#include "../checks.h"
#include "bn_kernels.h"
#include "conv_layout.h"

namespace resfast::cpu {
namespace {

constexpr int64_t kWeightPerPosition = 4096;
constexpr int64_t kDirectMaxChannels = 128;
// Output pixels per unit of the direct loop, whose blocks sum a unit in registers: 512
// pixels of g's 16-channel slices are 32 KB, the L1 cache (a prototype ran ResNet-20's
// layers faster with 512 than with 128 or 256).
constexpr int64_t kUnitPixels = 512;

enum class Path { kZeros, kGemm, kDirect, kOneDnn };

// Which way conv2d_weight_grad computes this gradient (the file's comment), for valid input.
Path path_of(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
             int64_t dilation) {
  if (x.numel() == 0 || g.numel() == 0) return Path::kZeros;
  // float32 only: bfloat16 keeps oneDNN's rounding; the windows need dilation 1
  if (x.scalar_type() != at::kFloat || dilation != 1) return Path::kOneDnn;
  const auto cl = at::MemoryFormat::ChannelsLast;
  // the GEMM writes a weight dense in one of the two layouts
  const bool dense = weight.is_contiguous() || weight.is_contiguous(cl);
  const int64_t positions = g.size(0) * g.size(2) * g.size(3);
  if (dense && weight.numel() >= kWeightPerPosition * positions) return Path::kGemm;
  const int64_t c_out = weight.size(0), c_in = weight.size(1);
  if (kernels().weight_grad != nullptr && weight.size(2) == 3 && weight.size(3) == 3 &&
      c_out % kOutBlock == 0 && c_out <= kDirectMaxChannels && c_in <= kDirectMaxChannels &&
      x.is_contiguous(cl) && g.is_contiguous(cl)) {
    return Path::kDirect;
  }
  return Path::kOneDnn;
}

// The direct loop over units of output pixels: strips of rows of one image on large maps,
// whole images on small ones (no more per unit than leaves every thread one), each thread's
// share summed into a buffer of its own.
at::Tensor weight_grad_direct(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                              int64_t stride, int64_t padding) {
  const int64_t n = x.size(0), c_in = x.size(1), c_out = weight.size(0), k = weight.size(2);
  const int64_t h_out = g.size(2), w_out = g.size(3), pixels = h_out * w_out;
  const int64_t threads = at::get_num_threads();
  int64_t unit_images = 1, unit_rows = h_out;
  if (pixels >= kUnitPixels) {
    unit_rows = std::max<int64_t>(1, kUnitPixels / w_out);
  } else {
    unit_images = std::max<int64_t>(1, std::min(kUnitPixels / pixels, (n + threads - 1) / threads));
  }
  const int64_t units = ((n + unit_images - 1) / unit_images) *
                        ((h_out + unit_rows - 1) / unit_rows);
  const int64_t chunks = std::min(units, threads);
  const int64_t size = k * k * c_in * c_out;
  at::Tensor partial = at::zeros({chunks, k, k, c_in, c_out}, x.options());
  const WeightGradArgs args{x.data_ptr<float>(), g.data_ptr<float>(), n, c_in, x.size(2),
                            x.size(3), c_out, h_out, w_out, k, stride, padding, unit_images,
                            unit_rows, 0, 0, partial.data_ptr<float>()};
  const Kernels& loops = kernels();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      WeightGradArgs a = args;
      a.begin = units * i / chunks;
      a.end = units * (i + 1) / chunks;
      a.out += i * size;
      loops.weight_grad(a);
    }
  });
  const at::Tensor sum = chunks > 1 ? partial.sum(0) : partial[0];
  return at::empty_like(weight).copy_(sum.permute({3, 2, 0, 1}));
}

// grad_w[o, (c, i, j)] = sum over (n, p) of g[n, o, p] x[n, c, window (i, j) of p], the
// columns in the weight's own order: (i, j, c) for a channels_last weight, else (c, i, j).
at::Tensor weight_grad_gemm(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                            int64_t stride, int64_t padding) {
  const int64_t n = x.size(0), c_in = x.size(1), c_out = weight.size(0);
  const int64_t kh = weight.size(2), kw = weight.size(3);
  const int64_t positions = n * g.size(2) * g.size(3);
  const bool rows = !weight.is_contiguous();  // channels_last, (i, j, c) per output channel
  const at::Tensor padded = padding > 0 ? at::constant_pad_nd(x, {padding, padding, padding,
                                                                  padding})
                                        : x;
  // (N, C_in, H_out, W_out, K, K): views, gathered by the reshape (a view itself for a 1x1
  // channels_last stride-1 convolution)
  const at::Tensor windows = padded.unfold(2, kh, stride).unfold(3, kw, stride);
  const at::Tensor cols = (rows ? windows.permute({0, 2, 3, 4, 5, 1})
                                : windows.permute({0, 2, 3, 1, 4, 5}))
                              .reshape({positions, c_in * kh * kw});
  const at::Tensor g2 = g.permute({0, 2, 3, 1}).reshape({positions, c_out});
  at::Tensor out = at::empty_like(weight);  // dense: the weight's strides
  at::Tensor out2 = (rows ? out.permute({0, 2, 3, 1}) : out).view({c_out, c_in * kh * kw});
  at::mm_out(out2, g2.t(), cols);
  return out;
}

void check_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                  int64_t stride, int64_t padding, int64_t dilation) {
  check_activation(x, "x");
  check_activation(grad_y, "grad_y");
  TORCH_CHECK_VALUE(weight.dim() == 4, "weight must be 4-D (C_out, C_in, K, K), got ",
                    weight.dim(), "-D");
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), "weight has ", weight.size(1),
                    " input channels but x has ", x.size(1));
  TORCH_CHECK_VALUE(x.scalar_type() == weight.scalar_type() &&
                        grad_y.scalar_type() == weight.scalar_type(),
                    "grad_y, x and weight must have one dtype, got ", grad_y.scalar_type(), ", ",
                    x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.size(2) >= 1 && weight.size(3) >= 1,
                    "weight's kernel must be at least 1x1, got ", weight.sizes().slice(2));
  TORCH_CHECK_VALUE(stride >= 1 && padding >= 0 && dilation >= 1,
                    "stride and dilation must be >= 1 and padding >= 0, got stride=", stride,
                    ", padding=", padding, ", dilation=", dilation);
  for (int d = 2; d < 4; ++d) {
    TORCH_CHECK_VALUE(x.size(d) + 2 * padding >= dilation * (weight.size(d) - 1) + 1,
                      "x spatial size ", x.sizes().slice(2), " is smaller than the kernel ",
                      weight.sizes().slice(2), " with padding ", padding, " and dilation ",
                      dilation);
  }
  const std::vector<int64_t> out_shape = conv_output_shape(x, weight, stride, padding, dilation);
  TORCH_CHECK_VALUE(grad_y.sizes() == out_shape, "grad_y must have the output's shape ",
                    out_shape, ", got ", grad_y.sizes());
}

at::Tensor conv2d_weight_grad_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                  const at::Tensor& weight, int64_t stride, int64_t padding,
                                  int64_t dilation) {
  check_inputs(grad_y, x, weight, stride, padding, dilation);
  switch (path_of(grad_y, x, weight, dilation)) {
    case Path::kZeros:
      return at::zeros_like(weight);
    case Path::kGemm:
      return weight_grad_gemm(grad_y, x, weight, stride, padding);
    case Path::kDirect:
      return weight_grad_direct(grad_y, x, weight, stride, padding);
    case Path::kOneDnn:
      break;
  }
  // oneDNN's AVX2 kernel for the weight gradient of a strided 1x1 convolution over
  // channels_last input with under 8 channels returns wrong sums, hangs or corrupts the heap
  // (torch 2.14.1; uxlfoundation/oneDNN#6035, tests/ops/test_conv2d_weight_grad.py): the
  // same sum over every stride-th input pixel at stride 1 does not go there.
  at::Tensor a = x;
  int64_t s = stride;
  if (weight.size(2) == 1 && weight.size(3) == 1 && stride > 1 && padding == 0 &&
      x.size(1) < 8) {
    a = x.slice(2, 0, x.size(2), stride).slice(3, 0, x.size(3), stride).contiguous(layout_of(x));
    s = 1;
  }
  at::Tensor grad_w = std::get<1>(at::convolution_backward(
      grad_y, a, gemm_weight(weight, a), std::nullopt, {s, s}, {padding, padding},
      {dilation, dilation}, false, {0, 0}, 1, {false, true, false}));
  if (grad_w.strides() != weight.strides()) grad_w = at::empty_like(weight).copy_(grad_w);
  return grad_w;
}

std::string conv2d_weight_grad_path_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                        const at::Tensor& weight, int64_t stride,
                                        int64_t padding, int64_t dilation) {
  check_inputs(grad_y, x, weight, stride, padding, dilation);
  switch (path_of(grad_y, x, weight, dilation)) {
    case Path::kZeros:
      return "zeros";
    case Path::kGemm:
      return "gemm";
    case Path::kDirect:
      return "direct";
    case Path::kOneDnn:
      break;
  }
  return "onednn";
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("conv2d_weight_grad", &conv2d_weight_grad_cpu);
  m.impl("conv2d_weight_grad_path", &conv2d_weight_grad_path_cpu);
}

}  // namespace resfast::cpu
