// WTA-CRS (winner-take-all column-row sampling) CPU kernels. Torch-free: raw pointers, sizes,
// strides and a parallel-for callback (see cpu_kernels.h).
//
// For Z = H·Wᵀ the weight gradient is ∇W = Σ_i ∇Z_iᵀ H_i over the M rows (tokens) i. WTA-CRS keeps
// k of them: the c "winners" with the largest sampling weights exactly (scale 1), and s = k − c
// rows drawn with replacement from the rest with probability p_j / (1 − P_C), each scaled by
// (1 − P_C) / (s · p_j). The estimate Σ_i scale_i ∇Z_{idx_i}ᵀ H_{idx_i} is unbiased.
//
// The selection needs the rows sorted by weight; the launchers sort and prefix-sum with torch ops
// and hand the results to wtacrs_select_cpu (the draw itself is a kernel, so that it is
// reproducible from a seed and identical in structure on the GPU).
#pragma once
#include <cstdint>

#include "layerpress/cpu_kernels.h"
#include "layerpress/quant_format.h"
#include "layerpress/wtacrs_common.h"

namespace layerpress {

// out[m] = ‖x[m, :]‖₂ (fp32 accumulation) for an [M, D] matrix with row stride ld.
void wtacrs_row_norms_cpu(const void* x, FloatType t, int64_t M, int64_t D, int64_t ld, float* out,
                          const ParallelFor& pf);

// The selection, given the weights sorted in descending order (`sorted`, double [M]), their
// inclusive prefix sums (`cum`, double [M]), the row each sorted position came from (`order`,
// int64 [M]) and the number of winners *c_ptr (0 <= c < k < M, chosen by the variance rule; a
// pointer so that the GPU version never has to read it back). Writes idx [k] (row numbers) and
// scale [k]: positions 0..c-1 are the winners (scale 1), positions c..k-1 the draws. Draw j uses
// the uniform wtacrs_uniform(seed, j); with no residual mass left the draws get scale 0.
void wtacrs_select_cpu(const double* sorted, const double* cum, const int64_t* order, int64_t M,
                       int64_t k, const int64_t* c_ptr, uint64_t seed, int64_t* idx, float* scale,
                       const ParallelFor& pf);

// Gather-and-scale: out[i, :] = scale[i] · x[idx[i], :] (scale == nullptr: plain gather), fp32
// product rounded once to t. x is [M, D] with row stride ld; out is [k, D] contiguous.
void wtacrs_gather_scale_cpu(const void* x, FloatType t, int64_t D, int64_t ld, const int64_t* idx,
                             const float* scale, int64_t k, void* out, const ParallelFor& pf);

// Sampled weight gradient with the gather fused into the GEMM:
//   dW[N, D] = Σ_{i<k} scale[i] · G[idx[i], :]ᵀ · R[i, :]
// G: [M, N] output gradient (row stride ldg), R: [k, D] compact rows (contiguous), both of type t;
// scale == nullptr means 1. dW: [N, D] contiguous, type t. fp32 accumulation over i = 0..k-1 in
// order, one task per output element: deterministic and independent of the thread count.
void wtacrs_wgrad_cpu(const void* g, int64_t ldg, int64_t N, const void* rows, int64_t D,
                      const int64_t* idx, const float* scale, int64_t k, FloatType t, void* dw,
                      const ParallelFor& pf);

// Name of the wgrad variant this machine runs ("avx512" or "generic"), for build_info.
const char* wtacrs_wgrad_variant();

}  // namespace layerpress
