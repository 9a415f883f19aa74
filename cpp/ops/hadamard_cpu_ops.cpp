// CPU launcher of the hadamard op: checks and plumbing in hadamard_launch.h, kernel from
// cpu_hadamard_active() (AVX-512, AVX2 or portable, chosen at run time).
#include "cpu_output_cache.h"
#include "hadamard_launch.h"

namespace layerpress {
namespace {

Tensor empty_output(const Tensor& x) { return empty_cpu_output(shape_of(x), x.scalar_type()); }

Tensor hadamard_cpu(const Tensor& x, int64_t block, const OptTensor& signs, bool transpose) {
  HadamardPlan p = plan_hadamard(x, block, signs, transpose, &empty_output);
  cpu_hadamard_active().run(p.a, torch_parallel_for());
  return p.y;
}

}  // namespace
}  // namespace layerpress

STABLE_TORCH_LIBRARY_IMPL(layerpress, CPU, m) {
  m.impl("hadamard", TORCH_BOX(&layerpress::hadamard_cpu));
}
