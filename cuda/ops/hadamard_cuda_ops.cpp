// CUDA launcher of the hadamard op: the same checks and messages as the CPU launcher
// (cpp/ops/hadamard_launch.h); kernel from cuda/include/layerpress/hadamard_cuda.h on the current
// stream of the input's device.
#include "hadamard_cuda_launch.h"

namespace layerpress {
namespace {

Tensor hadamard_cuda_op(const Tensor& x, int64_t block, const OptTensor& signs, bool transpose) {
  const CudaDeviceGuard guard(x);
  HadamardPlan p = plan_hadamard(x, block, signs, transpose, &empty_full_like);
  check_cuda_rotation_block(block, "block");
  check_launch(hadamard_cuda(p.a, current_stream(x)), "hadamard");
  return p.y;
}

}  // namespace
}  // namespace layerpress

STABLE_TORCH_LIBRARY_IMPL(layerpress, CUDA, m) {
  m.impl("hadamard", TORCH_BOX(&layerpress::hadamard_cuda_op));
}
