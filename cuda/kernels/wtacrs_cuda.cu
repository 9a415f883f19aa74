// WTA-CRS CUDA kernels: row norms (one warp per row), the seeded selection draw (one thread per
// slot, binary search in the prefix sums), gather-and-scale (grid-stride over the k·D outputs) and
// the sampled weight-gradient GEMM.
//
// wgrad, dW[N, D] = Σ_i s_i G[idx_i, :]ᵀ R[i, :]: a classic 64 × 64 output tile per block of 256
// threads, each thread owning a 4 × 4 sub-tile in registers. The reduction dimension is the k
// sampled rows, walked in steps of kBK = 16: the block loads Gs[16][64] = s_i · G[idx_i, n0 : n0+64]
// (the gather and the scale happen in this load: no compact copy of G is ever written) and
// Rs[16][64] = R[i, d0 : d0+64] into shared memory, converting to fp32, then accumulates. The sum
// over i runs in a fixed order, so results are deterministic.
#include "device_common.cuh"
#include "layerpress/wtacrs_common.h"
#include "layerpress/wtacrs_cuda.h"

namespace layerpress {
namespace {

using device::from_float;
using device::grid_for;
using device::kWarpSize;
using device::to_float;

template <typename T>
__global__ void row_norms_kernel(const T* __restrict__ x, int64_t M, int64_t D, int64_t ld,
                                 float* __restrict__ out) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
       m < M; m += warps) {
    const T* row = x + m * ld;
    float acc = 0.f;
    for (int64_t d = lane; d < D; d += kWarpSize) {
      const float v = to_float(row[d]);
      acc += v * v;
    }
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) out[m] = sqrtf(acc);
  }
}

__global__ void select_kernel(const double* __restrict__ sorted, const double* __restrict__ cum,
                              const int64_t* __restrict__ order, int64_t M, int64_t k,
                              const int64_t* __restrict__ c_ptr, uint64_t seed, int64_t* __restrict__ idx,
                              float* __restrict__ scale) {
  const int64_t c = *c_ptr, s = k - c;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < k;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (j < c) {
      idx[j] = order[j];
      scale[j] = 1.0f;
    } else {
      int64_t pos;
      wtacrs_draw(sorted, cum, M, c, s, wtacrs_uniform(seed, j - c), &pos, &scale[j]);
      idx[j] = order[pos];
    }
  }
}

template <typename T>
__global__ void gather_scale_kernel(const T* __restrict__ x, int64_t D, int64_t ld,
                                    const int64_t* __restrict__ idx, const float* __restrict__ scale,
                                    int64_t k, T* __restrict__ out) {
  const int64_t total = k * D;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / D, d = e - i * D;
    const T v = x[idx[i] * ld + d];
    out[e] = scale == nullptr ? v : from_float<T>(scale[i] * to_float(v));
  }
}

constexpr int kBN = 64, kBD = 64, kBK = 16, kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    wgrad_kernel(const T* __restrict__ g, int64_t ldg, int64_t N, const T* __restrict__ rows,
                 int64_t D, const int64_t* __restrict__ idx, const float* __restrict__ scale,
                 int64_t k, T* __restrict__ dw) {
  __shared__ float gs[kBK][kBN];
  __shared__ float rs[kBK][kBD];
  const int tid = threadIdx.x;
  const int tn = tid / 16, td = tid % 16;  // this thread's 4 x 4 sub-tile: rows 4tn.., cols 4td..
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN, d0 = static_cast<int64_t>(blockIdx.x) * kBD;
  float acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
  for (int64_t i0 = 0; i0 < k; i0 += kBK) {
    // 16 x 64 = 1024 elements per tile, 4 per thread; consecutive threads read consecutive columns.
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int e = tid + r * kThreads;
      const int ii = e / kBN, cc = e % kBN;
      const int64_t i = i0 + ii;
      float gv = 0.f, rv = 0.f;
      if (i < k) {
        const int64_t n = n0 + cc, d = d0 + cc;
        if (n < N) gv = (scale ? scale[i] : 1.0f) * to_float(g[idx[i] * ldg + n]);
        if (d < D) rv = to_float(rows[i * D + d]);
      }
      gs[ii][cc] = gv;
      rs[ii][cc] = rv;
    }
    __syncthreads();
#pragma unroll
    for (int ii = 0; ii < kBK; ++ii) {
      float a[4], b[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        a[q] = gs[ii][4 * tn + q];
        b[q] = rs[ii][4 * td + q];
      }
#pragma unroll
      for (int x = 0; x < 4; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y) acc[x][y] += a[x] * b[y];
    }
    __syncthreads();
  }
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    const int64_t n = n0 + 4 * tn + x;
    if (n >= N) continue;
#pragma unroll
    for (int y = 0; y < 4; ++y) {
      const int64_t d = d0 + 4 * td + y;
      if (d < D) dw[n * D + d] = from_float<T>(acc[x][y]);
    }
  }
}

template <typename Fn>
cudaError_t dispatch(FloatType t, Fn&& fn) {
  switch (t) {
    case FloatType::kF32: fn(float{}); break;
    case FloatType::kBF16: fn(__nv_bfloat16{}); break;
    default: fn(__half{}); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t wtacrs_row_norms_cuda(const void* x, FloatType t, int64_t M, int64_t D, int64_t ld,
                                  float* out, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  constexpr int threads = 256;
  const unsigned blocks = grid_for(M, threads / kWarpSize);
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    LP_LAUNCH(blocks, threads, 0, stream, row_norms_kernel<T>)(static_cast<const T*>(x), M, D, ld, out);
  });
}

cudaError_t wtacrs_select_cuda(const double* sorted, const double* cum, const int64_t* order,
                               int64_t M, int64_t k, const int64_t* c_ptr, uint64_t seed,
                               int64_t* idx, float* scale, cudaStream_t stream) {
  if (k == 0) return cudaSuccess;
  constexpr int threads = 256;
  LP_LAUNCH(grid_for(k, threads), threads, 0, stream, select_kernel)(sorted, cum, order, M, k, c_ptr, seed,
                                                              idx, scale);
  return cudaGetLastError();
}

cudaError_t wtacrs_gather_scale_cuda(const void* x, FloatType t, int64_t D, int64_t ld,
                                     const int64_t* idx, const float* scale, int64_t k, void* out,
                                     cudaStream_t stream) {
  if (k * D == 0) return cudaSuccess;
  constexpr int threads = 256;
  const unsigned blocks = grid_for(k * D, threads);
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    LP_LAUNCH(blocks, threads, 0, stream, gather_scale_kernel<T>)(static_cast<const T*>(x), D, ld, idx, scale,
                                                           k, static_cast<T*>(out));
  });
}

cudaError_t wtacrs_wgrad_cuda(const void* g, int64_t ldg, int64_t N, const void* rows, int64_t D,
                              const int64_t* idx, const float* scale, int64_t k, FloatType t,
                              void* dw, cudaStream_t stream) {
  if (N * D == 0) return cudaSuccess;
  const int64_t by = (N + kBN - 1) / kBN, bx = (D + kBD - 1) / kBD;
  if (by > 65535) return cudaErrorInvalidConfiguration;  // N > 4M rows: not a linear layer
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    LP_LAUNCH(grid, kThreads, 0, stream, wgrad_kernel<T>)(static_cast<const T*>(g), ldg, N,
                                                   static_cast<const T*>(rows), D, idx, scale, k,
                                                   static_cast<T*>(dw));
  });
}

}  // namespace layerpress
