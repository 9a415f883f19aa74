// CUDA randomised Walsh–Hadamard transform (see cuda/include/layerpress/hadamard_cuda.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "device_common.cuh"
#include "layerpress/hadamard_cuda.h"

namespace layerpress {
namespace {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Element <-> accumulation type: device_common.cuh's conversions, plus fp64 as itself.
template <typename T> __device__ __forceinline__ typename AccOf<T>::type widen(T v) { return device::to_float(v); }
template <> __device__ __forceinline__ double widen<double>(double v) { return v; }
template <typename T> __device__ __forceinline__ T narrow(typename AccOf<T>::type v) { return device::from_float<T>(v); }
template <> __device__ __forceinline__ double narrow<double>(double v) { return v; }

// Thread g of the launch holds elements [E·c, E·c + E) of row g / (cols/E), c = g % (cols/E).
// `lanes` = block / E threads share one block; when lanes <= 32 they sit in one warp (lanes
// divides 32 and the groups are aligned), else one CUDA block of `lanes` threads holds the block
// and the stages with a partner in another warp go through shared memory.
template <typename T, int E>
__global__ void hadamard_kernel(HadamardArgs a, int64_t lanes) {
  using A = typename AccOf<T>::type;
  const int64_t per_row = a.cols / E;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = g < a.rows * per_row;  // invalid lanes still take part in the shuffles
  const int64_t row = valid ? g / per_row : 0, c0 = valid ? (g % per_row) * E : 0;
  const T* x = static_cast<const T*>(a.x) + row * a.x_stride + c0;
  const float* s = a.signs ? a.signs + c0 : nullptr;
  const A scale = A(1) / sqrt(static_cast<A>(a.block));
  A v[E];
#pragma unroll
  for (int i = 0; i < E; ++i) {
    A t = valid ? widen<T>(x[i]) * scale : A(0);
    if (s && !a.transpose && valid) t *= static_cast<A>(s[i]);
    v[i] = t;
  }
#pragma unroll
  for (int h = 1; h < E; h *= 2)
#pragma unroll
    for (int i = 0; i < E; ++i)
      if (!(i & h)) {
        const A p = v[i], q = v[i + h];
        v[i] = p + q;
        v[i + h] = p - q;
      }
  const int lane = threadIdx.x & 31;
  const int warp_lanes = lanes < 32 ? static_cast<int>(lanes) : 32;
  for (int o = 1; o < warp_lanes; o *= 2) {
    const bool upper = lane & o;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const A p = __shfl_xor_sync(0xffffffffu, v[i], o);
      v[i] = upper ? p - v[i] : v[i] + p;
    }
  }
  if (lanes > 32) {  // one block per CUDA block: threadIdx.x is the thread's index in the block
    LP_DYNAMIC_SMEM(A, buf);
    const int t = threadIdx.x;
    for (int o = 32; o < lanes; o *= 2) {
#pragma unroll
      for (int i = 0; i < E; ++i) buf[t * E + i] = v[i];
      __syncthreads();
      const bool upper = t & o;
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const A p = buf[(t ^ o) * E + i];
        v[i] = upper ? p - v[i] : v[i] + p;
      }
      __syncthreads();
    }
  }
  if (!valid) return;
  T* y = static_cast<T*>(a.y) + row * a.y_stride + c0;
#pragma unroll
  for (int i = 0; i < E; ++i) {
    A t = v[i];
    if (s && a.transpose) t *= static_cast<A>(s[i]);
    y[i] = narrow<T>(t);
  }
}

template <typename T, int E>
cudaError_t launch_e(const HadamardArgs& a, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int64_t lanes = a.block / E;
  const int64_t threads = a.rows * (a.cols / E);
  if (lanes <= 32) {
    const int64_t bs = 256;
    LP_LAUNCH(dim3(static_cast<unsigned>((threads + bs - 1) / bs)), dim3(bs), 0, stream,
              hadamard_kernel<T, E>)(a, lanes);
  } else {
    const size_t smem = static_cast<size_t>(a.block) * sizeof(A);
    if (smem > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(hadamard_kernel<T, E>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    LP_LAUNCH(dim3(static_cast<unsigned>(threads / lanes)), dim3(static_cast<unsigned>(lanes)), smem, stream,
              hadamard_kernel<T, E>)(a, lanes);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_t(const HadamardArgs& a, cudaStream_t stream) {
  const int64_t e = a.block <= 32 ? 1 : (a.block <= 1024 * 8 ? (a.block < 256 ? a.block / 32 : 8) : a.block / 1024);
  switch (e) {
    case 1: return launch_e<T, 1>(a, stream);
    case 2: return launch_e<T, 2>(a, stream);
    case 4: return launch_e<T, 4>(a, stream);
    case 8: return launch_e<T, 8>(a, stream);
    case 16: return launch_e<T, 16>(a, stream);
    default: return launch_e<T, 32>(a, stream);
  }
}

}  // namespace

cudaError_t hadamard_cuda(const HadamardArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  if (a.block > kHadamardCudaMaxBlock) return cudaErrorInvalidValue;
  switch (a.type) {
    case NormType::kF32: return launch_t<float>(a, stream);
    case NormType::kF64: return launch_t<double>(a, stream);
    case NormType::kBF16: return launch_t<__nv_bfloat16>(a, stream);
    case NormType::kF16: return launch_t<__half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace layerpress
