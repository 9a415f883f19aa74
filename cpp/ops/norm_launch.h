// Argument checks and tensor -> NormFwdArgs/NormBwdArgs plumbing shared by the CPU launcher
// (cpp/ops/norm_cpu_ops.cpp) and the CUDA launcher (cuda/ops/norm_cuda_ops.cpp), so both give
// the same messages. Outputs are allocated here; the device-specific launcher only runs the
// kernel.
#pragma once
#include <cmath>

#include "launch_utils.h"
#include "layerpress/norm_kernels.h"

namespace layerpress {

// Allocates a full-size output like x: the CPU launcher passes one that takes large outputs from
// the output cache (cpu_output_cache.h: no page faults on repeated calls), the CUDA launcher
// torch's allocator.
using FullOutputAlloc = Tensor (*)(const Tensor& x);
inline Tensor empty_full_like(const Tensor& x) { return empty_like_device(x, shape_of(x), x.scalar_type()); }

inline NormType norm_type_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case ScalarType::Float: return NormType::kF32;
    case ScalarType::BFloat16: return NormType::kBF16;
    case ScalarType::Half: return NormType::kF16;
    case ScalarType::Double: return NormType::kF64;
    default:
      throw_type_error(str_cat(name, " must be float32, bfloat16, float16 or float64, got ", t.scalar_type()));
  }
}

// dtype of mean/rstd: fp32, or fp64 for fp64 inputs.
inline ScalarType norm_stat_dtype(const Tensor& x) {
  return x.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

inline Shape leading_shape(const Tensor& x) {
  Shape s = shape_of(x);
  s.pop_back();
  return s;
}

inline void check_norm_input(const Tensor& x, const char* name) {
  norm_type_of(x, name);
  LP_CHECK_VALUE(x.dim() >= 1, name, " must have at least 1 dimension (..., hidden), got a 0-D tensor");
  LP_CHECK_VALUE(x.numel() > 0, name, " must not be empty, got shape ", shape_str(x));
}

inline void check_like(const Tensor& t, const Tensor& x, const char* name, const char* xname) {
  LP_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have the dtype of ", xname, " (",
                   x.scalar_type(), "), got ", t.scalar_type());
  check_same_device(t, x, name, xname);
  LP_CHECK_VALUE(shape_of(t) == shape_of(x), name, " must have the shape of ", xname, " ", shape_str(x),
                 ", got ", shape_str(t));
}

inline Tensor check_param(const OptTensor& p, const Tensor& x, const char* name) {
  if (!p.has_value()) return Tensor();
  const Tensor& t = *p;
  LP_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have the dtype of x (",
                   x.scalar_type(), "), got ", t.scalar_type());
  check_same_device(t, x, name, "x");
  LP_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(-1), name, " must have shape [", x.size(-1),
                    "] (the hidden size, x.shape[-1]), got ", shape_str(t));
  return as_contiguous(t);
}

inline void check_eps(double eps) {
  LP_CHECK_VALUE(std::isfinite(eps) && eps > 0, "eps must be a positive finite number, got ", eps);
}

struct NormFwdPlan {
  NormFwdArgs a;
  RowMatrix x2, r2;  // inputs as row matrices (copies kept alive)
  Tensor w, b;
  Tensor y, h, mean, rstd;
};

