// CUDA fused norm kernels (RMSNorm / LayerNorm, forward and backward, optional residual add).
// Torch-free: NormFwdArgs/NormBwdArgs (layerpress/norm_kernels.h) hold raw device pointers;
// every function only enqueues work on `stream` and returns the launch status. Semantics are
// those of the CPU kernels: fp32 accumulation (fp64 for fp64 elements), h rounded to the element
// type before the statistics, mean/rstd stored in the accumulation type.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "layerpress/norm_kernels.h"

namespace layerpress {

// One warp per row for hidden sizes up to 1024, one block per row (64 to 512 threads) above; 16-byte vector loads
// when every row pointer is 16-byte aligned and the hidden size allows it.
cudaError_t norm_forward_cuda(const NormFwdArgs& a, cudaStream_t stream);

// Bytes of device workspace norm_backward_cuda needs for the weight/bias partial sums (0 when no
// weight/bias gradient is asked for).
size_t norm_backward_cuda_workspace(const NormBwdArgs& a);
// grad_x: one warp/block per row. grad_weight/grad_bias without atomics: a [chunks, cols]
// partial sum per row chunk (one block per 32 columns x chunk), then a reduction over chunks.
cudaError_t norm_backward_cuda(const NormBwdArgs& a, void* workspace, cudaStream_t stream);

}  // namespace layerpress
