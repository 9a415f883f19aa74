// Argument checks and tensor -> NormFwdArgs/NormBwdArgs plumbing shared by the CPU launcher
// (cpp/ops/norm_cpu_ops.cpp) and the CUDA launcher (cuda/ops/norm_cuda_ops.cpp), so both give
// the same messages. Outputs are allocated here; the device-specific launcher only runs the
// kernel.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#include "cpu_output_cache.h"
#include "launch_utils.h"
#include "layerpress/norm_kernels.h"

namespace layerpress {

// Full-size outputs: on the CPU from the output cache (no page faults on repeated calls).
inline at::Tensor empty_norm_output(const at::Tensor& x) {
  return x.is_cpu() ? empty_cpu_output(x.sizes(), x.options()) : at::empty(x.sizes(), x.options());
}

inline NormType norm_type_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return NormType::kF32;
    case at::kBFloat16: return NormType::kBF16;
    case at::kHalf: return NormType::kF16;
    case at::kDouble: return NormType::kF64;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16, float16 or float64, got ",
                       t.scalar_type());
  }
}

// dtype of mean/rstd: fp32, or fp64 for fp64 inputs.
inline at::ScalarType norm_stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// [rows, cols] view (or copy) with unit column stride; rows may keep a stride.
inline at::Tensor norm_rows(const at::Tensor& t, int64_t cols) {
  at::Tensor u = t.stride(-1) == 1 ? t : t.contiguous();
  return u.reshape({-1, cols});
}
inline int64_t row_stride(const at::Tensor& t2) { return t2.size(0) > 1 ? t2.stride(0) : t2.size(1); }

inline void check_norm_input(const at::Tensor& x, const char* name) {
  norm_type_of(x, name);
  TORCH_CHECK_VALUE(x.dim() >= 1, name, " must have at least 1 dimension (..., hidden), got a 0-D tensor");
  TORCH_CHECK_VALUE(x.numel() > 0, name, " must not be empty, got shape ", x.sizes());
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name, const char* xname) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have the dtype of ", xname, " (",
                   x.scalar_type(), "), got ", t.scalar_type());
  check_same_device(t, x, name, xname);
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, " must have the shape of ", xname, " ", x.sizes(),
                    ", got ", t.sizes());
}

inline at::Tensor check_param(const c10::optional<at::Tensor>& p, const at::Tensor& x, const char* name) {
  if (!p.has_value()) return at::Tensor();
  const at::Tensor& t = *p;
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have the dtype of x (",
                   x.scalar_type(), "), got ", t.scalar_type());
  check_same_device(t, x, name, "x");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(-1), name, " must have shape [", x.size(-1),
                    "] (the hidden size, x.shape[-1]), got ", t.sizes());
  return t.contiguous();
}

inline void check_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "eps must be a positive finite number, got ", eps);
}

struct NormFwdPlan {
  NormFwdArgs a;
  at::Tensor x2, r2, w, b;  // keep inputs (and copies) alive
  at::Tensor y, h, mean, rstd;
};

inline NormFwdPlan plan_norm_forward(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                     const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias, double eps, bool center) {
  check_norm_input(x, "x");
  if (residual.has_value()) check_like(*residual, x, "residual", "x");
  check_eps(eps);
  NormFwdPlan p;
  const int64_t C = x.size(-1);
  p.w = check_param(weight, x, "weight");
  p.b = check_param(bias, x, "bias");
  p.x2 = norm_rows(x, C);
  const int64_t R = p.x2.size(0);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  const auto sopt = x.options().dtype(norm_stat_dtype(x));
  p.y = empty_norm_output(x);
  p.rstd = at::empty(lead, sopt);
  p.mean = center ? at::empty(lead, sopt) : at::Tensor();
  NormFwdArgs& a = p.a;
  a.rows = R;
  a.cols = C;
  a.type = norm_type_of(x, "x");
  a.center = center;
  a.eps = eps;
  a.x = p.x2.data_ptr();
  a.x_stride = row_stride(p.x2);
  if (residual.has_value()) {
    p.r2 = norm_rows(*residual, C);
    p.h = empty_norm_output(x);
    a.residual = p.r2.data_ptr();
    a.res_stride = row_stride(p.r2);
    a.h = p.h.data_ptr();
  }
  a.weight = p.w.defined() ? p.w.data_ptr() : nullptr;
  a.bias = p.b.defined() ? p.b.data_ptr() : nullptr;
  a.y = p.y.data_ptr();
  a.mean = center ? p.mean.data_ptr() : nullptr;
  a.rstd = p.rstd.data_ptr();
  return p;
}

struct NormBwdPlan {
  NormBwdArgs a;
  at::Tensor g2, x2, w, mean, rstd, gh2;
  at::Tensor grad_x, grad_w, grad_b;
};

inline void check_stat(const at::Tensor& s, const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(s.scalar_type() == norm_stat_dtype(x), name, " must be ", norm_stat_dtype(x),
                   " (as returned by the forward op), got ", s.scalar_type());
  check_same_device(s, x, name, "x");
  TORCH_CHECK_VALUE(s.sizes() == x.sizes().slice(0, x.dim() - 1), name, " must have shape ",
                    x.sizes().slice(0, x.dim() - 1), " (x.shape[:-1]), got ", s.sizes());
}

inline NormBwdPlan plan_norm_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                      const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& mean, const at::Tensor& rstd,
                                      const c10::optional<at::Tensor>& grad_h, bool weight_grad,
                                      bool bias_grad, bool center) {
  check_norm_input(x, "x");
  check_like(grad_y, x, "grad_y", "x");
  if (grad_h.has_value()) check_like(*grad_h, x, "grad_h", "x");
  check_stat(rstd, x, "rstd");
  if (center) {
    TORCH_CHECK_VALUE(mean.has_value(), "mean is required for layer_norm_backward");
    check_stat(*mean, x, "mean");
  }
  TORCH_CHECK_VALUE(!weight_grad || weight.has_value(), "weight_grad=True needs a weight");
  NormBwdPlan p;
  const int64_t C = x.size(-1);
  p.w = check_param(weight, x, "weight");
  p.x2 = norm_rows(x, C);
  p.g2 = norm_rows(grad_y, C);
  p.rstd = rstd.contiguous();
  if (center) p.mean = mean->contiguous();
  p.grad_x = empty_norm_output(x);
  p.grad_w = at::empty({weight_grad ? C : 0}, x.options());
  p.grad_b = at::empty({bias_grad ? C : 0}, x.options());
  NormBwdArgs& a = p.a;
  a.rows = p.x2.size(0);
  a.cols = C;
  a.type = norm_type_of(x, "x");
  a.center = center;
  a.grad_y = p.g2.data_ptr();
  a.gy_stride = row_stride(p.g2);
  a.x = p.x2.data_ptr();
  a.x_stride = row_stride(p.x2);
  a.weight = p.w.defined() ? p.w.data_ptr() : nullptr;
  a.mean = center ? p.mean.data_ptr() : nullptr;
  a.rstd = p.rstd.data_ptr();
  if (grad_h.has_value()) {
    p.gh2 = norm_rows(*grad_h, C);
    a.grad_h = p.gh2.data_ptr();
    a.gh_stride = row_stride(p.gh2);
  }
  a.grad_x = p.grad_x.data_ptr();
  a.grad_weight = weight_grad ? p.grad_w.data_ptr() : nullptr;
  a.grad_bias = bias_grad ? p.grad_b.data_ptr() : nullptr;
  return p;
}

}  // namespace layerpress
