// CPU bn_finalize, bn_finalize_backward and bn_update_running_stats_: one loop
// over the channels each, reading the inputs through their strides. The
// formulas and rounding steps are those of csrc/cuda/bn_finalize.cu: float32
// arithmetic (float64 for float64 statistics), results in mean's dtype.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "activation.h"
#include "bn_affine.h"

namespace resfast::cpu {
namespace {

// float32 and float64 compute in their own dtype; float16 and bfloat16 in float32.
at::ScalarType compute_dtype(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

// Reads element c of a 1-D tensor of dtype A through its stride (any stride, 0 too).
template <typename A>
struct Strided {
  const A* data = nullptr;
  int64_t stride = 0;
  Strided() = default;
  explicit Strided(const at::Tensor& t) : data(t.const_data_ptr<A>()), stride(t.stride(0)) {}
  A operator[](int64_t c) const { return data[c * stride]; }
  explicit operator bool() const { return data != nullptr; }
};

// t as dtype A, read in place when it already is (the common case).
template <typename A>
std::pair<at::Tensor, Strided<A>> read_as(const std::optional<at::Tensor>& t) {
  if (!t) return {};
  at::Tensor cast = t->to(c10::CppTypeToScalarType<A>::value);
  Strided<A> view(cast);
  return {std::move(cast), view};
}

std::tuple<at::Tensor, at::Tensor> bn_finalize_cpu(const at::Tensor& mean, const at::Tensor& var,
                                                   const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   double eps) {
  check_finalize_inputs(mean, var, weight, bias);
  const int64_t C = mean.size(0);
  const auto dt = mean.scalar_type();
  at::Tensor scale = at::empty({C}, mean.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor shift = at::empty({C}, mean.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "resfast::bn_finalize", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto [mean_t, mu] = read_as<A>(mean);
    const auto [var_t, v] = read_as<A>(var);
    const auto [weight_t, w] = read_as<A>(weight);
    const auto [bias_t, b] = read_as<A>(bias);
    scalar_t* scale_out = scale.mutable_data_ptr<scalar_t>();
    scalar_t* shift_out = shift.mutable_data_ptr<scalar_t>();
    const A e = static_cast<A>(eps);
    for (int64_t c = 0; c < C; ++c) {
      A s = bn_invstd(v[c], e);
      if (w) s = s * w[c];
      A t = -mu[c] * s;
      if (b) t = t + b[c];
      scale_out[c] = static_cast<scalar_t>(s);
      shift_out[c] = static_cast<scalar_t>(t);
    }
  });
  return {scale, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize_backward_cpu(
    const at::Tensor& grad_scale, const at::Tensor& grad_shift, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& weight, double eps) {
  check_finalize_backward_inputs(grad_scale, grad_shift, mean, var, weight);
  const int64_t C = mean.size(0);
  const auto options = mean.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_mean = at::empty({C}, options);
  at::Tensor grad_var = at::empty({C}, options);
  at::Tensor grad_weight = at::empty({C}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, mean.scalar_type(), "resfast::bn_finalize_backward", [&] {
        using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const auto [gs_t, gs] = read_as<A>(grad_scale);
        const auto [gsh_t, gsh] = read_as<A>(grad_shift);
        const auto [mean_t, mu] = read_as<A>(mean);
        const auto [var_t, v] = read_as<A>(var);
        const auto [weight_t, w] = read_as<A>(weight);
        scalar_t* gm_out = grad_mean.mutable_data_ptr<scalar_t>();
        scalar_t* gv_out = grad_var.mutable_data_ptr<scalar_t>();
        scalar_t* gw_out = grad_weight.mutable_data_ptr<scalar_t>();
        const A e = static_cast<A>(eps);
        for (int64_t c = 0; c < C; ++c) {
          const A invstd = bn_invstd(v[c], e);
          const A wc = w ? w[c] : A(1);
          // shift = bias - mean * scale, so scale also receives -mean * grad_shift.
          const A gs_total = gs[c] - gsh[c] * mu[c];
          gm_out[c] = static_cast<scalar_t>(-gsh[c] * wc * invstd);
          gv_out[c] = static_cast<scalar_t>(bn_grad_var(gs_total, wc, invstd));
          gw_out[c] = static_cast<scalar_t>(gs_total * invstd);
        }
      });
  // grad_bias is grad_shift itself, as on the GPU.
  return {grad_mean, grad_var, grad_weight, grad_shift.clone()};
}

// running = R(running * keep) + momentum_batch * R(batch), the add an fma in
// the accumulation type, as ATen's mul_ then add_(alpha) round it.
void update_running(at::Tensor& running, const at::Tensor& batch, double keep,
                    double momentum_batch) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, running.scalar_type(), "resfast::bn_update_running_stats_", [&] {
        using A = at::opmath_type<scalar_t>;
        const auto [batch_t, x] = read_as<scalar_t>(batch);
        scalar_t* r = running.mutable_data_ptr<scalar_t>();
        const int64_t stride = running.stride(0);
        const A k = static_cast<A>(keep), m = static_cast<A>(momentum_batch);
        for (int64_t c = 0; c < running.size(0); ++c) {
          const A kept = static_cast<scalar_t>(static_cast<A>(r[c * stride]) * k);
          r[c * stride] = static_cast<scalar_t>(std::fma(static_cast<A>(x[c]), m, kept));
        }
      });
}

void bn_update_running_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var,
                                 const at::Tensor& mean, const at::Tensor& var, int64_t count,
                                 double momentum) {
  check_running_stats_inputs(running_mean, running_var, mean, var, count);
  at::assert_no_internal_overlap(running_mean);
  at::assert_no_internal_overlap(running_var);
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  update_running(running_mean, mean, 1.0 - momentum, momentum);
  update_running(running_var, var, 1.0 - momentum, momentum * unbias);
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("bn_finalize", &bn_finalize_cpu);
  m.impl("bn_finalize_backward", &bn_finalize_backward_cpu);
  m.impl("bn_update_running_stats_", &bn_update_running_stats_cpu);
}

}  // namespace resfast::cpu
