// CUDA launchers of the fused norm ops: the same checks and messages as the CPU launchers
// (cpp/ops/norm_launch.h); kernels from cuda/include/layerpress/norm_cuda.h on the current stream
// of the input's device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "layerpress/norm_cuda.h"
#include "norm_launch.h"

namespace layerpress {
namespace {

using at::Tensor;
using c10::optional;

NormFwdPlan run_forward(const Tensor& x, const optional<Tensor>& residual, const optional<Tensor>& weight,
                        const optional<Tensor>& bias, double eps, bool center) {
  const c10::cuda::CUDAGuard guard(x.device());
  NormFwdPlan p = plan_norm_forward(x, residual, weight, bias, eps, center);
  C10_CUDA_CHECK(norm_forward_cuda(p.a, c10::cuda::getCurrentCUDAStream().stream()));
  return p;
}

NormBwdPlan run_backward(const Tensor& grad_y, const Tensor& x, const optional<Tensor>& weight,
                         const optional<Tensor>& mean, const Tensor& rstd, const optional<Tensor>& grad_h,
                         bool weight_grad, bool bias_grad, bool center) {
  const c10::cuda::CUDAGuard guard(x.device());
  NormBwdPlan p = plan_norm_backward(grad_y, x, weight, mean, rstd, grad_h, weight_grad, bias_grad, center);
  const size_t ws = norm_backward_cuda_workspace(p.a);
  Tensor workspace = at::empty({static_cast<int64_t>(ws)}, x.options().dtype(at::kByte));
  C10_CUDA_CHECK(norm_backward_cuda(p.a, ws ? workspace.data_ptr() : nullptr,
                                    c10::cuda::getCurrentCUDAStream().stream()));
  return p;
}

std::tuple<Tensor, Tensor> rms_norm_cuda(const Tensor& x, const optional<Tensor>& weight, double eps) {
  NormFwdPlan p = run_forward(x, c10::nullopt, weight, c10::nullopt, eps, false);
  return {p.y, p.rstd};
}

std::tuple<Tensor, Tensor, Tensor> add_rms_norm_cuda(const Tensor& x, const Tensor& residual,
                                                     const optional<Tensor>& weight, double eps) {
  NormFwdPlan p = run_forward(x, residual, weight, c10::nullopt, eps, false);
  return {p.y, p.h, p.rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_cuda(const Tensor& x, const optional<Tensor>& weight,
                                                   const optional<Tensor>& bias, double eps) {
  NormFwdPlan p = run_forward(x, c10::nullopt, weight, bias, eps, true);
  return {p.y, p.mean, p.rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_cuda(const Tensor& x, const Tensor& residual,
                                                               const optional<Tensor>& weight,
                                                               const optional<Tensor>& bias, double eps) {
  NormFwdPlan p = run_forward(x, residual, weight, bias, eps, true);
  return {p.y, p.h, p.mean, p.rstd};
}

std::tuple<Tensor, Tensor> rms_norm_backward_cuda(const Tensor& grad_y, const Tensor& x,
                                                  const optional<Tensor>& weight, const Tensor& rstd,
                                                  const optional<Tensor>& grad_h, bool weight_grad) {
  NormBwdPlan p = run_backward(grad_y, x, weight, c10::nullopt, rstd, grad_h, weight_grad, false, false);
  return {p.grad_x, p.grad_w};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_cuda(const Tensor& grad_y, const Tensor& x,
                                                            const optional<Tensor>& weight,
                                                            const Tensor& mean, const Tensor& rstd,
                                                            const optional<Tensor>& grad_h,
                                                            bool weight_grad, bool bias_grad) {
  NormBwdPlan p = run_backward(grad_y, x, weight, mean, rstd, grad_h, weight_grad, bias_grad, true);
  return {p.grad_x, p.grad_w, p.grad_b};
}

}  // namespace
}  // namespace layerpress

TORCH_LIBRARY_IMPL(layerpress, CUDA, m) {
  m.impl("rms_norm", &layerpress::rms_norm_cuda);
  m.impl("add_rms_norm", &layerpress::add_rms_norm_cuda);
  m.impl("layer_norm", &layerpress::layer_norm_cuda);
  m.impl("add_layer_norm", &layerpress::add_layer_norm_cuda);
  m.impl("rms_norm_backward", &layerpress::rms_norm_backward_cuda);
  m.impl("layer_norm_backward", &layerpress::layer_norm_backward_cuda);
}
