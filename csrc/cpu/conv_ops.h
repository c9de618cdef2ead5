// What the CPU's C++ convolution ops (conv2d_stats.cpp, conv2d_bn_eval.cpp) share: the checks
// of their convolution's arguments, and the op calls they make through the dispatcher (so
// that profiles name them as they name the Python route's calls).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string_view>

#include "op_handle.h"

namespace resfast::cpu {

using OptionalTensor = std::optional<at::Tensor>;

// x and weight as oneDNN's CPU convolution takes them; `op` names the op in the messages.
inline void check_conv_tensors(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be a 4-D tensor (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(2) == weight.size(3),
                    "weight must be (C_out, C_in, K, K), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), "weight has ", weight.size(1),
                    " input channels but x has ", x.size(1));
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
                    op, " runs oneDNN in float32 or bfloat16, got weight of dtype ",
                    weight.scalar_type());
  TORCH_CHECK_VALUE(x.scalar_type() == weight.scalar_type() || x.scalar_type() == at::kFloat,
                    "weight dtype ", weight.scalar_type(), " does not go with x dtype ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), op,
                    " is a CPU op; got x on ", x.device(), " and weight on ", weight.device());
  TORCH_CHECK_VALUE(x.numel() > 0, op, " needs a non-empty x, got ", x.sizes());
}

// The stride, padding and dilation conv2d_bn takes, and a padded x at least the kernel's size.
inline void check_conv_geometry(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                                int64_t padding, int64_t dilation) {
  TORCH_CHECK_VALUE((stride == 1 || stride == 2) && padding >= 0 && dilation >= 1,
                    "stride must be 1 or 2, padding >= 0 and dilation >= 1, got stride=", stride,
                    ", padding=", padding, ", dilation=", dilation);
  const int64_t span = dilation * (weight.size(2) - 1) + 1;
  TORCH_CHECK_VALUE(x.size(2) + 2 * padding >= span && x.size(3) + 2 * padding >= span,
                    "x spatial size ", x.sizes().slice(2), " is smaller than the kernel (", span,
                    "x", span, ") with padding ", padding);
}

// [attr](conv(a, weight) + bias) in one oneDNN call; attr "none" or "relu".
inline at::Tensor onednn_conv(const at::Tensor& a, const at::Tensor& weight,
                              const OptionalTensor& bias, int64_t stride, int64_t padding,
                              int64_t dilation, std::string_view attr) {
  using Scalars = c10::List<std::optional<c10::Scalar>>;
  static const auto op = op_handle<at::Tensor(
      const at::Tensor&, const at::Tensor&, const OptionalTensor&, c10::IntArrayRef,
      c10::IntArrayRef, c10::IntArrayRef, int64_t, std::string_view, Scalars,
      std::optional<std::string_view>)>("mkldnn::_convolution_pointwise");
  return op.call(a, weight, bias, {padding, padding}, {stride, stride}, {dilation, dilation}, 1,
                 attr, Scalars(), "");
}

// resfast::bn_act: [relu]((y - centre) * scale + shift [+ residual]).
inline at::Tensor bn_act(const at::Tensor& y, const OptionalTensor& scale,
                         const OptionalTensor& shift, const OptionalTensor& residual, bool relu,
                         const OptionalTensor& centre) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const OptionalTensor&,
                                              const OptionalTensor&, const OptionalTensor&, bool,
                                              const OptionalTensor&)>("resfast::bn_act");
  return op.call(y, scale, shift, residual, relu, centre);
}

// resfast::conv2d_winograd on a weight winograd_weight transformed.
inline at::Tensor conv2d_winograd(const at::Tensor& x, const at::Tensor& weight,
                                  const OptionalTensor& scale, const OptionalTensor& shift,
                                  const OptionalTensor& residual, bool relu) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                           const OptionalTensor&, const OptionalTensor&, bool)>(
          "resfast::conv2d_winograd");
  return op.call(x, weight, scale, shift, residual, relu);
}

}  // namespace resfast::cpu
