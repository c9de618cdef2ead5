// resfast::conv2d_bn_train: the forward of a CPU training layer in one call from Python.
//
// resfast.functional.conv_bn_pending builds a training conv + BN layer from three ops: the
// input's pending BatchNorm (+ ReLU) on its batch statistics (bn_batch_act), the
// convolution with its output's statistics (conv2d_stats), and the running statistics'
// update (bn_update_running_stats_). Made one by one from Python, with the checks and
// bookkeeping around them, they left a layer's forward and backward at ~75 us of host time
// more than torch.nn's modules; made from here, ~40 us more (benchmarks/cpu_host_time.py,
// 2026-11-30-4-cpu-2core-host-time.txt). This kernel makes the same three calls from C++.
// It is CompositeImplicitAutograd: each call goes through the dispatcher and records its own
// autograd node, so results, gradients and profiles are those of the Python route
// (tests/ops/test_conv2d_bn_train.py checks bitwise).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "op_handle.h"

namespace resfast::cpu {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_bn_train(
    const at::Tensor& x, const OptionalTensor& in_mean, const OptionalTensor& in_var,
    const OptionalTensor& in_weight, const OptionalTensor& in_bias, bool in_relu, double in_eps,
    const at::Tensor& weight, const OptionalTensor& bias, int64_t stride, int64_t padding,
    int64_t dilation, const OptionalTensor& running_mean, const OptionalTensor& running_var,
    const OptionalTensor& num_batches_tracked, std::optional<double> momentum) {
  TORCH_CHECK_VALUE(in_mean.has_value() == in_var.has_value(),
                    "in_mean and in_var must be given together");
  TORCH_CHECK_VALUE(in_mean.has_value() || !(in_relu || in_weight || in_bias),
                    "in_relu, in_weight and in_bias need in_mean and in_var");
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "running_mean and running_var must be given together");
  TORCH_CHECK_VALUE(!running_mean || momentum || num_batches_tracked,
                    "momentum=None (a cumulative average) needs num_batches_tracked");
  at::Tensor a = x;
  if (in_mean.has_value()) {
    static const auto act = op_handle<at::Tensor(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
        const OptionalTensor&, const OptionalTensor&, bool, double)>("resfast::bn_batch_act");
    a = act.call(x, *in_mean, *in_var, in_weight, in_bias, std::nullopt, in_relu, in_eps);
  }
  static const auto conv = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const OptionalTensor&, int64_t, int64_t, int64_t)>(
      "resfast::conv2d_stats");
  auto [y, mean, var] = conv.call(a, weight, bias, stride, padding, dilation);
  if (running_mean.has_value()) {
    // nn.BatchNorm2d's update (resfast.functional._update_running_stats)
    // (symbolic sizes under torch.compile's fake tensors: the count is a guard there)
    const c10::SymInt channels = y.sym_size(1);
    const int64_t count =
        channels == 0 ? 0 : (y.sym_numel() / channels).guard_int(__FILE__, __LINE__);
    TORCH_CHECK_VALUE(count > 1, "Expected more than 1 value per channel when training, got ",
                      count);
    // Buffers, outside any graph: below autograd, whose fallback for a mutating op costs
    // more host time than the update itself.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    double factor = momentum.value_or(0.0);
    if (num_batches_tracked.has_value()) {
      num_batches_tracked->add_(1);
      if (!momentum) factor = 1.0 / num_batches_tracked->item<double>();
    }
    static const auto update =
        op_handle<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                       double)>("resfast::bn_update_running_stats_");
    at::Tensor rm = *running_mean, rv = *running_var;
    update.call(rm, rv, mean, var, count, factor);
  }
  return {y, mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CompositeImplicitAutograd, m) {
  m.impl("conv2d_bn_train", &conv2d_bn_train);
}

}  // namespace resfast::cpu
