// The CPU training layer in C++: resfast::conv2d_stats (oneDNN's convolution, then the
// batch statistics of its output) and its backward, with autograd formulas in C++ for it
// and for resfast::bn_batch_act.
//
// resfast's layers run a training conv + BN + ReLU on the CPU as two autograd nodes:
// conv2d_stats, then bn_batch_act applying the BN (+ residual, ReLU) on those statistics.
// Written as Python autograd Functions, the two cost ~0.27 ms of host time per layer more
// than torch.nn's three C++ nodes (benchmarks/cpu_host_time.py); here they are C++ nodes.
// conv2d_stats computes what resfast::conv2d_bn computes on the CPU for these arguments (no
// prologue or epilogue, stats=True) with the same oneDNN and BN calls
// (resfast/ops/conv_cpu.py), so the two agree bitwise (tests/ops/test_conv2d_stats.py).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "conv_layout.h"
#include "conv_ops.h"
#include "op_handle.h"
#include "winograd.h"


namespace resfast::cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The convolution by Winograd's F(4x4, 3x3) where winograd_applies (resfast.ops.winograd):
// conv(a, weight) + bias, or with transposed=True the input's gradient conv(g, weight
// rotated, its channels swapped), through the dispatcher as the Python route calls them.
at::Tensor winograd_conv(const at::Tensor& a, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, bool transposed) {
  static const auto transform =
      op_handle<at::Tensor(const at::Tensor&, bool)>("resfast::winograd_weight");
  return conv2d_winograd(a, transform.call(weight, transposed), std::nullopt, bias,
                         std::nullopt, false);
}

void check_conv2d_stats_inputs(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, int64_t stride,
                               int64_t padding, int64_t dilation) {
  check_conv_tensors("conv2d_stats", x, weight);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape (",
                      weight.size(0), ",), got ", bias->sizes());
  }
  check_conv_geometry(x, weight, stride, padding, dilation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_stats_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    int64_t stride, int64_t padding, int64_t dilation) {
  check_conv2d_stats_inputs(x, weight, bias, stride, padding, dilation);
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(weight.scalar_type());
  const at::Tensor a = gemm_input(x, weight.scalar_type());
  at::Tensor y = winograd_applies(a, weight, stride, padding, dilation)
                     ? winograd_conv(a, weight, b, false)
                     : onednn_conv(a, gemm_weight(weight, a), b, stride, padding, dilation,
                                   "none");
  static const auto stats =
      op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>("resfast::bn_stats");
  auto [mean, var] = stats.call(y);
  return {y, mean, var};
}

// g + (grad_mean + 2 (y - mean) grad_var) / count in one centred bn_act pass, as
// conv_cpu.stats_gradient computes it (the same scalars, so the same rounding).
at::Tensor add_stats_gradient(const std::optional<at::Tensor>& g,
                              const std::optional<at::Tensor>& grad_mean,
                              const std::optional<at::Tensor>& grad_var, const at::Tensor& y,
                              const at::Tensor& mean) {
  const int64_t count = y.numel() / y.size(1);
  const at::Tensor gm = grad_mean.has_value() ? *grad_mean : at::zeros_like(mean);
  const at::Tensor gv = grad_var.has_value() ? *grad_var : at::zeros_like(mean);
  return bn_act(y, gv * (2.0 / static_cast<double>(count)), gm / count, g, false, mean);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_stats_backward_cpu(
    const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_mean,
    const std::optional<at::Tensor>& grad_var, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& y, const at::Tensor& mean, int64_t stride, int64_t padding,
    int64_t dilation, std::array<bool, 3> output_mask) {
  check_conv2d_stats_inputs(x, weight, std::nullopt, stride, padding, dilation);
  const std::vector<int64_t> out_shape = conv_output_shape(x, weight, stride, padding, dilation);
  TORCH_CHECK_VALUE(y.sizes() == out_shape, "y must have the output's shape ", out_shape,
                    ", got ", y.sizes());
  TORCH_CHECK_VALUE(!grad_y.has_value() || grad_y->sizes() == out_shape,
                    "grad_y must have the output's shape ", out_shape, ", got ",
                    grad_y.has_value() ? grad_y->sizes() : y.sizes());
  TORCH_CHECK_VALUE(mean.dim() == 1 && mean.size(0) == weight.size(0),
                    "mean must have shape (", weight.size(0), ",), got ", mean.sizes());
  const auto dtype = weight.scalar_type();
  at::Tensor g;
  if (grad_mean.has_value() || grad_var.has_value()) {
    g = add_stats_gradient(grad_y, grad_mean, grad_var, y, mean);
  } else if (grad_y.has_value()) {
    g = *grad_y;
  } else {
    g = at::zeros_like(y);
  }
  const at::Tensor a = gemm_input(x, dtype);
  g = to_memory_format(g.to(dtype), layout_of(a));
  // By Winograd the input's gradient is a convolution of its own; the weight's is
  // conv2d_weight_grad's (oneDNN's, or one GEMM where oneDNN's is slow), as in conv_cpu.backward.
  const bool winograd = winograd_applies(a, weight, stride, padding, dilation);
  const std::array<bool, 3> mask = {output_mask[0] && !winograd, false, output_mask[2]};
  at::Tensor grad_a, grad_w, grad_b;
  if (mask[0] || mask[2]) {
    std::tie(grad_a, std::ignore, grad_b) = at::convolution_backward(
        g, a, gemm_weight(weight, a), at::OptionalIntArrayRef({weight.size(0)}),
        {stride, stride}, {padding, padding}, {dilation, dilation}, false, {0, 0}, 1, mask);
  }
  if (winograd && output_mask[0]) grad_a = winograd_conv(g, weight, std::nullopt, true);
  if (output_mask[1]) {
    static const auto weight_grad =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                             int64_t, int64_t)>("resfast::conv2d_weight_grad");
    grad_w = weight_grad.call(g, a, weight, stride, padding, dilation);
  }
  const auto empty = [&] { return at::empty({0}, x.options()); };
  return {output_mask[0] ? grad_a.to(x.scalar_type()) : empty(),
          output_mask[1] ? grad_w : empty(), output_mask[2] ? grad_b.to(dtype) : empty()};
}

