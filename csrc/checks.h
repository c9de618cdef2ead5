// Input checks shared by the CPU and CUDA implementations: each names the
// argument it rejects.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace resfast {

inline void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ", t.scalar_type());
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

// The inputs of bn_act / bn_act_backward, checked alike on the CPU and the GPU.
inline void check_bn_act_inputs(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual) {
  check_activation(y, "y");
  TORCH_CHECK_VALUE(scale.has_value() == shift.has_value(), "scale and shift must be given together");
  if (scale) {
    check_channel_vector(*scale, y.size(1), y, "scale");
    check_channel_vector(*shift, y.size(1), y, "shift");
  }
  if (residual) check_same_as(*residual, y, "residual", "y");
}

}  // namespace resfast
