// CUDA implementations of the per-channel BatchNorm ops: bn_finalize,
// bn_finalize_backward and bn_update_running_stats_. One thread per channel;
// the formulas and their rounding steps follow csrc/cpu/bn_ops.cpp.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../checks.h"
#include "fallback.h"
#include "vec.cuh"

namespace resfast::cuda {
namespace {

// ---- Kernels ----------------------------------------------------------------

constexpr int kChannelThreads = 128;

// scale = rsqrt(var + eps) [* weight], shift = -mean * scale [+ bias].
template <typename A>
__global__ __launch_bounds__(kChannelThreads) void bn_finalize_kernel(const A* __restrict__ mean,
                                                                      const A* __restrict__ var,
                                                                      const A* __restrict__ weight,
                                                                      const A* __restrict__ bias, A eps,
                                                                      A* __restrict__ scale, A* __restrict__ shift,
                                                                      int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  A s = rsqrt_rn(var[c] + eps);
  if (weight) s = mul_rn(s, weight[c]);
  A b = mul_rn(-mean[c], s);
  if (bias) b += bias[c];
  scale[c] = s;
  shift[c] = b;
}

// The gradients of bn_finalize's inputs, given those of scale and shift.
template <typename A>
__global__ __launch_bounds__(kChannelThreads) void bn_finalize_backward_kernel(
    const A* __restrict__ grad_scale, const A* __restrict__ grad_shift, const A* __restrict__ mean,
    const A* __restrict__ var, const A* __restrict__ weight, A eps, A* __restrict__ grad_mean,
    A* __restrict__ grad_var, A* __restrict__ grad_weight, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const A invstd = rsqrt_rn(var[c] + eps);
  const A w = weight ? weight[c] : A(1);
  const A gsh = grad_shift[c];
  // shift = bias - mean * scale, so scale also receives -mean * grad_shift.
  const A gs_total = grad_scale[c] - mul_rn(gsh, mean[c]);
  grad_mean[c] = mul_rn(mul_rn(-gsh, w), invstd);
  grad_var[c] = mul_rn(mul_rn(mul_rn(mul_rn(mul_rn(gs_total, w), A(-0.5)), invstd), invstd), invstd);
  grad_weight[c] = mul_rn(gs_total, invstd);
}

// running = running * (1 - momentum) + momentum' * batch (an fma, as ATen's
// add_ with alpha), momentum' = momentum for the mean, momentum * count /
// (count - 1) for the variance.
template <typename R>
__global__ __launch_bounds__(kChannelThreads) void bn_update_running_stats_kernel(
    R* __restrict__ running_mean, R* __restrict__ running_var, const R* __restrict__ mean,
    const R* __restrict__ var, acc_t<R> keep, acc_t<R> momentum_mean, acc_t<R> momentum_var, int64_t C) {
  using A = acc_t<R>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  // Rounded to R between the two steps, as mul_ then add_ do.
  const A rm = static_cast<A>(static_cast<R>(mul_rn(static_cast<A>(running_mean[c]), keep)));
  const A rv = static_cast<A>(static_cast<R>(mul_rn(static_cast<A>(running_var[c]), keep)));
  running_mean[c] = static_cast<R>(rm + momentum_mean * static_cast<A>(mean[c]));
  running_var[c] = static_cast<R>(rv + momentum_var * static_cast<A>(var[c]));
}

// ---- Host side --------------------------------------------------------------

unsigned channel_blocks(int64_t C) { return static_cast<unsigned>((C + kChannelThreads - 1) / kChannelThreads); }

// Per-channel vectors (checked by the op) of a float32/float64 computation: `t` as dtype `dt`,
// contiguous.
at::Tensor channel_input(const at::Tensor& t, at::ScalarType dt) { return t.to(dt).contiguous(); }

// float32 and float64 compute in their own dtype; float16 and bfloat16 in float32.
at::ScalarType compute_dtype(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> bn_finalize_cuda(const at::Tensor& mean, const at::Tensor& var,
                                                    const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& bias, double eps) {
  check_finalize_inputs(mean, var, weight, bias);
  if (!use_kernels(mean.device())) return aten_fallback::bn_finalize(mean, var, weight, bias, eps);
  const int64_t C = mean.size(0);
  const auto dt = mean.scalar_type();
  const auto ct = compute_dtype(dt);
  const at::Tensor mu = channel_input(mean, ct);
  const at::Tensor v = channel_input(var, ct);
  const at::Tensor w = weight ? channel_input(*weight, ct) : at::Tensor();
  const at::Tensor b = bias ? channel_input(*bias, ct) : at::Tensor();
  at::Tensor scale = at::empty({C}, mean.options().dtype(ct));
  at::Tensor shift = at::empty({C}, mean.options().dtype(ct));
  if (C > 0) {
    const c10::cuda::CUDAGuard guard(mean.device());
    AT_DISPATCH_FLOATING_TYPES(ct, "resfast::bn_finalize", [&] {
      bn_finalize_kernel<scalar_t><<<channel_blocks(C), kChannelThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          mu.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(w),
          ptr_or_null<scalar_t>(b), static_cast<scalar_t>(eps), scale.mutable_data_ptr<scalar_t>(),
          shift.mutable_data_ptr<scalar_t>(), C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {scale.to(dt), shift.to(dt)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize_backward_cuda(
    const at::Tensor& grad_scale, const at::Tensor& grad_shift, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, double eps) {
  check_finalize_backward_inputs(grad_scale, grad_shift, mean, var, weight);
  if (!use_kernels(mean.device())) {
    return aten_fallback::bn_finalize_backward(grad_scale, grad_shift, mean, var, weight, eps);
  }
  const int64_t C = mean.size(0);
  const auto dt = mean.scalar_type();
  const auto ct = compute_dtype(dt);
  const at::Tensor gs = channel_input(grad_scale, ct);
  const at::Tensor gsh = channel_input(grad_shift, ct);
  const at::Tensor mu = channel_input(mean, ct);
  const at::Tensor v = channel_input(var, ct);
  const at::Tensor w = weight ? channel_input(*weight, ct) : at::Tensor();
  at::Tensor grad_mean = at::empty({C}, mean.options().dtype(ct));
  at::Tensor grad_var = at::empty({C}, mean.options().dtype(ct));
  at::Tensor grad_weight = at::empty({C}, mean.options().dtype(ct));
  if (C > 0) {
    const c10::cuda::CUDAGuard guard(mean.device());
    AT_DISPATCH_FLOATING_TYPES(ct, "resfast::bn_finalize_backward", [&] {
      bn_finalize_backward_kernel<scalar_t>
          <<<channel_blocks(C), kChannelThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              gs.const_data_ptr<scalar_t>(), gsh.const_data_ptr<scalar_t>(), mu.const_data_ptr<scalar_t>(),
              v.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(w), static_cast<scalar_t>(eps),
              grad_mean.mutable_data_ptr<scalar_t>(), grad_var.mutable_data_ptr<scalar_t>(),
              grad_weight.mutable_data_ptr<scalar_t>(), C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // grad_bias is grad_shift itself, as in the CPU implementation.
  return {grad_mean.to(dt), grad_var.to(dt), grad_weight.to(dt), grad_shift.clone()};
}

void bn_update_running_stats_cuda(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                  const at::Tensor& var, int64_t count, double momentum) {
  check_running_stats_inputs(running_mean, running_var, mean, var, count);
  const int64_t C = running_mean.size(0);
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  const auto rt = running_mean.scalar_type();
  if (running_var.scalar_type() != rt || !running_mean.is_contiguous() || !running_var.is_contiguous() ||
      !use_kernels(running_mean.device())) {
    // Uncommon layouts, or no kernel image: tensor arithmetic
    aten_fallback::bn_update_running_stats_(running_mean, running_var, mean, var, count, momentum);
    return;
  }
  if (C == 0) return;
  const at::Tensor mu = mean.to(rt).contiguous();
  const at::Tensor v = var.to(rt).contiguous();
  const c10::cuda::CUDAGuard guard(running_mean.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rt, "resfast::bn_update_running_stats_", [&] {
    using A = acc_t<scalar_t>;
    bn_update_running_stats_kernel<scalar_t>
        <<<channel_blocks(C), kChannelThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            running_mean.mutable_data_ptr<scalar_t>(), running_var.mutable_data_ptr<scalar_t>(),
            mu.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), static_cast<A>(1.0 - momentum),
            static_cast<A>(momentum), static_cast<A>(momentum * unbias), C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CUDA, m) {
  m.impl("bn_finalize", &bn_finalize_cuda);
  m.impl("bn_finalize_backward", &bn_finalize_backward_cuda);
  m.impl("bn_update_running_stats_", &bn_update_running_stats_cuda);
}

}  // namespace resfast::cuda
