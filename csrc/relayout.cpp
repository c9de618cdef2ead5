// relayout: x copied into channels_last or NCHW. On the CPU, by tiles when x is
// dense in the other layout (cpu/activation.h, the loop in
// cpu/kernels/layout_kernel.cpp); elsewhere ATen's copy.
#include <torch/library.h>

#include "cpu/activation.h"

namespace resfast {
namespace {

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

void check_relayout_input(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
}

at::Tensor relayout_cpu(const at::Tensor& x, bool channels_last) {
  check_relayout_input(x);
  return cpu::relayout(x, format_of(channels_last));
}

at::Tensor relayout_any(const at::Tensor& x, bool channels_last) {
  check_relayout_input(x);
  return at::empty(x.sizes(), x.options().memory_format(format_of(channels_last))).copy_(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) { m.impl("relayout", &relayout_cpu); }
TORCH_LIBRARY_IMPL(resfast, CompositeExplicitAutograd, m) { m.impl("relayout", &relayout_any); }

}  // namespace resfast
