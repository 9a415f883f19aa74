// CUDA launchers of the fused norm ops: the same checks and messages as the CPU launchers
// (cpp/ops/norm_launch.h); kernels from cuda/include/layerpress/norm_cuda.h on the current stream
// of the input's device.
#include "cuda_launch.h"
#include "layerpress/norm_cuda.h"
#include "norm_launch.h"

namespace layerpress {
namespace {

NormFwdPlan run_forward(const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                        const OptTensor& bias, double eps, bool center) {
  const CudaDeviceGuard guard(x);
  NormFwdPlan p = plan_norm_forward(x, residual, weight, bias, eps, center, &empty_full_like);
  check_launch(norm_forward_cuda(p.a, current_stream(x)), "norm forward");
  return p;
}

NormBwdPlan run_backward(const Tensor& grad_y, const Tensor& x, const OptTensor& weight,
                         const OptTensor& mean, const Tensor& rstd, const OptTensor& grad_h,
                         bool weight_grad, bool bias_grad, bool center) {
  const CudaDeviceGuard guard(x);
  NormBwdPlan p = plan_norm_backward(grad_y, x, weight, mean, rstd, grad_h, weight_grad, bias_grad, center,
                                     &empty_full_like);
  const size_t ws = norm_backward_cuda_workspace(p.a);
  Tensor workspace = empty_like_device(x, {static_cast<int64_t>(ws)}, ScalarType::Byte);
  check_launch(norm_backward_cuda(p.a, ws ? workspace.mutable_data_ptr() : nullptr, current_stream(x)),
               "norm backward");
  return p;
}

std::tuple<Tensor, Tensor> rms_norm_cuda(const Tensor& x, const OptTensor& weight, double eps) {
  NormFwdPlan p = run_forward(x, std::nullopt, weight, std::nullopt, eps, false);
  return {p.y, p.rstd};
}

std::tuple<Tensor, Tensor, Tensor> add_rms_norm_cuda(const Tensor& x, const Tensor& residual,
                                                     const OptTensor& weight, double eps) {
  NormFwdPlan p = run_forward(x, residual, weight, std::nullopt, eps, false);
  return {p.y, p.h, p.rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_cuda(const Tensor& x, const OptTensor& weight,
                                                   const OptTensor& bias, double eps) {
  NormFwdPlan p = run_forward(x, std::nullopt, weight, bias, eps, true);
  return {p.y, p.mean, p.rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_cuda(const Tensor& x, const Tensor& residual,
                                                               const OptTensor& weight,
                                                               const OptTensor& bias, double eps) {
  NormFwdPlan p = run_forward(x, residual, weight, bias, eps, true);
  return {p.y, p.h, p.mean, p.rstd};
}

std::tuple<Tensor, Tensor> rms_norm_backward_cuda(const Tensor& grad_y, const Tensor& x,
                                                  const OptTensor& weight, const Tensor& rstd,
                                                  const OptTensor& grad_h, bool weight_grad) {
  NormBwdPlan p = run_backward(grad_y, x, weight, std::nullopt, rstd, grad_h, weight_grad, false, false);
  return {p.grad_x, p.grad_w};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_cuda(const Tensor& grad_y, const Tensor& x,
                                                            const OptTensor& weight,
                                                            const Tensor& mean, const Tensor& rstd,
                                                            const OptTensor& grad_h,
                                                            bool weight_grad, bool bias_grad) {
  NormBwdPlan p = run_backward(grad_y, x, weight, mean, rstd, grad_h, weight_grad, bias_grad, true);
  return {p.grad_x, p.grad_w, p.grad_b};
}

}  // namespace
}  // namespace layerpress

STABLE_TORCH_LIBRARY_IMPL(layerpress, CUDA, m) {
  m.impl("rms_norm", TORCH_BOX(&layerpress::rms_norm_cuda));
  m.impl("add_rms_norm", TORCH_BOX(&layerpress::add_rms_norm_cuda));
  m.impl("layer_norm", TORCH_BOX(&layerpress::layer_norm_cuda));
  m.impl("add_layer_norm", TORCH_BOX(&layerpress::add_layer_norm_cuda));
  m.impl("rms_norm_backward", TORCH_BOX(&layerpress::rms_norm_backward_cuda));
  m.impl("layer_norm_backward", TORCH_BOX(&layerpress::layer_norm_backward_cuda));
}
