// Schemas of resfast's BatchNorm ops, defined once for every backend.
//
// Conventions shared by all ops:
//  * activations are 4-D (N, C, H, W) in either memory format; outputs keep the
//    memory format of `y`;
//  * per-channel vectors (mean, var, scale, shift, their gradients) are float32,
//    or float64 when the activation is float64;
//  * `var` is the biased (population) batch variance.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "cpu/bn_kernels.h"

#ifndef RESFAST_CUDA_ARCHS
#define RESFAST_CUDA_ARCHS ""
#endif

#ifdef RESFAST_PYTHON_MODULE
#include <Python.h>
extern "C" {
// resfast._C is imported for its side effect of registering the ops below.
// (The CMake build makes a plain library for torch.ops.load_library instead.)
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(resfast, m) {
  // Per-channel batch mean and biased variance of y.
  m.def("bn_stats(Tensor y) -> (Tensor mean, Tensor var)");
  // grad_y = (grad_mean + 2 (y - mean) grad_var) / count, count = N*H*W.
  m.def("bn_stats_backward(Tensor grad_mean, Tensor grad_var, Tensor y, Tensor mean) -> Tensor");
  // scale = weight / sqrt(var + eps), shift = bias - mean * scale (weight, bias default 1, 0).
  m.def("bn_finalize(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) -> (Tensor scale, Tensor shift)");
  m.def(
      "bn_finalize_backward(Tensor grad_scale, Tensor grad_shift, Tensor mean, Tensor var, Tensor? weight, float eps)"
      " -> (Tensor grad_mean, Tensor grad_var, Tensor grad_weight, Tensor grad_bias)");
  // running = (1 - momentum) running + momentum batch, with the unbiased variance
  // var * count / (count - 1), as nn.BatchNorm2d does.
  m.def(
      "bn_update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var,"
      " int count, float momentum) -> ()");
  // out = [relu]((y - centre) * scale + shift [+ residual]); scale/shift are absent together,
  // centre (default 0) only comes with them. BatchNorm passes its mean as the centre, so that
  // grad_scale = sum(g * (y - mean)) is reduced without cancelling digits (it would be
  // sum(g * y) - mean * sum(g) otherwise: all digits lost when |mean| >> std).
  m.def(
      "bn_act(Tensor y, Tensor? scale, Tensor? shift, Tensor? residual, bool relu,"
      " Tensor? centre=None) -> Tensor");
  // The ReLU mask is recomputed from the inputs. output_mask selects
  // (grad_y, grad_scale, grad_shift, grad_residual); unselected outputs are empty.
  // grad_scale = sum(g * (y - centre)), grad_shift = sum(g); the centre's own gradient,
  // -scale * grad_shift, is left to the caller.
  m.def(
      "bn_act_backward(Tensor grad_out, Tensor y, Tensor? scale, Tensor? shift, Tensor? residual, bool relu,"
      " bool[4] output_mask, Tensor? centre=None)"
      " -> (Tensor grad_y, Tensor grad_scale, Tensor grad_shift, Tensor grad_residual)");
  // A training BatchNorm on batch statistics in one op: bn_finalize with a zero mean, then
  // bn_act with the mean as centre, i.e. out = [relu]((y - mean) * weight / sqrt(var + eps)
  // + bias [+ residual]) (weight, bias default 1, 0), rounded as that chain rounds it.
  m.def(
      "bn_batch_act(Tensor y, Tensor mean, Tensor var, Tensor? weight, Tensor? bias,"
      " Tensor? residual, bool relu, float eps) -> Tensor");
  // The backward of bn_batch_act where (mean, var) = bn_stats(y): grad_y includes the path
  // through mean and var (as batch_norm(training=True)'s backward does), so mean and var
  // get no gradient of their own. Two passes over the activations: the ReLU-masked
  // gradient's per-channel sums, then grad_y. output_mask selects (grad_y, grad_weight,
  // grad_bias, grad_residual); unselected outputs are empty, and so are grad_weight
  // without a weight and grad_bias without a bias. The one write to an input: on the CPU, a
  // grad_out that nothing but this call holds (one handle, no view: as the C++ autograd
  // node hands it over) is overwritten with grad_residual or grad_y, which is then returned
  // in its place; no caller can see the difference.
  m.def(
      "bn_batch_act_backward(Tensor grad_out, Tensor y, Tensor mean, Tensor var, Tensor? weight,"
      " Tensor? bias, Tensor? residual, bool relu, float eps, bool[4] output_mask)"
      " -> (Tensor grad_y, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  // The CPU training layer: y = conv2d(x, weight) [+ bias] (oneDNN; channels_last) and y's
  // per-channel batch mean and biased variance, as conv2d_bn(x, weight, bias, stats=True)
  // without prologue or epilogue computes them, with its autograd formula in C++
  // (cpu/conv2d_stats.cpp). CPU only, float32 or bfloat16 weights.
  m.def(
      "conv2d_stats(Tensor x, Tensor weight, Tensor? bias, int stride, int padding, int dilation)"
      " -> (Tensor y, Tensor mean, Tensor var)");
  // output_mask selects (grad_x, grad_weight, grad_bias); unselected outputs are empty.
  m.def(
      "conv2d_stats_backward(Tensor? grad_y, Tensor? grad_mean, Tensor? grad_var, Tensor x,"
      " Tensor weight, Tensor y, Tensor mean, int stride, int padding, int dilation,"
      " bool[3] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // The gradient of conv2d(x, weight, stride, padding, dilation)'s weight given grad_y, the
  // gradient of its output, in the weight's dtype and strides: oneDNN's, one GEMM over x's
  // windows where the weight is large for the output positions, or a direct loop at few
  // channels (where each measured faster: cpu/conv2d_weight_grad.cpp). CPU only; grad_y, x
  // and weight share one dtype.
  m.def(
      "conv2d_weight_grad(Tensor grad_y, Tensor x, Tensor weight, int stride, int padding,"
      " int dilation) -> Tensor");
  // Which of those conv2d_weight_grad takes for these arguments: "gemm", "direct",
  // "onednn", or "zeros" for an empty input (for tests and benchmarks).
  m.def(
      "conv2d_weight_grad_path(Tensor grad_y, Tensor x, Tensor weight, int stride, int padding,"
      " int dilation) -> str");
  // A CPU training layer's forward, as resfast.functional.conv_bn_pending makes it, in one
  // call (cpu/conv2d_bn_train.cpp): a = bn_batch_act(x, in_mean, in_var, in_weight, in_bias,
  // relu=in_relu, eps=in_eps) where in_mean and in_var are given (x's own batch statistics),
  // else x; (y, mean, var) = conv2d_stats(a, weight, bias, ...); then, where running_mean and
  // running_var are given, num_batches_tracked += 1 and the update of bn_update_running_stats_
  // with momentum (1 / num_batches_tracked for None), as nn.BatchNorm2d does in training.
  m.def(
      "conv2d_bn_train(Tensor x, Tensor? in_mean, Tensor? in_var, Tensor? in_weight,"
      " Tensor? in_bias, bool in_relu, float in_eps, Tensor weight, Tensor? bias, int stride,"
      " int padding, int dilation, Tensor(a!)? running_mean, Tensor(b!)? running_var,"
      " Tensor(c!)? num_batches_tracked, float? momentum) -> (Tensor y, Tensor mean, Tensor var)");
  // A CPU eval-mode layer's forward in one call (cpu/conv2d_bn_eval.cpp):
  // [relu](bn(conv2d(x, weight) [+ bias]) [+ residual]) with BN on its running statistics,
  // as conv2d_bn(x, weight, bias, ..., stats=False, out_relu=relu, out_scale, out_shift,
  // out_centre=running_mean, residual) computes it on the CPU (the same calls, so the same
  // bits), its folded weights cached per weight version. Inference only (no derivative);
  // CPU only, float32 or bfloat16 weights, the residual in the weight's dtype.
  // conv2d_bn_eval_cache(clear) gives its cache's {hits, misses, entries held} (dropping
  // every entry first where clear).
  m.def(
      "conv2d_bn_eval(Tensor x, Tensor weight, Tensor? bias, Tensor running_mean,"
      " Tensor running_var, Tensor? bn_weight, Tensor? bn_bias, float eps, Tensor? residual,"
      " bool relu, int stride, int padding, int dilation) -> Tensor");
  // [relu](conv(x, w) * scale + shift [+ residual]) for a 3x3 convolution with stride 1,
  // padding 1 over a float32 x (CPU), by Winograd's F(4x4, 3x3): weight is w transformed,
  // (36, C_in, C_out) = G w G^T position by position (winograd_weight below);
  // scale and shift are per output channel (default 1 and 0). y is channels_last.
  m.def(
      "conv2d_winograd(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, Tensor? residual,"
      " bool relu) -> Tensor");
  // The weight as conv2d_winograd takes it: G w G^T for each of the 36 positions of a 6x6
  // tile, (36, C_in, C_out), computed in float64 and rounded once; transposed=True gives the
  // (36, C_out, C_in) weight of the convolution that computes the input's gradient (the
  // kernel rotated by 180 degrees, its channels swapped).
  m.def("winograd_weight(Tensor weight, bool transposed) -> Tensor");
  // x copied into channels_last (channels_last=True) or NCHW memory: a new tensor
  // always. On the CPU an activation dense in the other layout is copied by tiles,
  // several times faster than ATen's copy_ between the two.
  m.def("relayout(Tensor x, bool channels_last) -> Tensor");
  // What this build contains: "cuda_archs=<list>" (empty without CUDA).
  m.def("build_info() -> str", [] { return std::string("cuda_archs=") + RESFAST_CUDA_ARCHS; });
  // The instruction set of the CPU kernels in use: "AVX512", "AVX2" or "DEFAULT".
  m.def("cpu_isa() -> str", [] { return std::string(resfast::cpu::kernels().isa); });
}

// The *_backward ops, conv2d_weight_grad, conv2d_winograd, winograd_weight and conv2d_bn_eval
// have no derivative of their own.
// Without an Autograd kernel the dispatcher only warns and returns outputs that do not
// require grad, so a double backward through them would silently give zero gradients; this
// fallback makes it raise instead (and costs only a requires_grad check when no input needs
// a gradient).
TORCH_LIBRARY_IMPL(resfast, Autograd, m) {
  for (const char* op :
       {"bn_stats_backward", "bn_finalize_backward", "bn_act_backward", "bn_batch_act_backward",
        "conv2d_stats_backward", "conv2d_weight_grad", "conv2d_winograd", "winograd_weight",
        "conv2d_bn_eval"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
