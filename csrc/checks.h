// Input checks shared by the CPU and CUDA implementations: each names the
// argument it rejects.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace resfast {

// The dtypes every kernel handles; float8/float4 are floating point too, but not among them.
inline void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  const auto dt = t.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                    name, " must be floating point (float16, bfloat16, float32 or float64), got ",
                    dt);
}

inline void check_same_as(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", ref.sizes(),
                    ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                    ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on ", ref.device(), " like ", ref_name, ", got ",
                    t.device());
}

// Per-channel vectors are float32 (float64 for float64 activations).
inline at::ScalarType stats_dtype(const at::Tensor& activation) {
  return activation.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_channel_vector(const at::Tensor& t, int64_t channels, const at::Tensor& activation,
                                 const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == channels, name, " must have shape (", channels, "), got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == activation.device(), name, " must be on ", activation.device(), ", got ",
                    t.device());
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ", t.scalar_type());
}

// N*H*W, also when C = 0.
inline int64_t count_per_channel(const at::Tensor& t) { return t.size(0) * t.size(2) * t.size(3); }

// ---- Each op's inputs, checked alike on the CPU and the GPU ----

inline void check_stats_input(const at::Tensor& y) {
  check_activation(y, "y");
  TORCH_CHECK_VALUE(count_per_channel(y) > 0,
                    "y must have at least one element per channel, got shape ", y.sizes());
}

inline void check_stats_backward_inputs(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                        const at::Tensor& y, const at::Tensor& mean) {
  check_activation(y, "y");
  check_channel_vector(grad_mean, y.size(1), y, "grad_mean");
  check_channel_vector(grad_var, y.size(1), y, "grad_var");
  check_channel_vector(mean, y.size(1), y, "mean");
}

// Per-channel vectors of bn_finalize(_backward) and bn_update_running_stats_:
// `ref` (mean, or running_mean) sets the length and the device.
inline void check_channel_reference(const at::Tensor& ref, const char* name) {
  TORCH_CHECK_VALUE(ref.dim() == 1, name, " must be 1-D, got ", ref.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(ref.scalar_type()), name, " must be floating point, got ",
                    ref.scalar_type());
}

inline void check_finalize_inputs(const at::Tensor& mean, const at::Tensor& var,
                                  const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(mean.dim() == 1 && var.sizes() == mean.sizes(),
                    "mean and var must be 1-D of equal size, got ", mean.sizes(), " and ",
                    var.sizes());
  check_channel_reference(mean, "mean");
  const int64_t C = mean.size(0);
  check_channel_vector(var, C, mean, "var");
  if (weight) check_channel_vector(*weight, C, mean, "weight");
  if (bias) check_channel_vector(*bias, C, mean, "bias");
}

inline void check_finalize_backward_inputs(const at::Tensor& grad_scale,
                                           const at::Tensor& grad_shift, const at::Tensor& mean,
                                           const at::Tensor& var,
                                           const std::optional<at::Tensor>& weight) {
  check_channel_reference(mean, "mean");
  const int64_t C = mean.size(0);
  check_channel_vector(grad_scale, C, mean, "grad_scale");
  check_channel_vector(grad_shift, C, mean, "grad_shift");
  check_channel_vector(var, C, mean, "var");
  if (weight) check_channel_vector(*weight, C, mean, "weight");
}

inline void check_running_stats_inputs(const at::Tensor& running_mean,
                                       const at::Tensor& running_var, const at::Tensor& mean,
                                       const at::Tensor& var, int64_t count) {
  TORCH_CHECK_VALUE(count > 1, "Expected more than 1 value per channel when training, got ", count);
  check_channel_reference(running_mean, "running_mean");
  const int64_t C = running_mean.size(0);
  check_channel_vector(running_var, C, running_mean, "running_var");
  check_channel_vector(mean, C, running_mean, "mean");
  check_channel_vector(var, C, running_mean, "var");
}

// The inputs of bn_act / bn_act_backward.
inline void check_bn_act_inputs(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual,
                         const std::optional<at::Tensor>& centre) {
  check_activation(y, "y");
  TORCH_CHECK_VALUE(scale.has_value() == shift.has_value(), "scale and shift must be given together");
  TORCH_CHECK_VALUE(!centre || scale, "centre needs scale and shift");
  if (scale) {
    check_channel_vector(*scale, y.size(1), y, "scale");
    check_channel_vector(*shift, y.size(1), y, "shift");
  }
  if (centre) check_channel_vector(*centre, y.size(1), y, "centre");
  if (residual) check_same_as(*residual, y, "residual", "y");
}

}  // namespace resfast
