// CPU launchers of the fused norm ops: checks and plumbing in norm_launch.h, kernels from
// cpu_norm_active() (AVX-512 or portable, chosen at run time).
#include "cpu_output_cache.h"
#include "norm_launch.h"

namespace layerpress {
namespace {

Tensor empty_output(const Tensor& x) { return empty_cpu_output(shape_of(x), x.scalar_type()); }

NormFwdPlan run_forward(const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                        const OptTensor& bias, double eps, bool center) {
  NormFwdPlan p = plan_norm_forward(x, residual, weight, bias, eps, center, &empty_output);
  cpu_norm_active().forward(p.a, torch_parallel_for());
  return p;
}

std::tuple<Tensor, Tensor> rms_norm_cpu(const Tensor& x, const OptTensor& weight, double eps) {
  NormFwdPlan p = run_forward(x, std::nullopt, weight, std::nullopt, eps, false);
  return {p.y, p.rstd};
}

std::tuple<Tensor, Tensor, Tensor> add_rms_norm_cpu(const Tensor& x, const Tensor& residual,
                                                    const OptTensor& weight, double eps) {
  NormFwdPlan p = run_forward(x, residual, weight, std::nullopt, eps, false);
  return {p.y, p.h, p.rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_cpu(const Tensor& x, const OptTensor& weight,
                                                  const OptTensor& bias, double eps) {
  NormFwdPlan p = run_forward(x, std::nullopt, weight, bias, eps, true);
  return {p.y, p.mean, p.rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_cpu(const Tensor& x, const Tensor& residual,
                                                              const OptTensor& weight,
                                                              const OptTensor& bias, double eps) {
  NormFwdPlan p = run_forward(x, residual, weight, bias, eps, true);
  return {p.y, p.h, p.mean, p.rstd};
}

std::tuple<Tensor, Tensor> rms_norm_backward_cpu(const Tensor& grad_y, const Tensor& x,
                                                 const OptTensor& weight, const Tensor& rstd,
                                                 const OptTensor& grad_h, bool weight_grad) {
  NormBwdPlan p =
      plan_norm_backward(grad_y, x, weight, std::nullopt, rstd, grad_h, weight_grad, false, false, &empty_output);
  cpu_norm_active().backward(p.a, torch_parallel_for());
  return {p.grad_x, p.grad_w};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_cpu(const Tensor& grad_y, const Tensor& x,
                                                           const OptTensor& weight,
                                                           const Tensor& mean, const Tensor& rstd,
                                                           const OptTensor& grad_h,
                                                           bool weight_grad, bool bias_grad) {
  NormBwdPlan p =
      plan_norm_backward(grad_y, x, weight, mean, rstd, grad_h, weight_grad, bias_grad, true, &empty_output);
  cpu_norm_active().backward(p.a, torch_parallel_for());
  return {p.grad_x, p.grad_w, p.grad_b};
}

}  // namespace
}  // namespace layerpress

STABLE_TORCH_LIBRARY_IMPL(layerpress, CPU, m) {
  m.impl("rms_norm", TORCH_BOX(&layerpress::rms_norm_cpu));
  m.impl("add_rms_norm", TORCH_BOX(&layerpress::add_rms_norm_cpu));
  m.impl("layer_norm", TORCH_BOX(&layerpress::layer_norm_cpu));
  m.impl("add_layer_norm", TORCH_BOX(&layerpress::add_layer_norm_cpu));
  m.impl("rms_norm_backward", TORCH_BOX(&layerpress::rms_norm_backward_cpu));
  m.impl("layer_norm_backward", TORCH_BOX(&layerpress::layer_norm_backward_cpu));
}
