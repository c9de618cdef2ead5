// The layout a CPU convolution runs in, as resfast.ops.conv_cpu.layout_of states it.
#pragma once
#include <ATen/core/Tensor.h>

namespace resfast::cpu {

// NCHW for an x dense in NCHW only; for an x dense in both (C == 1 or H*W == 1) the one its
// strides suggest, which is what oneDNN reads it as and writes y in; else channels_last.
inline at::MemoryFormat layout_of(const at::Tensor& x) {
  const bool nchw = x.is_contiguous(), cl = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (nchw && cl) return x.suggest_memory_format();
  return nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
}

// The weight as the convolution takes it: an NCHW convolution with a channels_last weight
// would compute channels_last (ATen's rule), so it gets an NCHW one.
inline at::Tensor gemm_weight(const at::Tensor& weight, const at::Tensor& a) {
  return layout_of(a) == at::MemoryFormat::ChannelsLast ? weight : weight.contiguous();
}

}  // namespace resfast::cpu
