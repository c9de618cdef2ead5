// The BatchNorm ops as compositions of ATen ops, for GPUs the CUDA kernels cannot run on
// (csrc/cuda/fallback.h). Same results as the kernels up to rounding: the same compute
// dtypes, outputs in the same dtypes and layouts (empty_like of the activation), unselected
// outputs empty, ReLU as torch's. The ops check their inputs before they get here.
#include "fallback.h"

#include <ATen/ATen.h>

#include "../checks.h"

namespace resfast::aten_fallback {
namespace {

// A per-channel vector in dtype dt, shaped to broadcast over (N, C, H, W).
at::Tensor per_channel(const at::Tensor& v, at::ScalarType dt) {
  return v.to(dt).view({1, -1, 1, 1});
}

// t stored as the kernels store their outputs: in like's dtype and layout.
at::Tensor stored_like(const at::Tensor& like, const at::Tensor& t) {
  return at::empty_like(like).copy_(t);
}

// float32 and float64 compute in their own dtype; float16 and bfloat16 in float32.
at::ScalarType compute_dtype(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

// y - centre in the statistics dtype (y itself, upcast, without a centre)
at::Tensor centred(const at::Tensor& y, const std::optional<at::Tensor>& centre,
                   at::ScalarType dt) {
  at::Tensor z = y.to(dt);
  return centre ? z - per_channel(*centre, dt) : z;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& y) {
  auto [var, mean] = at::var_mean(y.to(stats_dtype(y)), at::IntArrayRef{0, 2, 3},
                                  /*correction=*/0, /*keepdim=*/false);
  return {mean.contiguous(), var.contiguous()};
}

at::Tensor bn_stats_backward(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                             const at::Tensor& y, const at::Tensor& mean) {
  if (y.numel() == 0) return at::empty_like(y);
  const auto dt = stats_dtype(y);
  const double inv_count = 1.0 / static_cast<double>(count_per_channel(y));
  const at::Tensor g = (per_channel(grad_mean, dt) +
                        2 * (y.to(dt) - per_channel(mean, dt)) * per_channel(grad_var, dt)) *
                       inv_count;
  return stored_like(y, g);
}

std::tuple<at::Tensor, at::Tensor> bn_finalize(const at::Tensor& mean, const at::Tensor& var,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& bias, double eps) {
  const auto dt = mean.scalar_type();
  const auto ct = compute_dtype(dt);
  at::Tensor scale = at::rsqrt(var.to(ct) + eps);
  if (weight) scale = scale * weight->to(ct);
  at::Tensor shift = -mean.to(ct) * scale;
  if (bias) shift = shift + bias->to(ct);
  return {scale.to(dt).contiguous(), shift.to(dt).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize_backward(
    const at::Tensor& grad_scale, const at::Tensor& grad_shift, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& weight, double eps) {
  const auto dt = mean.scalar_type();
  const auto ct = compute_dtype(dt);
  const at::Tensor invstd = at::rsqrt(var.to(ct) + eps);
  const at::Tensor w = weight ? weight->to(ct) : at::ones_like(invstd);
  const at::Tensor gsh = grad_shift.to(ct);
  // shift = bias - mean * scale, so scale also receives -mean * grad_shift
  const at::Tensor gs_total = grad_scale.to(ct) - gsh * mean.to(ct);
  const at::Tensor grad_mean = -gsh * w * invstd;
  const at::Tensor grad_var = gs_total * w * -0.5 * invstd * invstd * invstd;
  const at::Tensor grad_weight = gs_total * invstd;
  return {grad_mean.to(dt).contiguous(), grad_var.to(dt).contiguous(),
          grad_weight.to(dt).contiguous(), grad_shift.clone()};
}

void bn_update_running_stats_(at::Tensor& running_mean, at::Tensor& running_var,
                              const at::Tensor& mean, const at::Tensor& var, int64_t count,
                              double momentum) {
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
  running_var.mul_(1.0 - momentum).add_(var.to(running_var.scalar_type()), momentum * unbias);
}

at::Tensor bn_act(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& shift,
                  const std::optional<at::Tensor>& residual, bool relu,
                  const std::optional<at::Tensor>& centre) {
  const auto dt = stats_dtype(y);
  at::Tensor z = centred(y, centre, dt);
  if (scale) z = z * per_channel(*scale, dt) + per_channel(*shift, dt);
  if (residual) z = z + residual->to(dt);
  if (relu) z = at::relu(z);
  return stored_like(y, z);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward(
    const at::Tensor& grad_out, const at::Tensor& y, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual, bool relu,
    std::array<bool, 4> output_mask, const std::optional<at::Tensor>& centre) {
  const auto dt = stats_dtype(y);
  const at::Tensor yc = centred(y, centre, dt);
  const bool sums = scale.has_value() && (output_mask[1] || output_mask[2]);
  at::Tensor g = grad_out.to(dt);
  if (relu) {
    at::Tensor z = yc;
    if (scale) z = z * per_channel(*scale, dt) + per_channel(*shift, dt);
    if (residual) z = z + residual->to(dt);
    // torch's threshold_backward: 0 where z <= 0, the gradient elsewhere (NaN z too)
    g = g.masked_fill(z <= 0, 0);
  }
  const auto channel_sum = [](const at::Tensor& t) { return t.sum(at::IntArrayRef{0, 2, 3}); };
  at::Tensor grad_y = output_mask[0]
                          ? stored_like(y, scale ? g * per_channel(*scale, dt) : g)
                          : at::empty({0}, y.options());
  at::Tensor grad_scale = output_mask[1] && sums ? channel_sum(g * yc)
                                                 : at::empty({0}, y.options().dtype(dt));
  at::Tensor grad_shift =
      output_mask[2] && sums ? channel_sum(g) : at::empty({0}, y.options().dtype(dt));
  at::Tensor grad_residual = output_mask[3] ? stored_like(y, g) : at::empty({0}, y.options());
  return {grad_y, grad_scale, grad_shift, grad_residual};
}

}  // namespace resfast::aten_fallback
