// Where the CPU's convolutions run Winograd's F(4x4, 3x3) (csrc/cpu/conv2d_winograd.cpp):
// the rule resfast.ops.winograd.applies states in Python, for the C++ training conv
// (csrc/cpu/conv2d_stats.cpp) and the C++ eval layer (csrc/cpu/conv2d_bn_eval.cpp). They must
// agree with it: the routes are compared bitwise.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace resfast::cpu {

constexpr int64_t kWinogradMinChannels = 16;
constexpr int64_t kWinogradMinSize = 8;
constexpr int64_t kWinogradMinTiles = 32;

// RESFAST_CPU_WINOGRAD=all: training convolutions run Winograd too (the default,
// "inference", and "off" leave them to oneDNN); a value other than off, inference and all
// is a ValueError.
bool winograd_in_training();

// Whether RESFAST_CPU_WINOGRAD lets inference's convolutions run Winograd: any value but off.
bool winograd_in_inference();

// The shape rule alone, in either layout: float32 a and weight, a 3x3 kernel, stride 1,
// padding 1, dilation 1, at least kWinogradMinChannels channels in and out, a map of at least
// kWinogradMinSize on each side and kWinogradMinTiles 4x4 output tiles in the batch.
bool winograd_fits(const at::Tensor& a, const at::Tensor& weight, int64_t stride,
                   int64_t padding, int64_t dilation);

// Whether a training convolution of GEMM input a by weight runs by Winograd, forward and
// input gradient: winograd_fits, a in channels_last, and winograd_in_training().
bool winograd_applies(const at::Tensor& a, const at::Tensor& weight, int64_t stride,
                      int64_t padding, int64_t dilation);

}  // namespace resfast::cpu
