// Chooses the instruction set of the CPU loops (BatchNorm, layout, Winograd, weight
// gradient): the one ATen uses for its own CPU kernels on this machine, among those this
// build contains.
#include <ATen/Version.h>

#include <string>

#include "bn_kernels.h"

namespace resfast::cpu {

RESFAST_DECLARE_CPU_KERNELS(DEFAULT)
#ifdef RESFAST_CPU_AVX2
RESFAST_DECLARE_CPU_KERNELS(AVX2)
#endif
#ifdef RESFAST_CPU_AVX512
RESFAST_DECLARE_CPU_KERNELS(AVX512)
#endif

// weight_grad: the loop where it is built (AVX2: weight_grad_kernel.cpp), else null.
#define RESFAST_KERNEL_TABLE(ISA, WEIGHT_GRAD) \
  Kernels { #ISA, &ISA::bn_stats, &ISA::bn_stats_backward, &ISA::bn_act, &ISA::bn_act_backward, \
        &ISA::transpose_images, &ISA::winograd_input, &ISA::winograd_output, WEIGHT_GRAD }

const Kernels& kernels() {
  static const Kernels chosen = [] {
    // "AVX512", "AVX2", "DEFAULT", ... as torch.backends.cpu.get_cpu_capability().
    const std::string capability = at::get_cpu_capability();
#ifdef RESFAST_CPU_AVX512
    if (capability == "AVX512") return RESFAST_KERNEL_TABLE(AVX512, nullptr);
#endif
#ifdef RESFAST_CPU_AVX2
    if (capability == "AVX512" || capability == "AVX2") {
      return RESFAST_KERNEL_TABLE(AVX2, &AVX2::weight_grad);
    }
#endif
    return RESFAST_KERNEL_TABLE(DEFAULT, nullptr);
  }();
  return chosen;
}

}  // namespace resfast::cpu
