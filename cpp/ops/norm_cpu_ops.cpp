// CPU launchers of the fused norm ops: checks and plumbing in norm_launch.h, kernels from
// cpu_norm_active() (AVX-512 or portable, chosen at run time).
#include <ATen/ATen.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "norm_launch.h"

namespace layerpress {
namespace {

using at::Tensor;
using c10::optional;

// Large outputs are fresh mmap'd memory (glibc serves >= 32 MB allocations by mmap), and the
// kernel's first write faults every 4 KB page in: at 4096 x 2048 fp32 that costs more than the
// kernel itself. Asking for transparent huge pages (what torch's own THP_MEM_ALLOC_ENABLE=1 does
// for every allocation) makes that 512x fewer faults. No effect where THP is off;
// LAYERPRESS_NORM_HUGEPAGES=0 disables it.
void advise_huge_pages(const Tensor& t) {
#ifdef MADV_HUGEPAGE
  static const bool enabled = [] {
    const char* e = std::getenv("LAYERPRESS_NORM_HUGEPAGES");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const size_t n = t.nbytes();
  if (!enabled || n < 4 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t s = (p + kHuge - 1) & ~(kHuge - 1), e = (p + n) & ~(kHuge - 1);
  if (e > s) (void)madvise(reinterpret_cast<void*>(s), e - s, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

NormFwdPlan run_forward(const Tensor& x, const optional<Tensor>& residual, const optional<Tensor>& weight,
                        const optional<Tensor>& bias, double eps, bool center) {
  NormFwdPlan p = plan_norm_forward(x, residual, weight, bias, eps, center);
  advise_huge_pages(p.y);
  if (p.h.defined()) advise_huge_pages(p.h);
  cpu_norm_active().forward(p.a, torch_parallel_for());
  return p;
}

std::tuple<Tensor, Tensor> rms_norm_cpu(const Tensor& x, const optional<Tensor>& weight, double eps) {
  NormFwdPlan p = run_forward(x, c10::nullopt, weight, c10::nullopt, eps, false);
  return {p.y, p.rstd};
}

std::tuple<Tensor, Tensor, Tensor> add_rms_norm_cpu(const Tensor& x, const Tensor& residual,
                                                    const optional<Tensor>& weight, double eps) {
  NormFwdPlan p = run_forward(x, residual, weight, c10::nullopt, eps, false);
  return {p.y, p.h, p.rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_cpu(const Tensor& x, const optional<Tensor>& weight,
                                                  const optional<Tensor>& bias, double eps) {
  NormFwdPlan p = run_forward(x, c10::nullopt, weight, bias, eps, true);
  return {p.y, p.mean, p.rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_cpu(const Tensor& x, const Tensor& residual,
                                                              const optional<Tensor>& weight,
                                                              const optional<Tensor>& bias, double eps) {
  NormFwdPlan p = run_forward(x, residual, weight, bias, eps, true);
  return {p.y, p.h, p.mean, p.rstd};
}

std::tuple<Tensor, Tensor> rms_norm_backward_cpu(const Tensor& grad_y, const Tensor& x,
                                                 const optional<Tensor>& weight, const Tensor& rstd,
                                                 const optional<Tensor>& grad_h, bool weight_grad) {
  NormBwdPlan p = plan_norm_backward(grad_y, x, weight, c10::nullopt, rstd, grad_h, weight_grad, false, false);
  advise_huge_pages(p.grad_x);
  cpu_norm_active().backward(p.a, torch_parallel_for());
  return {p.grad_x, p.grad_w};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_cpu(const Tensor& grad_y, const Tensor& x,
                                                           const optional<Tensor>& weight,
                                                           const Tensor& mean, const Tensor& rstd,
                                                           const optional<Tensor>& grad_h,
                                                           bool weight_grad, bool bias_grad) {
  NormBwdPlan p = plan_norm_backward(grad_y, x, weight, mean, rstd, grad_h, weight_grad, bias_grad, true);
  advise_huge_pages(p.grad_x);
  cpu_norm_active().backward(p.a, torch_parallel_for());
  return {p.grad_x, p.grad_w, p.grad_b};
}

}  // namespace
}  // namespace layerpress

TORCH_LIBRARY_IMPL(layerpress, CPU, m) {
  m.impl("rms_norm", &layerpress::rms_norm_cpu);
  m.impl("add_rms_norm", &layerpress::add_rms_norm_cpu);
  m.impl("layer_norm", &layerpress::layer_norm_cpu);
  m.impl("add_layer_norm", &layerpress::add_layer_norm_cpu);
  m.impl("rms_norm_backward", &layerpress::rms_norm_backward_cpu);
  m.impl("layer_norm_backward", &layerpress::layer_norm_backward_cpu);
}
