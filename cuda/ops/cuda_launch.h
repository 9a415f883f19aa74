// What every CUDA launcher needs beyond launch_utils.h, on the stable ABI: the current stream of
// a device, a device guard, and launch-status checks. Nothing here includes a CUDA build of
// torch, so the CUDA op library builds against any torch (a CPU-only one included).
#pragma once
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <torch/csrc/stable/accelerator.h>

#include "launch_utils.h"

namespace layerpress {

// torch's current CUDA stream for a device. The AOTI C shim function lives in libtorch_cuda,
// which this library does not link (it would then need a CUDA torch to build): it is looked up
// once in the copy torch has already loaded.
inline cudaStream_t current_stream(const Tensor& t) {
  using GetStream = int32_t (*)(int32_t, void**);
  static const GetStream get_stream = []() -> GetStream {
    void* lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
    return lib ? reinterpret_cast<GetStream>(dlsym(lib, "aoti_torch_get_current_cuda_stream")) : nullptr;
  }();
  if (get_stream == nullptr)
    throw std::runtime_error("layerpress CUDA ops need a CUDA build of torch (libtorch_cuda.so is not loaded)");
  void* stream = nullptr;
  if (get_stream(static_cast<int32_t>(t.get_device_index()), &stream) != AOTI_TORCH_SUCCESS)
    throw std::runtime_error("layerpress: could not get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

// Makes `t`'s device current for the launcher's scope (and its allocations).
struct CudaDeviceGuard {
  explicit CudaDeviceGuard(const Tensor& t) : guard(t.get_device_index()) {}
  torch::stable::accelerator::DeviceGuard guard;
};

// The kernels report the launch status of the CUDA runtime they were linked with.
inline void check_launch(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(str_cat("layerpress: CUDA error in ", what, ": ", cudaGetErrorString(err)));
}

}  // namespace layerpress
