// The layout a CPU convolution runs in, as resfast.ops.conv_cpu.layout_of states it, the
// copies into it, and its output's shape.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "op_handle.h"

namespace resfast::cpu {

// NCHW for an x dense in NCHW only; for an x dense in both (C == 1 or H*W == 1) the one its
// strides suggest, which is what oneDNN reads it as and writes y in; else channels_last.
inline at::MemoryFormat layout_of(const at::Tensor& x) {
  const bool nchw = x.is_contiguous(), cl = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (nchw && cl) return x.suggest_memory_format();
  return nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
}

// t dense in `format`, as resfast.ops.layout.to_memory_format makes it: t itself, or an
// activation dense in the other layout copied by the relayout op (named in profiles, as
// the Python route's copies are), or ATen's copy.
inline at::Tensor to_memory_format(const at::Tensor& t, at::MemoryFormat format) {
  if (t.is_contiguous(format)) return t;
  const bool to_rows = format == at::MemoryFormat::ChannelsLast;
  if (t.dim() == 4 &&
      (to_rows ? t.is_contiguous() : t.is_contiguous(at::MemoryFormat::ChannelsLast))) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, bool)>("resfast::relayout");
    return op.call(t, to_rows);
  }
  return t.contiguous(format);
}

// What conv_cpu.prologue gives for no prologue: x in the GEMM's dtype and layout.
inline at::Tensor gemm_input(const at::Tensor& x, at::ScalarType dtype) {
  return to_memory_format(x.to(dtype), layout_of(x));
}

// The weight as the convolution takes it: an NCHW convolution with a channels_last weight
// would compute channels_last (ATen's rule), so it gets an NCHW one.
inline at::Tensor gemm_weight(const at::Tensor& weight, const at::Tensor& a) {
  return layout_of(a) == at::MemoryFormat::ChannelsLast ? weight : weight.contiguous();
}

// (N, C_out, H_out, W_out) of conv2d(x, weight) with this stride, padding and dilation
// (x's spatial size, padded, at least the dilated kernel's: the callers check it).
inline std::vector<int64_t> conv_output_shape(const at::Tensor& x, const at::Tensor& weight,
                                              int64_t stride, int64_t padding,
                                              int64_t dilation) {
  std::vector<int64_t> shape = {x.size(0), weight.size(0)};
  for (int d = 2; d < 4; ++d) {
    shape.push_back((x.size(d) + 2 * padding - dilation * (weight.size(d) - 1) - 1) / stride + 1);
  }
  return shape;
}

}  // namespace resfast::cpu