inline NormFwdPlan plan_norm_forward(const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                                     const OptTensor& bias, double eps, bool center,
                                     FullOutputAlloc alloc) {
  check_norm_input(x, "x");
  if (residual.has_value()) check_like(*residual, x, "residual", "x");
  check_eps(eps);
  NormFwdPlan p;
  const int64_t C = x.size(-1);
  p.w = check_param(weight, x, "weight");
  p.b = check_param(bias, x, "bias");
  p.x2 = row_matrix(x, C);
  const int64_t R = p.x2.rows;
  const Shape lead = leading_shape(x);
  p.y = alloc(x);
  p.rstd = empty_like_device(x, lead, norm_stat_dtype(x));
  p.mean = center ? empty_like_device(x, lead, norm_stat_dtype(x)) : Tensor();
  NormFwdArgs& a = p.a;
  a.rows = R;
  a.cols = C;
  a.type = norm_type_of(x, "x");
  a.center = center;
  a.eps = eps;
  a.x = p.x2.data;
  a.x_stride = p.x2.ld;
  if (residual.has_value()) {
    p.r2 = row_matrix(*residual, C);
    p.h = alloc(x);
    a.residual = p.r2.data;
    a.res_stride = p.r2.ld;
    a.h = p.h.mutable_data_ptr();
  }
  a.weight = p.w.defined() ? p.w.const_data_ptr() : nullptr;
  a.bias = p.b.defined() ? p.b.const_data_ptr() : nullptr;
  a.y = p.y.mutable_data_ptr();
  a.mean = center ? p.mean.mutable_data_ptr() : nullptr;
  a.rstd = p.rstd.mutable_data_ptr();
  return p;
}

struct NormBwdPlan {
  NormBwdArgs a;
  RowMatrix g2, x2, gh2;
  Tensor w, mean, rstd;
  Tensor grad_x, grad_w, grad_b;
};

inline void check_stat(const Tensor& s, const Tensor& x, const char* name) {
  LP_CHECK_TYPE(s.scalar_type() == norm_stat_dtype(x), name, " must be ", norm_stat_dtype(x),
                   " (as returned by the forward op), got ", s.scalar_type());
  check_same_device(s, x, name, "x");
  LP_CHECK_VALUE(shape_of(s) == leading_shape(x), name, " must have shape ", shape_str(leading_shape(x)),
                 " (x.shape[:-1]), got ", shape_str(s));
}

inline NormBwdPlan plan_norm_backward(const Tensor& grad_y, const Tensor& x, const OptTensor& weight,
                                      const OptTensor& mean, const Tensor& rstd, const OptTensor& grad_h,
                                      bool weight_grad, bool bias_grad, bool center,
                                      FullOutputAlloc alloc) {
  check_norm_input(x, "x");
  check_like(grad_y, x, "grad_y", "x");
  if (grad_h.has_value()) check_like(*grad_h, x, "grad_h", "x");
  check_stat(rstd, x, "rstd");
  if (center) {
    LP_CHECK_VALUE(mean.has_value(), "mean is required for layer_norm_backward");
    check_stat(*mean, x, "mean");
  }
  LP_CHECK_VALUE(!weight_grad || weight.has_value(), "weight_grad=True needs a weight");
  NormBwdPlan p;
  const int64_t C = x.size(-1);
  p.w = check_param(weight, x, "weight");
  p.x2 = row_matrix(x, C);
  p.g2 = row_matrix(grad_y, C);
  p.rstd = as_contiguous(rstd);
  if (center) p.mean = as_contiguous(*mean);
  p.grad_x = alloc(x);
  p.grad_w = empty_like_device(x, {weight_grad ? C : 0}, x.scalar_type());
  p.grad_b = empty_like_device(x, {bias_grad ? C : 0}, x.scalar_type());
  NormBwdArgs& a = p.a;
  a.rows = p.x2.rows;
  a.cols = C;
  a.type = norm_type_of(x, "x");
  a.center = center;
  a.grad_y = p.g2.data;
  a.gy_stride = p.g2.ld;
  a.x = p.x2.data;
  a.x_stride = p.x2.ld;
  a.weight = p.w.defined() ? p.w.const_data_ptr() : nullptr;
  a.mean = center ? p.mean.const_data_ptr() : nullptr;
  a.rstd = p.rstd.const_data_ptr();
  if (grad_h.has_value()) {
    p.gh2 = row_matrix(*grad_h, C);
    a.grad_h = p.gh2.data;
    a.gh_stride = p.gh2.ld;
  }
  a.grad_x = p.grad_x.mutable_data_ptr();
  a.grad_weight = weight_grad ? p.grad_w.mutable_data_ptr() : nullptr;
  a.grad_bias = bias_grad ? p.grad_b.mutable_data_ptr() : nullptr;
  return p;
}

}  // namespace layerpress
