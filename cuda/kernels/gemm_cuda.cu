// Low-bit GEMM on the canonical layout: a simple, correct reference kernel for the GPU (a
// tensor-core kernel with its own layout comes later). The packed weight is decoded in registers
// (DeviceQuant::weight: extract the code from its row's words, (q - z) * s in fp32); the dense
// weight is never written to memory. All accumulation is in fp32.
//
// Forward, Y[M, N] = X[M, K] · Wᵀ (+ bias): one warp per output column n (= weight row n).
//   Lane l takes k = l, l+32, l+64, ... (K % 32 == 0, so every lane runs the same number of
//   steps): it decodes W[n, k] once and multiplies it into up to kTileM activation rows, whose
//   loads x[m, k] coalesce across the warp. The 32 partial sums of each row are then added by a
//   butterfly shuffle; lane 0 adds the bias and stores y[m, n]. Blocks hold kWarps warps (kWarps
//   consecutive n); blockIdx.y strides over tiles of kTileM rows of X.
//
// Transposed, Y[M, K] = G[M, N] · W: one block per 32-column slice k0 = 32*blockIdx.x. Lane l owns
//   column k = k0 + l; warp w walks n = w, w + kWarps, ... decoding W[n, k] and multiplying it into
//   up to kTileM gradient rows (g[m, n] is one broadcast load per warp). The kWarps partial sums
//   per output are added in shared memory in a fixed order (deterministic), then stored.
//
// Both kernels also read Layout::kCudaMma (the tensor-core kernel's layout, gemm_cuda_mma.cu): they
// are its fallback for fp32 activations and unaligned rows, and its transposed product.
#include "device_common.cuh"
#include "layerpress/cuda_kernels.h"
#include "layerpress/cuda_mma_layout.h"

namespace layerpress {
namespace {

using device::DeviceQuant;
using device::from_float;
using device::kWarpSize;
using device::to_float;

constexpr int kWarps = 4;         // warps per block
constexpr int kTileM = 8;         // activation rows sharing one decoded weight
constexpr int kMaxGridY = 65535;  // gridDim.y limit; the row-tile loops cover larger M

struct GemmArgsDevice {  // GemmArgs resolved for the kernels
  DeviceQuant p;
  const uint32_t* qweight;
  const void* scales;
  const uint8_t* zeros;
  int64_t M;
  int64_t ldx;
  bool mma_layout;  // Layout::kCudaMma instead of kCanonical

