// Whether this build's CUDA kernels run on a GPU (csrc/cuda/fallback.h): the archs the
// extension is built for (TORCH_CUDA_ARCH_LIST) may not include the GPU at hand, and
// without PTX that JIT-compiles for it every launch would fail with "no kernel image".
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "fallback.h"

namespace resfast::cuda {
namespace {

// Compiled for the same archs as every other kernel here: it runs where they run.
__global__ void probe_kernel() {}

bool forced_aten() {
  const char* value = std::getenv("RESFAST_CUDA_KERNELS");
  return value != nullptr && std::strcmp(value, "aten") == 0;
}

// Asking for the probe's attributes loads the module's image for the device, and fails
// when the build has none for it.
bool has_kernel_image(c10::DeviceIndex device) {
  const c10::cuda::CUDAGuard guard(device);
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, probe_kernel);
  if (err == cudaSuccess) return true;
  if (err != cudaErrorNoKernelImageForDevice && err != cudaErrorInvalidDeviceFunction) {
    C10_CUDA_CHECK(err);
  }
  (void)cudaGetLastError();  // not a sticky error: clear it, no later check is about it
  return false;
}

}  // namespace

bool use_kernels(const at::Device& device) {
  if (forced_aten()) return false;
  // Per device: 0 not yet asked, 1 the kernels run, -1 they do not.
  static std::array<std::atomic<int>, 64> known{};
  const c10::DeviceIndex index = device.index();
  if (index < 0 || static_cast<size_t>(index) >= known.size()) return has_kernel_image(index);
  int state = known[index].load(std::memory_order_relaxed);
  if (state == 0) {
    state = has_kernel_image(index) ? 1 : -1;
    known[index].store(state, std::memory_order_relaxed);
    if (state < 0) {
      const cudaDeviceProp* prop = at::cuda::getDeviceProperties(index);
      TORCH_WARN_ONCE("resfast: its CUDA kernels have no image for ", prop->name, " (sm_",
                      prop->major, prop->minor,
                      "): the BatchNorm ops run as ATen compositions instead (slower). "
                      "Rebuild with TORCH_CUDA_ARCH_LIST=\"", prop->major, ".", prop->minor,
                      "\" (`python -m resfast info` lists the archs built).");
    }
  }
  return state > 0;
}

}  // namespace resfast::cuda
