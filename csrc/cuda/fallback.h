// When the CUDA kernels cannot run, the BatchNorm ops still do: as compositions of
// ATen ops (csrc/cuda/aten_fallback.cpp) with the kernels' semantics (dtypes, layouts,
// output masks, torch's ReLU rules), slower but device-agnostic. That happens on a GPU
// this build has no kernel image for (an arch outside TORCH_CUDA_ARCH_LIST and no PTX
// that JIT-compiles for it), with one warning, and when RESFAST_CUDA_KERNELS=aten asks
// for it (to compare the two on a GPU, or to rule the kernels out).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace resfast::cuda {

// Whether the ops on `device` run this build's kernels (see above).
bool use_kernels(const at::Device& device);

}  // namespace resfast::cuda

namespace resfast::aten_fallback {

std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& y);
at::Tensor bn_stats_backward(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                             const at::Tensor& y, const at::Tensor& mean);
std::tuple<at::Tensor, at::Tensor> bn_finalize(const at::Tensor& mean, const at::Tensor& var,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& bias, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize_backward(
    const at::Tensor& grad_scale, const at::Tensor& grad_shift, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& weight, double eps);
void bn_update_running_stats_(at::Tensor& running_mean, at::Tensor& running_var,
                              const at::Tensor& mean, const at::Tensor& var, int64_t count,
                              double momentum);
at::Tensor bn_act(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& shift,
                  const std::optional<at::Tensor>& residual, bool relu,
                  const std::optional<at::Tensor>& centre);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward(
    const at::Tensor& grad_out, const at::Tensor& y, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual, bool relu,
    std::array<bool, 4> output_mask, const std::optional<at::Tensor>& centre);

}  // namespace resfast::aten_fallback
