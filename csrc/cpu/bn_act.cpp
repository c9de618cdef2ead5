// CPU bn_act and bn_act_backward: checks and layouts here, the loops in
// kernels/bn_act_kernel.cpp.
#include <torch/library.h>

#include "../checks.h"
#include "activation.h"

namespace resfast::cpu {
namespace {

// The centre as the loops read it: given with scale/shift, zero when absent
// ((y - 0) * scale + shift is y * scale + shift exactly).
at::Tensor centre_values(const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& centre, int64_t C, at::ScalarType dt,
                         const at::Tensor& y) {
  if (!scale) return at::Tensor();
  return centre ? channel_values(*centre, dt) : at::zeros({C}, y.options().dtype(dt));
}

at::Tensor bn_act_cpu(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                      const std::optional<at::Tensor>& shift,
                      const std::optional<at::Tensor>& residual, bool relu,
                      const std::optional<at::Tensor>& centre) {
  check_bn_act_inputs(y, scale, shift, residual, centre);
  at::Tensor out = at::empty_like(y);
  if (y.numel() == 0) return out;
  const auto dt = stats_dtype(y);
  const auto format = loop_format(y);
  const at::Tensor y_dense = dense(y, format);
  const at::Tensor res = residual ? dense(*residual, format) : at::Tensor();
  const at::Tensor sc = scale ? channel_values(*scale, dt) : at::Tensor();
  const at::Tensor sh = shift ? channel_values(*shift, dt) : at::Tensor();
  const at::Tensor cc = centre_values(scale, centre, y.size(1), dt, y);
  at::Tensor buffer = buffer_for(out, format);
  kernels().bn_act({y_dense.const_data_ptr(), y.scalar_type(), geometry(y, format),
                    data_or_null(sc), data_or_null(sh), data_or_null(cc), data_or_null(res), relu,
                    buffer.mutable_data_ptr()});
  copy_back(out, buffer);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual, bool relu,
    std::array<bool, 4> output_mask, const std::optional<at::Tensor>& centre) {
  check_bn_act_inputs(y, scale, shift, residual, centre);
  check_same_as(grad_out, y, "grad_out", "y");
  const auto dt = stats_dtype(y);
  const int64_t C = y.size(1);
  // The sums behind grad_scale and grad_shift come together from one pass.
  const bool sums = scale.has_value() && (output_mask[1] || output_mask[2]);
  auto empty = [&] { return at::empty({0}, y.options()); };
  at::Tensor grad_y = output_mask[0] ? at::empty_like(y) : empty();
  at::Tensor grad_residual = output_mask[3] ? at::empty_like(y) : empty();
  at::Tensor sum_gy = at::zeros({sums ? C : 0}, y.options().dtype(dt));
  at::Tensor sum_g = at::zeros({sums ? C : 0}, y.options().dtype(dt));
  if (y.numel() > 0 && (output_mask[0] || output_mask[3] || sums)) {
    const auto format = loop_format(y);
    const at::Tensor go = dense(grad_out, format);
    const at::Tensor y_dense = relu || sums ? dense(y, format) : at::Tensor();
    const at::Tensor res = relu && residual ? dense(*residual, format) : at::Tensor();
    const at::Tensor sc = scale ? channel_values(*scale, dt) : at::Tensor();
    const at::Tensor sh = shift ? channel_values(*shift, dt) : at::Tensor();
    const at::Tensor cc = centre_values(scale, centre, C, dt, y);
    at::Tensor gy_buffer = output_mask[0] ? buffer_for(grad_y, format) : at::Tensor();
    at::Tensor gr_buffer = output_mask[3] ? buffer_for(grad_residual, format) : at::Tensor();
    kernels().bn_act_backward(
        {go.const_data_ptr(), data_or_null(y_dense), y.scalar_type(), geometry(y, format),
         data_or_null(sc), data_or_null(sh), data_or_null(cc), data_or_null(res), relu,
         mutable_data_or_null(gy_buffer), mutable_data_or_null(gr_buffer),
         sums ? sum_gy.mutable_data_ptr() : nullptr, sums ? sum_g.mutable_data_ptr() : nullptr});
    if (output_mask[0]) copy_back(grad_y, gy_buffer);
    if (output_mask[3]) copy_back(grad_residual, gr_buffer);
  }
  // Unselected outputs are empty, in the dtypes of the selected ones.
  at::Tensor grad_scale = output_mask[1] && sums ? sum_gy : at::empty({0}, y.options().dtype(dt));
  at::Tensor grad_shift = output_mask[2] && sums ? sum_g : at::empty({0}, y.options().dtype(dt));
  return {grad_y, grad_scale, grad_shift, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("bn_act", &bn_act_cpu);
  m.impl("bn_act_backward", &bn_act_backward_cpu);
}

}  // namespace resfast::cpu
