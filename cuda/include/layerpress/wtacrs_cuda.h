// WTA-CRS CUDA kernels (issue 6). Torch-free: raw device pointers, sizes, strides and a stream;
// each function only enqueues work on `stream` and returns the launch status. Semantics are those
// of the CPU kernels in cpp/include/layerpress/wtacrs_kernels.h (same seeded draw, same fp32
// accumulation; the GEMM's summation order differs). Preconditions (the launcher's job, see
// cuda/ops/wtacrs_cuda_ops.cpp): types and shapes valid, idx values in range, tensors on the
// current device, column stride 1.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "layerpress/quant_format.h"

namespace layerpress {

// out[m] = ‖x[m, :]‖₂ for an [M, D] matrix with row stride ld (fp32 accumulation).
cudaError_t wtacrs_row_norms_cuda(const void* x, FloatType t, int64_t M, int64_t D, int64_t ld,
                                  float* out, cudaStream_t stream);

// The selection draw from the sorted weights, their prefix sums, the sorted order and the winner
// count *c_ptr (a device pointer: nothing is read back). See wtacrs_select_cpu.
cudaError_t wtacrs_select_cuda(const double* sorted, const double* cum, const int64_t* order,
                               int64_t M, int64_t k, const int64_t* c_ptr, uint64_t seed,
                               int64_t* idx, float* scale, cudaStream_t stream);

// out[i, :] = scale[i] · x[idx[i], :] (scale == nullptr: plain gather); out [k, D] contiguous.
cudaError_t wtacrs_gather_scale_cuda(const void* x, FloatType t, int64_t D, int64_t ld,
                                     const int64_t* idx, const float* scale, int64_t k, void* out,
                                     cudaStream_t stream);

// dW[N, D] = Σ_i scale[i] · G[idx[i], :]ᵀ R[i, :], the row gather fused into the GEMM's shared-
// memory tile loads; G [M, N] with row stride ldg, R [k, D] contiguous, dW [N, D] contiguous, all of
// type t; fp32 accumulation in a fixed order (deterministic).
cudaError_t wtacrs_wgrad_cuda(const void* g, int64_t ldg, int64_t N, const void* rows, int64_t D,
                              const int64_t* idx, const float* scale, int64_t k, FloatType t,
                              void* dw, cudaStream_t stream);

}  // namespace layerpress
