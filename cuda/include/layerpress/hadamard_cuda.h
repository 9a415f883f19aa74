// CUDA randomised Walsh–Hadamard transform (semantics in layerpress/hadamard_kernels.h).
// Torch-free: HadamardArgs holds raw device pointers; the function only enqueues work on
// `stream` and returns the launch status.
#pragma once
#include <cuda_runtime_api.h>

#include "layerpress/hadamard_kernels.h"

namespace layerpress {

// Each thread holds E = max(1, block/32) consecutive elements of a block (at most 32; blocks up
// to 32768): butterflies inside a thread's registers, then across lanes with warp shuffles, and
// for blocks of more than 32 threads (block > 256) across warps through shared memory.
cudaError_t hadamard_cuda(const HadamardArgs& a, cudaStream_t stream);

constexpr int64_t kHadamardCudaMaxBlock = 32768;

}  // namespace layerpress
