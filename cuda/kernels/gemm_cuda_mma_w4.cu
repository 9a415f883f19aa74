// The tensor-core GEMM's kernels for 4-bit codes (gemm_cuda_mma.cuh; one translation unit per width).
#include "gemm_cuda_mma.cuh"

namespace layerpress {
namespace mma_gemm {
cudaError_t launch_w4(const GemmArgs& a, const MmaPlan& plan, float* partial, cudaStream_t stream) {
  return launch_width<4>(a, plan, partial, stream);
}
}  // namespace mma_gemm
}  // namespace layerpress
