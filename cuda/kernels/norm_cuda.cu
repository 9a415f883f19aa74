// CUDA fused RMSNorm / LayerNorm kernels (see cuda/include/layerpress/norm_cuda.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "launch.cuh"
#include "layerpress/norm_cuda.h"

namespace layerpress {
namespace {

// Threads per row (and per block) in block-per-row mode; __launch_bounds__ keeps the kernels'
// register use within what a block of this size may have.
constexpr int kMaxRowThreads = 512;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float ld(float v) { return v; }
__device__ __forceinline__ double ld(double v) { return v; }
__device__ __forceinline__ float ld(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ld(__half v) { return __half2float(v); }
template <typename T, typename A> __device__ __forceinline__ T st(A v);
template <> __device__ __forceinline__ float st<float, float>(float v) { return v; }
template <> __device__ __forceinline__ double st<double, double>(double v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 st<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half st<__half, float>(float v) { return __float2half_rn(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> vload(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}
template <typename T, int VEC>
__device__ __forceinline__ void vstore(T* p, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

// Sum over the threads of one row (threadIdx.x; blockDim.x is 32 or a multiple of 32 with one
// row per block). Every thread of the row gets the total.
template <typename A>
__device__ __forceinline__ A row_sum(A v) {
  __shared__ A red[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (blockDim.x <= 32) return v;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // red may still be read from a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  A t = lane < static_cast<int>(blockDim.x >> 5) ? red[lane] : A(0);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  return t;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxRowThreads) norm_fwd_kernel(NormFwdArgs a) {
  using A = typename AccOf<T>::type;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= a.rows) return;  // whole rows only: a row's threads leave together
  const int64_t C = a.cols;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t c0 = static_cast<int64_t>(threadIdx.x) * VEC;
  const T* src = static_cast<const T*>(a.x) + row * a.x_stride;
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  A s = 0;
  if (a.residual) {
    const T* res = static_cast<const T*>(a.residual) + row * a.res_stride;
    T* h = static_cast<T*>(a.h) + row * C;
    for (int64_t c = c0; c < C; c += step) {
      Vec<T, VEC> xv = vload<T, VEC>(src + c), rv = vload<T, VEC>(res + c), hv;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        hv.v[k] = st<T, A>(ld(xv.v[k]) + ld(rv.v[k]));
        const A v = ld(hv.v[k]);
        s += a.center ? v : v * v;
      }
      vstore<T, VEC>(h + c, hv);
    }
    src = h;  // each thread re-reads only the columns it wrote
  } else {
    for (int64_t c = c0; c < C; c += step) {
      const Vec<T, VEC> xv = vload<T, VEC>(src + c);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A v = ld(xv.v[k]);
        s += a.center ? v : v * v;
      }
    }
  }
  s = row_sum(s);
  A mean = 0, ss = s;
  if (a.center) {
    mean = s / static_cast<A>(C);
    A q = 0;
    for (int64_t c = c0; c < C; c += step) {
      const Vec<T, VEC> xv = vload<T, VEC>(src + c);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A d = ld(xv.v[k]) - mean;
        q += d * d;
      }
    }
    ss = row_sum(q);
  }
  const A rstd = A(1) / sqrt(ss / static_cast<A>(C) + static_cast<A>(a.eps));
  if (threadIdx.x == 0) {
    static_cast<A*>(a.rstd)[row] = rstd;
    if (a.center) static_cast<A*>(a.mean)[row] = mean;
  }
  T* y = static_cast<T*>(a.y) + row * C;
  for (int64_t c = c0; c < C; c += step) {
    const Vec<T, VEC> xv = vload<T, VEC>(src + c);
    Vec<T, VEC> wv, bv, yv;
    if (w) wv = vload<T, VEC>(w + c);
    if (b) bv = vload<T, VEC>(b + c);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      A v = (ld(xv.v[k]) - mean) * rstd;
      if (w) v *= ld(wv.v[k]);
      if (b) v += ld(bv.v[k]);
      yv.v[k] = st<T, A>(v);
    }
    vstore<T, VEC>(y + c, yv);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxRowThreads) norm_bwd_dx_kernel(NormBwdArgs a) {
  using A = typename AccOf<T>::type;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= a.rows) return;
  const int64_t C = a.cols;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t c0 = static_cast<int64_t>(threadIdx.x) * VEC;
  const T* x = static_cast<const T*>(a.x) + row * a.x_stride;
  const T* g = static_cast<const T*>(a.grad_y) + row * a.gy_stride;
  const T* w = static_cast<const T*>(a.weight);
  const A rstd = static_cast<const A*>(a.rstd)[row];
  const A mean = a.center ? static_cast<const A*>(a.mean)[row] : A(0);
  A s1 = 0, s2 = 0;
  for (int64_t c = c0; c < C; c += step) {
    const Vec<T, VEC> xv = vload<T, VEC>(x + c), gv = vload<T, VEC>(g + c);
    Vec<T, VEC> wv;
    if (w) wv = vload<T, VEC>(w + c);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const A gw = ld(gv.v[k]) * (w ? ld(wv.v[k]) : A(1));
      s1 += gw;
      s2 += gw * (ld(xv.v[k]) - mean) * rstd;
    }
  }
  const A m1 = a.center ? row_sum(s1) / static_cast<A>(C) : A(0);
  const A m2 = row_sum(s2) / static_cast<A>(C);
  T* dx = static_cast<T*>(a.grad_x) + row * C;
  const T* gh = a.grad_h ? static_cast<const T*>(a.grad_h) + row * a.gh_stride : nullptr;
  for (int64_t c = c0; c < C; c += step) {
    const Vec<T, VEC> xv = vload<T, VEC>(x + c), gv = vload<T, VEC>(g + c);
    Vec<T, VEC> wv, hv, out;
    if (w) wv = vload<T, VEC>(w + c);
    if (gh) hv = vload<T, VEC>(gh + c);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const A gw = ld(gv.v[k]) * (w ? ld(wv.v[k]) : A(1));
      const A xh = (ld(xv.v[k]) - mean) * rstd;
      A v = rstd * (gw - m1 - xh * m2);
      if (gh) v += ld(hv.v[k]);
      out.v[k] = st<T, A>(v);
    }
    vstore<T, VEC>(dx + c, out);
  }
}

constexpr int kColTile = 32, kRowThreads = 8;

// Partial weight/bias gradients: block (32 columns) x (one chunk of rows).
template <typename T>
__global__ void norm_bwd_partial_kernel(NormBwdArgs a, typename AccOf<T>::type* pw,
                                        typename AccOf<T>::type* pb, int64_t chunk_rows) {
  using A = typename AccOf<T>::type;
  __shared__ A sw[kRowThreads][kColTile + 1], sb[kRowThreads][kColTile + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t r0 = chunk * chunk_rows, r1 = min(a.rows, r0 + chunk_rows);
  A aw = 0, ab = 0;
  if (col < a.cols) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowThreads) {
      const A gv = ld(static_cast<const T*>(a.grad_y)[r * a.gy_stride + col]);
      const A mean = a.center ? static_cast<const A*>(a.mean)[r] : A(0);
      const A xh = (ld(static_cast<const T*>(a.x)[r * a.x_stride + col]) - mean) *
                   static_cast<const A*>(a.rstd)[r];
      aw += gv * xh;
      ab += gv;
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && col < a.cols) {
    A tw = 0, tb = 0;
#pragma unroll
    for (int k = 0; k < kRowThreads; ++k) {
      tw += sw[k][threadIdx.x];
      tb += sb[k][threadIdx.x];
    }
    if (pw) pw[chunk * a.cols + col] = tw;
    if (pb) pb[chunk * a.cols + col] = tb;
  }
}

template <typename T>
__global__ void norm_bwd_reduce_kernel(const typename AccOf<T>::type* part, int64_t chunks,
                                       int64_t cols, T* out) {
  using A = typename AccOf<T>::type;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A s = 0;
    for (int64_t k = 0; k < chunks; ++k) s += part[k * cols + c];
    out[c] = st<T, A>(s);
  }
}