// ---- autograd ------------------------------------------------------------------------

// An undefined tensor (an absent optional, a gradient not materialized) as an empty optional.
std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

struct Conv2dStats : public torch::autograd::Function<Conv2dStats> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               int64_t stride, int64_t padding, int64_t dilation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t,
        int64_t)>("resfast::conv2d_stats");
    auto [y, mean, var] = op.call(x, weight, bias, stride, padding, dilation);
    // Statistics that reach no loss arrive as undefined, not zeros: then they cost no pass.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, weight, y, mean});
    ctx->saved_data["conf"] = std::vector<int64_t>{stride, padding, dilation, bias.has_value()};
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto conf = ctx->saved_data["conf"].toIntVector();
    const bool has_bias = conf[3] != 0;
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    if (!need_x && !need_w && !need_b) return variable_list(6);
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
        const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, int64_t, int64_t, int64_t, std::array<bool, 3>)>(
        "resfast::conv2d_stats_backward");
    auto [grad_x, grad_w, grad_b] =
        op.call(optional_of(grads[0]), optional_of(grads[1]), optional_of(grads[2]), saved[0],
                saved[1], saved[2], saved[3], conf[0], conf[1], conf[2], {need_x, need_w, need_b});
    variable_list out(6);
    if (need_x) out[0] = grad_x;
    if (need_w) out[1] = grad_w;
    if (need_b) out[2] = grad_b;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_stats_autograd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    int64_t stride, int64_t padding, int64_t dilation) {
  auto out = Conv2dStats::apply(x, weight, bias, stride, padding, dilation);
  return {out[0], out[1], out[2]};
}

struct BnBatchAct : public torch::autograd::Function<BnBatchAct> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& mean,
                            const at::Tensor& var, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, bool relu, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = op_handle<at::Tensor(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double)>(
        "resfast::bn_batch_act");
    at::Tensor out = op.call(y, mean, var, weight, bias, residual, relu, eps);
    ctx->save_for_backward({y, mean, var, weight.value_or(at::Tensor()),
                            bias.value_or(at::Tensor()), residual.value_or(at::Tensor())});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["eps"] = eps;
    return out;
  }

  // The gradient of y includes the path through mean and var, which must be y's own
  // statistics (bn_batch_act_backward's contract): mean and var get none of their own.
  // grads by reference: the node's own list (CppNode::apply's), from which the gradient is
  // moved on to the kernel below.
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &y = saved[0], &mean = saved[1], &var = saved[2];
    const at::Tensor &weight = saved[3], &bias = saved[4], &residual = saved[5];
    // needs_input_grad counts only the tensors given (an absent optional has no edge)
    int64_t edge = 3;
    const bool need_y = ctx->needs_input_grad(0);
    const bool need_w = weight.defined() && ctx->needs_input_grad(edge++);
    const bool need_b = bias.defined() && ctx->needs_input_grad(edge++);
    const bool need_r = residual.defined() && ctx->needs_input_grad(edge++);
    variable_list out(8);
    if (!need_y && !need_w && !need_b && !need_r) return out;
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
        const std::optional<at::Tensor>&, bool, double, std::array<bool, 4>)>(
        "resfast::bn_batch_act_backward");
    // The gradient received is handed over: the kernel may write an output into it when
    // nothing else holds it. Only without grad mode: a double backward must go through the
    // Autograd key, which raises for this op.
    at::Tensor grad_out = std::move(grads[0]);
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    auto [grad_y, grad_w, grad_b, grad_r] =
        op.call(grad_out, y, mean, var, optional_of(weight), optional_of(bias),
                optional_of(residual), ctx->saved_data["relu"].toBool(),
                ctx->saved_data["eps"].toDouble(), {need_y, need_w, need_b, need_r});
    if (need_y) out[0] = grad_y;
    if (need_w) out[3] = grad_w;
    if (need_b) out[4] = grad_b;
    if (need_r) out[5] = grad_r;
    return out;
  }
};

at::Tensor bn_batch_act_autograd(const at::Tensor& y, const at::Tensor& mean,
                                 const at::Tensor& var, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& residual, bool relu,
                                 double eps) {
  return BnBatchAct::apply(y, mean, var, weight, bias, residual, relu, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("conv2d_stats", &conv2d_stats_cpu);
  m.impl("conv2d_stats_backward", &conv2d_stats_backward_cpu);
}

// On the CPU these take precedence over the Python formulas registered for the Autograd key
// (resfast/ops/bn_batch.py), which the other devices keep.
TORCH_LIBRARY_IMPL(resfast, AutogradCPU, m) {
  m.impl("conv2d_stats", &conv2d_stats_autograd);
  m.impl("bn_batch_act", &bn_batch_act_autograd);
}

}  // namespace resfast::cpu
