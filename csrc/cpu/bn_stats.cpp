// CPU bn_stats and bn_stats_backward: checks and layouts here, the loops in
// kernels/bn_stats_kernel.cpp.
#include <torch/library.h>

#include "../checks.h"
#include "activation.h"

namespace resfast::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& y) {
  check_stats_input(y);
  const int64_t C = y.size(1);
  const auto options = y.options().dtype(stats_dtype(y));
  at::Tensor mean = at::empty({C}, options);
  at::Tensor var = at::empty({C}, options);
  if (C == 0) return {mean, var};
  const auto format = loop_format(y);
  const at::Tensor y_dense = dense(y, format);
  kernels().bn_stats({y_dense.const_data_ptr(), y.scalar_type(), geometry(y, format),
                      mean.mutable_data_ptr(), var.mutable_data_ptr()});
  return {mean, var};
}

at::Tensor bn_stats_backward_cpu(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                 const at::Tensor& y, const at::Tensor& mean) {
  check_stats_backward_inputs(grad_mean, grad_var, y, mean);
  at::Tensor grad_y = at::empty_like(y);
  if (y.numel() == 0) return grad_y;
  const auto dt = stats_dtype(y);
  const auto format = loop_format(y);
  const at::Tensor y_dense = dense(y, format);
  at::Tensor buffer = buffer_for(grad_y, format);
  const at::Tensor gm = channel_values(grad_mean, dt), gv = channel_values(grad_var, dt);
  const at::Tensor mu = channel_values(mean, dt);
  kernels().bn_stats_backward({y_dense.const_data_ptr(), y.scalar_type(), geometry(y, format),
                               gm.const_data_ptr(), gv.const_data_ptr(), mu.const_data_ptr(),
                               1.0 / static_cast<double>(count_per_channel(y)),
                               buffer.mutable_data_ptr()});
  copy_back(grad_y, buffer);
  return grad_y;
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_stats_backward", &bn_stats_backward_cpu);
}

}  // namespace resfast::cpu