// ---- launch helpers --------------------------------------------------------------------------------

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

struct RowLaunch {
  dim3 grid, block;
};

RowLaunch row_launch(int64_t rows, int64_t cols, int vec) {
  RowLaunch l;
  const int64_t vecs = (cols + vec - 1) / vec;
  if (cols <= 1024) {
    l.block = dim3(32, 4);
  } else {
    int64_t t = (vecs + 7) / 8;  // about 8 vectors per thread
    t = std::min<int64_t>(kMaxRowThreads, std::max<int64_t>(64, (t + 31) / 32 * 32));
    l.block = dim3(static_cast<unsigned>(t), 1);
  }
  l.grid = dim3(static_cast<unsigned>((rows + l.block.y - 1) / l.block.y));
  return l;
}

template <typename T>
cudaError_t forward_t(const NormFwdArgs& a, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  bool vec = a.cols % V == 0 && a.x_stride % V == 0 && aligned16(a.x) && aligned16(a.y) &&
             (!a.weight || aligned16(a.weight)) && (!a.bias || aligned16(a.bias));
  if (a.residual) vec = vec && a.res_stride % V == 0 && aligned16(a.residual) && aligned16(a.h);
  const RowLaunch l = row_launch(a.rows, a.cols, vec ? V : 1);
  if (vec) LP_LAUNCH(l.grid, l.block, 0, stream, norm_fwd_kernel<T, V>)(a);
  else LP_LAUNCH(l.grid, l.block, 0, stream, norm_fwd_kernel<T, 1>)(a);
  return cudaGetLastError();
}

