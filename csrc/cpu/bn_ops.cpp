// CPU implementations of the BatchNorm ops, written with ATen tensor
// arithmetic in float32 (float64 for float64 input). They are the reference
// path on machines without a GPU and compute what the CUDA kernels compute.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"

namespace resfast {
namespace {

at::Tensor as_channel(const at::Tensor& v, at::ScalarType dtype) { return v.to(dtype).view({1, -1, 1, 1}); }

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& y) {
  check_activation(y, "y");
  TORCH_CHECK_VALUE(count_per_channel(y) > 0, "y must have at least one element per channel, got shape ", y.sizes());
  auto [var, mean] = at::var_mean(y.to(stats_dtype(y)), {0, 2, 3}, /*correction=*/0);
  return {mean, var};
}

at::Tensor bn_stats_backward_cpu(const at::Tensor& grad_mean, const at::Tensor& grad_var, const at::Tensor& y,
                                 const at::Tensor& mean) {
  check_activation(y, "y");
  check_channel_vector(grad_mean, y.size(1), y, "grad_mean");
  check_channel_vector(grad_var, y.size(1), y, "grad_var");
  check_channel_vector(mean, y.size(1), y, "mean");
  const auto dt = stats_dtype(y);
  const double inv_count = 1.0 / static_cast<double>(count_per_channel(y));
  auto g = (as_channel(grad_mean, dt) + 2.0 * (y.to(dt) - as_channel(mean, dt)) * as_channel(grad_var, dt)) * inv_count;
  auto grad_y = at::empty_like(y);
  grad_y.copy_(g);
  return grad_y;
}

std::tuple<at::Tensor, at::Tensor> bn_finalize_cpu(const at::Tensor& mean, const at::Tensor& var,
                                                   const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK_VALUE(mean.dim() == 1 && var.sizes() == mean.sizes(), "mean and var must be 1-D of equal size, got ",
                    mean.sizes(), " and ", var.sizes());
  const auto dt = mean.scalar_type();
  auto scale = at::rsqrt(var + eps);
  if (weight) scale = scale * weight->to(dt);
  auto shift = -mean * scale;
  if (bias) shift = shift + bias->to(dt);
  return {scale, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize_backward_cpu(
    const at::Tensor& grad_scale, const at::Tensor& grad_shift, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, double eps) {
  const auto dt = mean.scalar_type();
  auto invstd = at::rsqrt(var + eps);
  auto w = weight ? weight->to(dt) : at::ones_like(mean);
  // shift = bias - mean * scale, so scale also receives -mean * grad_shift.
  auto grad_scale_total = grad_scale - grad_shift * mean;
  auto grad_mean = -grad_shift * w * invstd;
  auto grad_var = grad_scale_total * w * (-0.5) * invstd * invstd * invstd;
  auto grad_weight = grad_scale_total * invstd;
  return {grad_mean, grad_var, grad_weight, grad_shift.clone()};
}

void bn_update_running_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                 const at::Tensor& var, int64_t count, double momentum) {
  TORCH_CHECK_VALUE(count > 1, "Expected more than 1 value per channel when training, got ", count);
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
  running_var.mul_(1.0 - momentum).add_(var.to(running_var.scalar_type()), momentum * unbias);
}

// z = y * scale + shift + residual, in the stats dtype.
at::Tensor pre_activation(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                          const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual) {
  const auto dt = stats_dtype(y);
  auto z = y.to(dt);
  if (scale) z = z * as_channel(*scale, dt) + as_channel(*shift, dt);
  if (residual) z = z + residual->to(dt);
  return z;
}

at::Tensor bn_act_cpu(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                      const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual, bool relu) {
  check_bn_act_inputs(y, scale, shift, residual);
  auto z = pre_activation(y, scale, shift, residual);
  if (relu) z = at::relu(z);
  auto out = at::empty_like(y);
  out.copy_(z);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual, bool relu,
    std::array<bool, 4> output_mask) {
  check_bn_act_inputs(y, scale, shift, residual);
  check_same_as(grad_out, y, "grad_out", "y");
  const auto dt = stats_dtype(y);
  auto g = grad_out.to(dt);
  if (relu) g = g * (pre_activation(y, scale, shift, residual) > 0);
  at::Tensor grad_y, grad_scale, grad_shift, grad_residual;
  auto empty = [&] { return at::empty({0}, y.options()); };
  if (output_mask[0]) {
    grad_y = at::empty_like(y);
    grad_y.copy_(scale ? g * as_channel(*scale, dt) : g);
  } else {
    grad_y = empty();
  }
  grad_scale = output_mask[1] && scale ? (g * y.to(dt)).sum({0, 2, 3}) : empty().to(dt);
  grad_shift = output_mask[2] && scale ? g.sum({0, 2, 3}) : empty().to(dt);
  if (output_mask[3]) {
    grad_residual = at::empty_like(y);
    grad_residual.copy_(g);
  } else {
    grad_residual = empty();
  }
  return {grad_y, grad_scale, grad_shift, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_stats_backward", &bn_stats_backward_cpu);
  m.impl("bn_finalize", &bn_finalize_cpu);
  m.impl("bn_finalize_backward", &bn_finalize_backward_cpu);
  m.impl("bn_update_running_stats_", &bn_update_running_stats_cpu);
  m.impl("bn_act", &bn_act_cpu);
  m.impl("bn_act_backward", &bn_act_backward_cpu);
}

}  // namespace resfast
