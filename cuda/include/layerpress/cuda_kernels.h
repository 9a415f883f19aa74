// CUDA kernels for the quantised-weight format. Torch-free: raw device pointers, sizes,
// QuantParams and a stream. Every function only enqueues work on `stream` (no host sync) and
// returns the launch status (cudaGetLastError() of the runtime these kernels were linked with);
// a launch over zero elements enqueues nothing and returns cudaSuccess.
//
// Semantics are those of the CPU kernels in cpu_kernels.h, bit for bit where the CPU result is
// exact (quantize, pack, unpack, dequantize); the GEMMs accumulate in fp32 in their own order.
// Preconditions are the launcher's job (see cuda/ops/cuda_ops.cpp): valid bits/group/axis
// (make_params), K % 32 == 0, codes < 2^bits, zeros <= 2^bits - 1, given scales finite and
// non-zero, contiguous tensors on the current device.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "layerpress/quant_format.h"

namespace layerpress {

// ---- format ops (canonical layout) -------------------------------------------------------------
// Round-to-nearest quantisation of a row-major [N, K] weight of type w_type, as quantize_rtn.
// given_scales: scales (and zeros, if asymmetric) are inputs; otherwise min-max scales are
// computed and written there. `nonfinite` points to one device int that the caller zeroes
// beforehand; it is set to 1 if the weight holds a NaN/Inf (codes are then undefined).
cudaError_t quantize_rtn_cuda(const void* w, FloatType w_type, const QuantParams& p, uint8_t* codes,
                              void* scales, uint8_t* zeros, bool given_scales, int* nonfinite,
                              cudaStream_t stream);

// uint8 codes [rows, K] -> canonical int32 [rows, K*bits/32] (LSB-first bit stream per row).
cudaError_t pack_codes_cuda(const uint8_t* codes, int64_t rows, int64_t K, int bits,
                            int32_t* packed, cudaStream_t stream);
// Inverse of pack_codes_cuda.
cudaError_t unpack_codes_cuda(const int32_t* packed, int64_t rows, int64_t K, int bits,
                              uint8_t* codes, cudaStream_t stream);

// Canonical packed weight -> dense [N, K] weight (q - z) * s of type out_type (fp32 math).
cudaError_t dequantize_cuda(const int32_t* qweight, const void* scales, const uint8_t* zeros,
                            const QuantParams& p, void* out, FloatType out_type,
                            cudaStream_t stream);

// ---- low-bit GEMM on the canonical layout (Layout::kCanonical) ----------------------------------
// The CUDA GEMMs read GemmArgs (quant_format.h) with the weight in the canonical layout
// (qweight [N, K*bits/32], scales/zeros [N, K/g] per-OC or [K, N/g] per-IC).

// Y = X · dequant(W)ᵀ (+ bias): fp32 accumulation, dequantisation fused (the dense weight is never
// written to memory). Any M >= 0, any N >= 1.
cudaError_t gemm_canonical_cuda(const GemmArgs& a, cudaStream_t stream);
// Y = G · dequant(W) (the input gradient of the forward product); `bias` is ignored.
cudaError_t gemm_t_canonical_cuda(const GemmArgs& a, cudaStream_t stream);

// The same simple kernels on Layout::kCanonical or Layout::kCudaMma (any M, N, activation type).
cudaError_t gemm_simple_cuda(const GemmArgs& a, Layout layout, cudaStream_t stream);
cudaError_t gemm_t_simple_cuda(const GemmArgs& a, Layout layout, cudaStream_t stream);

// ---- Layout::kCudaMma (layerpress/cuda_mma_layout.h) ------------------------------------------------
// GemmArgs with qweight [ceil(N/64), K/16, 32*bits] and scales/zeros in the layout's shapes.
// Canonical triple -> kCudaMma triple and back (the same functions as the CPU repack).
cudaError_t repack_cuda_mma_cuda(const int32_t* q, const void* s, const uint8_t* z, const QuantParams& p,
                                 int32_t* q_out, void* s_out, uint8_t* z_out, cudaStream_t stream);
cudaError_t unrepack_cuda_mma_cuda(const int32_t* q, const void* s, const uint8_t* z, const QuantParams& p,
                                   int32_t* q_out, void* s_out, uint8_t* z_out, cudaStream_t stream);
// Y = X · dequant(W)ᵀ (+ bias) on tensor cores (gemm_cuda_mma.cu) for fp16/bf16 activations whose
// rows are 16-byte aligned; anything else runs gemm_simple_cuda on the same layout. `workspace`:
// gemm_cuda_mma_workspace_bytes(a) bytes of device memory (nullptr when that is 0), for split-K.
size_t gemm_cuda_mma_workspace_bytes(const GemmArgs& a);
bool gemm_cuda_mma_uses_tensor_cores(const GemmArgs& a);
cudaError_t gemm_cuda_mma(const GemmArgs& a, void* workspace, cudaStream_t stream);

}  // namespace layerpress