int64_t chunk_rows_for(const NormBwdArgs& a) {
  // about 64 rows per chunk, at most 1024 chunks
  int64_t chunk = 64;
  if ((a.rows + chunk - 1) / chunk > 1024) chunk = (a.rows + 1023) / 1024;
  return chunk;
}

template <typename T>
cudaError_t backward_t(const NormBwdArgs& a, void* workspace, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  constexpr int V = 16 / sizeof(T);
  const bool vec = a.cols % V == 0 && a.x_stride % V == 0 && a.gy_stride % V == 0 && aligned16(a.x) &&
                   aligned16(a.grad_y) && aligned16(a.grad_x) && (!a.weight || aligned16(a.weight)) &&
                   (!a.grad_h || (aligned16(a.grad_h) && a.gh_stride % V == 0));
  const RowLaunch l = row_launch(a.rows, a.cols, vec ? V : 1);
  if (vec) LP_LAUNCH(l.grid, l.block, 0, stream, norm_bwd_dx_kernel<T, V>)(a);
  else LP_LAUNCH(l.grid, l.block, 0, stream, norm_bwd_dx_kernel<T, 1>)(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || (!a.grad_weight && !a.grad_bias)) return err;
  const int64_t chunk = chunk_rows_for(a);
  const int64_t chunks = (a.rows + chunk - 1) / chunk;
  A* pw = a.grad_weight ? static_cast<A*>(workspace) : nullptr;
  A* pb = a.grad_bias ? static_cast<A*>(workspace) + (a.grad_weight ? chunks * a.cols : 0) : nullptr;
  const dim3 grid(static_cast<unsigned>((a.cols + kColTile - 1) / kColTile), static_cast<unsigned>(chunks));
  LP_LAUNCH(grid, dim3(kColTile, kRowThreads), 0, stream, norm_bwd_partial_kernel<T>)(a, pw, pb, chunk);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const unsigned rg = static_cast<unsigned>(std::min<int64_t>((a.cols + 255) / 256, 65535));
  if (pw) LP_LAUNCH(rg, 256, 0, stream, norm_bwd_reduce_kernel<T>)(pw, chunks, a.cols, static_cast<T*>(a.grad_weight));
  if (pb) LP_LAUNCH(rg, 256, 0, stream, norm_bwd_reduce_kernel<T>)(pb, chunks, a.cols, static_cast<T*>(a.grad_bias));
  return cudaGetLastError();
}

}  // namespace

cudaError_t norm_forward_cuda(const NormFwdArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  switch (a.type) {
    case NormType::kF32: return forward_t<float>(a, stream);
    case NormType::kBF16: return forward_t<__nv_bfloat16>(a, stream);
    case NormType::kF16: return forward_t<__half>(a, stream);
    default: return forward_t<double>(a, stream);
  }
}

size_t norm_backward_cuda_workspace(const NormBwdArgs& a) {
  if (a.rows == 0 || a.cols == 0 || (!a.grad_weight && !a.grad_bias)) return 0;
  const int64_t chunk = chunk_rows_for(a);
  const int64_t chunks = (a.rows + chunk - 1) / chunk;
  const size_t acc = a.type == NormType::kF64 ? sizeof(double) : sizeof(float);
  const int n = (a.grad_weight ? 1 : 0) + (a.grad_bias ? 1 : 0);
  return static_cast<size_t>(n * chunks * a.cols) * acc;
}

cudaError_t norm_backward_cuda(const NormBwdArgs& a, void* workspace, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  switch (a.type) {
    case NormType::kF32: return backward_t<float>(a, workspace, stream);
    case NormType::kBF16: return backward_t<__nv_bfloat16>(a, workspace, stream);
    case NormType::kF16: return backward_t<__half>(a, workspace, stream);
    default: return backward_t<double>(a, workspace, stream);
  }
}

}  // namespace layerpress