  // The dequantised weight at (n, k), (q - z) * s in fp32 in either layout.
  __device__ __forceinline__ float weight(int64_t n, int64_t k) const {
    if (!mma_layout) return p.weight(qweight, scales, zeros, n, k);
    namespace ml = mma_layout;
    const int nn = static_cast<int>(n % ml::kTileN), kk = static_cast<int>(k % ml::kTileK);
    const uint32_t* tile = qweight + ((n / ml::kTileN) * (p.K / ml::kTileK) + k / ml::kTileK) * ml::words_per_tile(p.bits);
    const int32_t code = static_cast<int32_t>(ml::tile_code(tile, p.bits, ml::lane_of(kk, nn), ml::code_of(kk, nn)));
    const int64_t sz = ml::scale_target(p.per_oc, p.N, p.K, p.group, p.scale_index(n, k));
    const int32_t zero = p.symmetric ? p.sym_zero() : static_cast<int32_t>(zeros[sz]);
    return __fmul_rn(static_cast<float>(code - zero), device::load_as_float(scales, sz, p.scale_type));
  }
};

template <typename T>
__global__ void __launch_bounds__(kWarps * kWarpSize)
    gemm_kernel(GemmArgsDevice a, const T* __restrict__ x, const T* __restrict__ bias,
                T* __restrict__ y) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (n >= a.p.N) return;  // uniform across the warp; this kernel has no block-level barrier
  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM; m0 < a.M;
       m0 += static_cast<int64_t>(gridDim.y) * kTileM) {
    const int64_t rows = a.M - m0 < kTileM ? a.M - m0 : kTileM;
    const T* xt = x + m0 * a.ldx;
    float acc[kTileM];
#pragma unroll
    for (int i = 0; i < kTileM; ++i) acc[i] = 0.0f;
    for (int64_t k = lane; k < a.p.K; k += kWarpSize) {
      const float w = a.weight(n, k);
#pragma unroll
      for (int i = 0; i < kTileM; ++i)
        if (i < rows) acc[i] += to_float(xt[i * a.ldx + k]) * w;
    }
#pragma unroll
    for (int i = 0; i < kTileM; ++i) {
      float v = acc[i];
#pragma unroll
      for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0 && i < rows) {
        if (bias != nullptr) v += to_float(bias[n]);
        y[(m0 + i) * a.p.N + n] = from_float<T>(v);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarps * kWarpSize)
    gemm_t_kernel(GemmArgsDevice a, const T* __restrict__ g, T* __restrict__ y) {
  __shared__ float partial[kWarps][kTileM][kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kWarpSize + lane;  // < K: grid is K/32
  // The loop bounds depend on blockIdx only, so every thread reaches every __syncthreads().
  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM; m0 < a.M;
       m0 += static_cast<int64_t>(gridDim.y) * kTileM) {
    const int64_t rows = a.M - m0 < kTileM ? a.M - m0 : kTileM;
    const T* gt = g + m0 * a.ldx;
    float acc[kTileM];
#pragma unroll
    for (int i = 0; i < kTileM; ++i) acc[i] = 0.0f;
    for (int64_t n = warp; n < a.p.N; n += kWarps) {
      const float w = a.weight(n, k);
#pragma unroll
      for (int i = 0; i < kTileM; ++i)
        if (i < rows) acc[i] += to_float(gt[i * a.ldx + n]) * w;
    }
#pragma unroll
    for (int i = 0; i < kTileM; ++i) partial[warp][i][lane] = acc[i];
    __syncthreads();
    if (warp == 0) {
      for (int i = 0; i < rows; ++i) {
        float v = partial[0][i][lane];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) v += partial[w][i][lane];
        y[(m0 + i) * a.p.K + k] = from_float<T>(v);
      }
    }
    __syncthreads();  // `partial` is reused by the next row tile
  }
}

GemmArgsDevice device_args(const GemmArgs& a, Layout layout) {
  GemmArgsDevice d;
  d.mma_layout = layout == Layout::kCudaMma;
  d.p = DeviceQuant::from(a.p);
  d.qweight = reinterpret_cast<const uint32_t*>(a.qweight);
  d.scales = a.scales;
  d.zeros = a.zeros;
  d.M = a.M;
  d.ldx = a.ldx;
  return d;
}

unsigned row_tiles(int64_t M) {
  const int64_t tiles = (M + kTileM - 1) / kTileM;
  return static_cast<unsigned>(tiles < kMaxGridY ? tiles : kMaxGridY);
}

template <typename T>
void launch_gemm(const GemmArgs& a, Layout layout, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.p.N + kWarps - 1) / kWarps), row_tiles(a.M));
  LP_LAUNCH(grid, kWarps * kWarpSize, 0, stream, gemm_kernel<T>)(
      device_args(a, layout), static_cast<const T*>(a.x), static_cast<const T*>(a.bias),
      static_cast<T*>(a.y));
}

template <typename T>
void launch_gemm_t(const GemmArgs& a, Layout layout, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.p.K / kWarpSize), row_tiles(a.M));
  LP_LAUNCH(grid, kWarps * kWarpSize, 0, stream, gemm_t_kernel<T>)(
      device_args(a, layout), static_cast<const T*>(a.x), static_cast<T*>(a.y));
}

}  // namespace

cudaError_t gemm_simple_cuda(const GemmArgs& a, Layout layout, cudaStream_t stream) {
  if (a.M <= 0 || a.p.N <= 0 || a.p.K <= 0) return cudaSuccess;
  switch (a.act_type) {
    case FloatType::kF32: launch_gemm<float>(a, layout, stream); break;
    case FloatType::kBF16: launch_gemm<__nv_bfloat16>(a, layout, stream); break;
    case FloatType::kF16: launch_gemm<__half>(a, layout, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t gemm_t_simple_cuda(const GemmArgs& a, Layout layout, cudaStream_t stream) {
  if (a.M <= 0 || a.p.N <= 0 || a.p.K <= 0) return cudaSuccess;
  switch (a.act_type) {
    case FloatType::kF32: launch_gemm_t<float>(a, layout, stream); break;
    case FloatType::kBF16: launch_gemm_t<__nv_bfloat16>(a, layout, stream); break;
    case FloatType::kF16: launch_gemm_t<__half>(a, layout, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t gemm_canonical_cuda(const GemmArgs& a, cudaStream_t stream) {
  return gemm_simple_cuda(a, Layout::kCanonical, stream);
}
cudaError_t gemm_t_canonical_cuda(const GemmArgs& a, cudaStream_t stream) {
  return gemm_t_simple_cuda(a, Layout::kCanonical, stream);
}

}  // namespace layerpress
